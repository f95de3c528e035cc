"""The one interface every interception backend implements.

A backend knows how to put interception in place in one network namespace, take it out,
describe what is live, and tear down whatever it set up node-wide. It does not keep the
node's records (`manager.Manager` does) and never prints or exits.

Contract every backend keeps:
* ``enable`` is atomic: it either applies the whole spec or leaves the namespace as it
  was (raising a `MeshInterceptError`). Enabling again with the same spec is a no-op;
  with another spec it replaces the old one.
* ``disable`` removes exactly what ``enable`` added, is idempotent, and works when the
  namespace is already gone (``netns`` is then None).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Tuple

from meshintercept.netns import Netns
from meshintercept.node import Node
from meshintercept.spec import InterceptSpec
from meshintercept.state import NamespaceRecord


@dataclass
class Check:
    """One doctor finding: a thing tried, whether it worked, and the fix when it did not."""

    name: str
    ok: bool
    detail: str = ""
    fix: str = ""
    #: A warning does not make the mode unusable (e.g. acceleration unavailable).
    warning: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "warning": self.warning, "detail": self.detail, "fix": self.fix}


@dataclass
class Metric:
    """One sample for `meshintercept metrics`: kind is counter, gauge or histogram (value: a
    list of observations). Counter names are given without the ``_total`` suffix."""

    name: str
    kind: str
    help: str
    labels: Dict[str, str]
    value: object


class Interceptor(ABC):
    #: Mode name as typed after --mode; set by each backend.
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, node: Node):
        self.node = node

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """None when the backend can run here, else one sentence saying why not and the fix.

        Must be cheap (import checks, file existence): it runs on every CLI start that
        selects this mode. `doctor` does the expensive, try-it-for-real checks.
        """
        return None

    @abstractmethod
    def enable(self, netns: Netns, spec: InterceptSpec, previous: Optional[NamespaceRecord] = None) -> dict:
        """Apply interception; return backend facts to store in the record's ``extra``."""

    @abstractmethod
    def disable(self, record: NamespaceRecord, netns: Optional[Netns]) -> None:
        """Remove what enable added; ``netns`` is None when the namespace no longer exists."""

    @abstractmethod
    def inspect(self, record: NamespaceRecord, netns: Optional[Netns]) -> dict:
        """Live facts for status: is it actually in place, counters, rules, ..."""

    def inspect_many(self, records: List[NamespaceRecord], namespaces: Dict[str, Optional[Netns]]) -> Dict[str, dict]:
        """``inspect`` for all namespaces of this mode at once, for ``status`` without --live.

        ``namespaces`` maps each record key to its Netns, or None when it is gone. The default
        looks inside none of them and reports the records (``"checked": "recorded"``); a backend
        that can answer for all at once cheaply (eBPF: one batched pass over its maps) overrides it.
        """
        return {r.key: {"checked": "recorded", "in_place": None} for r in records}

    def plan(self, netns: Netns, spec: InterceptSpec) -> str:
        """What enable would do, as text (`--dry-run`); must not change anything."""
        raise NotImplementedError(f"mode {self.name} has no dry-run")

    def superseded(self) -> List[str]:
        """What earlier builds of this backend left on the node that this build replaces (eBPF:
        pinned sets of another layout); empty when there is nothing to take over."""
        return []

    def take_over(self, namespaces: List[Tuple[NamespaceRecord, Optional[Netns]]],
                  grace: Optional[float] = None) -> dict:
        """Move every managed namespace from what `superseded` named into this build's objects,
        with interception in force throughout, then remove the old objects. Returns a report with
        ``moved`` ({record key: new extra}), ``gone`` (record keys whose namespace no longer
        exists), ``unknown`` and ``failed`` (what kept the old objects in place)."""
        return {"moved": {}, "gone": [], "unknown": {}, "failed": {}, "removed": []}

    def teardown(self) -> List[str]:
        """Remove node-wide objects (programs, pins, attachments); return what was removed."""
        return []

    def metrics(self, records: List[NamespaceRecord]) -> List[Metric]:
        """Node-wide facts of this mode worth scraping (loaded programs, map fill); per-namespace
        counters come from ``inspect`` and need nothing here."""
        return []

    def doctor(self, records: List[NamespaceRecord]) -> List[Check]:
        """Try each thing this backend needs, for real; never raise. ``records`` are the
        namespaces this mode manages on the node (the Manager's), for per-namespace checks."""
        reason = self.unavailable_reason()
        return [Check(f"{self.name} usable", reason is None, reason or "")]
