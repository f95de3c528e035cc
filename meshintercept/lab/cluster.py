"""A small Kubernetes-like cluster on one machine, made of real kernel objects.

    with TestCluster(nodes=2) as cluster:
        client = cluster.add_pod(cluster.nodes[0], "client")
        server = cluster.add_pod(cluster.nodes[1], "server")
        server.start_server(8080)
        print(client.connect(server.ip, 8080).greeting())

Layout (n = node index + 1, all inside namespaces this module creates; nothing is linked
to the machine's root namespace, so no packet can leave the cluster):

* node n: a namespace ``<id>-node<n>`` with bridge ``br0`` = 10.231.n.1/24 and
  fd00:231:n::1/64 (the pods' gateway), forwarding on, and an underlay address 10.231.0.n/24
  and fd00:231::n/64 on ``ul0``: a veth pair between the two nodes, or a veth to a bridge in
  ``<id>-underlay`` for 3+ nodes. Plain routes join the pod networks; no NAT.
* pod: a namespace ``<id>-<name>`` with ``eth0`` (veth to the node's bridge), dual-stack by
  default: 10.231.n.k/24 (``pod.ip``) and fd00:231:n::k/64 (``pod.ip6``, no DAD, no router
  advertisements) with default routes via the gateway. ``families=("ipv4",)`` makes a pod
  with IPv6 disabled in its namespace, ``("ipv6",)`` one with no IPv4 address.
* each node also has a child cgroup ``<cgroup2 root>/<id>-node<n>`` (every process started
  in its pods is moved there *before* it enters the pod namespace), a pin dir
  ``/sys/fs/bpf/<id>-node<n>`` and a state dir ``/run/meshintercept/<id>-node<n>``: its
  `meshintercept.node.Node`.

``<id>`` is ``<prefix>-<6 hex>``; the prefix comes from the constructor, else
``$MESHINTERCEPT_TEST_PREFIX``, else ``mi-t``. A registry file in
/run/meshintercept-testing names the owner process, so `sweep` removes leftovers of dead
runs without touching a live cluster of another process with the same prefix.

    python -m meshintercept.lab.cluster sweep [--prefix mi-t] [--force]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import ipaddress
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from meshintercept.netns import NETNS_RUN_DIR, Netns, run_forked, setns_path
from meshintercept.node import STATE_ROOT, Node, default_cgroup, mounts
from meshintercept.spec import InterceptSpec
from meshintercept.lab import pace

ENV_PREFIX = "MESHINTERCEPT_TEST_PREFIX"
DEFAULT_PREFIX = "mi-t"
DEMO_PREFIX = "mi-demo"
BENCH_PREFIX = "mi-b"
#: Every prefix the project's own users of the lab take (tests, demo, benchmarks); `sweep`
#: without a prefix covers these, $MESHINTERCEPT_TEST_PREFIX and every prefix in the registry.
KNOWN_PREFIXES = (DEFAULT_PREFIX, DEMO_PREFIX, BENCH_PREFIX)
REGISTRY_DIR = "/run/meshintercept-testing"
BPFFS_ROOT = "/sys/fs/bpf"
CLUSTER_CIDR = ipaddress.ip_network("10.231.0.0/16")
CLUSTER_CIDR6 = ipaddress.ip_network("fd00:231::/48")
#: How a test client reaches a pod: an AF_INET socket to its IPv4 address, an AF_INET6 socket
#: to the same address v4-mapped (what Java and .NET do), or an AF_INET6 socket to its IPv6 one.
VIAS = ("ipv4", "v4mapped", "ipv6")
#: UID of test apps and clients: an ordinary user, never the proxy UID.
APP_UID = 1000
#: The interpreter a venv was made from: executable by every UID, unlike a venv under /root.
BASE_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
MAX_NODES = 9

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


class ClusterError(RuntimeError):
    pass


class ConnectFailed(AssertionError):
    """A test client could not connect or read; ``.error`` is the errno name (ECONNREFUSED, ...)."""

    def __init__(self, target: str, error: str, message: str = ""):
        super().__init__(f"connection to {target} failed: {error} {message}".strip())
        self.target = target
        self.error = error


def fmt_endpoint(host: str, port: int) -> str:
    """How the lab writes an endpoint: ``10.231.1.2:80``, ``[fd00:231:1::2]:80``; a v4-mapped
    address as the IPv4 address it is (so both socket kinds of one connection read alike)."""
    ip = ipaddress.ip_address(host)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def resolve_prefix(prefix: Optional[str] = None) -> str:
    prefix = prefix or os.environ.get(ENV_PREFIX) or DEFAULT_PREFIX
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"test prefix {prefix!r} must be lowercase letters, digits and dashes, at most 16")
    return prefix


# --- small kernel helpers ----------------------------------------------------------------
def ip(*args: str, netns: Optional[str] = None, batch: Optional[Iterable[str]] = None) -> str:
    argv = ["ip"] + (["-n", netns] if netns else [])
    if batch is not None:
        argv += ["-batch", "-"]
        stdin = "\n".join(batch) + "\n"
    else:
        argv += list(args)
        stdin = None
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        what = " ".join(argv) if batch is None else f"{' '.join(argv)} <<< {stdin!r}"
        raise ClusterError(f"{what}: {proc.stderr.strip()}")
    return proc.stdout


def _write_sysctls(settings: Dict[str, str]) -> None:
    for key, value in settings.items():
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)


def sysctl(netns_path: str, settings: Dict[str, str]) -> None:
    """Write sysctls inside a namespace (a forked child enters it; /proc/sys/net follows it)."""
    def inside():
        setns_path(netns_path)
        _write_sysctls(settings)

    run_forked(inside)


def listening_ports(pid: int) -> set:
    """TCP ports in LISTEN state in the network namespace of `pid`."""
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return ports


def _netns_inode(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _proc_start_time(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _preexec(cgroup: Optional[str], netns_path: str, uid: Optional[int], gid: Optional[int], nofile: Optional[int]):
    """Child-side setup, in this order: cgroup (while /sys is still ours), netns, limits, identity."""
    def setup():
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        setns_path(netns_path)
        if nofile:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            except (ValueError, OSError):  # no CAP_SYS_RESOURCE: take what the hard limit allows
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                with contextlib.suppress(ValueError, OSError):
                    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
    return setup


class Received(bytes):
    """Bytes a test client received, with the client's own and its peer's address."""

    local: Optional[str] = None
    peer: Optional[str] = None

    def lines(self) -> List[bytes]:
        return [line for line in self.split(b"\n") if line]

    def greeting(self) -> dict:
        """The test server's first line: {"pod", "port", "local", "peer"}."""
        return json.loads(self.lines()[0])

    def trailer(self) -> dict:
        """The test server's last line: what it received (count and sha256)."""
        return json.loads(self.lines()[-1])

    @property
    def direct(self) -> bool:
        """True when the server saw exactly this client's address: nothing sat in between."""
        return self.greeting()["peer"] == self.local


