"""Where the benchmarks run: simulated nodes and pods, made of namespaces and child cgroups.

The project's test cluster (``meshintercept.testing.cluster``) is used when it is installed;
otherwise this module builds the same shape itself: one hub namespace holding a bridge, pods
as network namespaces with a veth on it (10.231.77.0/24), and nodes as (child cgroup, pin
dir, state dir). The harness only uses what both provide: ``node.node`` (a
``meshintercept.node.Node``), ``pod.netns`` / ``pod.path`` / ``pod.ip`` / ``pod.spawn()`` and
``pod.node``.

Safety: every object carries the prefix plus a random suffix, addresses come from
10.231.0.0/16, nothing is routed out, and ``close()`` / ``sweep()`` remove all of it.
"""

from __future__ import annotations

import ctypes
import os
import resource
import secrets
import shutil
import signal
import subprocess
import time
from typing import List, Optional

from meshintercept.node import Node

CGROUP2 = "/sys/fs/cgroup/unified" if os.path.ismount("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"
BPFFS = "/sys/fs/bpf"
STATE_ROOT = "/run/meshintercept"
NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def sh(*argv: str, check: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, input=input)


def _enter(cgroup: Optional[str], netns_path: Optional[str], uid: Optional[int]):
    """preexec_fn: join the cgroup first (``ip netns exec`` would remount /sys), then the netns."""

    def pre():
        os.setsid()
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write("0")
        if netns_path:
            fd = os.open(netns_path, os.O_RDONLY)
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                os._exit(121)
            os.close(fd)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return pre


class BenchNode:
    """A simulated node: where its pods' processes live and where its eBPF objects are pinned."""

    def __init__(self, name: str):
        self.name = name
        self.cgroup = os.path.join(CGROUP2, name)
        os.makedirs(self.cgroup, exist_ok=True)
        self.pin_dir = os.path.join(BPFFS, name)
        self.node = Node(cgroup=self.cgroup, pin_dir=self.pin_dir, state_dir=os.path.join(STATE_ROOT, name))

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


class BenchPod:
    def __init__(self, node: BenchNode, netns: str, ip: str, workdir: str):
        self.node = node
        self.netns = netns
        self.path = os.path.join(NETNS_DIR, netns)
        self.ip = ip
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        os.chmod(workdir, 0o755)
        self.procs: List[subprocess.Popen] = []

    def spawn(self, argv, uid: Optional[int] = None, **popen) -> subprocess.Popen:
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, preexec_fn=_enter(self.node.cgroup, self.path, uid), **popen)
        self.procs.append(proc)
        return proc

    def run(self, argv, timeout: float = 120, uid: Optional[int] = None) -> subprocess.CompletedProcess:
        proc = self.spawn(argv, uid=uid, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            raise RuntimeError(f"{argv[0]} in {self.netns} timed out after {timeout}s: {err.strip()[-300:]}")
        finally:
            if proc in self.procs:
                self.procs.remove(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def stop_all(self) -> None:
        for proc in self.procs:
            kill_group(proc)
        self.procs.clear()


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


class OwnCluster:
    """Nodes and pods on one bridge in a hub namespace; pods get 10.231.77.<n>/24."""

    SUBNET = "10.231.77"

    def __init__(self, nodes: int = 2, prefix: str = "mi-b"):
        self.id = f"{prefix}-{secrets.token_hex(3)}"
        self.hub = f"{self.id}-hub"
        self.workdir = f"/tmp/{self.id}"
        self.nodes: List[BenchNode] = []
        self.pods: List[BenchPod] = []
        self.extra_netns: List[str] = []
        self._next_ip = 2
        self._links = 0
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        try:
            sh("ip", "netns", "add", self.hub)
            sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            sh("ip", "-n", self.hub, "link", "set", "lo", "up")
            for i in range(nodes):
                self.nodes.append(BenchNode(f"{self.id}-n{i}"))
        except BaseException:
            self.close()
            raise

    def add_pod(self, node: BenchNode, name: str) -> BenchPod:
        netns = f"{self.id}-{name}"
        ip = f"{self.SUBNET}.{self._next_ip}"
        self._next_ip += 1
        self._links += 1
        host_if = f"v{self._links}"
        sh("ip", "netns", "add", netns)
        pod = BenchPod(node, netns, ip, os.path.join(self.workdir, name))
        self.pods.append(pod)
        script = "\n".join([
            f"link add {host_if} netns {self.hub} type veth peer name eth0 netns {netns}",
        ])
        sh("ip", "-batch", "-", input=script + "\n")
        sh("ip", "-n", self.hub, "link", "set", host_if, "master", "br0", "up")
        for cmd in (
            ("link", "set", "lo", "up"),
            ("addr", "add", f"{ip}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
        ):
            sh("ip", "-n", netns, *cmd)
        # Connection-per-request runs open tens of thousands of connections in seconds.
        for key, value in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")):
            sh("ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"{key}={value}")
        return pod

    def add_idle_namespaces(self, count: int, tag: str = "idle") -> List[str]:
        """``count`` pod-like namespaces (lo + eth0 with an address, peer left in the hub, unbridged).

        They carry no traffic: they are the 'other pods' of a loaded node for the control-plane run.
        Built with two ``ip -batch`` calls so 1,000 take seconds, not minutes.
        """
        base = len(self.extra_netns)
        names = [f"{self.id}-{tag}{base + i}" for i in range(count)]
        add = "".join(f"netns add {n}\n" for n in names)
        sh("ip", "-batch", "-", input=add)
        self.extra_netns.extend(names)
        links = []
        for i, n in enumerate(names):
            k = base + i
            ip = f"10.231.{100 + k // 250}.{k % 250 + 2}"
            links.append(f"link add i{k} netns {self.hub} type veth peer name eth0 netns {n}")
            links.append(f"-n {n} link set lo up")
            links.append(f"-n {n} addr add {ip}/16 dev eth0")
            links.append(f"-n {n} link set eth0 up")
        sh("ip", "-force", "-batch", "-", input="\n".join(links) + "\n")
        return names

    def delete_namespaces(self, names: List[str]) -> None:
        if names:
            sh("ip", "-force", "-batch", "-", input="".join(f"netns del {n}\n" for n in names), check=False)
        self.extra_netns = [n for n in self.extra_netns if n not in set(names)]

    def close(self) -> None:
        for pod in self.pods:
            pod.stop_all()
        teardown_nodes(self.nodes)
        self.delete_namespaces(list(self.extra_netns))
        for pod in self.pods:
            sh("ip", "netns", "del", pod.netns, check=False)
        self.pods.clear()
        sh("ip", "netns", "del", self.hub, check=False)
        for node in self.nodes:
            remove_cgroup(node.cgroup)
        shutil.rmtree(self.workdir, ignore_errors=True)


def teardown_nodes(nodes) -> None:
    """disable --all on every node, then remove whatever pins or records remain."""
    from meshintercept.manager import Manager

    for node in nodes:
        if not (os.path.exists(node.node.pin_dir) or os.path.exists(node.node.state_dir)):
            continue  # nothing was ever enabled on this node
        try:
            Manager(node.node).disable_all()
        except Exception as exc:  # keep cleaning; the sweep below removes the rest
            print(f"bench: disable_all on {node.name}: {exc}")
        shutil.rmtree(node.node.pin_dir, ignore_errors=True)
        shutil.rmtree(node.node.state_dir, ignore_errors=True)


def remove_cgroup(path: str) -> None:
    for _ in range(50):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)
    print(f"bench: could not remove cgroup {path}")


def sweep(prefix: str = "mi-b") -> List[str]:
    """Remove every leftover of earlier runs with this prefix: processes, namespaces, cgroups, pins."""
    removed = []
    stem = prefix + "-"
    for entry in sorted(os.listdir(CGROUP2)):
        if entry.startswith(stem) and os.path.isdir(os.path.join(CGROUP2, entry)):
            node = BenchNode.__new__(BenchNode)
            node.name, node.cgroup, node.pin_dir = entry, os.path.join(CGROUP2, entry), os.path.join(BPFFS, entry)
            node.node = Node(cgroup=node.cgroup, pin_dir=node.pin_dir, state_dir=os.path.join(STATE_ROOT, entry))
            teardown_nodes([node])
            remove_cgroup(node.cgroup)
            removed.append(node.cgroup)
    try:
        names = [n for n in os.listdir(NETNS_DIR) if n.startswith(stem)]
    except FileNotFoundError:
        names = []
    if names:
        sh("ip", "-force", "-batch", "-", input="".join(f"netns del {n}\n" for n in names), check=False)
        removed.extend(names)
    for root in (BPFFS, STATE_ROOT, "/tmp"):
        try:
            entries = os.listdir(root)
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.startswith(stem):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
                removed.append(os.path.join(root, entry))
    return removed


def make_cluster(nodes: int = 2, prefix: str = "mi-b", kind: str = "own"):
    """The topology the harness runs on. ``kind='project'`` uses meshintercept.testing.cluster."""
    if kind == "project":
        from bench.project_cluster import ProjectCluster

        return ProjectCluster(nodes=nodes, prefix=prefix)
    return OwnCluster(nodes=nodes, prefix=prefix)
