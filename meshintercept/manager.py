"""`Manager`: the core object behind every command (CLI, CNI plugin, demo, tests).

It resolves namespaces, picks the backend, keeps the node's records consistent with what
backends applied, and returns plain data. It never prints and never exits.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Tuple, Union

from meshintercept import registry
from meshintercept.errors import Conflict, MeshInterceptError, NamespaceNotFound, NotPermitted
from meshintercept.interceptor import Check, Interceptor
from meshintercept.netns import Netns
from meshintercept.node import Node
from meshintercept.spec import InterceptSpec
from meshintercept.state import NamespaceRecord, StateStore


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise NotPermitted(f"{action} needs root (CAP_NET_ADMIN and CAP_BPF); run it with sudo or as root.")


def _held_back(report: dict) -> str:
    parts = [f"{name}: netns cookies {', '.join(map(str, cookies))} have no record here"
             for name, cookies in report["unknown"].items()]
    parts += [f"{key}: {why}" for key, why in report["failed"].items()]
    return "; ".join(parts)


class Manager:
    def __init__(self, node: Optional[Node] = None):
        self.node = node or Node.from_options()
        #: Only the Manager reads or writes records; everyone else asks it.
        self._store = StateStore(self.node.state_dir)
        self._backends: Dict[str, Interceptor] = {}

    def backend(self, mode: str) -> Interceptor:
        if mode not in self._backends:
            self._backends[mode] = registry.require(mode)(self.node)
        return self._backends[mode]

    # --- enable -------------------------------------------------------------------------
    def plan(self, ns_ref: str, mode: str, spec: InterceptSpec) -> str:
        cls = registry.load(mode)
        netns = Netns.parse(ns_ref)
        return cls(self.node).plan(netns, spec)

    def enable(self, ns_ref: str, mode: str, spec: InterceptSpec, sources: Optional[Dict[str, str]] = None) -> dict:
        """Intercept a namespace; ``sources`` says where each setting came from (the CNI
        plugin: its config or a pod annotation), kept in the record for status."""
        registry.load(mode)  # unknown mode is a usage error, before the root check
        require_root("enable")
        netns = Netns.parse(ns_ref)
        backend = self.backend(mode)
        started = time.monotonic()
        with self._store.locked():
            notes = self._take_over(mode)
            previous = self._store.get(netns.key)
            if previous and previous.mode != mode:
                raise Conflict(
                    f"namespace {netns.name} is intercepted by mode {previous.mode}; "
                    f"run 'meshintercept disable --netns {netns.ref}' first."
                )
            if (previous and previous.spec == spec and previous.sources == (sources or {})
                    and backend.inspect(previous, netns).get("in_place", True)):
                return self._result(previous, changed=False, started=started)
            try:
                extra = backend.enable(netns, spec, previous)
            except BaseException as exc:
                if previous is None:
                    # Backends are atomic; this is the belt to their braces.
                    self._undo_failed_enable(backend, exc, NamespaceRecord(netns.key, netns.ref, netns.path,
                                                                           netns.name, mode, spec), netns)
                raise
            record = NamespaceRecord(
                key=netns.key, ref=netns.ref, path=netns.path, name=netns.name, mode=mode, spec=spec,
                enabled_at=previous.enabled_at if previous else time.time(), extra=extra or {},
                sources=dict(sources or {}),
            )
            self._store.put(record)
        result = self._result(record, changed=True, started=started)
        result["warnings"] += notes
        return result


    @staticmethod
    def _result(record: NamespaceRecord, changed: bool, started: float) -> dict:
        return {
            "namespace": record.name, "path": record.path, "mode": record.mode, "changed": changed,
            "spec": record.spec.to_dict(), "elapsed_ms": round((time.monotonic() - started) * 1000, 2),
            "warnings": list(record.extra.get("warnings", [])),
        }

    @staticmethod
    def _undo_failed_enable(backend: Interceptor, failure: BaseException, record: NamespaceRecord,
                            netns: Netns) -> None:
        """Remove whatever a failed first enable may have left; a failure here is told, not hidden."""
        try:
            backend.disable(record, netns)
        except MeshInterceptError as exc:
            note = (f" Cleaning up after it also failed ({exc.message}); "
                    f"run 'meshintercept disable --netns {netns.ref}'.")
            if isinstance(failure, MeshInterceptError):
                failure.message += note

    # --- another build's objects ----------------------------------------------------------
    def upgrade(self, grace: Optional[float] = None) -> dict:
        """Take the node over from what an earlier build left (eBPF: pinned programs of another
        layout), with every namespace intercepted throughout; {"modes": {mode: report}} with a
        report for each mode that had something to take over. Idempotent."""
        require_root("upgrade")
        out = {}
        with self._store.locked():
            for mode in registry.names():
                try:
                    cls = registry.load(mode)
                except MeshInterceptError:
                    continue
                if cls.unavailable_reason():
                    continue
                report = self._take_over_report(mode, grace)
                if report is not None:
                    out[mode] = report
        return {"modes": out}

    def _take_over_report(self, mode: str, grace: Optional[float]) -> Optional[dict]:
        """With the store locked: move ``mode``'s namespaces off superseded objects; None when
        there are none. Records of moved namespaces get their new extra; records of namespaces
        that no longer exist are dropped (the old objects go with them)."""
        backend = self.backend(mode)
        old = backend.superseded()
        if not old:
            return None
        records = self.records(mode)
        report = backend.take_over([(r, self.live_netns(r)) for r in records], grace)
        for record in records:
            if record.key in report["moved"]:
                record.extra = report["moved"][record.key]
                self._store.put(record)
            elif record.key in report["gone"]:
                self._store.delete(record.key)
        report["superseded"] = old
        return report

    def _take_over(self, mode: str) -> List[str]:
        """Before a change to ``mode``: take over from an earlier build first, so one build owns
        the node; returns notes for the result's warnings."""
        report = self._take_over_report(mode, None)
        if report is None:
            return []
        notes = [f"took the node over from layout {', '.join(report['superseded'])}: "
                 f"{len(report['moved'])} namespaces moved, old programs removed" if not report["unknown"]
                 and not report["failed"] else
                 f"layout {', '.join(report['superseded'])} of an earlier build stays beside this build's: "
                 f"{_held_back(report)}; see 'meshintercept upgrade'"]
        return notes

    # --- records ------------------------------------------------------------------------
    def records(self, mode: Optional[str] = None) -> List[NamespaceRecord]:
        """Every managed namespace of this node (of one mode, if given)."""
        return [r for r in self._store.all() if mode is None or r.mode == mode]

    def record(self, netns_or_key: Union[Netns, str]) -> Optional[NamespaceRecord]:
        """The record of a namespace (a Netns, or its "dev:inode" key), or None when not managed."""
        return self._store.get(netns_or_key.key if isinstance(netns_or_key, Netns) else netns_or_key)

    def lookup(self, ns_ref: str) -> Tuple[Optional[NamespaceRecord], Optional[Netns]]:
        """(record or None, netns or None) for what a user typed; a gone namespace is found by its record."""
        try:
            netns = Netns.parse(ns_ref)
        except NamespaceNotFound:
            return self._store.find(ns_ref), None
        return self._store.get(netns.key), netns

    @staticmethod
    def live_netns(record: NamespaceRecord) -> Optional[Netns]:
        """The record's namespace if it still exists (same dev:inode at the recorded path), else None."""
        try:
            netns = Netns.parse(record.path)
        except MeshInterceptError:
            return None
        return netns if netns.key == record.key else None

    def inspect(self, record: NamespaceRecord, netns: Optional[Netns]) -> dict:
        """The backend's live view of one managed namespace (what status shows as ``live``)."""
        return self.backend(record.mode).inspect(record, netns)

    # --- disable ------------------------------------------------------------------------

    def disable(self, ns_ref: str) -> dict:
        require_root("disable")
        with self._store.locked():
            record, netns = self.lookup(ns_ref)
            if record is not None and self._take_over(record.mode):
                record = self._store.get(record.key)
            if record is None:
                if netns is None:
                    raise NamespaceNotFound(
                        f"network namespace {ns_ref!r} does not exist and is not managed; nothing to disable."
                    )
                return {"namespace": netns.name, "mode": None, "changed": False}
            self.backend(record.mode).disable(record, netns)
            self._store.delete(record.key)
        return {"namespace": record.name, "mode": record.mode, "changed": True}

    def forget(self, key: str, netns: Optional[Netns] = None) -> Optional[NamespaceRecord]:
        """Disable the namespace recorded under ``key``, also when its path is gone or names another
        namespace now (CNI DEL with an empty CNI_NETNS, GC); None when it was not managed."""
        require_root("disable")
        with self._store.locked():
            record = self._store.get(key)
            if record is not None and self._take_over(record.mode):
                record = self._store.get(key)
            if record is None:
                return None
            if netns is None or netns.key != key:
                netns = self.live_netns(record)
            self.backend(record.mode).disable(record, netns)
            self._store.delete(key)
        return record

    def disable_all(self) -> dict:
        """Disable every managed namespace, then tear down node-wide objects of every mode."""
        require_root("disable --all")
        removed: List[str] = []
        errors: List[str] = []
        with self._store.locked():
            for record in self._store.all():
                netns = self.live_netns(record)
                try:
                    self.backend(record.mode).disable(record, netns)
                    self._store.delete(record.key)
                    removed.append(record.name)
                except MeshInterceptError as exc:
                    errors.append(f"{record.name}: {exc.message}")
            torn = {}
            for mode in registry.names():
                try:
                    cls = registry.load(mode)
                except MeshInterceptError:
                    continue  # a mode that cannot even load has nothing of its own on this node
                if cls.unavailable_reason():
                    continue
                try:
                    torn[mode] = self.backend(mode).teardown()
                except MeshInterceptError as exc:
                    errors.append(f"{mode}: {exc.message}")
            if not errors:
                self._store.remove_all()
        if errors:
            raise MeshInterceptError("disable --all left work undone: " + "; ".join(errors))
        return {"namespaces": removed, "teardown": torn, "changed": bool(removed) or any(torn.values())}

    # --- status -------------------------------------------------------------------------
    def status(self, ns_ref: Optional[str] = None, live: Optional[bool] = None) -> dict:
        """Managed namespaces and what is live in the kernel.

        One namespace (``ns_ref``) is always inspected live, inside the namespace. For all
        namespaces, looking inside each one costs milliseconds apiece (seconds at a thousand),
        so by default a backend that can answer for many at once does (``inspect_many``: the
        eBPF mode reads its pinned maps once) and the others show the recorded state, marked
        ``"checked": "recorded"``; ``live=True`` inspects every namespace.
        """
        if ns_ref is not None:
            record, netns = self.lookup(ns_ref)
            if record is None and netns is None:
                raise NamespaceNotFound(f"network namespace {ns_ref!r} does not exist and is not managed.")
            records = [record] if record else []
            live = True if live is None else live
        else:
            records = self._store.all()
        namespaces = {r.key: self.live_netns(r) for r in records}
        lives: Dict[str, dict] = {}
        if not live:
            by_mode: Dict[str, List[NamespaceRecord]] = {}
            for r in records:
                by_mode.setdefault(r.mode, []).append(r)
            for mode, group in by_mode.items():
                lives.update(self._inspect_group(mode, group, namespaces))
        items = []
        for r in records:
            if r.key not in lives:
                lives[r.key] = self._inspect(r, namespaces[r.key])
                lives[r.key].setdefault("checked", "live")
            items.append(self._item(r, namespaces[r.key], lives[r.key]))
        return {"node": self.node.to_dict(), "namespaces": items}

    def _inspect(self, record: NamespaceRecord, netns: Optional[Netns]) -> dict:
        try:
            return self.inspect(record, netns)
        except MeshInterceptError as exc:
            return {"error": exc.message}

    def _inspect_group(self, mode: str, records: List[NamespaceRecord], namespaces: dict) -> Dict[str, dict]:
        try:
            backend = self.backend(mode)
        except MeshInterceptError as exc:
            return {r.key: {"error": exc.message} for r in records}
        try:
            found = backend.inspect_many(records, namespaces)
        except MeshInterceptError as exc:
            return {r.key: {"error": exc.message} for r in records}
        for value in found.values():
            value.setdefault("checked", "node")
        return found

    @staticmethod
    def _item(record: NamespaceRecord, netns: Optional[Netns], live: dict) -> dict:
        return {
            "namespace": record.name, "path": record.path, "mode": record.mode, "present": netns is not None,
            "enabled_at": record.enabled_at, "spec": record.spec.to_dict(), "sources": record.sources,
            "extra": record.extra, "live": live,
        }

    # --- doctor -------------------------------------------------------------------------
    def doctor(self) -> Dict[str, List[Check]]:
        from meshintercept.doctor import run_checks

        return run_checks(self)