@dataclass
class Transfer:
    """Result of `Pod.transfer`: hashes of what each end sent and received."""

    local: Optional[str]
    sent: int
    sent_sha256: str
    received: int
    received_sha256: str
    server: dict
    greeting: dict
    seconds: float
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def intact(self) -> bool:
        s = self.server or {}
        return (s.get("received") == self.sent and s.get("received_sha256") == self.sent_sha256
                and s.get("sent") == self.received and s.get("sent_sha256") == self.received_sha256)


class Server:
    """A test server process (`meshintercept.lab.apps serve`) in a pod."""

    def __init__(self, pod: "Pod", ports: Sequence[int], process: subprocess.Popen, mode: str):
        self.pod = pod
        self.ports = tuple(ports)
        self.port = self.ports[0]
        self.process = process
        self.mode = mode

    def stop(self) -> None:
        _kill_group(self.process, signal.SIGTERM)

    def __repr__(self) -> str:
        return f"<Server {self.pod.name}:{','.join(map(str, self.ports))}>"


def _kill_group(process: subprocess.Popen, sig=signal.SIGKILL, wait: float = 3.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class _Place:
    """Something processes run in: a network namespace plus the node's cgroup."""

    cluster: "TestCluster"
    netns: Netns
    cgroup_path: str

    def spawn(self, argv: Sequence[str], uid: Optional[int] = None, env: Optional[dict] = None,
              gid: Optional[int] = None, nofile: Optional[int] = 65536, **popen_kw) -> subprocess.Popen:
        """Start a process here: cgroup first, then setns, then (optionally) setuid; tracked and killed at close."""
        popen_kw.setdefault("start_new_session", True)
        popen_kw.setdefault("cwd", self.cluster.workdir)  # reachable by every UID, unlike a clone in /root
        if env is not None:
            popen_kw["env"] = env
        proc = subprocess.Popen(list(argv), preexec_fn=_preexec(self.cgroup_path, self.netns.path, uid, gid, nofile),
                                **popen_kw)
        self.cluster._processes.append(proc)
        return proc

    def run(self, argv: Sequence[str], uid: Optional[int] = None, timeout: Optional[float] = 30,
            env: Optional[dict] = None, check: bool = False, gid: Optional[int] = None,
            **popen_kw) -> subprocess.CompletedProcess:
        """Run to completion here; stdout/stderr captured as text unless told otherwise."""
        if "stdout" not in popen_kw and "stderr" not in popen_kw and "capture_output" not in popen_kw:
            popen_kw["capture_output"] = True
        popen_kw.setdefault("text", True)
        if env is not None:
            popen_kw["env"] = env
        popen_kw.setdefault("start_new_session", True)
        popen_kw.setdefault("cwd", self.cluster.workdir)
        return subprocess.run(list(argv), preexec_fn=_preexec(self.cgroup_path, self.netns.path, uid, gid, 65536),
                              timeout=timeout, check=check, **popen_kw)

    def wait_listening(self, process: subprocess.Popen, ports: Iterable[int], timeout: float = 10.0) -> None:
        """Block until `process` is alive and all `ports` listen in this namespace."""
        ports = set(ports)
        timeout = pace.scaled(timeout)  # starting an interpreter is work: slower under emulation
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ClusterError(f"{process.args[0]} exited with {process.returncode} before listening on "
                                   f"{sorted(ports)} in {self.netns.name}")
            if ports <= listening_ports(process.pid):
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{process.args[0]} did not listen on {sorted(ports)} in {self.netns.name} "
                                   f"within {timeout}s")
            time.sleep(0.01)


