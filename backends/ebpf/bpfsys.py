"""Raw bpf(2) calls through ctypes: open pinned objects and work their maps without bcc.

Every command after a node's first enable (enable another namespace, disable, status,
maps dump, trace) goes through here: no compile, no bcc import, a few syscalls. Only the
loader imports bcc. Attributes and info records are the named structures of `uapi`;
maps are read and written as ctypes values through `TypedMap`, so no caller packs bytes.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
from typing import Any, List, Optional, Tuple, Type

from . import uapi
from .uapi import (BPF_ANY, BPF_CGROUP_GETSOCKOPT, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT,  # noqa: F401
                   BPF_CGROUP_SOCK_OPS, BPF_EXIST, BPF_F_ALLOW_MULTI, BPF_F_QUERY_EFFECTIVE, BPF_LINK_TYPE_NETNS, BPF_LINK_TYPE_TCX,
                   BPF_MAP_TYPE_RINGBUF, BPF_MAP_TYPE_SOCKHASH, BPF_NOEXIST, BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                   BPF_PROG_TYPE_CGROUP_SOCKOPT, BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_SK_LOOKUP,
                   BPF_PROG_TYPE_SK_MSG, BPF_PROG_TYPE_SOCK_OPS, BPF_SK_LOOKUP, BPF_SK_MSG_VERDICT, BPF_TCX_EGRESS,
                   BPF_TCX_INGRESS)

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}
#: The kernel's ENOTSUPP (not the userspace ENOTSUP): an operation this map type lacks.
ENOTSUPP = 524

# The process's own symbols include libc: no find_library (it forks ldconfig, ~10 ms per CLI run).
_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class BpfError(OSError):
    """A failed bpf(2) call; .errno is the kernel's answer."""


def _nr() -> int:
    machine = platform.machine()
    try:
        return _NR_BPF[machine]
    except KeyError:
        raise BpfError(errno.ENOSYS, f"bpf(2) syscall number unknown for {machine}") from None


def _addr(obj) -> int:
    return ct.addressof(obj) if obj is not None else 0


#: Room for all of ``union bpf_attr``: some commands write fields past the ones a caller
#: knows (BPF_PROG_QUERY writes ``query.revision`` since 6.6), so the kernel never gets a
#: pointer to an attribute structure shorter than the union.
_ATTR_ROOM = 512


def sys_bpf(cmd: int, attr: ct.Structure, what: str = "") -> int:
    """One bpf(2) call with a `uapi` attribute structure; raises BpfError with the errno.

    The structure's own size is what the kernel is told (the rest counts as zero); the call
    works on a copy in a union-sized buffer, and what the kernel wrote back is copied into ``attr``.
    """
    size = ct.sizeof(attr)
    room = (ct.c_ubyte * _ATTR_ROOM)()
    ct.memmove(room, ct.byref(attr), size)
    ret = _libc.syscall(_nr(), ct.c_int(cmd), room, ct.c_uint(size))
    err = ct.get_errno() if ret < 0 else 0
    ct.memmove(ct.byref(attr), room, size)
    if ret < 0:
        raise BpfError(err, f"{what or 'bpf'}: {os.strerror(err)}")
    return ret


# --- objects -----------------------------------------------------------------------------
def obj_get(path: str, readonly: bool = False) -> int:
    """Open a pinned map, program or link; returns a new fd (caller closes)."""
    cpath = ct.create_string_buffer(os.fsencode(path))
    attr = uapi.ObjAttr(pathname=_addr(cpath), file_flags=uapi.BPF_F_RDONLY if readonly else 0)
    return sys_bpf(uapi.BPF_OBJ_GET, attr, f"open {path}")


def obj_pin(fd: int, path: str) -> None:
    cpath = ct.create_string_buffer(os.fsencode(path))
    sys_bpf(uapi.BPF_OBJ_PIN, uapi.ObjAttr(pathname=_addr(cpath), bpf_fd=fd), f"pin {path}")


def close(fd: Optional[int]) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


