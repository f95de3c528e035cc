"""`doctor`: answer "will it work here, and why not" by trying things, not reading versions.

General checks live here; each backend contributes its own through `Interceptor.doctor()`.
"""

from __future__ import annotations

import os
from typing import Dict, List

from meshintercept import registry
from meshintercept.errors import MeshInterceptError
from meshintercept.interceptor import Check
from meshintercept.node import cgroup2_mounts, is_cgroup2


def general_checks(manager) -> List[Check]:
    node = manager.node
    checks = [
        Check("running as root", os.geteuid() == 0, f"euid {os.geteuid()}",
              "run meshintercept as root (it needs CAP_NET_ADMIN, CAP_BPF and CAP_SYS_ADMIN)"),
    ]
    mounts = cgroup2_mounts()
    checks.append(Check("cgroup v2 mounted", bool(mounts), ", ".join(mounts) or "no cgroup2 mount",
                        "mount it: mount -t cgroup2 none /sys/fs/cgroup/unified"))
    checks.append(Check(
        "node cgroup is a cgroup-v2 directory", os.path.isdir(node.cgroup) and _under_cgroup2(node.cgroup, mounts),
        node.cgroup, "point --cgroup (MESHINTERCEPT_CGROUP) at a directory inside the cgroup2 mount"))
    checks.append(Check("netns directory", True, "/var/run/netns " + ("exists" if os.path.isdir("/var/run/netns") else "absent (created by 'ip netns add')")))
    return checks


def _under_cgroup2(path: str, mounts) -> bool:
    path = os.path.realpath(path)
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts) or is_cgroup2(path)


def run_checks(manager) -> Dict[str, List[Check]]:
    sections: Dict[str, List[Check]] = {"general": general_checks(manager)}
    for mode in registry.names():
        try:
            cls = registry.load(mode)
        except MeshInterceptError as exc:
            sections[f"mode {mode}"] = [Check(f"{mode} backend loads", False, exc.message, "reinstall meshintercept")]
            continue
        try:
            # Not manager.backend(): that refuses a mode that cannot run here, and saying why
            # (and what else works) is the backend's doctor's job.
            checks = cls(manager.node).doctor(manager.records(mode))
        except Exception as exc:  # noqa: BLE001 - doctor must report, never crash
            checks = [Check(f"{mode} checks ran", False, f"{type(exc).__name__}: {exc}", "report this as a bug")]
        sections[f"mode {mode}"] = checks
    return sections


def summarize(sections: Dict[str, List[Check]]) -> dict:
    general_ok = all(c.ok or c.warning for c in sections.get("general", []))
    usable = []
    for name, checks in sections.items():
        if name.startswith("mode ") and general_ok and all(c.ok or c.warning for c in checks):
            usable.append(name[5:])
    return {
        "sections": [{"name": n, "checks": [c.to_dict() for c in cs]} for n, cs in sections.items()],
        "usable_modes": usable,
    }