class ClusterNode(_Place):
    def __init__(self, cluster: "TestCluster", index: int, netns: Netns, node: Node, cgroup_path: str):
        self.cluster = cluster
        self.index = index
        self.name = f"node{index + 1}"
        self.netns = netns
        self.node = node
        self.cgroup_path = cgroup_path
        self.pod_cidr = ipaddress.ip_network(f"10.231.{index + 1}.0/24")
        self.pod_cidr6 = ipaddress.ip_network(f"fd00:231:{index + 1:x}::/64")
        self.gateway = f"10.231.{index + 1}.1"
        self.gateway6 = f"fd00:231:{index + 1:x}::1"
        self.underlay_ip = f"10.231.0.{index + 1}"
        self.underlay_ip6 = f"fd00:231::{index + 1:x}"
        self.bridge = "br0"
        self.pods: List["Pod"] = []
        self._next_host = 2
        self._manager = None

    def cli_env(self, **extra: str) -> Dict[str, str]:
        """The environment for running the ``meshintercept`` command against this node."""
        env = dict(os.environ, MESHINTERCEPT_CGROUP=self.node.cgroup, MESHINTERCEPT_PIN_DIR=self.node.pin_dir,
                   MESHINTERCEPT_STATE_DIR=self.node.state_dir)
        env.pop("MESHINTERCEPT_MODE", None)
        env.update(extra)
        return env

    def add_pod(self, name: str, families: Sequence[str] = ("ipv4", "ipv6")) -> "Pod":
        """A pod on this node (see `TestCluster.add_pod`)."""
        return self.cluster.add_pod(self, name, families)

    def manager(self):
        """A `meshintercept.manager.Manager` for this node (created once)."""
        if self._manager is None:
            from meshintercept.manager import Manager

            self._manager = Manager(self.node)
        return self._manager

    def __repr__(self) -> str:
        return f"<ClusterNode {self.name} {self.netns.name} {self.pod_cidr}>"


