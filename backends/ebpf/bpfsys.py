"""Raw bpf(2) syscalls through ctypes: open pinned objects and work their maps without bcc.

Every command after a node's first enable (enable another namespace, disable, status,
maps dump, trace) goes through here: no compile, no bcc import, a few syscalls. Only the
loader imports bcc.

``union bpf_attr`` is built per command as a zeroed 128-byte buffer with the fields packed
at their UAPI offsets (include/uapi/linux/bpf.h); the kernel rejects non-zero bytes past the
fields a command knows, so the zero fill matters.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from typing import Iterator, List, Optional, Tuple

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

# Commands (enum bpf_cmd)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_BATCH = 24
BPF_LINK_CREATE = 28
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_DETACH = 34

# Attach types (enum bpf_attach_type)
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_MSG_VERDICT = 7
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_GETSOCKOPT = 21
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_LINK_TYPE_TCX = 11

# Program types (enum bpf_prog_type)
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_SK_MSG = 16
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25

# Map types
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_SOCKHASH = 18
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_MAP_TYPE_RINGBUF = 27

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_ALLOW_MULTI = 2
BPF_F_RDONLY = 1 << 3

ATTR_SIZE = 128

# The process's own symbols include libc: no find_library (it forks ldconfig, ~10 ms per CLI run).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A failed bpf(2) call; .errno is the kernel's answer."""


def _nr() -> int:
    machine = platform.machine()
    try:
        return _NR_BPF[machine]
    except KeyError:
        raise BpfError(errno.ENOSYS, f"bpf(2) syscall number unknown for {machine}") from None


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def sys_bpf(cmd: int, attr: ctypes.Array, what: str = "") -> int:
    ret = _libc.syscall(_nr(), ctypes.c_int(cmd), attr, ctypes.c_uint(ATTR_SIZE))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what or 'bpf'}: {os.strerror(err)}")
    return ret


def _attr(fmt: str, *values) -> ctypes.Array:
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


# --- objects -----------------------------------------------------------------------------
def obj_get(path: str, readonly: bool = False) -> int:
    """Open a pinned map, program or link; returns a new fd (caller closes)."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = _attr("=QII", _addr(cpath), 0, BPF_F_RDONLY if readonly else 0)
    return sys_bpf(BPF_OBJ_GET, attr, f"open {path}")


def obj_pin(fd: int, path: str) -> None:
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    sys_bpf(BPF_OBJ_PIN, _attr("=QI", _addr(cpath), fd), f"pin {path}")


def close(fd: Optional[int]) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


# --- maps --------------------------------------------------------------------------------
def map_lookup(fd: int, key: bytes, value_size: int) -> Optional[bytes]:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    try:
        sys_bpf(BPF_MAP_LOOKUP_ELEM, _attr("=IIQQQ", fd, 0, _addr(kbuf), _addr(vbuf), 0), "map lookup")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return vbuf.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    sys_bpf(BPF_MAP_UPDATE_ELEM, _attr("=IIQQQ", fd, 0, _addr(kbuf), _addr(vbuf), flags), "map update")


def map_delete(fd: int, key: bytes) -> bool:
    kbuf = ctypes.create_string_buffer(key, len(key))
    try:
        sys_bpf(BPF_MAP_DELETE_ELEM, _attr("=IIQ", fd, 0, _addr(kbuf)), "map delete")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_next_key(fd: int, key: Optional[bytes], key_size: int) -> Optional[bytes]:
    kbuf = ctypes.create_string_buffer(key, key_size) if key is not None else None
    nbuf = ctypes.create_string_buffer(key_size)
    try:
        sys_bpf(BPF_MAP_GET_NEXT_KEY, _attr("=IIQQ", fd, 0, _addr(kbuf), _addr(nbuf)), "map next key")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return nbuf.raw


def map_keys(fd: int, key_size: int) -> List[bytes]:
    """All keys, collected first so callers may delete while going through them."""
    keys, key = [], None
    while True:
        key = map_next_key(fd, key, key_size)
        if key is None:
            return keys
        keys.append(key)
        if len(keys) > 10_000_000:  # a map never holds that many; a kernel loop would
            raise BpfError(errno.ELOOP, "map iteration did not end")


def map_items(fd: int, key_size: int, value_size: int) -> Iterator[Tuple[bytes, bytes]]:
    for key in map_keys(fd, key_size):
        value = map_lookup(fd, key, value_size)
        if value is not None:  # deleted meanwhile
            yield key, value


def map_keys_batch(fd: int, key_size: int, value_size: int, batch: int = 1024) -> List[bytes]:
    """All keys with BPF_MAP_LOOKUP_BATCH (see ``map_items_batch``)."""
    return [k for k, _v in map_items_batch(fd, key_size, value_size, batch)]


def map_items_batch(fd: int, key_size: int, value_size: int, batch: int = 1024) -> List[Tuple[bytes, bytes]]:
    """All (key, value) pairs with BPF_MAP_LOOKUP_BATCH: one syscall per ``batch`` entries
    instead of two per key (hash, LRU and per-CPU hash maps; kernel >= 5.6; a per-CPU
    value_size is the whole per-CPU array). Falls back to key-by-key walking when the
    kernel or map type does not support batches (EINVAL/ENOTSUPP)."""
    items: List[Tuple[bytes, bytes]] = []
    kbuf = ctypes.create_string_buffer(key_size * batch)
    vbuf = ctypes.create_string_buffer(value_size * batch)
    token_in = ctypes.create_string_buffer(max(key_size, 8))
    token_out = ctypes.create_string_buffer(max(key_size, 8))
    first = True
    while True:
        attr = _attr("=QQQQIIQQ", 0 if first else _addr(token_in), _addr(token_out), _addr(kbuf), _addr(vbuf),
                     batch, fd, 0, 0)
        done = False
        ret = _libc.syscall(_nr(), ctypes.c_int(BPF_MAP_LOOKUP_BATCH), attr, ctypes.c_uint(ATTR_SIZE))
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                done = True
            elif first and err in (errno.EINVAL, errno.ENOTSUP, 524):  # 524: the kernel's ENOTSUPP
                return list(map_items(fd, key_size, value_size))
            else:
                raise BpfError(err, f"map lookup batch: {os.strerror(err)}")
        count = struct.unpack_from("=I", attr, 32)[0]
        keys, values = kbuf.raw, vbuf.raw
        items.extend((keys[i * key_size:(i + 1) * key_size], values[i * value_size:(i + 1) * value_size])
                     for i in range(count))
        if done:
            return items
        ctypes.memmove(token_in, token_out, len(token_out))
        first = False


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "") -> int:
    """Create an anonymous map (doctor probes); returns its fd."""
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("=IIIII", attr, 0, map_type, key_size, value_size, max_entries, 0)
    struct.pack_into("16s", attr, 28, name.encode()[:15])
    return sys_bpf(BPF_MAP_CREATE, attr, f"create map {name}")


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


# --- attach ------------------------------------------------------------------------------
def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A bpf link attaching prog to target (cgroup fd); multi-attach like BPF_F_ALLOW_MULTI."""
    return sys_bpf(BPF_LINK_CREATE, _attr("=IIII", prog_fd, target_fd, attach_type, 0), "link create")


