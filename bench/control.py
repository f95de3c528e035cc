"""Control-plane benchmark: enable/disable the Nth namespace, N = 1..count, per backend.

One node holds a client pod and a server pod (HAProxy sidecars, nginx) plus ``count`` idle
pod namespaces. For each backend:

1. intercept client and server; measure request latency with a new connection per request
   and with keep-alive (wrk, a few short runs) — "1 managed namespace" (two, strictly);
2. enable the idle namespaces one at a time, timing each ``Manager.enable`` call; every
   ``cli_every``-th goes through the ``meshintercept`` CLI instead (a fresh interpreter,
   timed from fork to exit, like a CNI plugin or an operator would pay);
3. at ``count`` namespaces: kernel memory of our eBPF maps (bpftool ``bytes_memlock``),
   ``meshintercept status --json`` time, and the same latency runs again;
4. disable them one at a time, last first (the Nth disable leaves N-1), timed the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List

from bench import apps
from meshintercept.spec import InterceptSpec

CLI = os.path.join(os.path.dirname(sys.executable), "meshintercept")


def cli_argv(*args: str) -> List[str]:
    return [CLI, *args] if os.path.exists(CLI) else [sys.executable, "-m", "meshintercept", *args]


def run_cli(node, *args: str) -> float:
    """Wall-clock seconds of one CLI invocation against ``node``; raises on a non-zero exit."""
    env = dict(os.environ, **node.env())
    started = time.perf_counter()
    proc = subprocess.run(cli_argv(*args), env=env, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"meshintercept {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return took


def map_memory(pin_dir: str) -> Dict:
    """Our pinned eBPF maps with their kernel memory (bytes_memlock as bpftool reports it)."""
    maps = {}
    if not shutil.which("bpftool"):
        return {"error": "bpftool not installed"}
    for root, _dirs, files in os.walk(pin_dir):
        for name in files:
            path = os.path.join(root, name)
            proc = subprocess.run(["bpftool", "-j", "map", "show", "pinned", path], capture_output=True, text=True)
            if proc.returncode != 0:
                continue  # a pinned program or link
            info = json.loads(proc.stdout)
            maps[info["id"]] = {
                "name": info.get("name"), "type": info.get("type"), "max_entries": info.get("max_entries"),
                "bytes_key": info.get("bytes_key"), "bytes_value": info.get("bytes_value"),
                "bytes_memlock": info.get("bytes_memlock", 0), "pinned": os.path.relpath(path, pin_dir),
            }
    total = sum(m["bytes_memlock"] for m in maps.values())
    return {"maps": sorted(maps.values(), key=lambda m: -m["bytes_memlock"]), "total_bytes_memlock": total}


def program_stats(pin_dir: str) -> Dict[str, tuple]:
    """(run_cnt, run_time_ns) of each pinned program (counted while bpf_stats_enabled is on),
    read with BPF_OBJ_GET_INFO_BY_FD (no bpftool)."""
    from meshintercept.backends.ebpf import bpfsys
    from meshintercept.backends.ebpf.pins import PROGRAMS, NodePins

    out = {}
    with NodePins(pin_dir) as pins:
        for name in PROGRAMS:
            if pins.has("prog", name):
                info = bpfsys.prog_info(pins.prog(name))
                out[name] = (info["run_cnt"], info["run_time_ns"])
    return out


def map_entries(pin_dir: str) -> Dict[str, int]:
    """Entry count of each pinned map (to show what grows with the namespace count)."""
    out = {}
    for root, _dirs, files in os.walk(pin_dir):
        for name in files:
            path = os.path.join(root, name)
            proc = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", path], capture_output=True, text=True)
            if proc.returncode == 0:
                try:
                    out[os.path.relpath(path, pin_dir)] = len(json.loads(proc.stdout))
                except ValueError:
                    pass
    return out


class ControlBench:
    def __init__(self, cluster, count: int, cli_every: int, latency_seconds: float, latency_reps: int, log=print):
        self.cluster = cluster
        self.node = cluster.nodes[0]
        self.count = count
        self.cli_every = cli_every
        self.latency_seconds = latency_seconds
        self.latency_reps = latency_reps
        self.log = log

    def setup(self) -> None:
        self.client = self.cluster.add_pod(self.node, "cp-client")
        self.server = self.cluster.add_pod(self.node, "cp-server")
        apps.start_nginx(self.server)
        apps.start_haproxy(self.server)
        apps.start_haproxy(self.client)
        started = time.monotonic()
        self.idle = self.cluster.add_idle_namespaces(self.node, self.count)
        self.log(f"  {self.count} idle pod namespaces in {time.monotonic() - started:.1f} s")

    def latency(self) -> Dict:
        url = f"http://{self.server.ip}/"
        out = {"close": [], "keepalive": []}
        for _ in range(self.latency_reps):
            for test in ("close", "keepalive"):
                res = apps.run_wrk(self.client, url, self.latency_seconds, 16, close=test == "close")
                out[test].append({k: res.get(k) for k in ("rps", "p50_ms", "p99_ms", "errors", "requests")})
        return out

    def run_backend(self, mode: str, spec: InterceptSpec) -> Dict:
        mgr = self.node.manager()
        res: Dict = {"mode": mode, "enable": [], "disable": [], "errors": []}
        started = time.perf_counter()
        for pod in (self.client, self.server):
            mgr.enable(pod.path, mode, spec)
        res["first_enable_s"] = time.perf_counter() - started  # includes the node-wide load for ebpf
        try:
            res["latency_at_1"] = self.latency()
            if mode == "ebpf":
                res["maps_at_1"] = map_memory(self.node.node.pin_dir)
            cli_args = ["enable", "--mode", mode, "--netns"]
            for i, ns in enumerate(self.idle, start=1):
                via_cli = self.cli_every and i % self.cli_every == 0
                t0 = time.perf_counter()
                try:
                    if via_cli:
                        run_cli(self.node, *cli_args, ns)
                    else:
                        mgr.enable(ns, mode, spec)
                except Exception as exc:  # noqa: BLE001 - a benchmark records the failure and goes on
                    res["errors"].append(f"enable #{i} {ns}: {exc}")
                    self.log(f"  {mode}: enable #{i} failed: {exc}")
                    break
                res["enable"].append({"n": i + 2, "via": "cli" if via_cli else "api", "s": time.perf_counter() - t0})
                if i % 250 == 0:
                    self.log(f"  {mode}: {i} namespaces enabled")
            res["managed_at_peak"] = len(res["enable"]) + 2
            if mode == "ebpf":
                res["maps_at_peak"] = map_memory(self.node.node.pin_dir)
                res["map_entries_at_peak"] = map_entries(self.node.node.pin_dir)
            res["status_cli_at_peak_s"] = run_cli(self.node, "status", "--json")
            t0 = time.perf_counter()
            mgr.status()
            res["status_api_at_peak_s"] = time.perf_counter() - t0
            res["latency_at_peak"] = self.latency()
            enabled = self.idle[:len(res["enable"])]
            for i in range(len(enabled), 0, -1):
                ns = enabled[i - 1]
                via_cli = self.cli_every and i % self.cli_every == 0
                t0 = time.perf_counter()
                try:
                    if via_cli:
                        run_cli(self.node, "disable", "--netns", ns)
                    else:
                        mgr.disable(ns)
                except Exception as exc:  # noqa: BLE001 - a benchmark records the failure and goes on
                    res["errors"].append(f"disable #{i} {ns}: {exc}")
                    continue
                res["disable"].append({"n": i + 2, "via": "cli" if via_cli else "api", "s": time.perf_counter() - t0})
        finally:
            for pod in (self.client, self.server):
                try:
                    mgr.disable(pod.path)
                except Exception as exc:  # noqa: BLE001 - a benchmark records the failure and goes on
                    res["errors"].append(f"disable {pod.name}: {exc}")
            t0 = time.perf_counter()
            try:
                mgr.disable_all()
            except Exception as exc:  # noqa: BLE001 - a benchmark records the failure and goes on
                res["errors"].append(f"disable --all: {exc}")
            res["disable_all_s"] = time.perf_counter() - t0
        return res


#: The backends measured side by side, in this order, in one run.
MODES = ["iptables", "nftables", "ebpf"]


def run(cluster, count: int = 1000, cli_every: int = 100, latency_seconds: float = 2, latency_reps: int = 3,
        modes=tuple(MODES), log=print) -> Dict:
    bench = ControlBench(cluster, count, cli_every, latency_seconds, latency_reps, log=log)
    bench.setup()
    out = {"count": count, "cli_every": cli_every, "latency_seconds": latency_seconds, "backends": {},
           "unavailable": {}}
    for mode in modes:
        log(f"  control plane: {mode}")
        try:
            out["backends"][mode] = bench.run_backend(mode, InterceptSpec())
        except Exception as exc:  # noqa: BLE001 - a benchmark records the failure and goes on
            out["unavailable"][mode] = f"{type(exc).__name__}: {exc}"
            log(f"  {mode}: unavailable: {exc}")
            try:
                bench.node.manager().disable_all()
            except Exception:  # noqa: BLE001 - best effort; the cluster's close removes the rest
                pass
    return out
