"""Find kernel headers bcc can compile against, and make bcc find them.

bcc looks only at /lib/modules/$(uname -r)/{build,source}. Nodes often run a kernel with
no headers package (custom, cloud or newer than the distribution's), while the UAPI structs
our programs use are stable across kernels, so another kernel's headers work. Debian's
linux-headers-* install split trees (`-amd64` under build, `-common` under source);
BCC_KERNEL_SOURCE points at one tree only, so the reliable fix is the one bcc expects: make
/lib/modules/$(uname -r) resolve to a directory whose build/source are a complete pair.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

from meshintercept.errors import EnvironmentMissing

MODULES_ROOT = "/lib/modules"

INSTALL_HINT = (
    "install kernel headers for bcc: 'apt-get install linux-headers-amd64' on Debian "
    "(linux-headers-arm64 on arm64), 'apt-get install linux-headers-generic' on Ubuntu, "
    "or 'dnf install kernel-devel' on Fedora/RHEL"
)


def _usable(moddir: str) -> bool:
    """True when moddir/build holds a configured header tree bcc can use."""
    build = os.path.join(moddir, "build")
    if not os.path.isdir(os.path.join(build, "include")):
        return False
    # A configured tree has the generated autoconf.h, in build or (split trees) nowhere else.
    return os.path.exists(os.path.join(build, "include", "generated", "autoconf.h")) or os.path.exists(
        os.path.join(build, "include", "linux", "kconfig.h")
    )


def _version_key(name: str) -> Tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.\-+]", name))


def candidates(root: str = MODULES_ROOT) -> List[str]:
    """Header-bearing module dirs, newest kernel version first."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = [os.path.join(root, n) for n in names if _usable(os.path.join(root, n))]
    return sorted(found, key=lambda p: _version_key(os.path.basename(p)), reverse=True)


def running_release() -> str:
    return os.uname().release


def find(root: str = MODULES_ROOT) -> Optional[str]:
    """The headers dir bcc will use now, or None when nothing fits (changes nothing)."""
    own = os.path.join(root, running_release())
    if _usable(own):
        return own
    found = candidates(root)
    return found[0] if found else None


def ensure(root: str = MODULES_ROOT) -> str:
    """Make /lib/modules/$(uname -r) usable by bcc; return the headers dir in use.

    Creates a symlink (or, when the running kernel's module dir exists without headers,
    build/source symlinks inside it) to the newest installed header tree. Never replaces
    anything that is already there.
    """
    own = os.path.join(root, running_release())
    if _usable(own):
        return own
    found = [c for c in candidates(root) if os.path.realpath(c) != os.path.realpath(own)]
    if not found:
        raise EnvironmentMissing(
            f"bcc found no kernel headers for kernel {running_release()} (nothing usable under {root}); {INSTALL_HINT}."
        )
    target = found[0]
    try:
        if not os.path.lexists(own):
            os.symlink(target, own)
        elif os.path.isdir(own):
            for part in ("build", "source"):
                link = os.path.join(own, part)
                src = os.path.join(target, part)
                if os.path.lexists(src) and not os.path.lexists(link):
                    os.symlink(os.path.realpath(src), link)
        else:
            raise EnvironmentMissing(
                f"{own} exists but is neither a directory nor a header tree; remove it or {INSTALL_HINT}."
            )
    except PermissionError:
        raise EnvironmentMissing(
            f"cannot link {own} to the kernel headers in {target} (not root); run as root or {INSTALL_HINT}."
        ) from None
    if not _usable(own):
        raise EnvironmentMissing(f"linking {own} to {target} did not give bcc a usable header tree; {INSTALL_HINT}.")
    return own
