"""The ``iptables`` mode: nat-table REDIRECT rules inside the pod's namespace.

What osm, Istio, Linkerd and Kuma init containers do, done as one atomic, idempotent change
per IP family of the legacy nat tables (iptables and ip6tables) through python-iptables; if
the second family's commit fails, the first is put back as it was. The rule layout and its
reasons are in `rules`; reading and committing in `table`; facts about nft rules, other
meshes and the node in `probe`.
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
from meshintercept.netns import Netns, ipv6_unavailable
from meshintercept.spec import InterceptSpec
from meshintercept.state import NamespaceRecord

#: python-iptables drives the legacy (x_tables) kernel interface, never nf_tables.
TABLE_BACKEND = "legacy"


def check_spec(spec: InterceptSpec) -> None:
    # ``debug`` only changes what eBPF programs print; iptables has nothing to print, so it
    # is accepted and ignored. Acceleration is a sockmap feature with no iptables meaning.
    if spec.accelerate:
        raise UsageError("--accelerate needs --mode ebpf; the iptables mode has no socket acceleration.")


class IptablesInterceptor(Interceptor):
    name = "iptables"
    description = "nat-table REDIRECT rules in the pod's namespace (legacy iptables, via python-iptables)"

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        return compat.missing_reason()

    # --- enable / disable --------------------------------------------------------------------
    def enable(self, netns: Netns, spec: InterceptSpec, previous: Optional[NamespaceRecord] = None) -> dict:
        """One commit per family, each in its own forked child (see the note above
        `_enable_facts`); a family that fails puts the ones before it back as they were."""
        check_spec(spec)
        _preload()
        where = _where(netns)
        no_ipv6 = netns.run(ipv6_unavailable)
        families, notes = spec.effective_families(no_ipv6)
        previous_families = previous.extra.get("families", ["ipv4"]) if previous else []
        done: List[int] = []
        foreign: List[str] = []
        try:
            for version in (4, 6):
                if FAMILY[version] in families:
                    summary = netns.run(table.apply, model.build(spec, version), where, None, _enable_facts)
                    foreign += summary["foreign_redirects"]
                    done.append(version)
            for version in (4, 6):  # a family the new spec no longer intercepts
                if FAMILY[version] not in families:
                    netns.run(table.remove, where, None, version)
        except BaseException:
            for version in done:
                if previous is not None and FAMILY[version] in previous_families:
                    netns.run(table.apply, model.build(previous.spec, version), where)
                else:
                    netns.run(table.remove, where, None, version)
            raise
        extra = {"table": model.TABLE, "backend": TABLE_BACKEND, "chains": list(model.build(spec).chains),
                 "rules": sum(len(model.build(spec, v).rules) for v in done), "families": list(families)}
        warnings = notes + probe.warnings_for(netns.name, {"foreign_redirects": foreign})
        if warnings:
            extra["warnings"] = warnings
        return extra

    def disable(self, record: NamespaceRecord, netns: Optional[Netns]) -> None:
        # The rules live in the namespace; a namespace that is gone took them with it.
        if netns is None or not netns.exists():
            return
        _preload()
        for version in (4, 6):
            netns.run(table.remove, _where(netns), None, version)

    # --- looking -----------------------------------------------------------------------------
    def inspect(self, record: NamespaceRecord, netns: Optional[Netns]) -> dict:
        base = {"backend": TABLE_BACKEND, "table": model.TABLE}
        if netns is None or not netns.exists():
            return dict(base, in_place=False, present=False, rules=[], nft_rules_present=None,
                        foreign_redirects=[], counters={}, families={})
        _preload()
        facts = probe.namespace_facts(netns)
        lives = facts.pop("live")
        recorded = record.extra.get("families") or ["ipv4"]
        families, have_all, wanted_all, in_place = {}, [], [], True
        for version in (4, 6):
            family = FAMILY[version]
            live: table.LiveTable = lives[version]
            have = live.our_lines()
            wanted = model.build(record.spec, version).lines() if family in recorded else []
            have_all += _tagged(version, have)
            wanted_all += _tagged(version, wanted)
            in_place = in_place and have == wanted
            families[family] = ("captured" if wanted and have == wanted else "not in place" if wanted
                                else facts["family_notes"].get(family, "not asked for"))
        out = dict(base, present=True, in_place=in_place, rules=have_all, families=families)
        if have_all != wanted_all:
            out["missing"] = [l for l in wanted_all if l not in have_all]
            out["unexpected"] = [l for l in have_all if l not in wanted_all]
        out["counters"] = _counters(lives)
        out["nft_rules_present"] = facts["nft_rules_present"]
        out["nft_rules"] = facts["nft_rules"]
        out["foreign_redirects"] = facts["foreign_redirects"]
        refs = lives[4].foreign_references() + lives[6].foreign_references()
        if refs:
            out["foreign_references"] = [r.line for r in refs]
        warnings = probe.warnings_for(netns.name, facts)
        if warnings:
            out["warnings"] = warnings
        return out

    def plan(self, netns: Netns, spec: InterceptSpec) -> str:
        """One iptables-save document per family, each accepted as is by ``<tool>-legacy-restore --noflush``."""
        check_spec(spec)
        unavailable = netns.run(ipv6_unavailable) if os.geteuid() == 0 else None
        families, notes = spec.effective_families(unavailable)
        docs = []
        for family in families:
            ruleset = model.build(spec, VERSION[family])
            header = [f"meshintercept plan for namespace {netns.name}: legacy {ruleset.tool} nat table, "
                      "applied in one commit",
                      f"({ruleset.tool}-legacy-restore --noflush accepts this document as is)"]
            current = _current_state(netns, ruleset)
            if current:
                header.append(current)
            docs.append(ruleset.render(header + [f"note: {n}" for n in notes if ruleset.family == 4]))
        return "".join(docs)

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
            checks.extend(self._self_test_checks())
        checks.append(_variant_check())
        checks.extend(self._managed_namespace_checks(records))
        return checks

    def _self_test_checks(self) -> List[Check]:
        """The real rules in a throwaway namespace, one connection per family. IPv6 failing is a
        warning: IPv4 interception works without it, and enable says IPv6 is not captured."""
        names = {4: "legacy nat table redirects (IPv4)", 6: "legacy nat table redirects (IPv6, ip6tables)"}
        fixes = {4: "load iptable_nat and xt_REDIRECT (modprobe iptable_nat xt_REDIRECT), run as root",
                 6: "load ip6table_nat (modprobe ip6table_nat); IPv6 pods are otherwise not intercepted"}
        try:
            results = probe.self_test(InterceptSpec())
        except MeshInterceptError as exc:
            return [Check(names[4], False, detail=exc.message, fix=fixes[4])]
        checks = []
        for version in (4, 6):
            result = results[version]
            if "skipped" in result:
                checks.append(Check(names[version], True, warning=True, detail=f"not tried: {result['skipped']}",
                                    fix="IPv6 pods are not intercepted while IPv6 is off"))
                continue
            want = "10.231.255.2:1404" if version == 4 else "[fd00:231:ffff::2]:1404"
            ok = result.get("original_dst") == want and result.get("rules_match_plan")
            asked = "SO_ORIGINAL_DST" if version == 4 else "IP6T_SO_ORIGINAL_DST"
            detail = (f"in a throwaway namespace a connection to {want} reached port {result.get('redirected_to')} "
                      f"with {asked} {result.get('original_dst')}")
            if not result.get("rules_match_plan"):
                detail += "; the applied rules differ from the plan"
            if result.get("error"):
                detail += f"; {result['error']}"
            checks.append(Check(names[version], bool(ok), detail=detail, warning=version == 6 and not ok,
                                fix="" if ok else fixes[version]))
        return checks

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


VERSION = {"ipv4": 4, "ipv6": 6}
FAMILY = {4: "ipv4", 6: "ipv6"}


# Why one forked child per family: libxtables registers an extension only for the family it
# is loaded for (libxt_REDIRECT.so holds the IPv4 and the IPv6 REDIRECT), and a library loaded
# once in a process is never loaded again, so a process that built IPv4 rules cannot build or
# read IPv6 ones. The parent never loads extensions; each child loads them for its family.


def _enable_facts(live: table.LiveTable) -> dict:
    return {"foreign_redirects": probe.foreign_redirects(live)}


def _tagged(version: int, lines: List[str]) -> List[str]:
    return lines if version == 4 else [f"ip6tables: {line}" for line in lines]


def _counters(lives: dict) -> dict:
    """Packets/bytes through our REDIRECT rules, both families: NAT sees only a connection's
    first packet, so ``packets`` is the number of connections redirected."""
    out = {}
    for label, chain in (("inbound", model.IN_REDIRECT), ("outbound", model.OUT_REDIRECT), ("dns", model.DNS)):
        rules = [r for live in lives.values() for r in live.rules if r.chain == chain and r.target == "REDIRECT"]
        if rules or label != "dns":  # DNS only where it is captured
            out[label] = {"packets": sum(r.packets for r in rules), "bytes": sum(r.bytes for r in rules)}
    return out


def _current_state(netns: Netns, ruleset: model.Ruleset) -> Optional[str]:
    """One header line saying what enable would change; None when we cannot look (not root)."""
    if os.geteuid() != 0:
        return None
    try:
        live = netns.run(table.read_table, model.TABLE, ruleset.family)
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
