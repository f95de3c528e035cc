"""The sk_lookup inbound path of one pod namespace: its BPF link, and its sidecar's listener.

The link (``BPF_LINK_CREATE`` on the namespace's fd, attach type ``BPF_SK_LOOKUP``) is pinned
in the node's layout dir as ``link_lookup_<netns cookie>``, so it outlives the command and
disable removes it by name (LINK_DETACH + unpin), also after the namespace is gone.

The inbound listener is found two ways. A sidecar that listens after enable is registered by
the sockops program (``BPF_SOCK_OPS_TCP_LISTEN_CB``). One already listening at enable is
registered here: its socket is found through /proc (the namespace's listening sockets on
the inbound port, then the process holding one), copied with ``pidfd_getfd`` and written
into the listener sockhash; our copy is closed right after (the map holds the socket).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Dict, List, Optional, Tuple

from . import bpfsys
from . import types as T
from meshintercept.errors import BackendFailure
from meshintercept.netns import Netns

from .pins import NodePins, lookup_link_name

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
NR_PIDFD_OPEN = 434  # the same number on every architecture since 5.3
NR_PIDFD_GETFD = 438
TCP_LISTEN = "0A"


def link_path(pins: NodePins, cookie: int) -> str:
    return pins.path("link", lookup_link_name(cookie))


def link_alive(path: str, netns: Optional[Netns]) -> bool:
    """The pinned link exists and is attached to this namespace (its inode)."""
    try:
        fd = bpfsys.obj_get(path)
    except OSError:
        return False
    try:
        info = bpfsys.link_info(fd)
    finally:
        bpfsys.close(fd)
    return netns is not None and info.get("netns_ino") == netns.inode


def attach(pins: NodePins, netns: Netns, cookie: int) -> Tuple[str, bool]:
    """Link the sk_lookup program to the namespace unless already linked; (pin path, made now)."""
    path = link_path(pins, cookie)
    if os.path.exists(path):
        if link_alive(path, netns):
            return path, False
        unpin(path)
    fd = os.open(netns.path, os.O_RDONLY)
    try:
        link = bpfsys.link_create(pins.prog("lookup"), fd, bpfsys.BPF_SK_LOOKUP)
    except OSError as exc:
        raise BackendFailure(f"cannot attach the sk_lookup program to namespace {netns.name} ({exc.strerror}); "
                             "use --inbound-path tc on kernels before 5.9.") from None
    finally:
        os.close(fd)
    try:
        bpfsys.obj_pin(link, path)
    except OSError as exc:
        bpfsys.link_detach(link)
        raise BackendFailure(f"cannot pin the sk_lookup link at {path} ({exc.strerror}).") from None
    finally:
        bpfsys.close(link)
    return path, True


def unpin(path: str) -> bool:
    """Detach and unpin a namespace's link; False when there was none."""
    return bpfsys.unpin_link(path)


# --- the sidecar's listener ------------------------------------------------------------------
def _listening_inodes(port: int) -> Dict[int, int]:
    """Socket inode -> family (4 or 6) of TCP listeners on ``port`` in the calling thread's namespace."""
    found = {}
    for name, family in (("tcp", 4), ("tcp6", 6)):
        try:
            with open(f"/proc/thread-self/net/{name}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[3] == TCP_LISTEN and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        found[int(parts[9])] = family
        except FileNotFoundError:
            continue
    return found


def _holders(netns: Netns, inodes: Dict[int, int]) -> List[Tuple[int, int, int]]:
    """(pid, fd, family) of processes of the namespace holding one of the sockets."""
    out = []
    wanted = {f"socket:[{inode}]": family for inode, family in inodes.items()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != (netns.dev, netns.inode) and st.st_ino != netns.inode:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target in wanted:
                out.append((int(entry), int(fd), wanted.pop(target)))
        if not wanted:
            break
    return out


def _copy_fd(pid: int, fd: int) -> int:
    pidfd = _libc.syscall(NR_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), f"pidfd_open({pid})")
    try:
        copy = _libc.syscall(NR_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
        if copy < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd({pid}, {fd})")
        return copy
    finally:
        os.close(pidfd)


def register_listeners(pins: NodePins, netns: Netns, cookie: int, port: int) -> List[dict]:
    """Put the namespace's existing listeners on ``port`` into the listener map; what was found.

    A socket that closed meanwhile is skipped: the sockops program registers its successor.
    """
    with netns.entered():
        inodes = _listening_inodes(port)
    if not inodes:
        return []
    table = pins.table("listen")
    registered = []
    for pid, fd, family in _holders(netns, inodes):
        try:
            copy = _copy_fd(pid, fd)
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.EBADF):
                continue  # gone meanwhile
            raise BackendFailure(f"cannot take the inbound listener of pid {pid} in {netns.name} ({exc.strerror}); "
                                 "restart the sidecar after enable, or run as root without ptrace limits.") from None
        try:
            table.put(T.ListenKey(netns=cookie, family=family), ctypes.c_uint64(copy))
        except OSError as exc:
            raise BackendFailure(f"cannot register the inbound listener of pid {pid} ({exc.strerror}).") from None
        finally:
            os.close(copy)
        registered.append({"pid": pid, "family": family})
    return registered


def forget_listeners(pins: NodePins, cookie: int) -> int:
    listen = pins.table("listen")
    return sum(int(listen.delete(T.ListenKey(netns=cookie, family=family))) for family in (4, 6))


def listener_families(pins: NodePins, cookie: int) -> List[int]:
    """Families (4, 6) with a registered inbound listener for this namespace (two lookups)."""
    listen = pins.table("listen")
    return [family for family in (4, 6) if listen.get(T.ListenKey(netns=cookie, family=family)) is not None]
