"""The node's pinned objects: names, paths, and opening them with BPF_OBJ_GET (no bcc).

Layout under the node's pin directory (bpffs):

    <pin_dir>/v<LAYOUT>/map_<name>    maps   (config, podip, origdst, counters, sock,
                                               sockhash, listen, events, meta)
    <pin_dir>/v<LAYOUT>/prog_<name>   programs (connect4, connect6, sendmsg4, sendmsg6,
                                               recvmsg4, recvmsg6, getpeername4, getpeername6,
                                               sockops, getsockopt, lookup, tc_ingress,
                                               tc_egress, msg_redirect)
    <pin_dir>/v<LAYOUT>/link_<name>   bpf links holding the cgroup attachments:
                                      unpinning (after LINK_DETACH) detaches them
    <pin_dir>/v<LAYOUT>/link_lookup_<netns cookie>
                                      a pod namespace's sk_lookup link (inbound path)
    <pin_dir>/v<LAYOUT>/link_tcx_...  a pod interface's tcx links (tc inbound path, opt-in)

The layout version is in the directory name and in every kernel map name (``mi3_*``), so a
node loaded by a build with another layout is recognised, never misread: this build loads
its own set beside it and moves the namespaces over (upgrade.py).
"""

from __future__ import annotations

import ctypes
import os
import re
from typing import Dict, List, Optional

from . import types as T
from . import bpfsys, uapi
from meshintercept.errors import BackendFailure

LAYOUT_DIR = f"v{T.LAYOUT_VERSION}"
LAYOUT_RE = re.compile(r"^v(\d+)$")
LOADING_RE = re.compile(r"^loading-v\d+-\d+$")  # bpffs refuses names with dots

#: pin name -> (kernel map name, key ctypes, value ctypes, per-CPU); None where the map's
#: keys or values are not data (socket storage, sockets, ring buffer records).
MAPS = {
    "config": ("mi3_config", ctypes.c_uint64, T.Config, False),
    "podip": ("mi3_podip", T.Addr, T.Pod, False),  # key: the address, IPv4 v4-mapped
    "origdst": ("mi3_origdst", T.Tuple, T.Origin, False),
    "counters": ("mi3_counters", ctypes.c_uint64, T.Counters, True),
    "sock": ("mi3_sock", None, T.Sock, False),
    "sockhash": ("mi3_sockhash", T.Tuple, None, False),  # values are sockets: keys only
    # inbound listeners: a put takes a socket fd, a get returns that socket's cookie
    "listen": ("mi3_listen", T.ListenKey, ctypes.c_uint64, False),
    "events": ("mi3_events", None, T.Event, False),
    "meta": ("mi3_meta", ctypes.c_uint32, T.Meta, False),
}

#: program pin name -> (function in bpf/, bpf prog type, expected attach type or -1)
PROGRAMS = {
    "connect4": ("mi_connect4", uapi.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, uapi.BPF_CGROUP_INET4_CONNECT),
    "connect6": ("mi_connect6", uapi.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, uapi.BPF_CGROUP_INET6_CONNECT),
    # --capture-dns: unconnected UDP queries, replies' source, DNS peers
    "sendmsg4": ("mi_sendmsg4", uapi.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, uapi.BPF_CGROUP_UDP4_SENDMSG),
    "sendmsg6": ("mi_sendmsg6", uapi.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, uapi.BPF_CGROUP_UDP6_SENDMSG),
    "recvmsg4": ("mi_recvmsg4", uapi.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, uapi.BPF_CGROUP_UDP4_RECVMSG),
    "recvmsg6": ("mi_recvmsg6", uapi.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, uapi.BPF_CGROUP_UDP6_RECVMSG),
    "getpeername4": ("mi_getpeername4", uapi.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, uapi.BPF_CGROUP_INET4_GETPEERNAME),
    "getpeername6": ("mi_getpeername6", uapi.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, uapi.BPF_CGROUP_INET6_GETPEERNAME),
    "sockops": ("mi_sockops", uapi.BPF_PROG_TYPE_SOCK_OPS, -1),
    "getsockopt": ("mi_getsockopt", uapi.BPF_PROG_TYPE_CGROUP_SOCKOPT, uapi.BPF_CGROUP_GETSOCKOPT),
    "lookup": ("mi_lookup", uapi.BPF_PROG_TYPE_SK_LOOKUP, uapi.BPF_SK_LOOKUP),
    "tc_ingress": ("mi_tc_ingress", uapi.BPF_PROG_TYPE_SCHED_CLS, -1),
    "tc_egress": ("mi_tc_egress", uapi.BPF_PROG_TYPE_SCHED_CLS, -1),
    "msg_redirect": ("mi_msg_redirect", uapi.BPF_PROG_TYPE_SK_MSG, -1),
}

