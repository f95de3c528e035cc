"""`doctor` for the ebpf mode: try each thing for real, name the fix of each failure.

Nothing here trusts a version number. Programs are compiled, loaded and attached in a
throwaway child cgroup that is removed again; maps are created and closed. The node's own
attach point is only read (which programs sit at its connect4 hook).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import subprocess
from typing import List

from . import bpfsys, kheaders
from . import types as T
from meshintercept.interceptor import Check
from meshintercept.node import Node
from meshintercept.state import NamespaceRecord

from .pins import CGROUP_LINKS, OPTIONAL_PROGRAMS, PROGRAMS, NodePins


def _try(name: str, fn, fix: str, warning: bool = False) -> Check:
    try:
        detail = fn() or ""
        return Check(name, True, detail)
    except Exception as exc:  # noqa: BLE001 - a doctor reports, it never raises
        message = getattr(exc, "message", None) or str(exc)
        return Check(name, False, message, fix, warning=warning)


def _root():
    if os.geteuid() != 0:
        raise PermissionError("not running as root")
    return "running as root"


def _cgroup(node: Node):
    from .loader import open_cgroup

    os.close(open_cgroup(node.cgroup))
    return f"{node.cgroup} is cgroup v2"


def _bpffs(node: Node):
    from .loader import DEFAULT_BPFFS, is_bpffs

    if is_bpffs(node.pin_dir):
        return f"{node.pin_dir} is on bpffs"
    if node.pin_dir.startswith(DEFAULT_BPFFS):
        return f"bpffs is not mounted at {DEFAULT_BPFFS}; the first enable mounts it"
    raise RuntimeError(f"{node.pin_dir} is not on a bpf filesystem")


def _tracefs():
    from .trace import TRACEFS_CANDIDATES

    for path in TRACEFS_CANDIDATES:
        if os.path.exists(os.path.join(path, "trace_pipe")):
            return f"trace_pipe at {path}"
    raise RuntimeError("tracefs is not mounted (debug lines cannot be read)")


def _headers():
    found = kheaders.find()
    if found is None:
        raise RuntimeError(f"no kernel headers for bcc under {kheaders.MODULES_ROOT}")
    own = os.path.join(kheaders.MODULES_ROOT, kheaders.running_release())
    if os.path.realpath(found) == os.path.realpath(own):
        return f"{own} -> {os.path.realpath(own)}"
    return f"{own} missing; enable links it to {found}"


def _bcc():
    import bcc

    return f"bcc from {os.path.dirname(bcc.__file__)}"


class _Throwaway:
    """A child cgroup to attach test programs to; removed on exit."""

    def __init__(self, parent: str):
        self.path = os.path.join(parent, f"mi-doctor-{secrets.token_hex(3)}")

    def __enter__(self):
        os.mkdir(self.path)
        return self.path

    def __exit__(self, *exc):
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def _load_check(bpf, name: str, fds: dict, loader, warning: bool) -> Check:
    """Load one program; a refusal is explained from the verifier's log (verifier.explain)."""
    from .verifier import ProgramRefused

    title = f"program {name} loads"
    try:
        loaded = loader.load_program(bpf, name)
    except ProgramRefused as exc:
        refusal = exc.refusal
        fix = refusal.remedy()
        if warning and refusal.missing:
            fix = "acceleration is unavailable on this kernel; run without --accelerate"
        return Check(title, False, refusal.cause(), fix, warning=warning)
    except Exception as exc:  # noqa: BLE001 - a doctor reports, it never raises
        return Check(title, False, getattr(exc, "message", None) or str(exc),
                     "report it with the output of 'meshintercept doctor --json'", warning=warning)
    fds[name] = loaded.fd
    if loaded.insns is None:
        return Check(title, True, "loaded")
    return Check(title, True, f"loaded; the verifier processed {loaded.insns} instructions")


