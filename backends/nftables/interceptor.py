"""The ``nftables`` mode: native nf_tables rules in one ``inet`` table of the pod's namespace.

The same decisions as the iptables mode, for nodes where iptables is gone or is iptables-nft:
one table (``inet meshintercept``) serves IPv4 and IPv6, is replaced as a whole in one
transaction, and is the only thing we ever touch. The layout is in `ruleset`, reading and
writing it inside the namespace in `table`, other tools' redirects in `others`, the node's
netfilter flavours and the self-test in `probe`.
"""

from __future__ import annotations

import os
from typing import List, Optional

from meshintercept.backends.nftables import lib, others, table
from meshintercept.backends.nftables import ruleset as model
from meshintercept.errors import MeshInterceptError, UsageError
from meshintercept.interceptor import Check, Interceptor
from meshintercept.netns import Netns, ipv6_unavailable
from meshintercept.spec import FAMILIES, InterceptSpec
from meshintercept.state import NamespaceRecord

TABLE_NAME = f"{model.FAMILY} {model.TABLE}"


class NftablesInterceptor(Interceptor):
    name = "nftables"
    description = "native nf_tables rules in one inet table of the pod's namespace (libnftables JSON API)"

    # --- enable / disable --------------------------------------------------------------------
    def enable(self, netns: Netns, spec: InterceptSpec, previous: Optional[NamespaceRecord] = None) -> dict:
        """One forked child: it reads the ruleset, refuses a table of our name it did not make, and
        sends at most one transaction (nothing when the table already holds the plan)."""
        _refuse_ebpf_only(spec)
        lib.preload()
        summary = netns.run(table.apply, spec, _where(netns))
        extra = {"table": TABLE_NAME, "backend": "nftables", "chains": sorted(model.OWN_CHAINS),
                 "rules": summary["rules"], "families": summary["families"], "libnftables": summary["version"]}
        warnings = summary["notes"] + others.warnings_for(netns.name, summary["foreign_redirects"])
        return dict(extra, warnings=warnings) if warnings else extra

    def disable(self, record: NamespaceRecord, netns: Optional[Netns]) -> None:
        # The table lives in the namespace; a namespace that is gone took it with it.
        if netns is not None and netns.exists():
            lib.preload()
            netns.run(table.remove, _where(netns))

    # --- looking -----------------------------------------------------------------------------
    def inspect(self, record: NamespaceRecord, netns: Optional[Netns]) -> dict:
        base = {"backend": "nftables", "table": TABLE_NAME}
        if netns is None or not netns.exists():
            return dict(base, in_place=False, present=False, listing=[], counters={}, families={},
                        foreign_redirects=[])
        lib.preload()
        facts = netns.run(table.look)
        live: table.LiveTable = facts["live"]
        recorded = record.extra.get("families") or list(FAMILIES)
        plan = model.build(record.spec, recorded)
        in_place = live.holds(plan) and not live.not_ours()
        families = {}
        for family in FAMILIES:
            if family in recorded:
                families[family] = "captured" if in_place else "not in place"
            elif family == "ipv6" and facts["ipv6_unavailable"]:
                families[family] = facts["ipv6_unavailable"]
            else:
                families[family] = "not asked for"
        out = dict(base, present=True, in_place=in_place, families=families,
                   listing=live.listing, counters=_counters(live), rule_counters=live.counters())
        if live.exists and not in_place:
            have = live.normalized()["rules"]
            wanted = plan.normalized()["rules"]
            out["missing"] = [r[1] for r in wanted if r not in have]
            out["unexpected"] = [f"{r[0]}: {r[1]}" for r in have if r not in wanted]
            if live.not_ours():
                out["not_ours"] = live.not_ours()
        out["other_tables"] = live.other_tables
        out["foreign_redirects"] = live.foreign_redirects + facts["legacy_redirects"]
        warnings = others.warnings_for(netns.name, out["foreign_redirects"])
        if warnings:
            out["warnings"] = warnings
        return out

    def plan(self, netns: Netns, spec: InterceptSpec) -> str:
        """The table as ``nft list table inet meshintercept`` would show it after enable; ``nft -f``
        accepts the document as is (its header lines are comments)."""
        _refuse_ebpf_only(spec)
        root = os.geteuid() == 0
        families, notes = spec.effective_families(netns.run(ipv6_unavailable) if root else None)
        ruleset = model.build(spec, families)
        header = [f"meshintercept plan for namespace {netns.name}: nftables table {TABLE_NAME}, "
                  "replaced as a whole in one transaction",
                  "(nft -f accepts this document as is; 'nft list table inet meshintercept' shows it after enable)"]
        current = _current_state(netns, ruleset) if root else None
        if current:
            header.append(current)
        return ruleset.render(header + [f"note: {n}" for n in notes])

    # --- node ----------------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        return lib.missing_reason()

    def teardown(self) -> List[str]:
        return []  # nothing node-wide: every table lives in a pod namespace

    def doctor(self, records: List[NamespaceRecord]) -> List[Check]:
        reason = self.unavailable_reason()
        checks = [Check("libnftables (python3-nftables) loads", reason is None, detail=reason or "",
                        fix="" if reason is None else lib.INSTALL)]
        # The self-test's helpers (sockets, subprocesses) are imported here only: enable never needs them.
        from meshintercept.backends.nftables import probe

        try:
            result = probe.self_test(InterceptSpec())
        except MeshInterceptError as exc:
            result = {"error": exc.message}
        if reason is None:
            checks.extend(_self_test_checks(result))
        checks.extend(_flavour_checks(result))
        checks.extend(self._managed_namespace_checks(records))
        return checks

    def _managed_namespace_checks(self, records: List[NamespaceRecord]) -> List[Check]:
        from meshintercept.manager import Manager

        checks = []
        for record in records:
            netns = Manager.live_netns(record)
            try:
                live = self.inspect(record, netns) if netns else None
            except MeshInterceptError:
                live = None
            if live is None:
                continue
            problems = ([] if live["in_place"] else [f"the table is not as enabled ({live.get('not_ours') or 'drifted'})"])
            problems += live.get("warnings", [])
            checks.append(Check(
                f"namespace {record.name}: table in place, no foreign redirect rules", not problems,
                detail=" ".join(problems) or "only meshintercept's redirect rules",
                fix="enable it again, and check the other rules do not NAT the same connections" if problems else "",
                warning=bool(problems)))
        return checks


