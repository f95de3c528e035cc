"""Where the benchmarks run: the project's test cluster, seen through a thin adapter.

``meshintercept.lab.cluster.TestCluster`` builds nodes (a namespace with a bridge, a child
cgroup, a pin dir, a state dir) and pods (a namespace with eth0 on the node's bridge,
10.231.<node>.<k>/24); two nodes are joined by a veth underlay, so cross-node traffic really
crosses one. This module adds what only benchmarks need: a pod work dir for config files,
the node cgroup's CPU counter, the environment that points the CLI at a node, and hundreds
of cheap idle pod namespaces for the control-plane run.

Safety: names carry the prefix plus the cluster's random id (so the cluster's own ``sweep``
finds leftovers), addresses come from 10.231.0.0/16, nothing is routed out, ``close()``
removes everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import List, Optional

from meshintercept.lab import cluster as tc
from meshintercept.netns import setns_path

PREFIX = tc.BENCH_PREFIX


class BenchNode:
    def __init__(self, cnode: "tc.ClusterNode"):
        self.cnode = cnode
        self.node = cnode.node  # meshintercept.node.Node
        self.name = cnode.name
        self.cgroup = cnode.cgroup_path

    def cpu_usec(self) -> int:
        """CPU time of every process of this node's pods (cgroup-v2 cpu.stat, always present)."""
        with open(os.path.join(self.cgroup, "cpu.stat")) as f:
            for line in f:
                key, value = line.split()
                if key == "usage_usec":
                    return int(value)
        return 0

    def env(self) -> dict:
        """Environment that points the meshintercept CLI at this node."""
        return {
            "MESHINTERCEPT_CGROUP": self.node.cgroup,
            "MESHINTERCEPT_PIN_DIR": self.node.pin_dir,
            "MESHINTERCEPT_STATE_DIR": self.node.state_dir,
        }

    def manager(self):
        return self.cnode.manager()


class BenchPod:
    def __init__(self, node: BenchNode, pod: "tc.Pod", workdir: str):
        self.node = node
        self.pod = pod
        self.name = pod.name
        self.netns = pod.netns.name
        self.path = pod.netns.path
        self.ip = pod.ip
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        os.chmod(workdir, 0o755)

    def spawn(self, argv, uid: Optional[int] = None, **popen) -> subprocess.Popen:
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.DEVNULL)
        return self.pod.spawn(argv, uid=uid, **popen)

    def run(self, argv, timeout: float = 120, uid: Optional[int] = None) -> subprocess.CompletedProcess:
        try:
            return self.pod.run(argv, uid=uid, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{argv[0]} in {self.netns} timed out after {timeout}s") from exc


def kill_group(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """Stop a process we started (it leads its own session), TERM first, then KILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def sh(*argv: str, check: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, input=input)


class BenchCluster:
    def __init__(self, nodes: int = 2, prefix: str = PREFIX):
        self.tc = tc.TestCluster(nodes=nodes, prefix=prefix)
        self.id = self.tc.id
        self.nodes = [BenchNode(n) for n in self.tc.nodes]
        self.pods: List[BenchPod] = []
        self.idle: List[str] = []

    def add_pod(self, node: BenchNode, name: str) -> BenchPod:
        pod = self.tc.add_pod(node.cnode, name)
        bp = BenchPod(node, pod, os.path.join(self.tc.workdir, name))
        # A new connection per request opens tens of thousands of connections in seconds.
        tc.sysctl(bp.path, {"net.ipv4.ip_local_port_range": "1024 65000", "net.ipv4.tcp_tw_reuse": "1"})
        self.pods.append(bp)
        return bp

    def remove_pod(self, pod: BenchPod) -> None:
        self.tc.remove_pod(pod.pod)
        self.pods.remove(pod)

    def add_idle_namespaces(self, node: BenchNode, count: int) -> List[str]:
        """``count`` pod-like namespaces (lo, eth0 with an address, peer left unbridged in the node).

        They carry no traffic: they are the other pods of a loaded node in the control-plane
        run. Two ``ip -batch`` calls make 1,000 in seconds (add_pod takes ~50 ms each and a
        node's /24 holds 253). Names carry the cluster id, so its close() and sweep remove them.
        """
        base = len(self.idle)
        names = [f"{self.id}-idle{base + i}" for i in range(count)]
        self.tc.adopt_netns(names)  # registered before creation: a crash still gets swept
        sh("ip", "-batch", "-", input="".join(f"netns add {n}\n" for n in names))
        self.idle.extend(names)
        links, addrs = [], []
        for i, n in enumerate(names):
            k = base + i
            links.append(f"link add i{k} type veth peer name eth0 netns {n}")
            addrs.append((os.path.join(tc.NETNS_RUN_DIR, n), f"10.231.{100 + k // 250}.{k % 250 + 2}"))
        sh("ip", "-n", node.cnode.netns.name, "-batch", "-", input="\n".join(links) + "\n")
        tc.run_forked(_configure_idle, addrs)
        return names

    def delete_idle(self) -> None:
        if self.idle:
            self.tc.delete_netns(self.idle)
            self.idle.clear()

    def close(self) -> None:
        try:
            teardown_nodes(self.nodes)
            self.delete_idle()
        finally:
            self.tc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _configure_idle(addrs) -> None:
    """In a forked child: visit each namespace once and bring lo and eth0 up with an address."""
    from pyroute2 import IPRoute

    for path, addr in addrs:
        setns_path(path)
        with IPRoute() as ipr:
            for ifname in ("lo", "eth0"):
                index = ipr.link_lookup(ifname=ifname)[0]
                if ifname == "eth0":
                    ipr.addr("add", index=index, address=addr, prefixlen=24)
                ipr.link("set", index=index, state="up")


def teardown_nodes(nodes) -> None:
    """disable --all on every node where something was enabled (detaches programs, unpins)."""
    for node in nodes:
        state = node.node.state_dir
        if not (os.path.isdir(state) and os.listdir(state)) and not _has_pins(node.node.pin_dir):
            continue
        try:
            node.manager().disable_all()
        except Exception as exc:  # noqa: BLE001 - keep cleaning; the cluster's close removes pins and cgroups
            print(f"bench: disable --all on {node.name}: {exc}")


def _has_pins(path: str) -> bool:
    try:
        return bool(os.listdir(path))
    except OSError:
        return False


def sweep(prefix: str = PREFIX) -> List[str]:
    """Remove leftovers of dead benchmark runs (the cluster's own sweep, our prefix)."""
    removed = tc.sweep(prefix)
    for root in ("/tmp",):
        for entry in os.listdir(root):
            if entry.startswith(prefix + "-bench-"):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
                removed.append(os.path.join(root, entry))
    return removed
