"""Taking a node over from another build's layout without a moment where pods go direct.

Pinned programs and maps outlive the agent. A new build with the same layout reuses them
(``NodePins.loaded``). A build with another layout cannot read the old maps' values, so it
never tries: it loads its own set beside the old one, moves every recorded namespace over,
and removes the old set last. What it relies on from any older layout is small and has not
changed since layout 1: ``v<N>/map_config`` keyed by the 8-byte netns cookie, cgroup links
pinned as ``v<N>/link_<hook>``, per-namespace links as ``v<N>/link_lookup_<cookie>`` and
``v<N>/link_tcx_<cookie>_*``.

Why there is no gap, step by step (docs/ebpf.md, "Upgrades"):

1. The new programs are attached to the cgroup after the old ones. While a namespace is in
   both config maps the old connect program runs first and redirects to loopback; the new one
   leaves loopback alone. Each getsockopt program answers only from its own maps and leaves a
   miss untouched, so the set that redirected a connection answers for it. An sk_lookup
   program leaves a connection another program already steered alone (``ctx->sk``).
2. Each recorded namespace is enabled in the new set (config, pod IPs, its sk_lookup link, its
   sidecar's listener; tc filters are replaced in place).
3. Only when every namespace in the old config map is in the new one: the old connect links
   and the old per-namespace links are detached, so new connections take the new path.
4. After a grace period, in which sidecars ask for the original destination of connections the
   old programs redirected, the old set (getsockopt, sockops, maps) is removed.

A namespace in the old config map without a record is never dropped: the old set stays, both
run side by side (correct, just two sets), and the report says which cookies are unknown.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Callable, Dict, List

from meshintercept.errors import Conflict
from meshintercept.state import NamespaceRecord

from . import bpfsys
from .pins import LAYOUT_DIR, LAYOUT_RE, layout_dirs

#: Hooks whose old links go as soon as every namespace is in the new set: they decide where
#: new connections (and, from layout 3, new unconnected DNS queries) go. getsockopt, sockops,
#: recvmsg and getpeername stay for the grace period: they serve connections and replies of
#: queries the old set already redirected. A hook an old layout did not have is skipped.
STEERING_LINKS = ("link_connect4", "link_connect6", "link_sendmsg4", "link_sendmsg6")
DEFAULT_GRACE_SECONDS = 2.0


def superseded(pin_dir: str) -> List[str]:
    """Layout dirs of other builds under ``pin_dir`` (e.g. ``["v1"]``)."""
    return [d for d in layout_dirs(pin_dir) if d != LAYOUT_DIR]


def _old_config(path: str) -> bpfsys.TypedMap:
    """The old layout's config map, read only by its 8-byte netns cookie keys."""
    map_path = os.path.join(path, "map_config")
    try:
        fd = bpfsys.obj_get(map_path)
    except OSError as exc:
        raise Conflict(f"{path} is not a meshintercept node layout this build can take over ({exc.strerror} "
                       f"opening map_config); remove it with the build that made it or use another --pin-dir.") from None
    info = bpfsys.map_info(fd)
    if info.get("key_size") != 8:
        bpfsys.close(fd)
        raise Conflict(f"{map_path} is not keyed by netns cookie; remove it with the build that made it "
                       "or use another --pin-dir.")
    return bpfsys.TypedMap(fd, ctypes.c_uint64, None)


def check(pin_dir: str) -> Dict[str, List[int]]:
    """Old layout dir -> the netns cookies in its config map; raises Conflict for a dir that is
    not a meshintercept layout."""
    out = {}
    for name in superseded(pin_dir):
        table = _old_config(os.path.join(pin_dir, name))
        try:
            out[name] = sorted(int(k) for k in table.keys())
        finally:
            bpfsys.close(table.fd)
    return out


def _unpin_named(path: str, prefix: str) -> List[str]:
    gone = []
    for name in sorted(os.listdir(path)):
        if name.startswith(prefix) and bpfsys.unpin_link(os.path.join(path, name)):
            gone.append(name)
    return gone


def take_over(pin_dir: str, records: List[NamespaceRecord], enable: Callable[[NamespaceRecord], dict],
              remove_dir: Callable[[str], List[str]], grace: float = DEFAULT_GRACE_SECONDS) -> dict:
    """Move every recorded namespace of the old layouts into this build's set (already loaded),
    then remove the old sets. ``enable(record)`` enables one namespace in the new set and returns
    its new record extra. Returns {"from", "to", "moved": {key: extra}, "unknown", "removed"}."""
    old = check(pin_dir)
    report = {"from": sorted(old), "to": LAYOUT_DIR, "moved": {}, "unknown": {}, "removed": [],
              "failed": {}}
    if not old:
        return report
    for record in records:
        try:
            report["moved"][record.key] = enable(record)
        except Exception as exc:  # noqa: BLE001 - one namespace's failure is reported, the old set stays for it
            report["failed"][record.key] = getattr(exc, "message", str(exc))
    moved = {extra.get("netns_cookie") for extra in report["moved"].values()}
    for name, cookies in old.items():
        unknown = [c for c in cookies if c not in moved]
        if unknown:
            report["unknown"][name] = unknown
    if report["unknown"] or report["failed"]:
        return report  # both sets keep running; nothing of the old one is taken away
    for name in old:
        path = os.path.join(pin_dir, name)
        for link in STEERING_LINKS:
            bpfsys.unpin_link(os.path.join(path, link))
        _unpin_named(path, "link_lookup_")
        _unpin_named(path, "link_tcx_")
    time.sleep(grace)
    for name in old:
        if LAYOUT_RE.match(name):
            report["removed"].extend(remove_dir(os.path.join(pin_dir, name)))
    return report