def tcx_link_create(prog_fd: int, ifindex: int, attach_type: int) -> int:
    """A tcx link (kernel >= 6.6) on interface ``ifindex`` of the calling thread's network
    namespace; appended after any programs already attached (relative_fd 0, no revision)."""
    return sys_bpf(BPF_LINK_CREATE, _attr("=IIII", prog_fd, ifindex, attach_type, 0), "tcx link create")


def link_detach(link_fd: int) -> None:
    sys_bpf(BPF_LINK_DETACH, _attr("=I", link_fd), "link detach")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    sys_bpf(BPF_PROG_ATTACH, _attr("=IIII", target_fd, prog_fd, attach_type, flags), "prog attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    sys_bpf(BPF_PROG_DETACH, _attr("=III", target_fd, prog_fd, attach_type), "prog detach")


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64) -> List[int]:
    """Program ids attached to a cgroup for one attach type (directly, not inherited)."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    # target_fd, attach_type, query_flags, attach_flags, prog_ids (u64), prog_cnt
    struct.pack_into("=IIIIQI", attr, 0, target_fd, attach_type, 0, 0, ctypes.addressof(ids), max_progs)
    sys_bpf(BPF_PROG_QUERY, attr, "prog query")
    count = struct.unpack_from("=I", attr, 24)[0]
    return [ids[i] for i in range(min(count, max_progs))]


def prog_fd_by_id(prog_id: int) -> int:
    return sys_bpf(BPF_PROG_GET_FD_BY_ID, _attr("=I", prog_id), f"open program id {prog_id}")


# --- info --------------------------------------------------------------------------------
def _info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, size, ctypes.addressof(buf)), "object info")
    return buf.raw


def map_info(fd: int) -> dict:
    raw = _info(fd, 88)
    mtype, mid, ksize, vsize, maxent, flags = struct.unpack_from("=IIIIII", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return {"type": mtype, "id": mid, "key_size": ksize, "value_size": vsize, "max_entries": maxent,
            "flags": flags, "name": name}


def prog_info(fd: int) -> dict:
    raw = _info(fd, 232)
    ptype, pid = struct.unpack_from("=II", raw, 0)
    tag = raw[8:16].hex()
    name = raw[64:80].split(b"\0", 1)[0].decode()
    return {"type": ptype, "id": pid, "tag": tag, "name": name}


def link_info(fd: int) -> dict:
    raw = _info(fd, 64)
    ltype, lid, prog_id = struct.unpack_from("=III", raw, 0)
    out = {"type": ltype, "id": lid, "prog_id": prog_id}
    if ltype == BPF_LINK_TYPE_TCX:
        # ifindex 0: the device went away and the kernel detached the link
        out["ifindex"], out["attach_type"] = struct.unpack_from("=II", raw, 16)
    return out