class Pod(_Place):
    def __init__(self, cluster: "TestCluster", node: ClusterNode, name: str, netns: Netns, ip_addr: Optional[str],
                 host_ifname: str, ip6: Optional[str] = None):
        self.cluster = cluster
        self.node = node
        self.name = name
        self.netns = netns
        #: IPv4 and IPv6 address (None where the pod lacks that family).
        self.ip = ip_addr
        self.ip6 = ip6
        self.ifname = "eth0"
        #: The veth end in the node namespace, enslaved to the node's bridge.
        self.host_ifname = host_ifname
        self.sidecars: list = []
        self.servers: List[Server] = []

    @property
    def cgroup_path(self) -> str:
        return self.node.cgroup_path

    @property
    def families(self) -> Tuple[str, ...]:
        return tuple(f for f, a in (("ipv4", self.ip), ("ipv6", self.ip6)) if a)

    def address(self, via: str = "ipv4") -> str:
        """The address a client connects to this pod by, for one of `VIAS`."""
        addr = {"ipv4": self.ip, "v4mapped": self.ip and f"::ffff:{self.ip}", "ipv6": self.ip6}[via]
        if addr is None:
            raise ClusterError(f"pod {self.name} has no address for {via} (families {self.families})")
        return addr

    def endpoint(self, port: int, via: str = "ipv4") -> str:
        """``ip:port`` / ``[ip6]:port`` as sidecars and apps write it; a v4-mapped address as IPv4."""
        return fmt_endpoint(self.address(via), port)

    # --- apps ---------------------------------------------------------------------------
    def _apps(self, *args: str) -> List[str]:
        return self.cluster.unprivileged_argv("apps", *args)

    def start_server(self, port: Union[int, Sequence[int]], reply: Optional[str] = None, mode: str = "hello",
                     uid: int = APP_UID, bind: Optional[str] = None, timeout: float = 10.0) -> Server:
        """A test server on one or more ports, as an ordinary UID; see `meshintercept.lab.apps`.
        By default it takes both families on one dual-stack socket (``bind`` names one address)."""
        ports = [port] if isinstance(port, int) else list(port)
        argv = self._apps("serve", "--name", self.name, "--mode", mode)
        if bind:
            argv += ["--bind", bind]
        for p in ports:
            argv += ["--port", str(p)]
        if reply is not None:
            argv += ["--reply", reply]
        err = open(os.path.join(self.cluster.workdir, f"server-{self.name}-{ports[0]}.stderr"), "wb")
        with err:
            proc = self.spawn(argv, uid=uid, stdout=subprocess.DEVNULL, stderr=err)
        self.wait_listening(proc, ports, timeout)
        server = Server(self, ports, proc, mode)
        self.servers.append(server)
        return server

    def _client(self, args: List[str], uid: int, timeout: float) -> dict:
        proc = self.run(self._apps(*args), uid=uid, timeout=timeout + 10)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise ClusterError(f"test client in {self.name} failed ({proc.returncode}): {proc.stderr.strip()}") from None

    def connect(self, ip_addr: str, port: int, send: bytes = b"", timeout: float = 5.0, uid: int = APP_UID) -> Received:
        """Connect from this pod (as `uid`), send, half-close, read to EOF; raise ConnectFailed on error."""
        out = self._client(["connect", "--host", ip_addr, "--port", str(port), "--timeout", str(timeout),
                            "--send-b64", base64.b64encode(send).decode()], uid, timeout)
        if not out["ok"]:
            raise ConnectFailed(f"{ip_addr}:{port} from {self.name}", out["error"], out.get("message", ""))
        data = Received(base64.b64decode(out["data_b64"]))
        data.local, data.peer = out["local"], out["peer"]
        return data

    def connect_many(self, ip_addr: str, port: int, count: int = 100, parallel: int = 20, timeout: float = 10.0,
                     uid: int = APP_UID) -> dict:
        """`count` connections, `parallel` at a time: {"ok", "failed", "errors", "greetings": {pod: n}}."""
        # In a batch a connection waits behind the batch's own work (`parallel` in flight), so its
        # timeout bounds work too, like the whole batch's 4x: both longer under emulation.
        timeout = pace.scaled(timeout)
        return self._client(["many", "--host", ip_addr, "--port", str(port), "--count", str(count),
                             "--parallel", str(parallel), "--timeout", str(timeout)], uid, timeout * 4)

    def transfer(self, ip_addr: str, port: int, up: int = 20 << 20, down: int = 20 << 20, timeout: float = 60.0,
                 uid: int = APP_UID) -> Transfer:
        """Push `up` bytes to a test server while it pushes `down` back; compare sha256 both ways."""
        out = self._client(["transfer", "--host", ip_addr, "--port", str(port), "--up", str(up), "--down", str(down),
                            "--timeout", str(timeout)], uid, timeout)
        if not out.get("ok"):
            raise ConnectFailed(f"{ip_addr}:{port} from {self.name}", out.get("error", "?"), out.get("message", ""))
        return Transfer(out["local"], out["sent"], out["sent_sha256"], out["received"], out["received_sha256"],
                        out.get("server") or {}, out.get("greeting") or {}, out.get("seconds", 0.0), out)

    def dns(self, server: str, name: str, port: int = 53, qtype: int = 1, transport: str = "udp",
            connected: bool = True, uid: int = APP_UID, timeout: float = 3.0) -> dict:
        """One DNS query from this pod (`meshintercept.lab.apps.dns_query`): addresses, rcode, from."""
        args = ["dns", "--server", server, "--port", str(port), "--name", name, "--type", str(qtype),
                "--transport", transport, "--timeout", str(timeout)]
        return self._client(args + ([] if connected else ["--unconnected"]), uid, timeout)

    def resolve(self, name: str, nameserver: str, uid: int = APP_UID, tool: Sequence[str] = ("getent", "hosts")):
        """Resolve with the libc resolver (or another tool) as the app would, with ``nameserver`` in
        a resolv.conf of its own (a private mount namespace): the completed process."""
        conf = os.path.join(self.cluster.workdir, f"resolv-{self.name}-{time.monotonic_ns()}.conf")
        with open(conf, "w") as f:
            f.write(f"nameserver {nameserver}\noptions timeout:2 attempts:1\n")
        os.chmod(conf, 0o644)
        script = (f"mount --bind {conf} /etc/resolv.conf && exec setpriv --reuid={uid} --regid={uid} "
                  f"--clear-groups {' '.join(tool)} {name}")
        return self.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], timeout=20)

    def start_sidecar(self, kind: str = "project", spec: Optional[InterceptSpec] = None, routes=None,
                      inbound_target: str = "127.0.0.1", timeout: float = 10.0,
                      dns_hosts: Optional[Dict[str, str]] = None, bind: str = ""):
        """Start a transparent sidecar (`meshintercept.lab.sidecars.KINDS`) as spec.proxy_uid; waits
        until it listens. ``dns_hosts`` (name -> address) turns the project sidecar's DNS forwarder on;
        ``bind`` is the project sidecar's listen address (default: [::], dual-stack)."""
        from meshintercept.lab.sidecars import start_sidecar

        sidecar = start_sidecar(self, kind, spec, routes, inbound_target, timeout, dns_hosts, bind)
        self.sidecars.append(sidecar)
        return sidecar

    def start_dns_server(self, hosts: Dict[str, str], port: int = 53, uid: Optional[int] = None,
                         loopback_only: bool = False):
        """dnsmasq (Debian's) answering only ``hosts`` on ``port``, UDP and TCP, both families; as
        the pod's DNS sidecar (port 15053 on loopback, as the proxy UID) or as a server others ask."""
        from meshintercept.lab.sidecars import start_dns_server

        server = start_dns_server(self, hosts, port, uid, loopback_only)
        self.sidecars.append(server)
        return server

    def iptables_save(self, table: str = "nat", legacy: bool = True, family: int = 4) -> str:
        """iptables-save (ip6tables-save for family 6) of this pod's namespace, legacy or nft,
        for leftover checks."""
        tool = f"{'ip6' if family == 6 else 'ip'}tables-{'legacy' if legacy else 'nft'}-save"
        return self.run([tool, "-t", table], timeout=10).stdout

    def __repr__(self) -> str:
        return f"<Pod {self.name} {self.ip or ''} {self.ip6 or ''} on {self.node.name}>"


