"""A node = (cgroup-v2 attach point, bpffs pin directory, state directory).

Several nodes can live side by side on one machine: that is how tests and the demo
simulate a cluster. Nothing here touches the kernel; it only names places.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

DEFAULT_PIN_DIR = "/sys/fs/bpf/meshintercept"
STATE_ROOT = "/run/meshintercept"


def mounts(fstype: str) -> list:
    """Mount points of this file-system type (``cgroup2``, ``bpf``), from /proc/self/mountinfo."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if parts[parts.index("-") + 1] == fstype:
                    out.append(parts[4])
    except (OSError, ValueError):
        pass
    return out


def is_cgroup2(path: str) -> bool:
    return path in mounts("cgroup2")


def cgroup2_mounts() -> list:
    return mounts("cgroup2")


def default_cgroup() -> str:
    """The cgroup-v2 root: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones."""
    for candidate in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if is_cgroup2(candidate):
            return candidate
    mounts = cgroup2_mounts()
    return mounts[0] if mounts else "/sys/fs/cgroup/unified"


#: How the ebpf mode's tc programs attach: clsact filters (every kernel) or tcx links (6.6+,
#: slower to attach here; docs/ebpf.md).
TC_ATTACH_MODES = ("clsact", "tcx")


@dataclass(frozen=True)
class Node:
    cgroup: str
    pin_dir: str
    state_dir: str
    tc_attach: str = "clsact"

    @classmethod
    def from_options(cls, cgroup=None, pin_dir=None, state_dir=None, tc_attach=None) -> "Node":
        cgroup = cgroup or os.environ.get("MESHINTERCEPT_CGROUP") or default_cgroup()
        pin_dir = os.path.abspath(pin_dir or os.environ.get("MESHINTERCEPT_PIN_DIR") or DEFAULT_PIN_DIR)
        state_dir = state_dir or os.environ.get("MESHINTERCEPT_STATE_DIR")
        if not state_dir:
            # One state dir per pin dir, so side-by-side nodes never share records.
            if pin_dir == DEFAULT_PIN_DIR:
                state_dir = os.path.join(STATE_ROOT, "default")
            else:
                digest = hashlib.sha1(pin_dir.encode()).hexdigest()[:12]
                state_dir = os.path.join(STATE_ROOT, f"{os.path.basename(pin_dir)}-{digest}")
        tc_attach = tc_attach or os.environ.get("MESHINTERCEPT_TC_ATTACH") or "clsact"
        if tc_attach not in TC_ATTACH_MODES:
            from meshintercept.errors import UsageError

            raise UsageError(f"--tc-attach must be one of {', '.join(TC_ATTACH_MODES)}, not {tc_attach!r}.")
        return cls(cgroup=os.path.abspath(cgroup), pin_dir=pin_dir, state_dir=os.path.abspath(state_dir),
                   tc_attach=tc_attach)

    def to_dict(self) -> dict:
        return {"cgroup": self.cgroup, "pin_dir": self.pin_dir, "state_dir": self.state_dir,
                "tc_attach": self.tc_attach}
