"""Prometheus metrics of a node: what `meshintercept metrics` prints and the agent serves.

Everything is read at scrape time from where it already lives (the records, the backends'
live counters, the CNI invocation log), so the agent keeps no state and a restart loses no
counts. The exposition format comes from prometheus_client, not from hand-written text.

| metric | labels | from |
|---|---|---|
| meshintercept_namespaces | mode | the node's records |
| meshintercept_namespace_families | namespace, mode, family | captured families (status) |
| meshintercept_<mode>_<counter>_total | namespace | the backend's live counters (eBPF maps, nat/nft rule counters) |
| meshintercept_cni_invocations_total | command, result | the CNI invocation log |
| meshintercept_cni_duration_seconds (histogram) | command | the CNI invocation log |
| backend metrics (e.g. meshintercept_ebpf_programs_loaded_timestamp_seconds) | | `Interceptor.metrics()` |
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional

from meshintercept.interceptor import Metric

#: CNI durations are tens of milliseconds; the buckets stretch to the runtime's patience.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text).lower()


def _flatten(prefix: str, value, out: Dict[str, float]) -> None:
    """Counters as the backends report them (flat, or nested by direction) to metric suffixes."""
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}_{key}" if prefix else str(key), sub, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = value


def gather(manager, cni_log: Optional[str] = None) -> List[Metric]:
    """Every metric of the node as plain samples (backends' counters read live)."""
    from meshintercept.cni.invocation_log import read

    status = manager.status()
    records = {r.name: r for r in manager.records()}
    out: List[Metric] = []
    per_mode: Dict[str, int] = {}
    for item in status["namespaces"]:
        mode, name = item["mode"], item["namespace"]
        per_mode[mode] = per_mode.get(mode, 0) + 1
        live = item.get("live") or {}
        if live.get("checked") == "recorded" and item["present"] and name in records:
            live = manager.inspect(records[name], manager.live_netns(records[name]))
        counters: Dict[str, float] = {}
        _flatten("", live.get("counters") or {}, counters)
        for counter, value in sorted(counters.items()):
            out.append(Metric(f"meshintercept_{_name(mode)}_{_name(counter)}", "counter",
                              f"{mode} interception counter {counter} of a namespace", {"namespace": name}, value))
        for family, state in sorted((live.get("families") or {}).items()):
            out.append(Metric("meshintercept_namespace_families", "gauge",
                              "1 where the family is intercepted in the namespace, else 0",
                              {"namespace": name, "mode": mode, "family": family}, float(state == "captured")))
    for mode, count in sorted(per_mode.items()):
        out.append(Metric("meshintercept_namespaces", "gauge", "intercepted namespaces on this node",
                          {"mode": mode}, count))
    for mode in sorted(per_mode):
        out.extend(manager.backend(mode).metrics([r for r in records.values() if r.mode == mode]))
    if cni_log:
        out.extend(_cni_metrics(read(cni_log)))
    return out


def _cni_metrics(entries: Iterable[dict]) -> List[Metric]:
    counts: Dict[tuple, int] = {}
    durations: Dict[str, List[float]] = {}
    for e in entries:
        command, result = str(e.get("command", "?")), str(e.get("result", "?"))
        counts[(command, result)] = counts.get((command, result), 0) + 1
        if isinstance(e.get("duration_ms"), (int, float)):
            durations.setdefault(command, []).append(e["duration_ms"] / 1000)
    out = [Metric("meshintercept_cni_invocations", "counter", "CNI plugin invocations by command and result",
                  {"command": c, "result": r}, n) for (c, r), n in sorted(counts.items())]
    for command, values in sorted(durations.items()):
        out.append(Metric("meshintercept_cni_duration_seconds", "histogram", "CNI plugin invocation duration",
                          {"command": command}, values))
    return out


def registry_of(samples: List[Metric]):
    """A prometheus_client registry holding these samples (one family per metric name)."""
    from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)

    families: Dict[str, object] = {}
    for s in samples:
        labels = sorted(s.labels)
        family = families.get(s.name)
        if family is None:
            cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                   "histogram": HistogramMetricFamily}[s.kind]
            family = families[s.name] = cls(s.name, s.help, labels=labels)
        values = [s.labels[k] for k in labels]
        if s.kind == "histogram":
            buckets = [(str(b), sum(1 for v in s.value if v <= b)) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", len(s.value)))
            family.add_metric(values, buckets, sum(s.value))
        else:
            family.add_metric(values, s.value)

    class Snapshot:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return registry


def exposition(manager, cni_log: Optional[str] = None) -> bytes:
    """The node's metrics in Prometheus text exposition format."""
    from prometheus_client import generate_latest

    return generate_latest(registry_of(gather(manager, cni_log)))


def serve(manager_factory, address: str, cni_log: Optional[str] = None) -> None:
    """Serve /metrics on ``address`` ("[host]:port") until interrupted; each scrape reads afresh."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = exposition(manager_factory(), cni_log)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):  # scrapes every few seconds: not worth a log line each
            pass

    server_cls = ThreadingHTTPServer
    if ":" in host:
        import socket

        class Server6(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        server_cls = Server6
    with server_cls((host, int(port)), Handler) as httpd:
        httpd.serve_forever()