@dataclass
class _Objects:
    """Kernel and file-system objects of one cluster (or of a sweep)."""

    netns: List[str] = field(default_factory=list)  # names under /var/run/netns
    cgroups: List[str] = field(default_factory=list)
    pin_dirs: List[str] = field(default_factory=list)
    state_dirs: List[str] = field(default_factory=list)
    dirs: List[str] = field(default_factory=list)
    files: List[str] = field(default_factory=list)


class TestCluster:
    """Nodes and pods as namespaces on one machine; a context manager, `close()` is idempotent."""

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, nodes: int = 2, prefix: Optional[str] = None):
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be between 1 and {MAX_NODES}")
        if os.geteuid() != 0:
            raise PermissionError("the test cluster needs root (namespaces, cgroups, veth)")
        self.prefix = resolve_prefix(prefix)
        self.id = f"{self.prefix}-{secrets.token_hex(3)}"
        self.nodes: List[ClusterNode] = []
        self.pods: Dict[str, Pod] = {}
        self.underlay: Optional[str] = None
        self._processes: List[subprocess.Popen] = []
        self._objects = _Objects()
        self._closed = False
        self.cgroup_root = default_cgroup()
        os.makedirs(REGISTRY_DIR, exist_ok=True)
        self._registry = os.path.join(REGISTRY_DIR, f"{self.id}.json")
        self._objects.files.append(self._registry)
        self.workdir = tempfile.mkdtemp(prefix=f"{self.id}-")
        os.chmod(self.workdir, 0o755)  # sidecars and apps run as other UIDs
        self._objects.dirs.append(self.workdir)
        self._stage_unprivileged()
        try:
            self._save_registry()
            for index in range(nodes):
                self._add_node(index)
            self._link_nodes()
        except BaseException:
            self.close()
            raise

    # --- programs that run as ordinary UIDs -----------------------------------------------
    def _stage_unprivileged(self) -> None:
        """Copy the stdlib-only programs pods run as ordinary UIDs into the world-readable workdir.

        The clone (and the venv or tox env inside it) may sit where only root can look, such as
        /root (mode 0700); an app or sidecar running as UID 1000 or 1500 could then execute
        neither the env's python nor our modules. The base interpreter and these copies it can.
        """
        from meshintercept import sidecar
        from meshintercept.lab import apps

        bin_dir = os.path.join(self.workdir, "bin")
        os.mkdir(bin_dir, 0o755)
        self._scripts = {}
        from meshintercept import dnsfwd

        for name, module in (("apps", apps), ("sidecar", sidecar), ("dnsfwd", dnsfwd)):
            path = os.path.join(bin_dir, f"{name}.py")
            shutil.copyfile(module.__file__, path)
            os.chmod(path, 0o644)
            self._scripts[name] = path

    def unprivileged_argv(self, program: str, *args: str) -> List[str]:
        """argv that runs `program` ("apps" or "sidecar") as any UID, wherever the clone lives."""
        # -S -E: stdlib only, so no site-packages to import (faster, and nothing under the clone).
        return [BASE_PYTHON, "-S", "-E", self._scripts[program], *args]

    # --- registry (for sweep) -------------------------------------------------------------
    def _save_registry(self) -> None:
        data = {"id": self.id, "prefix": self.prefix, "owner_pid": os.getpid(),
                "owner_start": _proc_start_time(os.getpid()), "objects": self._objects.__dict__}
        tmp = self._registry + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self._registry)

    def _new_netns(self, name: str, ipv6: bool = True) -> Netns:
        full = f"{self.id}-{name}"
        if full in self._objects.netns:
            raise ValueError(f"name {name!r} is already used in cluster {self.id}")
        self._objects.netns.append(full)
        self._save_registry()
        ip("netns", "add", full)
        netns = Netns.parse(full)
        # IPv6 with static addresses only: no duplicate address detection (addresses usable at
        # once), no router advertisements or autoconfiguration (nothing but what the lab set).
        if ipv6:
            sysctl(netns.path, {f"net.ipv6.conf.{c}.{k}": "0" for c in ("all", "default")
                                for k in ("accept_dad", "accept_ra", "autoconf", "router_solicitations")})
        else:
            sysctl(netns.path, {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"})
        ip(netns=full, batch=["link set lo up"])
        return netns

    # --- nodes ----------------------------------------------------------------------------
    def _add_node(self, index: int) -> None:
        name = f"node{index + 1}"
        obj_name = f"{self.id}-{name}"
        cgroup = os.path.join(self.cgroup_root, obj_name)
        pin_dir = os.path.join(BPFFS_ROOT, obj_name)
        state_dir = os.path.join(STATE_ROOT, obj_name)
        self._objects.cgroups.append(cgroup)
        self._objects.pin_dirs.append(pin_dir)
        self._objects.state_dirs.append(state_dir)
        self._save_registry()
        os.mkdir(cgroup)
        if BPFFS_ROOT in mounts("bpf"):
            os.makedirs(pin_dir, exist_ok=True)
        os.makedirs(state_dir, exist_ok=True)
        netns = self._new_netns(name)
        n = index + 1
        sysctl(netns.path, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        ip(netns=netns.name, batch=[
            # A fixed MAC: a bridge without one takes the lowest MAC of its ports and changes it
            # as pods come and go, while pods keep the old gateway MAC in their neighbour cache,
            # so their frames stop reaching the node (lost SYNs under connection storms).
            f"link add br0 address 02:00:0a:e7:{n:02x}:01 type bridge",
            f"addr add 10.231.{n}.1/24 dev br0",
            f"addr add fd00:231:{n:x}::1/64 dev br0 nodad",
            "link set br0 up",
        ])
        self.nodes.append(ClusterNode(self, index, netns, Node(cgroup=cgroup, pin_dir=pin_dir, state_dir=state_dir),
                                      cgroup))

    def _link_nodes(self) -> None:
        if len(self.nodes) < 2:
            return
        if len(self.nodes) == 2:
            a, b = self.nodes
            ip("link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", b.netns.name, netns=a.netns.name)
        else:
            self.underlay = self._new_netns("underlay").name
            ip(netns=self.underlay, batch=["link add br0 address 02:00:0a:e7:00:01 type bridge", "link set br0 up"])
            for node in self.nodes:
                port = f"n{node.index + 1}"
                ip("link", "add", "ul0", "type", "veth", "peer", "name", port, "netns", self.underlay,
                   netns=node.netns.name)
                ip(netns=self.underlay, batch=[f"link set {port} master br0", f"link set {port} up"])
        for node in self.nodes:
            cmds = [f"addr add {node.underlay_ip}/24 dev ul0", f"addr add {node.underlay_ip6}/64 dev ul0 nodad",
                    "link set ul0 up"]
            for other in self.nodes:
                if other is not node:
                    cmds += [f"route add {other.pod_cidr} via {other.underlay_ip}",
                             f"route add {other.pod_cidr6} via {other.underlay_ip6}"]
            ip(netns=node.netns.name, batch=cmds)

    # --- pods -----------------------------------------------------------------------------
    def add_pod(self, node: Union[ClusterNode, int], name: str, families: Sequence[str] = ("ipv4", "ipv6")) -> Pod:
        """A pod namespace `<id>-<name>` on `node` (a ClusterNode or its index) with eth0 on the bridge.

        ``families``: dual-stack by default; ``("ipv4",)`` disables IPv6 in the namespace (as
        ``net.ipv6.conf.all.disable_ipv6=1`` does on such nodes), ``("ipv6",)`` gives no IPv4 address."""
        families = tuple(families)
        if not families or set(families) - {"ipv4", "ipv6"}:
            raise ValueError(f"families {families!r}: use ipv4, ipv6 or both")
        if isinstance(node, int):
            node = self.nodes[node]
        if not _NAME_RE.match(name) or re.match(r"^(node\d+|underlay)$", name):
            raise ValueError(f"pod name {name!r}: use lowercase letters, digits and dashes (not nodeN/underlay)")
        if name in self.pods:
            raise ValueError(f"pod {name!r} already exists in cluster {self.id}")
        k = node._next_host
        if k > 254:
            raise ClusterError(f"node {node.name} has no free pod address left")
        node._next_host += 1
        netns = self._new_netns(name, ipv6="ipv6" in families)
        host_if = f"vp{k}"
        pod_ip = f"10.231.{node.index + 1}.{k}" if "ipv4" in families else None
        pod_ip6 = f"fd00:231:{node.index + 1:x}::{k:x}" if "ipv6" in families else None
        ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns.name, netns=node.netns.name)
        ip(netns=node.netns.name, batch=[f"link set {host_if} master br0", f"link set {host_if} up"])
        cmds = ["link set eth0 up"]
        if pod_ip:
            cmds += [f"addr add {pod_ip}/24 dev eth0", f"route add default via {node.gateway}"]
        if pod_ip6:
            cmds += [f"addr add {pod_ip6}/64 dev eth0 nodad", f"route add default via {node.gateway6}"]
        ip(netns=netns.name, batch=cmds)
        pod = Pod(self, node, name, netns, pod_ip, host_if, pod_ip6)
        node.pods.append(pod)
        self.pods[name] = pod
        return pod

    def adopt_netns(self, names: Iterable[str]) -> None:
        """Register namespaces made outside `add_pod` (call BEFORE creating them), so that
        `close()` and `sweep` remove them and their processes. Names must start with ``<id>-``."""
        names = list(names)
        for name in names:
            if not name.startswith(self.id + "-"):
                raise ValueError(f"namespace {name!r} must start with {self.id}- so sweep can find it")
        self._objects.netns.extend(n for n in names if n not in self._objects.netns)
        self._save_registry()

    def delete_netns(self, names: Iterable[str]) -> None:
        """Delete adopted namespaces (their processes first) and forget them."""
        names = [n for n in names if n in self._objects.netns]
        inodes = {i for i in (_netns_inode(os.path.join(NETNS_RUN_DIR, n)) for n in names) if i is not None}
        _kill_pids(_pids_in_netns(inodes))
        problems = _delete_netns(names)
        if problems:
            raise ClusterError("; ".join(problems))
        self._objects.netns[:] = [n for n in self._objects.netns if n not in set(names)]
        self._save_registry()

    def pod(self, name: str) -> Pod:
        return self.pods[name]

    def remove_pod(self, pod: Pod) -> None:
        """Kill the pod's processes and delete its namespace (its name becomes free again)."""
        full = pod.netns.name
        inode = pod.netns.inode
        for proc in list(self._processes):
            if proc.poll() is None and _netns_inode(f"/proc/{proc.pid}/ns/net") == inode:
                _kill_group(proc)
        _kill_pids(_pids_in_netns({inode}))
        _delete_netns([full])
        self._objects.netns.remove(full)
        self._save_registry()
        pod.node.pods.remove(pod)
        del self.pods[pod.name]

    # --- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process, delete namespaces, rmdir cgroups, remove pin/state/work dirs."""
        if self._closed:
            return
        self._closed = True
        for proc in self._processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self._processes:
            with contextlib.suppress(Exception):
                proc.wait(5)
        problems = _destroy(self._objects)
        if problems:
            raise ClusterError(f"cluster {self.id} left things behind: " + "; ".join(problems))

    def __enter__(self) -> "TestCluster":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except ClusterError:
            if exc_type is None:
                raise  # do not hide the test's own failure behind a cleanup one

    def __repr__(self) -> str:
        return f"<TestCluster {self.id} nodes={len(self.nodes)} pods={len(self.pods)}>"


# --- teardown and sweep --------------------------------------------------------------------
def _pids_in_netns(inodes: set) -> set:
    me = os.getpid()
    found = set()
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if _netns_inode(f"/proc/{entry}/ns/net") in inodes:
            found.add(int(entry))
    return found


def _pids_in_cgroup(path: str) -> set:
    found = set()
    for root, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            with open(os.path.join(root, "cgroup.procs")) as f:
                found.update(int(x) for x in f.read().split())
    found.discard(os.getpid())
    return found


def _kill_pids(pids: set) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 3
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # reaps our own children; others are reaped by init
            if not os.path.exists(f"/proc/{pid}") or _is_zombie(pid):
                pids.discard(pid)
        time.sleep(0.01)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _delete_netns(names: List[str]) -> List[str]:
    problems = []
    existing = [n for n in names if os.path.exists(os.path.join(NETNS_RUN_DIR, n))]
    if existing:
        proc = subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in existing),
                              capture_output=True, text=True)
        for n in existing:
            if os.path.exists(os.path.join(NETNS_RUN_DIR, n)):
                problems.append(f"netns {n}: {proc.stderr.strip()}")
    return problems


