"""Namespace-level helpers shared by the plugin commands and `cni repair`, built on `Manager`:
open a CNI_NETNS that may be gone, and compare what is live with what a config asks for
(CHECK, repair). Acting on a namespace by its record key is `Manager.forget`.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from meshintercept.errors import MeshInterceptError
from meshintercept.manager import Manager
from meshintercept.netns import Netns
from meshintercept.spec import InterceptSpec


def open_netns(ref: str) -> Optional[Netns]:
    """Netns for a CNI_NETNS value, or None when it is empty or already gone."""
    if not ref:
        return None
    try:
        return Netns.parse(ref)
    except MeshInterceptError:
        return None


def spec_differences(have: InterceptSpec, want: InterceptSpec) -> List[str]:
    a, b = have.to_dict(), want.to_dict()
    return [f"{k} is {a[k]!r}, config says {b[k]!r}" for k in sorted(b) if a.get(k) != b[k]]


def compare(manager: Manager, netns: Netns, mode: str, spec: InterceptSpec) -> Tuple[List[str], dict]:
    """Problems (empty when interception is in place exactly as asked) and the backend's live view."""
    record = manager.record(netns)
    if record is None:
        return [f"namespace {netns.name} is not intercepted"], {}
    if record.mode != mode:
        return [f"namespace {netns.name} is intercepted by mode {record.mode}, config says {mode}"], {}
    problems = spec_differences(record.spec, spec)
    live = manager.inspect(record, netns)
    if not live.get("in_place"):
        problems.append(f"mode {mode} reports interception of {netns.name} is not in place")
    return problems, live
