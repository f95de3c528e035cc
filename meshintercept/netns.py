"""Network namespace references: parse, identify, enter, and run code inside.

A target is given as a name under /var/run/netns, a path to a namespace file
(/proc/PID/ns/net, a CNI netns path) or ``pid:N``. Its identity is the (device, inode)
of the nsfs file; the eBPF backend also uses the kernel's netns cookie.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

from meshintercept.errors import MeshInterceptError, NamespaceNotFound, NotPermitted, UsageError

NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
NS_GET_NSTYPE = 0xB703

# The process's own symbols include libc: no find_library (which forks ldconfig and costs the CLI ~10 ms).
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        if err == 1:
            raise NotPermitted("entering a network namespace needs root (CAP_SYS_ADMIN); run meshintercept as root.")
        raise OSError(err, os.strerror(err))


def unshare_net() -> None:
    """Move the calling process into a new, empty network namespace (for throwaway self-tests
    in a forked child: the namespace goes when the child does)."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def setns_path(path: str, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace whose nsfs file (or /proc/PID/ns/...) is ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        setns(fd, nstype)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Netns:
    #: What the user wrote, kept for messages and the state record.
    ref: str
    #: Path of the nsfs file that identifies the namespace.
    path: str
    #: Inode number of the namespace (what `ip netns identify` and `lsns` show).
    inode: int
    dev: int

    @property
    def name(self) -> str:
        """Short display name: the netns name when it lives under /var/run/netns."""
        if self.path.startswith(NETNS_RUN_DIR + "/"):
            return self.path[len(NETNS_RUN_DIR) + 1:]
        return self.ref

    @property
    def key(self) -> str:
        return f"{self.dev}:{self.inode}"

    @classmethod
    def parse(cls, ref: str) -> "Netns":
        ref = str(ref).strip()
        if not ref:
            raise UsageError("the network namespace is empty; give a name under /var/run/netns, a path or pid:N.")
        if ref.startswith("pid:"):
            pid = ref[4:]
            if not pid.isdigit():
                raise UsageError(f"{ref!r} is not a valid pid reference; write it like pid:1234.")
            path = f"/proc/{pid}/ns/net"
        elif "/" in ref:
            path = ref
        else:
            path = os.path.join(NETNS_RUN_DIR, ref)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise NamespaceNotFound(
                f"network namespace {ref!r} does not exist ({path} not found); check 'ip netns list' or the pod's netns path."
            ) from None
        except PermissionError:
            raise NotPermitted(f"cannot read {path}; run meshintercept as root.") from None
        if not cls._is_netns(path):
            raise UsageError(f"{path} is not a network namespace file; give a name under /var/run/netns, a path or pid:N.")
        return cls(ref=ref, path=path, inode=st.st_ino, dev=st.st_dev)

    @staticmethod
    def _is_netns(path: str) -> bool:
        import fcntl

        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            # NS_GET_NSTYPE answers for nsfs files only, bind mounts under /var/run/netns included.
            return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
        except OSError:
            return False
        finally:
            os.close(fd)

    def exists(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.dev, self.inode)

    @contextlib.contextmanager
    def entered(self):
        """Switch the calling thread into this namespace; always switch back."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            setns(target)
            try:
                yield self
            finally:
                setns(own)
        finally:
            os.close(target)
            os.close(own)

    def cookie(self) -> int:
        """The kernel's netns cookie, as bpf_get_netns_cookie() sees it in programs."""
        with self.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        finally:
            sock.close()
        return ctypes.c_uint64.from_buffer_copy(raw).value  # the kernel writes a native-order u64

    def run(self, fn: Callable, *args, **kwargs):
        """Run ``fn`` in a forked child that entered this namespace; return its result.

        Forking keeps libraries with per-process state (libiptc's table cache, netlink
        sockets) from ever seeing the caller's namespace and the target's mixed up.
        Exceptions are re-raised in the caller with their message intact.
        """
        return run_forked(self._run_inside, fn, args, kwargs)

    def _run_inside(self, fn, args, kwargs):
        setns_path(self.path)
        return fn(*args, **kwargs)


def run_forked(fn: Callable, *args):
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            result = ("ok", fn(*args))
        except MeshInterceptError as exc:
            result = ("err", exc)
        except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
            result = ("exc", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        try:
            data = pickle.dumps(result)
        except Exception as exc:  # noqa: BLE001 - pickle raises many types for an unpicklable result
            data = pickle.dumps(("exc", f"unpicklable result: {exc}"))
        with os.fdopen(write_fd, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    if not data:
        raise MeshInterceptError("a helper process died before reporting; see the kernel log (dmesg).")
    kind, value = pickle.loads(data)
    if kind == "ok":
        return value
    if kind == "err":
        raise value
    raise MeshInterceptError(value.splitlines()[0] + " (in the target namespace)") from RuntimeError(value)


def ipv6_unavailable() -> Optional[str]:
    """Why the *current* namespace cannot carry IPv6 (a sentence), or None when it can."""
    try:
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
            disabled = f.read().strip() == "1"
    except FileNotFoundError:
        return "the kernel has no IPv6 (booted with ipv6.disable=1 or built without it)"
    if disabled:
        return "IPv6 is disabled in the namespace (net.ipv6.conf.all.disable_ipv6=1)"
    return None


def current() -> Netns:
    return Netns.parse("/proc/self/ns/net")


def list_named() -> list:
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            out.append(Netns.parse(name))
        except MeshInterceptError:
            continue
    return out


def pod_addresses(netns: Optional[Netns] = None) -> list:
    """A namespace's own IPv4 and IPv6 addresses (not loopback, not link-local) with their
    interface: [(ifname, ifindex, "10.231.1.2", 24), (ifname, ifindex, "fd00:231:1::2", 64)]."""
    def collect():
        import ipaddress

        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            out = []
            for addr in ipr.get_addr():
                ip = addr.get_attr("IFA_ADDRESS")
                parsed = ipaddress.ip_address(ip)
                if parsed.is_loopback or parsed.is_link_local:
                    continue
                out.append((names.get(addr["index"], "?"), addr["index"], ip, addr["prefixlen"]))
            return out

    return netns.run(collect) if netns else collect()
