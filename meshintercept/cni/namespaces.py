"""Namespace-level helpers shared by the plugin commands and `cni repair`, built on `Manager`.

They add what the CLI's `disable --netns` cannot do: act on a namespace by its record key
when the path is gone or now names another namespace (DEL with an empty CNI_NETNS, GC),
and compare what is live with what a config asks for (CHECK, repair).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from meshintercept.errors import MeshInterceptError
from meshintercept.manager import Manager
from meshintercept.netns import Netns
from meshintercept.spec import InterceptSpec
from meshintercept.state import NamespaceRecord


def live_netns(record: NamespaceRecord) -> Optional[Netns]:
    """The record's namespace if it still exists (same dev:inode at the recorded path), else None."""
    try:
        netns = Netns.parse(record.path)
    except MeshInterceptError:
        return None
    return netns if netns.key == record.key else None


def open_netns(ref: str) -> Optional[Netns]:
    """Netns for a CNI_NETNS value, or None when it is empty or already gone."""
    if not ref:
        return None
    try:
        return Netns.parse(ref)
    except MeshInterceptError:
        return None


def disable_key(manager: Manager, key: str, netns: Optional[Netns] = None) -> Optional[NamespaceRecord]:
    """Disable interception of the namespace recorded under ``key``; None if it was not managed."""
    with manager.store.locked():
        record = manager.store.get(key)
        if record is None:
            return None
        if netns is None or netns.key != key:
            netns = live_netns(record)
        manager.backend(record.mode).disable(record, netns)
        manager.store.delete(key)
    return record


def spec_differences(have: InterceptSpec, want: InterceptSpec) -> List[str]:
    a, b = have.to_dict(), want.to_dict()
    return [f"{k} is {a[k]!r}, config says {b[k]!r}" for k in sorted(b) if a.get(k) != b[k]]


def compare(manager: Manager, netns: Netns, mode: str, spec: InterceptSpec) -> Tuple[List[str], dict]:
    """Problems (empty when interception is in place exactly as asked) and the backend's live view."""
    record = manager.store.get(netns.key)
    if record is None:
        return [f"namespace {netns.name} is not intercepted"], {}
    if record.mode != mode:
        return [f"namespace {netns.name} is intercepted by mode {record.mode}, config says {mode}"], {}
    problems = spec_differences(record.spec, spec)
    live = manager.backend(record.mode).inspect(record, netns)
    if not live.get("in_place"):
        problems.append(f"mode {mode} reports interception of {netns.name} is not in place")
    return problems, live