def _rmdir_cgroup(path: str) -> Optional[str]:
    """Remove a cgroup and its children, bottom-up, moving stragglers to the parent first."""
    if not os.path.isdir(path):
        return None
    parent = os.path.dirname(path)
    for root, _dirs, _files in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        with contextlib.suppress(OSError):
            with open(os.path.join(root, "cgroup.procs")) as f:
                pids = f.read().split()
            for pid in pids:
                with contextlib.suppress(OSError):
                    with open(os.path.join(parent, "cgroup.procs"), "w") as out:
                        out.write(pid)
        deadline = time.monotonic() + 3
        while True:
            try:
                os.rmdir(root)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    return f"cgroup {root}: {exc.strerror}"
                time.sleep(0.02)
    return None


def _destroy(objects: _Objects) -> List[str]:
    problems: List[str] = []
    inodes = {i for i in (_netns_inode(os.path.join(NETNS_RUN_DIR, n)) for n in objects.netns) if i}
    pids = _pids_in_netns(inodes)
    for cg in objects.cgroups:
        pids |= _pids_in_cgroup(cg)
    _kill_pids(pids)
    problems += _delete_netns(objects.netns)
    for cg in objects.cgroups:
        problem = _rmdir_cgroup(cg)
        if problem:
            problems.append(problem)
    for path in objects.pin_dirs + objects.state_dirs + objects.dirs:
        if os.path.lexists(path):
            try:
                shutil.rmtree(path)
            except OSError as exc:
                problems.append(f"{path}: {exc.strerror}")
    for path in objects.files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return problems