#: cgroup attachments: link pin name -> (program pin name, attach type)
CGROUP_LINKS = {
    "connect4": ("connect4", uapi.BPF_CGROUP_INET4_CONNECT),
    "connect6": ("connect6", uapi.BPF_CGROUP_INET6_CONNECT),
    "sendmsg4": ("sendmsg4", uapi.BPF_CGROUP_UDP4_SENDMSG),
    "sendmsg6": ("sendmsg6", uapi.BPF_CGROUP_UDP6_SENDMSG),
    "recvmsg4": ("recvmsg4", uapi.BPF_CGROUP_UDP4_RECVMSG),
    "recvmsg6": ("recvmsg6", uapi.BPF_CGROUP_UDP6_RECVMSG),
    "getpeername4": ("getpeername4", uapi.BPF_CGROUP_INET4_GETPEERNAME),
    "getpeername6": ("getpeername6", uapi.BPF_CGROUP_INET6_GETPEERNAME),
    "sockops": ("sockops", uapi.BPF_CGROUP_SOCK_OPS),
    "getsockopt": ("getsockopt", uapi.BPF_CGROUP_GETSOCKOPT),
}

#: acceleration is optional: its absence is a warning, not a failure
OPTIONAL_PROGRAMS = ("msg_redirect",)


def lookup_link_name(cookie: int) -> str:
    """Pin name of a pod namespace's sk_lookup link."""
    return f"lookup_{cookie}"


def layout_dirs(pin_dir: str) -> List[str]:
    try:
        return sorted(n for n in os.listdir(pin_dir) if LAYOUT_RE.match(n))
    except OSError:
        return []


class NodePins:
    """Open pinned objects on demand; close them all with close() or a with-block."""

    def __init__(self, pin_dir: str):
        self.pin_dir = pin_dir
        self.dir = os.path.join(pin_dir, LAYOUT_DIR)
        self._fds: Dict[str, int] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            bpfsys.close(fd)
        self._fds.clear()

    def path(self, kind: str, name: str) -> str:
        return os.path.join(self.dir, f"{kind}_{name}")

    def loaded(self) -> bool:
        return os.path.exists(self.path("map", "config"))

    def fd(self, kind: str, name: str) -> int:
        key = f"{kind}_{name}"
        if key not in self._fds:
            path = self.path(kind, name)
            try:
                self._fds[key] = bpfsys.obj_get(path)
            except FileNotFoundError:
                raise BackendFailure(f"{path} is missing; the node's programs are not loaded or were removed.") from None
            except OSError as exc:
                raise BackendFailure(f"cannot open {path} ({exc.strerror}); run 'meshintercept doctor'.") from None
        return self._fds[key]

    def map(self, name: str) -> int:
        return self.fd("map", name)

    def table(self, name: str) -> bpfsys.TypedMap:
        """The pinned map ``name`` as a `bpfsys.TypedMap` of its key and value types."""
        _kernel, key, value, percpu = MAPS[name]
        return bpfsys.TypedMap(self.map(name), key, value, percpu)

    def prog(self, name: str) -> int:
        return self.fd("prog", name)

    def has(self, kind: str, name: str) -> bool:
        return os.path.exists(self.path(kind, name))

    def meta(self) -> Optional[T.Meta]:
        if not self.has("map", "meta"):
            return None
        return self.table("meta").get(0)

    def accelerate_available(self) -> bool:
        meta = self.meta()
        return bool(meta and meta.features & T.FEAT_ACCELERATE)