def _programs(node: Node) -> List[Check]:
    """Compile once; each program type must load, cgroup ones attach in a throwaway cgroup."""
    from . import loader

    checks: List[Check] = []
    try:
        bpf = loader.compile_programs()
    except Exception as exc:  # noqa: BLE001
        return [Check("programs compile (bcc)", False, getattr(exc, "message", str(exc)),
                      "install python3-bpfcc and kernel headers (see the checks above)")]
    checks.append(Check("programs compile (bcc)", True, "bpf/*.c compiled"))
    fds = {}
    try:
        for name in PROGRAMS:
            checks.append(_load_check(bpf, name, fds, loader, warning=name in OPTIONAL_PROGRAMS))
        with _Throwaway(node.cgroup) as cgroup:
            cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for prog, attach_type in CGROUP_LINKS.values():
                    if prog not in fds:
                        continue

                    def attach(prog=prog, attach_type=attach_type):
                        link = bpfsys.link_create(fds[prog], cg_fd, attach_type)
                        bpfsys.link_detach(link)
                        bpfsys.close(link)
                        return "attached and detached in a throwaway cgroup"

                    checks.append(_try(f"program {prog} attaches to a cgroup", attach,
                                       "cgroup-v2 BPF attachment failed; on v1/v2 hybrid hosts before 5.15 "
                                       "net_cls/net_prio disable it: boot with cgroup_no_v1=net_cls,net_prio"))
            finally:
                os.close(cg_fd)

        if "lookup" in fds:
            checks.append(_try("sk_lookup program attaches to a network namespace (inbound path)",
                               lambda: _netns_link(fds["lookup"]),
                               "kernel < 5.9 has no sk_lookup: enable with --inbound-path tc (IPv4 only)"))
        if "tc_ingress" in fds:
            checks.append(_try("tc programs attach as tcx links", lambda: _tcx(fds["tc_ingress"]),
                               "kernel < 6.6: keep --tc-attach at its default, clsact (the clsact filters "
                               "work everywhere); tcx links are an opt-in", warning=True))

        def sockhash():
            fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_SOCKHASH, ctypes.sizeof(T.Tuple), 4, 16, "mi_doctor")
            try:
                if "msg_redirect" in fds:
                    bpfsys.prog_attach(fds["msg_redirect"], fd, bpfsys.BPF_SK_MSG_VERDICT)
                    bpfsys.prog_detach(fds["msg_redirect"], fd, bpfsys.BPF_SK_MSG_VERDICT)
            finally:
                bpfsys.close(fd)
            return "sockhash created, sk_msg attached (--accelerate available)"

        checks.append(_try("sockhash + sk_msg (--accelerate)", sockhash,
                           "acceleration is unavailable on this kernel; run without --accelerate", warning=True))
    finally:
        bpf.cleanup()
    return checks