def _owner_alive(registry_file: str) -> bool:
    try:
        with open(registry_file) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    pid = data.get("owner_pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False  # our own leftovers are ours to remove
    return _proc_start_time(pid) is not None and _proc_start_time(pid) == data.get("owner_start")


def known_prefixes() -> List[str]:
    """The prefixes `sweep()` covers: the project's own, the environment's, the registry's."""
    found = set(KNOWN_PREFIXES)
    if os.environ.get(ENV_PREFIX):
        found.add(resolve_prefix())
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(REGISTRY_DIR):
            m = re.match(r"^([a-z][a-z0-9-]{0,15})-[0-9a-f]{6}\.json$", name)
            if m:
                found.add(m.group(1))
    return sorted(found)


def sweep(prefix: Optional[str] = None, force: bool = False) -> List[str]:
    """Remove leftovers of dead lab clusters: processes, namespaces, cgroups, pins, dirs.

    With a prefix, only clusters of that prefix; without, those of every `known_prefixes()`.
    Clusters whose owner process is still running (another run) are left alone unless
    `force`. Returns what was removed.
    """
    if prefix is None:
        return [line for p in known_prefixes() for line in sweep(p, force)]
    prefix = resolve_prefix(prefix)
    pattern = re.compile(rf"^({re.escape(prefix)}-[0-9a-f]{{6}})(?:[-.].*)?$")

    def matching(directory: str) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for name in sorted(os.listdir(directory)):
                m = pattern.match(name)
                if m:
                    out.setdefault(m.group(1), []).append(name)
        return out

    cgroup_root = default_cgroup()
    found = {
        "netns": matching(NETNS_RUN_DIR), "cgroups": matching(cgroup_root), "pins": matching(BPFFS_ROOT),
        "state": matching(STATE_ROOT), "dirs": matching(tempfile.gettempdir()), "files": matching(REGISTRY_DIR),
    }
    ids = set().union(*(d.keys() for d in found.values()))
    objects = _Objects()
    removed = []
    for cid in sorted(ids):
        if not force and _owner_alive(os.path.join(REGISTRY_DIR, f"{cid}.json")):
            continue
        objects.netns += found["netns"].get(cid, [])
        objects.cgroups += [os.path.join(cgroup_root, n) for n in found["cgroups"].get(cid, [])]
        objects.pin_dirs += [os.path.join(BPFFS_ROOT, n) for n in found["pins"].get(cid, [])]
        objects.state_dirs += [os.path.join(STATE_ROOT, n) for n in found["state"].get(cid, [])]
        objects.dirs += [os.path.join(tempfile.gettempdir(), n) for n in found["dirs"].get(cid, [])
                         if os.path.isdir(os.path.join(tempfile.gettempdir(), n))]
        objects.files += [os.path.join(REGISTRY_DIR, n) for n in found["files"].get(cid, [])]
        removed.append(cid)
    if not removed:
        return []
    problems = _destroy(objects)
    if problems:
        raise ClusterError("sweep left things behind: " + "; ".join(problems))
    return ([f"netns {n}" for n in objects.netns] + [f"cgroup {c}" for c in objects.cgroups]
            + [f"dir {d}" for d in objects.pin_dirs + objects.state_dirs + objects.dirs])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshintercept.lab.cluster",
                                description="Test cluster tooling.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="remove leftovers (namespaces, cgroups, pins, state, processes) of a prefix")
    s.add_argument("--prefix", default=None, help="only clusters of this prefix (default: every known prefix: "
                   f"{', '.join(KNOWN_PREFIXES)}, ${ENV_PREFIX} and those in {REGISTRY_DIR})")
    s.add_argument("--force", action="store_true", help="also remove clusters whose owner process still runs")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("sweep needs root", file=sys.stderr)
        return 3
    removed = sweep(args.prefix, force=args.force)
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print(f"nothing to sweep for prefix {resolve_prefix(args.prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