def _where(netns: Netns) -> str:
    return f"namespace {netns.name}"


def _refuse_ebpf_only(spec: InterceptSpec) -> None:
    # ``debug`` changes only what eBPF programs print, so it is accepted and ignored here;
    # socket acceleration (sockmap) has no netfilter counterpart.
    if spec.accelerate:
        raise UsageError("--accelerate needs --mode ebpf; the nftables mode has no socket acceleration.")


SELF_TEST_NAMES = {"ipv4": "native nftables redirects (IPv4)",
                   "v4mapped": "native nftables redirects (IPv4 from an IPv6 socket, v4-mapped)",
                   "ipv6": "native nftables redirects (IPv6)"}


def _self_test_checks(result: dict) -> List[Check]:
    """One check per way an app reaches a peer; IPv6 failing is a warning (IPv4 works without it)."""
    from meshintercept.backends.nftables import probe
    from meshintercept.sidecar import fmt

    fix = ("load the nf_tables NAT parts (modprobe nf_tables nft_chain_nat nft_redir) and run as root; "
           "or use --mode iptables")
    if "error" in result:
        return [Check(SELF_TEST_NAMES["ipv4"], False, detail=result["error"], fix=fix)]
    checks = []
    for way, name in SELF_TEST_NAMES.items():
        conn = result["connections"].get(way, {})
        if "skipped" in conn:
            checks.append(Check(name, True, warning=True, detail=f"not tried: {conn['skipped']}",
                                fix="IPv6 pods are not intercepted while IPv6 is off"))
            continue
        want = fmt((probe.TARGETS[way][1], probe.TARGET_PORT))
        problems = [] if result.get("matches_plan") else ["the table read back differs from the plan"]
        if conn.get("original_dst") != want:
            problems.append(conn.get("error") or f"the proxy would have read {conn.get('original_dst')}, not {want}")
        told = [f"in a throwaway namespace a connection to {want} landed on {conn.get('landed')} with original "
                f"destination {conn.get('original_dst')} (libnftables {result.get('version')})"]
        checks.append(Check(name, not problems, detail="; ".join(told + problems),
                            warning=way == "ipv6" and bool(problems), fix=fix if problems else ""))
    return checks


def _flavour_checks(result: dict) -> List[Check]:
    """Which of iptables-legacy, iptables-nft and native nft work on this node, and the mode to use."""
    from meshintercept.backends.nftables import probe

    flavours = result.get("flavours") or {}
    nft_works = bool(result.get("connections")) and "error" not in result and \
        result["connections"].get("ipv4", {}).get("original_dst") is not None
    default = probe.iptables_default()
    parts = [f"{name}: {flavours.get(name, {}).get('detail', 'not tried')}" for name in probe.FLAVOURS]
    parts.append("native nft (libnftables): " + ("works" if nft_works else result.get("error", "not usable").rstrip(".")))
    parts.append(f"plain 'iptables' is {default['text']}")
    legacy_works = flavours.get("iptables-legacy", {}).get("works", False)
    mode, why = probe.recommend(nft_works, legacy_works, default["variant"])
    return [Check("netfilter on this node (tried in a throwaway namespace)", True, detail="; ".join(parts)),
            Check("recommended netfilter mode", mode is not None, detail=f"{mode}: {why}" if mode else why,
                  fix="" if mode else "use a kernel with nf_tables (or x_tables) NAT support, or --mode ebpf")]


def _counters(live: table.LiveTable) -> dict:
    """Packets/bytes through our redirect rules: NAT sees only a connection's first packet, so
    ``packets`` is the number of connections redirected."""
    out = {}
    for label, chain in (("inbound", model.INBOUND), ("outbound", model.OUTBOUND), ("dns", model.DNS)):
        rules = [r for r in live.rules if r.chain == chain and any("redirect" in e for e in r.expr)]
        if rules or label != "dns":  # DNS only where it is captured
            out[label] = {"packets": sum(r.packets for r in rules), "bytes": sum(r.bytes for r in rules)}
    return out


def _current_state(netns: Netns, ruleset: model.Ruleset) -> Optional[str]:
    """One header line saying what enable would change; None when we cannot look."""
    try:
        lib.preload()
        live = netns.run(table.look)["live"]
    except MeshInterceptError:
        return None
    if not live.exists:
        return f"current: no meshintercept table; enable would add {len(ruleset.rules)} rules in {len(ruleset.chains)} chains"
    if live.not_ours():
        return f"current: a table of this name that meshintercept did not create ({live.not_ours()}); enable would refuse"
    if live.holds(ruleset):
        return "current: this table is already in place; enable would change nothing"
    return f"current: another meshintercept ruleset; enable would replace its {len(live.rules)} rules in one transaction"
