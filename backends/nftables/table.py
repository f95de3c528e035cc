"""Read, replace and remove our table in the *current* network namespace (run inside it, in a
forked child: `Netns.run`), through libnftables' JSON API.

Enable is one read of the ruleset and at most one transaction: if the table already holds
exactly the plan, nothing is sent (not even an identical batch); otherwise one batch replaces
the table's whole ruleset, so the kernel swaps the old rules for the new ones in one commit and
no packet ever meets a half-built or missing table. A table of our name that we did not create
is refused before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from meshintercept.backends.nftables import lib, others
from meshintercept.backends.nftables import ruleset as model
from meshintercept.errors import Conflict, EnvironmentMissing
from meshintercept.netns import ipv6_unavailable
from meshintercept.spec import InterceptSpec


@dataclass
class LiveRule:
    chain: str
    comment: Optional[str]
    #: Its expressions as libnftables returns them, counter values dropped.
    expr: list
    handle: int
    packets: int = 0
    bytes: int = 0

    @property
    def ours(self) -> bool:
        return bool(self.comment) and self.comment.startswith(model.COMMENT_PREFIX)


@dataclass
class LiveTable:
    """Our table as the kernel holds it (``exists`` False when there is none), and what the rest
    of the namespace's ruleset says about other tools."""

    exists: bool
    handle: Optional[int] = None
    chains: List[dict] = field(default_factory=list)
    rules: List[LiveRule] = field(default_factory=list)
    #: Sets, maps, stateful objects... in our table: we never create any.
    objects: List[str] = field(default_factory=list)
    #: ``nft list table`` text (with counters), when asked for.
    listing: List[str] = field(default_factory=list)
    version: Optional[str] = None
    other_tables: List[str] = field(default_factory=list)
    foreign_redirects: List[str] = field(default_factory=list)

    def not_ours(self) -> Optional[str]:
        """Why an existing table of our name was not made by meshintercept, or None when it was."""
        if not self.exists:
            return None
        if not self.chains:
            return "it is empty, and meshintercept never leaves an empty table"
        strange = [c["name"] for c in self.chains if model.CHAIN_SHAPES.get(c["name"]) != c]
        if strange:
            return f"it has a chain {strange[0]!r} that meshintercept does not create"
        if self.objects:
            return f"it holds {self.objects[0]}, which meshintercept never creates"
        foreign = [r for r in self.rules if not r.ours]
        if foreign:
            return f"rule {foreign[0].handle} in chain {foreign[0].chain!r} has no meshintercept comment"
        return None  # our chains, our rules (all, or some: a flushed chain is drift, repaired by enable)

    def normalized(self) -> dict:
        return {"chains": self.chains, "rules": [(r.chain, r.comment, r.expr) for r in self.rules]}

    def holds(self, plan: model.Ruleset) -> bool:
        return self.exists and self.normalized() == plan.normalized()

    def counters(self) -> List[dict]:
        return [{"chain": r.chain, "comment": r.comment, "handle": r.handle, "packets": r.packets, "bytes": r.bytes}
                for r in self.rules]


def _chain(item: dict) -> dict:
    # The form `Chain.json` produces: handle dropped, keys the kernel always returns for a base chain.
    return {k: item[k] for k in ("family", "table", "name", "type", "hook", "prio", "policy") if k in item}


def _counter(expr: list) -> tuple:
    for e in expr:
        if "counter" in e and isinstance(e["counter"], dict):
            return e["counter"].get("packets", 0), e["counter"].get("bytes", 0)
    return 0, 0


def read(nft: lib.Session, listing: bool = False) -> LiveTable:
    items = nft.list_ruleset()
    meta = next((i["metainfo"] for i in items if "metainfo" in i), {})
    live = LiveTable(exists=False, version=meta.get("version"))
    for item in items:
        kind, body = next(iter(item.items()))
        if kind == "metainfo":
            continue
        table = body.get("name") if kind == "table" else body.get("table")
        if (body.get("family"), table) != (model.FAMILY, model.TABLE):
            if kind == "table":
                live.other_tables.append(f"{body['family']} {body['name']}")
            continue
        if kind == "table":
            live.exists, live.handle = True, body.get("handle")
        elif kind == "chain":
            live.chains.append(_chain(body))
        elif kind == "rule":
            packets, nbytes = _counter(body.get("expr", []))
            live.rules.append(LiveRule(chain=body["chain"], comment=body.get("comment"),
                                       expr=model.normalized_expr(body.get("expr", [])), handle=body.get("handle"),
                                       packets=packets, bytes=nbytes))
        else:
            live.objects.append(f"{kind} {body.get('name', '')}".strip())
    live.foreign_redirects = others.nft_redirects(items)
    if listing and live.exists:
        live.listing = nft.text(f"list table {model.FAMILY} {model.TABLE}").rstrip("\n").splitlines()
    return live


def refuse_foreign(live: LiveTable, where: str) -> None:
    reason = live.not_ours()
    if reason:
        raise Conflict(
            f"{where} already has an nftables table '{model.FAMILY} {model.TABLE}' that meshintercept did not create "
            f"({reason}); remove or rename it (nft delete table {model.FAMILY} {model.TABLE}) if it is stale, "
            "then enable again.")


def apply(spec: InterceptSpec, where: str) -> dict:
    """Make our table hold exactly the plan for ``spec``; one transaction at most."""
    families, notes = spec.effective_families(ipv6_unavailable())
    plan = model.build(spec, families)
    with lib.session() as nft:
        changed, live = _replace(nft, read(nft), plan, where)
    return {"changed": changed, "families": list(families), "notes": notes, "rules": len(plan.rules),
            "foreign_redirects": live.foreign_redirects, "version": live.version}


def _replace(nft: lib.Session, live: LiveTable, plan: model.Ruleset, where: str):
    """(changed, what we last read). A table made or deleted by someone else between our look and
    our batch makes the batch fail whole (``create``: it exists now; ``flush``: it is gone), so we
    look once more and decide again."""
    for attempt in (1, 2):
        refuse_foreign(live, where)
        if live.holds(plan):
            return False, live
        try:
            nft.run(plan.commands(live.chains if live.exists else None))
            return True, live
        except lib.NftError as exc:
            raced = "No such file or directory" in exc.reason if live.exists else "File exists" in exc.reason
            if not raced or attempt == 2:
                raise lib.failure(exc, "the nftables transaction", where) from None
        live = read(nft)
    raise AssertionError("unreachable")


def remove(where: str) -> bool:
    """Delete our table (one transaction); a table of our name that is not ours is left alone.
    True when something was removed."""
    try:
        lib.check_kernel()
    except EnvironmentMissing:
        return False  # without nf_tables nothing of ours can be here (the undo of a failed enable)
    with lib.session() as nft:
        live = read(nft)
        if not live.exists or live.not_ours():
            return False
        try:
            nft.run([{"delete": {"table": {"family": model.FAMILY, "name": model.TABLE}}}])
        except lib.NftError as exc:
            if "No such file or directory" in exc.reason:  # gone since we looked
                return False
            raise lib.failure(exc, "deleting the meshintercept table", where) from None
    return True


def look() -> dict:
    """Everything status needs, changing nothing: our table with its listing and counters, other
    tools' redirects (nft and the legacy iptables nat tables), and why IPv6 cannot be intercepted."""
    with lib.session() as nft:
        live = read(nft, listing=True)
    return {"live": live, "legacy_redirects": others.legacy_redirects(), "ipv6_unavailable": ipv6_unavailable()}
