"""The only code that compiles, loads, attaches and pins (and its inverse, unload).

A node's first ebpf enable calls `load()`: bcc compiles bpf/*.c into one unit, the programs
are loaded, maps and programs pinned, the cgroup programs attached to the node's cgroup
with bpf links (pinned too: unpinning detaches), sk_msg attached to the sockhash. All of it
is built in a temporary directory and renamed into place, so other commands see either a
complete node or none. Everything later opens the pins (pins.NodePins); bcc is never
imported again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import struct
import time
from typing import List, Optional

from . import types as T
from . import bpfsys, kheaders
from meshintercept.errors import BackendFailure, EnvironmentMissing, NotPermitted
from meshintercept.node import Node

from . import verifier
from .pins import CGROUP_LINKS, LAYOUT_DIR, LAYOUT_RE, LOADING_RE, MAPS, OPTIONAL_PROGRAMS, PROGRAMS, NodePins

BPF_FS_MAGIC = 0xCAFE4A11
DEFAULT_BPFFS = "/sys/fs/bpf"

#: Concatenated in this order into bcc's main file: bcc only rewrites map calls there.
SOURCES = ("lib/helpers.h", "lib/dns.h", "mi_connect.c", "mi_sendmsg.c", "mi_recvmsg.c", "mi_getpeername.c",
           "mi_sockops.c", "mi_getsockopt.c", "mi_lookup.c", "mi_tc.c", "mi_redir.c")
CFLAGS = ("-Wno-unused-function", "-Wno-macro-redefined", "-Wno-compare-distinct-pointer-types")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def bpf_dir() -> str:
    import meshintercept.bpf as pkg

    return os.path.dirname(pkg.__file__)


def source_text() -> str:
    base = bpf_dir()
    parts = []
    for name in SOURCES:
        with open(os.path.join(base, name)) as f:
            parts.append(f'#line 1 "{name}"\n{f.read()}\n')
    return "".join(parts)


def build_hash() -> int:
    """Identifies the sources a node was loaded from (shown by status)."""
    digest = hashlib.sha256()
    base = bpf_dir()
    for name in SOURCES + ("common.h",):
        with open(os.path.join(base, name), "rb") as f:
            digest.update(f.read())
    return struct.unpack("=Q", digest.digest()[:8])[0]


# --- bpffs -------------------------------------------------------------------------------
def fs_magic(path: str) -> Optional[int]:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is the first word
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return struct.unpack_from("=q", buf, 0)[0] & 0xFFFFFFFF


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def is_bpffs(path: str) -> bool:
    return fs_magic(_existing_ancestor(path)) == BPF_FS_MAGIC


def ensure_bpffs(pin_dir: str) -> None:
    """Mount bpffs at /sys/fs/bpf when the pin dir lives there and nothing is mounted."""
    if is_bpffs(pin_dir):
        return
    pin_dir = os.path.abspath(pin_dir)
    if pin_dir == DEFAULT_BPFFS or pin_dir.startswith(DEFAULT_BPFFS + "/"):
        os.makedirs(DEFAULT_BPFFS, exist_ok=True)
        if _libc.mount(b"bpf", DEFAULT_BPFFS.encode(), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise EnvironmentMissing(
                f"cannot mount bpffs at {DEFAULT_BPFFS} ({os.strerror(err)}); run 'mount -t bpf bpf {DEFAULT_BPFFS}' as root."
            )
        if is_bpffs(pin_dir):
            return
    raise EnvironmentMissing(
        f"pin directory {pin_dir} is not on a bpf filesystem; choose --pin-dir under {DEFAULT_BPFFS} "
        f"or mount one with 'mount -t bpf bpf <dir>'."
    )


def open_cgroup(path: str) -> int:

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise EnvironmentMissing(f"cgroup {path} does not exist; give --cgroup a cgroup-v2 directory.") from None
    if fs_magic(path) != 0x63677270:  # CGROUP2_SUPER_MAGIC
        os.close(fd)
        raise EnvironmentMissing(
            f"{path} is not a cgroup-v2 directory; give --cgroup a directory under a cgroup2 mount "
            f"(mount one with 'mount -t cgroup2 none /sys/fs/cgroup/unified')."
        )
    return fd


# --- load --------------------------------------------------------------------------------
def compile_programs():
    """Compile with bcc; returns the bcc.BPF object (maps created, programs not loaded)."""
    kheaders.ensure()
    try:
        from bcc import BPF
    except ImportError:
        raise EnvironmentMissing(
            "bcc is not importable; install Debian/Ubuntu's python3-bpfcc and run meshintercept with /usr/bin/python3 "
            "or a venv made with --system-site-packages."
        ) from None
    cflags = [f"-I{bpf_dir()}", *CFLAGS]
    try:
        return BPF(text=source_text().encode(), cflags=cflags)
    except Exception as exc:
        raise BackendFailure(f"bcc could not compile the eBPF programs ({exc}); run 'meshintercept doctor'.") from exc


def _map_fd(bpf, kernel_name: str) -> int:
    # bcc's get_table() cannot wrap every map type (sk_storage); the fd is all we need.
    from bcc.libbcc import lib

    fd = lib.bpf_table_fd(bpf.module, kernel_name.encode())
    if fd < 0:
        raise BackendFailure(f"bcc created no map {kernel_name}; the sources and bpf_types disagree.")
    return fd


def load_program(bpf, pin_name: str) -> verifier.Loaded:
    """Load one program; a refusal raises verifier.ProgramRefused saying why (never a bare errno)."""
    func, prog_type, attach_type = PROGRAMS[pin_name]
    return verifier.load(bpf, pin_name, func, prog_type, attach_type)


def load(node: Node) -> List[str]:
    """Compile, load, pin and attach the node's programs unless already there.

    Returns warnings (e.g. acceleration unavailable). Raises with everything undone.
    """
    if os.geteuid() != 0:
        raise NotPermitted("loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN); run as root.")
    from . import upgrade

    pins = NodePins(node.pin_dir)
    if pins.loaded():
        return []
    upgrade.check(node.pin_dir)  # another build's layout may stay beside ours; junk may not
    ensure_bpffs(node.pin_dir)
    os.makedirs(node.pin_dir, exist_ok=True)
    cgroup_fd = open_cgroup(node.cgroup)
    tmp = os.path.join(node.pin_dir, f"loading-{LAYOUT_DIR}-{os.getpid()}")
    os.mkdir(tmp)
    link_fds: List[int] = []
    bpf = None
    warnings: List[str] = []
    try:
        bpf = compile_programs()
        prog_fds = {}
        refused = []
        # Every program is tried before anything is pinned, so a kernel that lacks a feature
        # is told all of it at once and keeps nothing of ours.
        for name in PROGRAMS:
            try:
                prog_fds[name] = load_program(bpf, name).fd
            except verifier.ProgramRefused as exc:
                if name in OPTIONAL_PROGRAMS:
                    warnings.append(f"acceleration unavailable: {exc.refusal.cause()}")
                else:
                    refused.append(exc.refusal)
        if refused:
            raise verifier.summarize(refused)
        for name, (kernel_name, *_types) in MAPS.items():
            bpfsys.obj_pin(_map_fd(bpf, kernel_name), os.path.join(tmp, f"map_{name}"))
        for name, fd in prog_fds.items():
            bpfsys.obj_pin(fd, os.path.join(tmp, f"prog_{name}"))
        features = T.FEAT_LOOKUP
        if "msg_redirect" in prog_fds:
            try:
                bpfsys.prog_attach(prog_fds["msg_redirect"], _map_fd(bpf, "mi3_sockhash"),
                                   bpfsys.BPF_SK_MSG_VERDICT)
                features |= T.FEAT_ACCELERATE
            except OSError as exc:
                warnings.append(f"acceleration unavailable: sk_msg would not attach to the sockhash ({exc.strerror})")
        meta = T.Meta(layout_version=T.LAYOUT_VERSION, features=features, build_hash=build_hash(),
                      loaded_at_ns=time.time_ns())
        bpfsys.TypedMap(_map_fd(bpf, "mi3_meta"), ctypes.c_uint32, T.Meta).put(0, meta)
        for link_name, (prog_name, attach_type) in CGROUP_LINKS.items():
            try:
                fd = bpfsys.link_create(prog_fds[prog_name], cgroup_fd, attach_type)
            except OSError as exc:
                raise BackendFailure(
                    f"cannot attach {prog_name} to cgroup {node.cgroup} ({exc.strerror}); run 'meshintercept doctor'."
                ) from None
            link_fds.append(fd)
            bpfsys.obj_pin(fd, os.path.join(tmp, f"link_{link_name}"))
        os.rename(tmp, pins.dir)
    except BaseException:
        for fd in link_fds:
            try:
                bpfsys.link_detach(fd)
            except OSError:
                pass
        _remove_dir(tmp)
        raise
    finally:
        for fd in link_fds:
            bpfsys.close(fd)
        os.close(cgroup_fd)
        if bpf is not None:
            bpf.cleanup()
    return warnings


# --- unload ------------------------------------------------------------------------------
def remove_layout(path: str) -> List[str]:
    """Detach and unpin one layout dir (this build's or another's)."""
    return _remove_dir(path)


def _remove_dir(path: str) -> List[str]:
    """Detach links, detach sk_msg, unpin everything in one layout dir, remove it."""
    removed: List[str] = []
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith("link_"):
            full = os.path.join(path, name)
            try:
                fd = bpfsys.obj_get(full)
                try:
                    bpfsys.link_detach(fd)
                finally:
                    bpfsys.close(fd)
            except OSError:
                pass
    if "prog_msg_redirect" in names and "map_sockhash" in names:
        try:
            prog = bpfsys.obj_get(os.path.join(path, "prog_msg_redirect"))
            sockhash = bpfsys.obj_get(os.path.join(path, "map_sockhash"))
            try:
                bpfsys.prog_detach(prog, sockhash, bpfsys.BPF_SK_MSG_VERDICT)
            except OSError:
                pass
            finally:
                bpfsys.close(prog)
                bpfsys.close(sockhash)
        except OSError:
            pass
    for name in names:
        full = os.path.join(path, name)
        try:
            os.unlink(full)
            removed.append(full)
        except IsADirectoryError:
            removed.extend(_remove_dir(full))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(path)
        removed.append(path)
    except OSError:
        pass
    return removed


def unload(node: Node) -> List[str]:
    """Detach and unpin every layout of this node, then remove the pin dir if empty."""
    removed: List[str] = []
    try:
        names = os.listdir(node.pin_dir)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        if LAYOUT_RE.match(name) or LOADING_RE.match(name):
            removed.extend(_remove_dir(os.path.join(node.pin_dir, name)))
    try:
        os.rmdir(node.pin_dir)
        removed.append(node.pin_dir)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT,):
            raise BackendFailure(
                f"{node.pin_dir} still holds objects meshintercept did not create ({exc.strerror}); remove them by hand."
            ) from None
    return removed
