"""Data-path benchmark: wrk -> client sidecar -> server sidecar -> nginx, per interception mode.

Every mode gets its own pods, set up once and kept for the whole run, so the modes can be
interleaved test by test (the five runs of one test follow each other within seconds, and
the order rotates every round): machine load drifting during the run hits all modes alike.

Node pairs (a pair = node A with the client and the same-node server, node B with the
cross-node server; B is reached over the cluster's underlay):

  plain  direct, explicit, iptables and nftables pods: no eBPF program is attached to these nodes
  ebpf   ebpf pods;  accel  ebpf --accelerate pods (each pair has its own programs and maps)

Every pod set is fresh (an iptables pod keeps its nat table, and conntrack with it, after
interception is off, so no two modes share a namespace, except direct/explicit, which never
intercept). Every server pod runs nginx and an HAProxy sidecar; the client pod runs wrk and
its own HAProxy. Both HAProxies run as the proxy UID (1500).

Modes:
  direct      wrk -> nginx, no sidecar on the path (the physical reference)
  explicit    wrk -> 127.0.0.1:1501x (client sidecar) -> server:15013 (server sidecar) -> nginx;
              same proxies and hops as an intercepted mode, but no interception: the floor
  iptables    wrk -> server:80, REDIRECTed to 15001, the sidecar connects to server:80,
              REDIRECTed to 15003 in the server pod (SO_ORIGINAL_DST from conntrack)
  nftables    the same path, redirected by the nftables mode's inet table instead
  ebpf        same path: outbound rewritten by connect4, inbound steered by sk_lookup (the default
              inbound path; SO_ORIGINAL_DST from our program)
  ebpf-tc     ebpf with --inbound-path tc (the seed's tc port rewrite on the pod interfaces)
  ebpf-accel  ebpf with --accelerate (sockmap redirect between local sockets)

Tests, each a bounded wrk run (one thread, ``connections`` connections, ``seconds`` long):
  keepalive   1 KiB page over persistent connections: requests/s, p50/p99 latency
  close       the same with ``Connection: close``: a new connection (on every hop) per request
  bulk        one connection fetching a 64 MiB file again and again: bytes/s of one stream
CPU per request is the growth of the pair's node cgroups' usage_usec (every process of the
pods: wrk, both sidecars, nginx) over the run, divided by the requests served.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List

from bench import apps
from meshintercept.spec import InterceptSpec

MODES = ["direct", "explicit", "iptables", "nftables", "ebpf", "ebpf-tc", "ebpf-accel"]
PLACEMENTS = ["same-node", "cross-node"]
TESTS = ["keepalive", "close", "bulk"]
BACKEND = {"iptables": ("iptables", {}), "nftables": ("nftables", {}), "ebpf": ("ebpf", {}),
           "ebpf-tc": ("ebpf", {"inbound_path": "tc", "families": ["ipv4"]}), "ebpf-accel": ("ebpf", {"accelerate": True})}
EXPLICIT_PORT = {"same-node": apps.EXPLICIT_OUT, "cross-node": apps.EXPLICIT_OUT + 1}
#: node pair of each mode, and the pod set it uses (direct and explicit share one)
PAIR = {"direct": 0, "explicit": 0, "iptables": 0, "nftables": 0, "ebpf": 1, "ebpf-accel": 2, "ebpf-tc": 3}
POD_SET = {"direct": "plain", "explicit": "plain", "iptables": "ipt", "nftables": "nft", "ebpf": "ebpf",
           "ebpf-accel": "accel", "ebpf-tc": "ebpftc"}
NODES = 8


class ModeUnavailable(Exception):
    pass


class bpf_stats:
    """Turn on kernel.bpf_stats_enabled (run_cnt/run_time_ns per program) and restore it."""

    PATH = "/proc/sys/kernel/bpf_stats_enabled"

    def __enter__(self):
        with open(self.PATH) as f:
            self.old = f.read().strip()
        with open(self.PATH, "w") as f:
            f.write("1")

    def __exit__(self, *exc):
        with open(self.PATH, "w") as f:
            f.write(self.old)


class PodSet:
    """One mode's client and servers."""

    def __init__(self, name: str, client, servers: Dict[str, object], nodes):
        self.name = name
        self.client = client
        self.servers = servers
        self.nodes = nodes

    def pods(self):
        return [self.client, *self.servers.values()]

    def cpu_usec(self) -> int:
        return sum(n.cpu_usec() for n in self.nodes)