# --- maps --------------------------------------------------------------------------------
def possible_cpus() -> int:
    """How many per-CPU slots a per-CPU map value has (/sys/devices/system/cpu/possible)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def _plain(value):
    """A ctypes scalar as a Python int; a structure as a copy (batch buffers are reused)."""
    if isinstance(value, ct._SimpleCData):
        return value.value
    if isinstance(value, int):  # an element of an array of scalars is an int already
        return value
    return type(value).from_buffer_copy(value)


class TypedMap:
    """A map fd whose keys and values are ctypes types: ``get``/``put``/``delete``/``items``.

    Keys may be given as ctypes values or as what their type's constructor takes (an int for
    ``c_uint64``). Scalar keys come back as ints. A per-CPU map's value is a list with one
    value per possible CPU (`sum_percpu` adds them up). The fd stays the caller's.
    """

    def __init__(self, fd: int, key_type: Type, value_type: Optional[Type], percpu: bool = False):
        """``value_type`` None: a map whose values are not data (a sockhash); only keys() and delete()."""
        self.fd, self.key_type, self.value_type, self.percpu = fd, key_type, value_type, percpu
        self._ncpus = possible_cpus() if percpu else 1
        size = ct.sizeof(value_type) if value_type is not None else 0
        self._stride = (size + 7) & ~7 if percpu else size
        self._value_buf = ct.c_ubyte * (self._stride * self._ncpus) if percpu else value_type

    def _key(self, key):
        return key if isinstance(key, self.key_type) else self.key_type(key)

    def _decode(self, buf):
        if not self.percpu:
            return _plain(buf)
        raw = bytes(buf)
        size = ct.sizeof(self.value_type)
        return [self.value_type.from_buffer_copy(raw[i * self._stride:i * self._stride + size])
                for i in range(self._ncpus)]

    def _elem(self, cmd: int, key, value=None, flags: int = 0, what: str = "") -> None:
        attr = uapi.MapElemAttr(map_fd=self.fd, key=_addr(key), value=_addr(value), flags=flags)
        sys_bpf(cmd, attr, what)

    def get(self, key) -> Optional[Any]:
        value = self._value_buf()
        try:
            self._elem(uapi.BPF_MAP_LOOKUP_ELEM, self._key(key), value, what="map lookup")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return self._decode(value)

    def put(self, key, value, flags: int = BPF_ANY) -> None:
        """Write one entry (a per-CPU map gets the same value on every CPU)."""
        if self.percpu:
            one = bytes(value).ljust(self._stride, b"\0")
            value = self._value_buf.from_buffer_copy(one * self._ncpus)
        self._elem(uapi.BPF_MAP_UPDATE_ELEM, self._key(key), value, flags, "map update")

    def delete(self, key) -> bool:
        try:
            self._elem(uapi.BPF_MAP_DELETE_ELEM, self._key(key), what="map delete")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> List[Any]:
        """All keys, collected first so callers may delete while going through them."""
        keys: List[Any] = []
        current = None
        while True:
            nxt = self.key_type()
            try:
                self._elem(uapi.BPF_MAP_GET_NEXT_KEY, current, nxt, what="map next key")
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    return keys
                raise
            keys.append(_plain(nxt))
            current = nxt
            if len(keys) > 10_000_000:  # a map never holds that many; a kernel loop would
                raise BpfError(errno.ELOOP, "map iteration did not end")

    def items(self, batch: int = 1024) -> List[Tuple[Any, Any]]:
        """All (key, value) pairs: BPF_MAP_LOOKUP_BATCH, one syscall per ``batch`` entries instead
        of two per key (hash, LRU and per-CPU hash maps); key by key where a map type or kernel
        has no batches."""
        out: List[Tuple[Any, Any]] = []
        keys = (self.key_type * batch)()
        values = (self._value_buf * batch)()
        token_in, token_out = self.key_type(), self.key_type()
        first = True
        while True:
            attr = uapi.MapBatchAttr(in_batch=0 if first else _addr(token_in), out_batch=_addr(token_out),
                                     keys=_addr(keys), values=_addr(values), count=batch, map_fd=self.fd)
            done = False
            try:
                sys_bpf(uapi.BPF_MAP_LOOKUP_BATCH, attr, "map lookup batch")
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    done = True  # the last (possibly partial) batch
                elif first and exc.errno in (errno.EINVAL, errno.ENOTSUP, ENOTSUPP):
                    return self._items_one_by_one()
                else:
                    raise
            out.extend((_plain(keys[i]), self._decode(values[i])) for i in range(attr.count))
            if done:
                return out
            ct.memmove(ct.byref(token_in), ct.byref(token_out), ct.sizeof(token_in))
            first = False

    def _items_one_by_one(self) -> List[Tuple[Any, Any]]:
        out = []
        for key in self.keys():
            value = self.get(key)
            if value is not None:  # deleted meanwhile
                out.append((key, value))
        return out

    def __len__(self) -> int:
        return len(self.keys())


def sum_percpu(values: List[ct.Structure]):
    """Add up the per-CPU copies of a structure of counters."""
    cls = type(values[0])
    total = cls()
    for one in values:
        for name, _ in cls._fields_:
            setattr(total, name, getattr(total, name) + getattr(one, name))
    return total


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "") -> int:
    """Create an anonymous map (doctor probes); returns its fd."""
    attr = uapi.MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                              max_entries=max_entries, map_name=name.encode()[:15])
    return sys_bpf(uapi.BPF_MAP_CREATE, attr, f"create map {name}")


# --- attach ------------------------------------------------------------------------------
def link_create(prog_fd: int, target: int, attach_type: int) -> int:
    """A bpf link attaching a program to ``target``: a cgroup or netns fd, or for the tcx
    attach types an ifindex of the calling thread's namespace (appended after what is there)."""
    attr = uapi.LinkCreateAttr(prog_fd=prog_fd, target=target, attach_type=attach_type)
    return sys_bpf(uapi.BPF_LINK_CREATE, attr, "link create")


