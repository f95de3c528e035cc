"""Load one program through bcc with the verifier's log, and say why a kernel refused it.

bcc's own `BPF.load_func()` prints the verifier log to stderr and raises with the bare errno:
6.1 rejecting a loop as "The sequence of 8193 jumps is too complex" came out as "Bad address".
Here the same libbcc call (`bcc_func_load`, so BTF, program names and licence are handled as
bcc does) gets our buffer at BPF_LOG_STATS level: the verifier then writes its error lines and
its "processed N insns" total, but not the per-instruction trace, so a small buffer holds it on
every kernel (before 6.4 a full log buffer fails the load with ENOSPC, and keeps the start of
the log, not the end).

`explain()` turns errno + log into one of: a missing helper, program type or attach type (with
the first Linux release that has it), the verifier's complexity limit (with the instruction
count), a permission problem, or another rejection quoting the verifier's own last line.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from . import bpfsys, uapi
from meshintercept.errors import BackendFailure, ModeUnavailable, NotPermitted

BPF_LOG_STATS = 4
LOG_SIZE = 256 * 1024

#: The oldest kernel the ebpf mode runs on: the first with bpf_get_netns_cookie() in sockops
#: and cgroup/getsockopt programs (docs/ebpf.md, "Kernels").
FLOOR = "5.15"

PROG_TYPES = {
    bpfsys.BPF_PROG_TYPE_SCHED_CLS: ("sched_cls (tc)", "4.1"),
    bpfsys.BPF_PROG_TYPE_SOCK_OPS: ("sockops", "4.13"),
    bpfsys.BPF_PROG_TYPE_SK_MSG: ("sk_msg", "4.17"),
    bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR: ("cgroup/sock_addr", "4.17"),
    bpfsys.BPF_PROG_TYPE_CGROUP_SOCKOPT: ("cgroup/sockopt", "5.3"),
}
ATTACH_TYPES = {
    bpfsys.BPF_CGROUP_SOCK_OPS: ("cgroup sock_ops", "4.13"),
    bpfsys.BPF_SK_MSG_VERDICT: ("sk_msg verdict", "4.17"),
    bpfsys.BPF_CGROUP_INET4_CONNECT: ("cgroup/connect4", "4.17"),
    bpfsys.BPF_CGROUP_GETSOCKOPT: ("cgroup/getsockopt", "5.3"),
    bpfsys.BPF_TCX_INGRESS: ("tcx ingress", "6.6"),
    bpfsys.BPF_TCX_EGRESS: ("tcx egress", "6.6"),
}
#: First Linux release where a helper we call is allowed in a program type; a helper missing
#: from this table is named without a release.
HELPER_SINCE: Dict[Tuple[str, Optional[int]], str] = {
    ("bpf_get_netns_cookie", bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR): "5.7",
    ("bpf_get_netns_cookie", bpfsys.BPF_PROG_TYPE_SOCK_OPS): "5.15",
    ("bpf_get_netns_cookie", bpfsys.BPF_PROG_TYPE_CGROUP_SOCKOPT): "5.15",
    ("bpf_get_netns_cookie", bpfsys.BPF_PROG_TYPE_SK_MSG): "5.15",
    ("bpf_get_netns_cookie", None): "5.7",
    ("bpf_sk_storage_get", None): "5.2",
    ("bpf_ringbuf_output", None): "5.8",
    ("bpf_sock_hash_update", None): "4.18",
    ("bpf_msg_redirect_hash", None): "4.18",
}

#: Types that need an expected attach type to load at all: probe them with their oldest one.
TYPE_PROBE_ATTACH = {
    bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR: 8,  # BPF_CGROUP_INET4_BIND, as old as the type
    bpfsys.BPF_PROG_TYPE_CGROUP_SOCKOPT: bpfsys.BPF_CGROUP_GETSOCKOPT,
}

KINDS = ("helper", "program type", "attach type", "complexity", "permission", "rejected")

_PROCESSED = re.compile(r"processed (\d+) insns")
_HELPER_PATTERNS = (
    re.compile(r"program of this type cannot use helper (\w+)#(\d+)"),
    re.compile(r"unknown func (\w+)#(\d+)"),
    re.compile(r"invalid func (\w+)#(\d+)"),
)
_COMPLEXITY_PATTERNS = (
    re.compile(r"The sequence of \d+ jumps is too complex"),
    re.compile(r"BPF program is too large\. Processed \d+ insn"),
    re.compile(r"combined stack size of \d+ calls is \d+\. Too large"),
    re.compile(r"too many states"),
)
# Lines the verifier prints around any rejection that say nothing about the cause.
_NOISE = re.compile(r"^(processed \d+ insns|verification time|stack depth|func#\d|\d+: |;|from \d+ to \d+|"
                    r"R\d+=|last_idx|regs=|parent |mark_precise|propagating)")


def processed_insns(log: str) -> Optional[int]:
    found = _PROCESSED.findall(log)
    return int(found[-1]) if found else None


def _release() -> str:
    return os.uname().release


@dataclass
class Refusal:
    """Why a kernel refused one program: `kind` is one of KINDS, `feature` what is missing."""

    program: str
    kind: str
    errno: int
    feature: str = ""
    since: str = ""
    insns: Optional[int] = None
    line: str = ""
    log: str = ""

    @property
    def missing(self) -> bool:
        return self.kind in ("helper", "program type", "attach type")

    def cause(self) -> str:
        if self.missing:
            since = f" (first in Linux {self.since})" if self.since else ""
            needs = "which programs {} need" if "," in self.program else "which program {} needs"
            return f"this kernel ({_release()}) has no {self.feature}{since}, {needs.format(self.program)}"
        if self.kind == "complexity":
            count = f", {self.insns} instructions processed" if self.insns is not None else ""
            return f"program {self.program} is too complex for this kernel's verifier ({self.line}{count})"
        if self.kind == "permission":
            name = errno.errorcode.get(self.errno, str(self.errno))
            return f"the kernel did not permit loading program {self.program} ({name}{': ' + self.line if self.line else ''})"
        return f"the verifier rejected program {self.program} ({self.line or os.strerror(self.errno)})"

    def remedy(self) -> str:
        if self.missing:
            return f"the ebpf mode needs Linux >= {FLOOR}: use --mode iptables here or a newer kernel"
        if self.kind == "permission":
            return ("run as root with CAP_BPF and CAP_NET_ADMIN, and check kernel lockdown and LSM policy "
                    "(SELinux, AppArmor) for bpf")
        return "this is a bug in meshintercept's programs: report it with the output of 'meshintercept doctor --json'"

    def sentence(self) -> str:
        return f"{self.cause()}; {self.remedy()}."

    def error(self):
        if self.missing:
            return ModeUnavailable(self.sentence())
        if self.kind == "permission":
            return NotPermitted(self.sentence())
        return BackendFailure(self.sentence())


class ProgramRefused(BackendFailure):
    def __init__(self, refusal: Refusal):
        super().__init__(refusal.sentence())
        self.refusal = refusal


def _helper_name(name: str, number: int) -> str:
    """Kernels older than a helper print 'unknown#N'; name it from the headers bcc used."""
    if name != "unknown":
        return name
    return helper_names().get(number, f"helper #{number}")


_HELPERS: Optional[Dict[int, str]] = None


def _uapi_headers() -> List[str]:
    """The UAPI bpf.h files a node may have: linux-libc-dev's, then the kernel headers bcc
    compiles against (which the ebpf mode needs anyway), newest first."""
    release = os.uname().release
    paths = ["/usr/include/linux/bpf.h"]
    paths += [os.path.join("/lib/modules", release, d, "include/uapi/linux/bpf.h") for d in ("source", "build")]
    paths += sorted(glob.glob("/usr/src/linux-headers-*/include/uapi/linux/bpf.h"), reverse=True)
    return paths


def parse_helper_names(text: str) -> Dict[int, str]:
    """Helper number -> bpf_<name> from a UAPI bpf.h: ``FN(name)`` in order up to 6.1's header,
    ``FN(name, id, ##ctx)`` with explicit numbers from 6.2's."""
    names = re.findall(r"^\s*FN\((\w+)(?:,\s*(\d+))?", text, re.M)
    return {int(num) if num else i: f"bpf_{name}" for i, (name, num) in enumerate(names)}


def helper_names() -> Dict[int, str]:
    """Helper number -> bpf_<name>, from the first UAPI bpf.h at hand (`_uapi_headers`)."""
    global _HELPERS
    if _HELPERS is None:
        _HELPERS = {}
        for path in _uapi_headers():
            try:
                with open(path) as f:
                    _HELPERS = parse_helper_names(f.read())
            except OSError:
                continue
            if _HELPERS:
                break
    return _HELPERS


def _last_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    meaningful = [ln for ln in lines if not _NOISE.match(ln)]
    return (meaningful or lines or [""])[-1]


def explain(program: str, err: int, log: str, prog_type: int, attach_type: int = -1,
            type_loads=None) -> Refusal:
    """Classify a refused load. `type_loads(prog_type, attach_type) -> bool` probes whether a
    trivial program of that type loads (only consulted when the log is empty)."""
    insns = processed_insns(log)
    for pattern in _HELPER_PATTERNS:
        found = pattern.search(log)
        if found:
            helper = _helper_name(found.group(1), int(found.group(2)))
            type_name = PROG_TYPES.get(prog_type, (f"type {prog_type}",))[0]
            since = HELPER_SINCE.get((helper, prog_type)) or HELPER_SINCE.get((helper, None), "")
            return Refusal(program, "helper", err, f"{helper}() in {type_name} programs", since, insns)
    for pattern in _COMPLEXITY_PATTERNS:
        found = pattern.search(log)
        if found:
            return Refusal(program, "complexity", err, line=found.group(0).rstrip("."), insns=insns)
    if err == errno.E2BIG and insns is not None:
        return Refusal(program, "complexity", err, line="program too large", insns=insns)
    if err == errno.EPERM:
        return Refusal(program, "permission", err, line=_last_line(log))
    if not log.strip():
        if err == errno.EACCES:
            return Refusal(program, "permission", err)
        if err == errno.EINVAL and type_loads is not None:
            if not type_loads(prog_type, TYPE_PROBE_ATTACH.get(prog_type, -1)):
                name, since = PROG_TYPES.get(prog_type, (f"program type {prog_type}", ""))
                return Refusal(program, "program type", err, f"BPF program type {name}", since)
            if attach_type >= 0 and not type_loads(prog_type, attach_type):
                name, since = ATTACH_TYPES.get(attach_type, (f"attach type {attach_type}", ""))
                return Refusal(program, "attach type", err, f"BPF attach type {name}", since)
    return Refusal(program, "rejected", err, line=_last_line(log), insns=insns)


# --- loading -----------------------------------------------------------------------------
@dataclass
class Loaded:
    fd: int
    insns: Optional[int]
    log: str


class _StderrSilenced:
    """libbcc prints the whole verifier log to fd 2 on a failed load; we report it ourselves."""

    def __enter__(self):
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def _bcc_load(bpf, func: bytes, prog_type: int, attach_type: int, log_buf) -> Tuple[int, int]:
    from bcc.libbcc import lib

    start = lib.bpf_function_start(bpf.module, func)
    if not start:
        raise BackendFailure(f"bcc compiled no function {func.decode()}; the sources and pins.PROGRAMS disagree.")
    ctypes.set_errno(0)
    with _StderrSilenced():
        fd = lib.bcc_func_load(bpf.module, prog_type, func, start, lib.bpf_function_size(bpf.module, func),
                               lib.bpf_module_license(bpf.module), lib.bpf_module_kern_version(bpf.module),
                               BPF_LOG_STATS, log_buf, len(log_buf), None, attach_type)
    return fd, ctypes.get_errno()


def load(bpf, program: str, func: str, prog_type: int, attach_type: int = -1) -> Loaded:
    """Load `func` of a compiled bcc module; raise ProgramRefused with the reason.

    The fd is registered with bcc like `load_func()` does, so `bpf.cleanup()` closes it.
    """
    from bcc import BPF

    name = func.encode()
    if name in bpf.funcs:
        return Loaded(bpf.funcs[name].fd, None, "")
    size = LOG_SIZE
    while True:
        log_buf = ctypes.create_string_buffer(size)
        fd, err = _bcc_load(bpf, name, prog_type, attach_type, log_buf)
        if fd >= 0 or err != errno.ENOSPC or size >= 16 * LOG_SIZE:
            break
        size *= 4
    log = log_buf.value.decode(errors="replace")
    if fd < 0:
        refusal = explain(program, err, log, prog_type, attach_type, type_loads)
        refusal.log = log
        raise ProgramRefused(refusal)
    bpf.funcs[name] = BPF.Function(bpf, name, fd)
    return Loaded(fd, processed_insns(log), log)


# --- probing program and attach types ----------------------------------------------------
_RETURN_1 = bytes([0xB7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = 1; exit


def type_loads(prog_type: int, attach_type: int = -1) -> bool:
    """Does a two-instruction program of this type (and expected attach type) load?"""
    insns = ctypes.create_string_buffer(_RETURN_1, len(_RETURN_1))
    license = ctypes.create_string_buffer(b"GPL")
    attr = uapi.ProgLoadAttr(prog_type=prog_type, insn_cnt=2, insns=ctypes.addressof(insns),
                             license=ctypes.addressof(license), expected_attach_type=max(attach_type, 0))
    try:
        fd = bpfsys.sys_bpf(uapi.BPF_PROG_LOAD, attr, "probe program type")
    except OSError:
        return False
    bpfsys.close(fd)
    return True


def summarize(refusals: Iterable[Refusal]) -> Optional[Exception]:
    """One error for the refused required programs: the same missing helper is said once."""
    refusals = list(refusals)
    if not refusals:
        return None
    first = refusals[0]
    helper = first.feature.split("() in ")[0]
    same = [r for r in refusals if r.kind == "helper" and r.feature.startswith(helper + "() in ")]
    if first.kind != "helper" or len(same) < 2:
        return first.error()
    types = " and ".join(dict.fromkeys(r.feature.split("() in ", 1)[1][: -len(" programs")] for r in same))
    since = max((r.since for r in same if r.since), key=_version, default="")
    merged = Refusal(", ".join(r.program for r in same), "helper", first.errno, f"{helper}() in {types} programs", since)
    return merged.error()


def _version(text: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())