class DataPathBench:
    def __init__(self, cluster, seconds: float = 3, connections: int = 16, log=print):
        self.cluster = cluster
        self.seconds = seconds
        self.connections = connections
        self.log = log
        self.samples: List[dict] = []
        self.events: List[dict] = []
        self.sets: Dict[str, PodSet] = {}

    # --- topology --------------------------------------------------------------------------
    def setup(self, modes: List[str]) -> None:
        self.site = apps.make_site(os.path.join(self.cluster.tc.workdir, "www"))
        for mode in modes:
            name = POD_SET[mode]
            if name not in self.sets:
                self.sets[name] = self._make_set(name, PAIR[mode])

    def _make_set(self, name: str, pair: int) -> PodSet:
        a, b = self.cluster.nodes[2 * pair], self.cluster.nodes[2 * pair + 1]
        client = self.cluster.add_pod(a, f"{name}-client")
        servers = {"same-node": self.cluster.add_pod(a, f"{name}-server-same"),
                   "cross-node": self.cluster.add_pod(b, f"{name}-server-cross")}
        for pod in servers.values():
            apps.start_nginx(pod, self.site)
            apps.start_haproxy(pod)
        apps.start_haproxy(client, {EXPLICIT_PORT[p]: s.ip for p, s in servers.items()})
        return PodSet(name, client, servers, [a, b])

    def pods_of(self, mode: str) -> PodSet:
        return self.sets[POD_SET[mode]]

    # --- modes ------------------------------------------------------------------------------
    def apply(self, mode: str) -> float:
        """Turn ``mode`` on for its pods; returns seconds taken (includes the eBPF load)."""
        if mode not in BACKEND:
            return 0.0
        backend, extra = BACKEND[mode]
        spec = InterceptSpec.build(**extra) if extra else InterceptSpec()
        started = time.monotonic()
        try:
            for pod in self.pods_of(mode).pods():
                pod.node.manager().enable(pod.path, backend, spec)
        except Exception as exc:
            self.clear(mode)
            raise ModeUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return time.monotonic() - started

    def clear(self, mode: str) -> None:
        if mode not in BACKEND:
            return
        for pod in self.pods_of(mode).pods():
            try:
                pod.node.manager().disable(pod.path)
            except Exception as exc:  # noqa: BLE001 - a benchmark records the failure and goes on
                self.log(f"  disable {pod.name}: {exc}")

    def netfilter_state(self, mode: str) -> Dict[str, str]:
        """iptables and nft tables present in each pod: a table hooks every packet of its namespace."""
        out = {}
        for pod in self.pods_of(mode).pods():
            res = pod.run(["cat", "/proc/net/ip_tables_names"], timeout=10)
            nft = pod.run(["nft", "list", "tables"], timeout=10).stdout.split("\n")
            names = sorted(res.stdout.split()) + [f"nft {t[6:]}" for t in nft if t.startswith("table ")]
            out[pod.name] = ",".join(names) or "none"
        return out

    def url(self, mode: str, placement: str, path: str = "/") -> str:
        if mode == "explicit":
            return f"http://127.0.0.1:{EXPLICIT_PORT[placement]}{path}"
        return f"http://{self.pods_of(mode).servers[placement].ip}{path}"

    def verify(self, mode: str, placement: str) -> None:
        """One request, then prove it took the path the mode claims (sidecar stats, peer address)."""
        ps = self.pods_of(mode)
        client, server = ps.client, ps.servers[placement]
        before = (apps.haproxy_sessions(client), apps.haproxy_sessions(server))
        res = client.run(["curl", "-sS", "--max-time", "5", self.url(mode, placement, "/whoami")], timeout=15)
        after = (apps.haproxy_sessions(client), apps.haproxy_sessions(server))
        if res.returncode != 0:
            raise ModeUnavailable(f"request failed: {res.stderr.strip()}")
        seen = res.stdout.strip()
        delta_c = {k: after[0].get(k, 0) - before[0].get(k, 0) for k in after[0]}
        delta_s = {k: after[1].get(k, 0) - before[1].get(k, 0) for k in after[1]}
        if mode == "direct":
            ok = seen == client.ip and not any(delta_c.values()) and not any(delta_s.values())
        elif mode == "explicit":
            ok = seen == "127.0.0.1" and delta_c.get(f"explicit_out_{EXPLICIT_PORT[placement]}") == 1 \
                and delta_s.get("explicit_in") == 1
        else:
            ok = seen == "127.0.0.1" and delta_c.get("outbound") == 1 and delta_s.get("inbound") == 1
        if not ok:
            raise ModeUnavailable(
                f"the request did not take the {mode} path: server saw {seen!r}, "
                f"client sidecar sessions {delta_c}, server sidecar sessions {delta_s}"
            )

    # --- tests ------------------------------------------------------------------------------
    def measure(self, mode: str, placement: str, test: str) -> dict:
        if test == "bulk":
            url, conns, close = self.url(mode, placement, "/big"), 1, False
        else:
            url, conns, close = self.url(mode, placement), self.connections, test == "close"
        ps = self.pods_of(mode)
        load1 = float(open("/proc/loadavg").read().split()[0])
        cpu0 = ps.cpu_usec()
        res = apps.run_wrk(ps.client, url, self.seconds, conns, close=close)
        cpu = ps.cpu_usec() - cpu0
        res["load1"] = load1
        res["cpu_s"] = cpu / 1e6
        res["cpu_us_per_req"] = cpu / res["requests"]
        if test == "bulk":
            res["cpu_s_per_gib"] = (cpu / 1e6) / max(res["requests"] * apps.BIG_BYTES / (1 << 30), 1e-9)
        return res

    def profile_programs(self, mode: str, placements: List[str]) -> Dict:
        """One extra pass with kernel.bpf_stats_enabled: runs and ns per request of each program.

        Kept out of the measured rounds because the statistics add a little to every run.
        """
        from bench.control import program_stats

        out: Dict = {}
        nodes = self.pods_of(mode).nodes
        with bpf_stats():
            for placement in placements:
                for test in ("keepalive", "close"):
                    before = {n.name: program_stats(n.node.pin_dir) for n in nodes}
                    res = self.measure(mode, placement, test)
                    after = {n.name: program_stats(n.node.pin_dir) for n in nodes}
                    rows = []
                    for node, progs in after.items():
                        for name, (cnt, ns) in sorted(progs.items()):
                            c0, n0 = before[node].get(name, (0, 0))
                            if cnt > c0:
                                rows.append({"node": node, "program": name,
                                             "runs_per_req": (cnt - c0) / res["requests"],
                                             "ns_per_run": (ns - n0) / (cnt - c0),
                                             "us_per_req": (ns - n0) / 1000 / res["requests"]})
                    out[f"{placement}/{test}"] = {"rps": res["rps"], "cpu_us_per_req": res["cpu_us_per_req"],
                                                  "programs": rows}
        return out

    def run(self, rounds: int, modes: List[str] = MODES, placements: List[str] = PLACEMENTS) -> Dict:
        unavailable: Dict[str, str] = {}
        active = []
        for mode in modes:
            try:
                took = self.apply(mode)
                for placement in placements:
                    self.verify(mode, placement)
            except ModeUnavailable as exc:
                unavailable[mode] = str(exc)
                self.log(f"  {mode}: unavailable: {exc}")
                self.clear(mode)
                continue
            self.events.append({"mode": mode, "enable_pods_s": took, "netfilter": self.netfilter_state(mode)})
            active.append(mode)
        for rnd in range(rounds):
            # The order rotates every round: no mode always runs right after the same one.
            order = active[rnd % len(active):] + active[:rnd % len(active)] if active else []
            for placement in placements:
                for test in TESTS:
                    for mode in order:
                        res = self.measure(mode, placement, test)
                        res.update(round=rnd, mode=mode, placement=placement, test=test)
                        self.samples.append(res)
                        self.log(f"  r{rnd} {mode:10} {placement:10} {test:9} "
                                 + (f"{res['bytes_per_s'] / 1e6:9.0f} MB/s" if test == "bulk"
                                    else f"{res['rps']:9.0f} req/s p50 {res.get('p50_ms', 0):.3f} ms "
                                         f"p99 {res.get('p99_ms', 0):.3f} ms")
                                 + f"  cpu {res['cpu_us_per_req']:.1f} us/req err {res['errors']}  "
                                   f"load {res['load1']:.1f}")
        profiles = {}
        for mode in ("ebpf", "ebpf-tc", "ebpf-accel"):
            if mode in active:
                self.log(f"  {mode}: per-program profile (bpf_stats)")
                try:
                    profiles[mode] = self.profile_programs(mode, placements)
                except Exception as exc:  # noqa: BLE001 - the measured rounds must not be lost to it
                    profiles[mode] = {"error": f"{type(exc).__name__}: {exc}"}
        for mode in active:
            self.clear(mode)
        return {
            "program_profile": profiles,
            "seconds": self.seconds, "connections": self.connections, "rounds": rounds,
            "modes": modes, "placements": placements, "tests": TESTS,
            "samples": self.samples, "unavailable": unavailable, "events": self.events,
            "layout": {name: {"client": ps.client.ip, "nodes": [n.name for n in ps.nodes],
                              **{p: s.ip for p, s in ps.servers.items()}} for name, ps in self.sets.items()},
        }


def run(cluster, rounds: int, seconds: float, connections: int = 16, modes=MODES, placements=PLACEMENTS,
        log=print) -> Dict:
    bench = DataPathBench(cluster, seconds=seconds, connections=connections, log=log)
    bench.setup(modes)
    return bench.run(rounds, modes=modes, placements=placements)