def _foreign_connect4(node: Node):
    """Programs at the node's connect4 hook that are not ours (e.g. Cilium's socket LB)."""
    ours = set()
    with NodePins(node.pin_dir) as pins:
        if pins.loaded() and pins.has("prog", "connect4"):
            ours.add(bpfsys.prog_info(pins.prog("connect4"))["id"])
    fd = os.open(node.cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = bpfsys.prog_query(fd, bpfsys.BPF_CGROUP_INET4_CONNECT)
        effective = bpfsys.prog_query(fd, bpfsys.BPF_CGROUP_INET4_CONNECT, effective=True)
    finally:
        os.close(fd)
    foreign = []
    for pid in sorted(set(ids) | set(effective)):
        if pid in ours:
            continue
        try:
            pfd = bpfsys.prog_fd_by_id(pid)
            foreign.append(f"{bpfsys.prog_info(pfd)['name'] or '?'} (id {pid})")
            bpfsys.close(pfd)
        except OSError:
            foreign.append(f"id {pid}")
    if foreign:
        raise RuntimeError(
            f"other connect4 programs run for this cgroup: {', '.join(foreign)}; a socket load balancer "
            f"(Cilium) rewrites service addresses before ours and sidecars are bypassed"
        )
    return "no other program at the connect4 hook"


def _leftover_redirects(records: List[NamespaceRecord]):
    """REDIRECT rules in namespaces the ebpf mode manages would intercept first."""
    found = []
    nsenter = shutil.which("nsenter")
    for record in records:
        if not os.path.exists(record.path) or not nsenter:
            continue
        for tool in ("iptables-legacy-save", "iptables-nft-save"):
            if not shutil.which(tool):
                continue
            out = subprocess.run([nsenter, f"--net={record.path}", tool, "-t", "nat"], capture_output=True,
                                 text=True, timeout=10).stdout
            if "REDIRECT" in out:
                found.append(f"{record.name} ({tool.split('-')[1]})")
    if found:
        raise RuntimeError(f"iptables REDIRECT rules in ebpf-managed namespaces: {', '.join(found)}")
    return "no iptables REDIRECT rules in ebpf-managed namespaces"


def _in_throwaway_netns(attach) -> int:
    """Run ``attach()`` in a forked child that unshares a network namespace of its own (which
    goes with the child); 0 when it worked, 1 no namespace, 2 EINVAL, 3 another error."""
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
                attach()
                code = 0
        except OSError as exc:
            code = 2 if exc.errno == errno.EINVAL else 3
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _tcx(prog_fd: int) -> str:
    """Attach a tcx link on lo of a throwaway network namespace, then let it go with it."""
    def attach():
        bpfsys.link_detach(bpfsys.link_create(prog_fd, 1, bpfsys.BPF_TCX_INGRESS))

    code = _in_throwaway_netns(attach)
    if code == 0:
        return "tcx link attached and detached in a throwaway namespace (--tc-attach tcx usable)"
    raise RuntimeError({1: "could not create a throwaway network namespace",
                        2: f"this kernel ({os.uname().release}) has no tcx attach types"}.get(code, "tcx attach failed"))


def _netns_link(prog_fd: int) -> str:
    """An sk_lookup link on a throwaway network namespace, as enable makes one per pod."""
    def attach():
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        bpfsys.link_detach(bpfsys.link_create(prog_fd, fd, bpfsys.BPF_SK_LOOKUP))

    code = _in_throwaway_netns(attach)
    if code == 0:
        return "sk_lookup link attached and detached in a throwaway namespace"
    raise RuntimeError({1: "could not create a throwaway network namespace",
                        2: f"this kernel ({os.uname().release}) has no sk_lookup attach type"}.get(
                            code, "sk_lookup attach failed"))


def _families(records: List[NamespaceRecord]) -> str:
    """Which IP families each ebpf namespace has captured, and why not where one is not."""
    if not records:
        return "no namespace managed by the ebpf mode"
    lines = []
    for record in records:
        families = record.extra.get("families") or {}
        path = record.extra.get("inbound_path") or record.spec.inbound_path
        text = "; ".join(f"{f} {'captured' if why == 'captured' else 'not captured: ' + why}"
                         for f, why in sorted(families.items())) or "unknown (enabled by an older build)"
        lines.append(f"{record.name} ({path} inbound): {text}")
    return " | ".join(lines)


def run(node: Node, records: List[NamespaceRecord]) -> List[Check]:
    checks = [
        _try("root", _root, "run meshintercept as root (sudo)"),
        _try("cgroup v2 attach point", lambda: _cgroup(node),
             "give --cgroup a cgroup-v2 directory, or mount one: mount -t cgroup2 none /sys/fs/cgroup/unified"),
        _try("bpffs", lambda: _bpffs(node), "mount -t bpf bpf /sys/fs/bpf, or choose --pin-dir under it"),
        _try("tracefs (debug lines)", _tracefs, "mount -t tracefs tracefs /sys/kernel/tracing", warning=True),
        _try("kernel headers for bcc", _headers, kheaders.INSTALL_HINT),
        _try("bcc importable", _bcc, "apt-get install python3-bpfcc; use /usr/bin/python3 or a venv with "
             "--system-site-packages"),
    ]
    if all(c.ok for c in checks if not c.warning):
        checks.extend(_programs(node))
        checks.append(_try("connect4 hook free of other programs", lambda: _foreign_connect4(node),
                           "with Cilium set socketLB.hostNamespaceOnly=true (bpf-lb-sock-hostns-only) so pods "
                           "keep their sidecar interception", warning=True))
    checks.append(Check("IP families per namespace", True, _families(records), warning=True))
    checks.append(_try("no leftover iptables redirects", lambda: _leftover_redirects(records),
                       "disable the iptables mode in those namespaces (meshintercept disable) or remove the rules",
                       warning=True))
    return checks
