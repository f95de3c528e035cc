"""Minimal real topology for the ebpf backend's own tests (before/beside the shared cluster).

One "node": a child cgroup of the cgroup-v2 root (never the root itself), its own pin dir
and state dir, a hub namespace with a bridge, and pods as namespaces wired to it with veth
pairs, addresses from 10.231.0.0/16. Processes are put into the cgroup BEFORE entering a
namespace. Everything carries the prefix mi-e- and a random suffix and is removed in
`close()`, also after failures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Dict, List, Optional

import pytest

from meshintercept.netns import Netns, setns
from meshintercept.node import Node, default_cgroup
from meshintercept.testing import pace
from meshintercept.testing.cluster import BASE_PYTHON

PREFIX = "mi-e"
PROXY_UID = 1500
APP_UID = 1600

SIDECAR = textwrap.dedent(
    r'''
    import json, socket, struct, sys, threading
    out_port, in_port, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    lock = threading.Lock()
    def original_dst(conn):
        try:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)
        except OSError as exc:
            return None, str(exc)
        port, ip = struct.unpack("!2xH4s8x", raw)
        return (socket.inet_ntoa(ip), port), None
    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    def handle(conn, direction):
        dst, err = original_dst(conn)
        entry = {"direction": direction, "peer": "%s:%d" % conn.getpeername(),
                 "local": "%s:%d" % conn.getsockname(), "original_dst": dst and "%s:%d" % dst, "error": err}
        with lock, open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if dst is None:
            conn.close(); return
        target = dst if direction == "outbound" else ("127.0.0.1", dst[1])
        try:
            up = socket.create_connection(target, timeout=5)
        except OSError:
            conn.close(); return
        up.settimeout(None)
        t = threading.Thread(target=pipe, args=(up, conn), daemon=True); t.start()
        pipe(conn, up); t.join(); up.close(); conn.close()
    def serve(port, direction):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(512)
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c, direction), daemon=True).start()
    threading.Thread(target=serve, args=(in_port, "inbound"), daemon=True).start()
    serve(out_port, "outbound")
    '''
)

# An app server: answers "<name> <local addr> <peer addr>\n", or echoes a sha256 for "sum".
SERVER = textwrap.dedent(
    r'''
    import hashlib, socket, sys, threading
    name, port = sys.argv[1], int(sys.argv[2])
    def handle(c):
        with c:
            first = c.recv(4)
            if first == b"SUM:":
                h = hashlib.sha256(); n = 0
                while True:
                    d = c.recv(1 << 16)
                    if not d:
                        break
                    h.update(d); n += len(d)
                c.sendall(("%s %d\n" % (h.hexdigest(), n)).encode())
                return
            if first == b"GEN:":
                size = int(c.recv(64).split(b"\n")[0]); import os
                data = os.urandom(size); c.sendall(hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
                return
            c.sendall(("%s %s:%d %s:%d\n" % ((name,) + c.getsockname() + c.getpeername())).encode())
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(512)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
    '''
)


def rand() -> str:
    return "%06x" % random.getrandbits(24)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


class Pod:
    def __init__(self, topo: "Topology", name: str, ip: str):
        self.topo, self.name, self.ip = topo, name, ip

    @property
    def netns(self) -> Netns:
        return Netns.parse(self.name)

    def spawn(self, argv: List[str], uid: Optional[int] = None, cgroup: bool = True, **kw) -> subprocess.Popen:
        return self.topo.spawn(self.name, argv, uid=uid, cgroup=cgroup, **kw)

    def run(self, argv: List[str], uid: Optional[int] = APP_UID, timeout: float = 30, cgroup: bool = True,
            input: Optional[bytes] = None) -> bytes:
        proc = self.spawn(argv, uid=uid, cgroup=cgroup, stdin=subprocess.PIPE if input is not None else None,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(input=input, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{argv} in {self.name} failed: {err.decode()[-2000:]}")
        return out

    def call(self, ip: str, port: int, payload: bytes = b"", uid: int = APP_UID, cgroup: bool = True) -> str:
        """Connect from inside this pod (a process in the node cgroup) and return the answer."""
        code = (
            "import socket,sys\n"
            f"s=socket.create_connection(({ip!r},{port}),timeout=10)\n"
            f"s.sendall({payload!r})\n"
            "s.shutdown(socket.SHUT_WR)\n"
            "buf=b''\n"
            "while True:\n"
            "    d=s.recv(65536)\n"
            "    if not d: break\n"
            "    buf+=d\n"
            "sys.stdout.write(buf.decode())\n"
        )
        return self.run([BASE_PYTHON, "-c", code], uid=uid, cgroup=cgroup).decode()

    def start_server(self, port: int, name: Optional[str] = None) -> subprocess.Popen:
        return self.topo.track(self.spawn([BASE_PYTHON, "-c", SERVER, name or self.name, str(port)], uid=APP_UID))

    def start_sidecar(self, out_port: int = 15001, in_port: int = 15003) -> str:
        log = os.path.join(self.topo.tmp, f"sidecar-{self.name}.log")
        open(log, "w").close()
        os.chmod(log, 0o666)
        self.topo.track(self.spawn([BASE_PYTHON, "-c", SIDECAR, str(out_port), str(in_port), log], uid=PROXY_UID))
        self.topo.wait_listening(self, in_port)
        self.topo.wait_listening(self, out_port)
        return log

    def sidecar_log(self) -> List[dict]:
        path = os.path.join(self.topo.tmp, f"sidecar-{self.name}.log")
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


class Topology:
    """A node (child cgroup, pin dir, state dir) with a bridge hub and pods."""

    def __init__(self, tmp: str, subnet: Optional[int] = None):
        self.id = rand()
        # Sidecars run as the proxy UID: their log dir must be reachable (pytest's is 0700).
        self.tmp = tempfile.mkdtemp(prefix=f"{PREFIX}-{self.id}-")
        os.chmod(self.tmp, 0o777)
        root = default_cgroup()
        self.cgroup = os.path.join(root, f"{PREFIX}-{self.id}")
        assert self.cgroup != root
        os.mkdir(self.cgroup)
        self.node = Node(cgroup=self.cgroup, pin_dir=f"/sys/fs/bpf/{PREFIX}-{self.id}",
                         state_dir=os.path.join(tmp, "state"))
        self.subnet = subnet if subnet is not None else random.randint(64, 250)
        self.hub = f"{PREFIX}-{self.id}-hub"
        self.namespaces = [self.hub]
        self.procs: List[subprocess.Popen] = []
        self.pods: Dict[str, Pod] = {}
        sh("ip", "netns", "add", self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        sh("ip", "-n", self.hub, "link", "set", "lo", "up")

    def add_pod(self, short: str) -> Pod:
        index = len(self.pods) + 2
        name = f"{PREFIX}-{self.id}-{short}"
        ip = f"10.231.{self.subnet}.{index}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        peer = f"v{short}{self.id}"[:15]
        sh("ip", "-n", self.hub, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "-n", self.hub, "link", "set", peer, "master", "br0", "up")
        sh("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        pod = Pod(self, name, ip)
        self.pods[short] = pod
        return pod

    def spawn(self, ns: str, argv: List[str], uid: Optional[int] = None, cgroup: bool = True, **kw) -> subprocess.Popen:
        procs_file = os.path.join(self.cgroup, "cgroup.procs") if cgroup else None
        ns_path = f"/var/run/netns/{ns}"

        def enter():
            if procs_file:  # the cgroup first: entering a namespace must not change which one
                with open(procs_file, "w") as f:
                    f.write(str(os.getpid()))
            fd = os.open(ns_path, os.O_RDONLY)
            setns(fd)  # os.setns needs Python 3.12
            os.close(fd)
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)

        kw.setdefault("cwd", "/")
        return subprocess.Popen(argv, preexec_fn=enter, **kw)

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def wait_listening(self, pod: Pod, port: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + pace.scaled(timeout)  # interpreter start-up: slower when emulated
        while time.monotonic() < deadline:
            out = sh("ip", "netns", "exec", pod.name, "ss", "-Htln", f"sport = :{port}").stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise AssertionError(f"nothing listens on {port} in {pod.name}")

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        from meshintercept.backends.ebpf import loader

        with contextlib.suppress(Exception):
            loader.unload(self.node)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
        deadline = time.monotonic() + 10
        while os.path.isdir(self.cgroup):
            try:
                os.rmdir(self.cgroup)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture
def topo(tmp_path):
    """One eBPF test node (child cgroup, pin dir, hub namespace), removed after the test."""
    t = Topology(str(tmp_path))
    try:
        yield t
    finally:
        t.close()
