"""The ``iptables`` mode: nat-table REDIRECT rules inside the pod's namespace.

What osm, Istio, Linkerd and Kuma init containers do, done as one atomic, idempotent
change of the legacy nat table through python-iptables. The rule layout and its reasons
are in `iptables_rules`; reading and committing in `iptables_table`; facts about nft rules,
other meshes and the node in `iptables_probe`.
"""

from __future__ import annotations

import os
from typing import List, Optional

from meshintercept.backends.iptables import iptc_compat as compat
from meshintercept.backends.iptables import probe
from meshintercept.backends.iptables import rules as model
from meshintercept.backends.iptables import table
from meshintercept.errors import MeshInterceptError, UsageError
from meshintercept.interceptor import Check, Interceptor
from meshintercept.netns import Netns
from meshintercept.spec import InterceptSpec
from meshintercept.state import NamespaceRecord

#: python-iptables drives the legacy (x_tables) kernel interface, never nf_tables.
TABLE_BACKEND = "legacy"


def check_spec(spec: InterceptSpec) -> None:
    # ``debug`` only changes what eBPF programs print; iptables has nothing to print, so it
    # is accepted and ignored. Acceleration is a sockmap feature with no iptables meaning.
    if spec.accelerate:
        raise UsageError("--accelerate needs --mode ebpf; the iptables mode has no socket acceleration.")
    if "ipv6" in spec.families:
        raise UsageError("the iptables mode intercepts IPv4 only so far; drop --family ipv6.")


class IptablesInterceptor(Interceptor):
    name = "iptables"
    description = "nat-table REDIRECT rules in the pod's namespace (legacy iptables, via python-iptables)"

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        return compat.missing_reason()

    # --- enable / disable --------------------------------------------------------------------
    def enable(self, netns: Netns, spec: InterceptSpec, previous: Optional[NamespaceRecord] = None) -> dict:
        check_spec(spec)
        ruleset = model.build(spec)
        _preload()
        summary = netns.run(_enable_inside, ruleset, _where(netns))
        extra = {"table": model.TABLE, "backend": TABLE_BACKEND, "chains": list(ruleset.chains),
                 "rules": len(ruleset.rules)}
        warnings = probe.warnings_for(netns.name, summary["facts"])
        if warnings:
            extra["warnings"] = warnings
        return extra

    def disable(self, record: NamespaceRecord, netns: Optional[Netns]) -> None:
        # The rules live in the namespace; a namespace that is gone took them with it.
        if netns is None or not netns.exists():
            return
        _preload()
        netns.run(table.remove, _where(netns))

    # --- looking -----------------------------------------------------------------------------
    def inspect(self, record: NamespaceRecord, netns: Optional[Netns]) -> dict:
        base = {"backend": TABLE_BACKEND, "table": model.TABLE}
        if netns is None or not netns.exists():
            return dict(base, in_place=False, present=False, rules=[], nft_rules_present=None,
                        foreign_redirects=[], counters={})
        _preload()
        facts = netns.run(probe.namespace_facts)
        live: table.LiveTable = facts.pop("live")
        wanted = model.build(record.spec).lines()
        have = live.our_lines()
        out = dict(base, present=True, in_place=have == wanted, rules=have)
        if have != wanted:
            out["missing"] = [l for l in wanted if l not in have]
            out["unexpected"] = [l for l in have if l not in wanted]
        out["counters"] = _counters(live)
        out["nft_rules_present"] = facts["nft_rules_present"]
        out["nft_rules"] = facts["nft_rules"]
        out["foreign_redirects"] = facts["foreign_redirects"]
        refs = live.foreign_references()
        if refs:
            out["foreign_references"] = [r.line for r in refs]
        warnings = probe.warnings_for(netns.name, facts)
        if warnings:
            out["warnings"] = warnings
        return out

    def plan(self, netns: Netns, spec: InterceptSpec) -> str:
        check_spec(spec)
        ruleset = model.build(spec)
        header = [f"meshintercept plan for namespace {netns.name}: legacy nat table, applied in one commit",
                  "(iptables-legacy-restore --noflush accepts this document as is)"]
        current = _current_state(netns, ruleset)
        if current:
            header.append(current)
        return ruleset.render(header)

    # --- node ----------------------------------------------------------------------------------
    def teardown(self) -> List[str]:
        return []  # nothing node-wide: every rule lives in a pod namespace

    def doctor(self, records: List[NamespaceRecord]) -> List[Check]:
        checks: List[Check] = []
        reason = self.unavailable_reason()
        if reason is None:
            try:
                compat.load()
            except MeshInterceptError as exc:
                reason = exc.message
        checks.append(Check(
            "python-iptables importable", reason is None,
            detail=reason or f"XTABLES_LIBDIR={os.environ.get('XTABLES_LIBDIR', '?')}",
            fix="" if reason is None else "apt-get install python3-iptables iptables",
        ))
        if reason is None:
            checks.append(self._self_test_check())
        checks.append(_variant_check())
        checks.extend(self._managed_namespace_checks(records))
        return checks

    def _self_test_check(self) -> Check:
        name = "legacy nat table redirects"
        spec = InterceptSpec()
        try:
            result = probe.self_test(spec)
        except MeshInterceptError as exc:
            return Check(name, False, detail=exc.message,
                         fix="load iptable_nat and xt_REDIRECT (modprobe iptable_nat xt_REDIRECT), run as root")
        want = "10.231.255.2:1404"
        ok = result.get("original_dst") == want and result.get("rules_match_plan")
        detail = (f"in a throwaway namespace a connection to {want} reached port {result.get('redirected_to')} "
                  f"with SO_ORIGINAL_DST {result.get('original_dst')}")
        if not result.get("rules_match_plan"):
            detail += "; the applied rules differ from the plan"
        if result.get("error"):
            detail += f"; {result['error']}"
        return Check(name, bool(ok), detail=detail,
                     fix="" if ok else "check that the kernel has iptable_nat, xt_REDIRECT, xt_owner and nf_conntrack")

    def _managed_namespace_checks(self, records: List[NamespaceRecord]) -> List[Check]:
        checks = []
        for record in records:
            try:
                netns = Netns.parse(record.path)
                if netns.key != record.key:
                    continue
                facts = probe.namespace_conflicts(netns)
            except MeshInterceptError:
                continue
            warnings = facts["warnings"]
            checks.append(Check(
                f"namespace {record.name}: no nft or foreign redirect rules", not warnings,
                detail=" ".join(warnings) or "only meshintercept's redirect rules",
                fix="remove the other rules or check they do not NAT the same connections" if warnings else "",
                warning=bool(warnings),
            ))
        return checks