def link_detach(link_fd: int) -> None:
    sys_bpf(uapi.BPF_LINK_DETACH, uapi.LinkDetachAttr(link_fd=link_fd), "link detach")


def unpin_link(path: str) -> bool:
    """Detach a pinned link (if still attached) and unpin it; False when there was none."""
    try:
        fd = obj_get(path)
    except FileNotFoundError:
        return False
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                link_detach(fd)
            except OSError:
                pass  # already detached (its device or namespace went away)
    finally:
        close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    attr = uapi.ProgAttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type, attach_flags=flags)
    sys_bpf(uapi.BPF_PROG_ATTACH, attr, "prog attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    attr = uapi.ProgAttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    sys_bpf(uapi.BPF_PROG_DETACH, attr, "prog detach")


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64, effective: bool = False) -> List[int]:
    """Program ids attached to a cgroup for one attach type (``effective``: inherited ones too)."""
    ids = (ct.c_uint32 * max_progs)()
    attr = uapi.QueryAttr(target_fd=target_fd, attach_type=attach_type, prog_ids=_addr(ids), prog_cnt=max_progs,
                          query_flags=BPF_F_QUERY_EFFECTIVE if effective else 0)
    sys_bpf(uapi.BPF_PROG_QUERY, attr, "prog query")
    return list(ids[:min(attr.prog_cnt, max_progs)])


def prog_fd_by_id(prog_id: int) -> int:
    return sys_bpf(uapi.BPF_PROG_GET_FD_BY_ID, uapi.GetIdAttr(id=prog_id), f"open program id {prog_id}")


# --- info --------------------------------------------------------------------------------
def _info(fd: int, cls):
    info = cls()
    sys_bpf(uapi.BPF_OBJ_GET_INFO_BY_FD, uapi.InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=_addr(info)),
            "object info")
    return info


def map_info(fd: int) -> dict:
    i = _info(fd, uapi.MapInfo)
    return {"type": i.type, "id": i.id, "key_size": i.key_size, "value_size": i.value_size,
            "max_entries": i.max_entries, "flags": i.map_flags, "name": i.name.decode()}


def prog_info(fd: int) -> dict:
    i = _info(fd, uapi.ProgInfo)
    return {"type": i.type, "id": i.id, "tag": bytes(i.tag).hex(), "name": i.name.decode(),
            "run_cnt": i.run_cnt, "run_time_ns": i.run_time_ns, "verified_insns": i.verified_insns}


def link_info(fd: int) -> dict:
    i = _info(fd, uapi.LinkInfo)
    out = {"type": i.type, "id": i.id, "prog_id": i.prog_id}
    if i.type == BPF_LINK_TYPE_TCX:
        # ifindex 0: the device went away and the kernel detached the link
        out["ifindex"], out["attach_type"] = i.target, i.target_attach_type
    elif i.type == BPF_LINK_TYPE_NETNS:
        # netns_ino 0: the namespace went away and the kernel detached the link
        out["netns_ino"], out["attach_type"] = i.target, i.target_attach_type
    return out