def _preload() -> None:
    """Import python-iptables here, once, so each forked namespace helper inherits it
    instead of paying the import (about 0.1 s) again."""
    compat.load()


def _variant_check() -> Check:
    variant = probe.iptables_variant()
    name = "iptables default variant"
    if variant["variant"] is None:
        return Check(name, True, warning=True, detail=variant["text"],
                     fix="install the iptables package to inspect rules by hand (iptables-legacy-save)")
    detail = f"'iptables' is {variant['text']}"
    if variant["variant"] == "legacy":
        return Check(name, True, detail=detail + "; plain iptables shows meshintercept's rules")
    return Check(name, True, warning=True,
                 detail=detail + "; meshintercept writes the legacy tables, which plain 'iptables' does not show",
                 fix="inside a namespace use 'iptables-legacy-save -t nat' (or 'meshintercept status') to see our rules")


def _where(netns: Netns) -> str:
    return f"namespace {netns.name}"


def _enable_inside(ruleset: model.Ruleset, where: str) -> dict:
    # Others' redirect rules come from the table read for the commit itself. The nft probe
    # (a subprocess, ~3 ms) is left to status and doctor, which are where the issue asks
    # for it: enable stays one table read and one commit.
    return table.apply(ruleset, where, observe=_enable_facts)


def _enable_facts(live: table.LiveTable) -> dict:
    return {"facts": {"foreign_redirects": probe.foreign_redirects(live)}}


def _counters(live: table.LiveTable) -> dict:
    """Packets/bytes through our REDIRECT rules: NAT sees only a connection's first packet,
    so ``packets`` is the number of connections redirected."""
    out = {}
    for label, chain in (("inbound", model.IN_REDIRECT), ("outbound", model.OUT_REDIRECT)):
        rules = [r for r in live.rules if r.chain == chain and r.target == "REDIRECT"]
        out[label] = {"packets": sum(r.packets for r in rules), "bytes": sum(r.bytes for r in rules)}
    return out


def _current_state(netns: Netns, ruleset: model.Ruleset) -> Optional[str]:
    """One header line saying what enable would change; None when we cannot look (not root)."""
    if os.geteuid() != 0:
        return None
    try:
        live = netns.run(table.read_table)
    except MeshInterceptError:
        return None
    have, wanted = live.our_lines(), ruleset.lines()
    if not have:
        return f"current: no meshintercept rules; enable would add {len(ruleset.rules)} rules in {len(ruleset.chains)} chains"
    if have == wanted:
        return "current: these rules are already in place; enable would change nothing"
    gone = len([l for l in have if l not in wanted])
    new = len([l for l in wanted if l not in have])
    return f"current: other meshintercept rules; enable would replace {gone} line(s) with {new} in one commit"
