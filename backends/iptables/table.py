"""Read and change the legacy nat tables (iptables and ip6tables) of the *current* network
namespace with python-iptables.

Everything here runs inside the target namespace, in a process forked for that purpose
(`Netns.run`): libiptc caches a whole table per process, and that cache must never hold
one namespace's table while we commit into another.

Changes are made on one libiptc handle with autocommit off and committed once: the
kernel swaps the whole table in one IPT_SO_SET_REPLACE, so either everything we changed
is live or nothing is. Writers take the xtables lock, as ``iptables-legacy -w`` does.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import ipaddress
import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from meshintercept.backends.iptables import iptc_compat as compat
from meshintercept.backends.iptables import rules as model
from meshintercept.errors import BackendFailure, Conflict, EnvironmentMissing

#: How long a change waits for another iptables writer (Istio's choice: 30 s).
LOCK_TIMEOUT = 30.0
DEFAULT_LOCKFILE = "/run/xtables.lock"
#: A concurrent writer that ignores the lock makes the commit fail with EAGAIN; retry.
COMMIT_ATTEMPTS = 3

IPT_INV_VIA_IN, IPT_INV_VIA_OUT = 0x01, 0x02
IPT_INV_SRCIP, IPT_INV_DSTIP = 0x08, 0x10
IPT_INV_FRAG, IPT_INV_PROTO = 0x20, 0x40  # the same bits in ip6t_ip6
IPT_F_FRAG = 0x01
IP6T_F_PROTO = 0x01


@dataclass(frozen=True)
class Family:
    """What differs between iptables (4) and ip6tables (6) for us."""

    version: int
    names_file: str  # /proc/net/<names_file>: the tables a namespace has instantiated
    tool: str  # the matching legacy tool, for messages
    module: str  # the kernel module of its nat table

    def table(self, iptc, name: str):
        return (iptc.Table if self.version == 4 else iptc.Table6)(name, autocommit=False)

    def rule(self, iptc):
        return iptc.Rule() if self.version == 4 else iptc.Rule6()


FAMILIES = {4: Family(4, "ip_tables_names", "iptables-legacy", "iptable_nat"),
            6: Family(6, "ip6_tables_names", "ip6tables-legacy", "ip6table_nat")}



# --- reading -------------------------------------------------------------------------------
@dataclass
class LiveRule:
    chain: str
    #: The rule exactly as ``iptables-legacy-save`` prints it.
    line: str
    target: str
    comment: Optional[str] = None
    packets: int = 0
    bytes: int = 0

    @property
    def ours(self) -> bool:
        return self.chain in model.OWN_CHAINS or model.is_own_comment(self.comment)


@dataclass
class LiveTable:
    name: str
    exists: bool
    family: int = 4
    #: Chain names in libiptc order (built-ins first, then user chains by name).
    chains: List[str] = field(default_factory=list)
    rules: List[LiveRule] = field(default_factory=list)

    def own_chains(self) -> List[str]:
        return [c for c in self.chains if c in model.OWN_CHAINS]

    def ours(self) -> List[LiveRule]:
        return [r for r in self.rules if r.ours]

    def our_lines(self) -> List[str]:
        """Our chain declarations and rules, in iptables-save order: comparable to a plan."""
        return [model.chain_declaration(c) for c in self.own_chains()] + [r.line for r in self.ours()]

    def foreign_references(self) -> List[LiveRule]:
        """Rules we did not add that jump into our chains (they would keep our chains alive)."""
        return [r for r in self.rules if not r.ours and r.target in model.OWN_CHAINS]


def table_exists(name: str = model.TABLE, family: int = 4) -> bool:
    """Whether the namespace has instantiated this legacy table, without instantiating it.

    Opening a table with libiptc creates it in the namespace; status and dry runs must
    change nothing, so they ask /proc first.
    """
    return name in compat.present_tables(FAMILIES[family].names_file)


def read_table(name: str = model.TABLE, family: int = 4) -> LiveTable:
    if not table_exists(name, family):
        return LiveTable(name=name, exists=False, family=family)
    iptc = compat.load()
    table = _open(iptc, name, family)
    return _read(table, name, family)


def _open(iptc, name: str, family: int = 4):
    fam = FAMILIES[family]
    try:
        table = fam.table(iptc, name)
        table.autocommit = False
        table.refresh()
        return table
    except iptc.IPTCError as exc:
        raise EnvironmentMissing(
            f"the kernel's legacy {fam.tool.split('-')[0]} {name} table is not usable here ({_reason(exc)}); "
            f"load it with 'modprobe {fam.module}' (kernels from 6.x need CONFIG_IP{'6' if family == 6 else ''}"
            "_NF_IPTABLES_LEGACY)."
        ) from None


def _read(table, name: str, family: int = 4) -> LiveTable:
    out = LiveTable(name=name, exists=True, family=family)
    for chain in table.chains:
        out.chains.append(chain.name)
        for rule in chain.rules:
            out.rules.append(_live_rule(chain.name, rule))
    return out


def _live_rule(chain: str, rule) -> LiveRule:
    line, comment = render_rule(chain, rule)
    packets, nbytes = rule.get_counters()
    return LiveRule(chain=chain, line=line, target=rule.target.name or "", comment=comment,
                    packets=packets, bytes=nbytes)


def render_rule(chain: str, rule) -> Tuple[str, Optional[str]]:
    """One live rule as iptables-legacy-save prints it, plus its comment text.

    The match and target parts come from the extensions' own save functions (the code
    iptables-save calls), so any rule, ours or not, renders as the real tool shows it.
    """
    v6 = hasattr(rule.entry, "ipv6")
    ip = rule.entry.ipv6 if v6 else rule.entry.ip
    parts = [f"-A {chain}"]
    for letter, text in (("s", rule.src), ("d", rule.dst)):
        addr = _render_addr(letter, text)
        if addr:
            parts.append(addr)
    for letter, iface in (("i", rule.in_interface), ("o", rule.out_interface)):
        if iface:
            inv = iface.startswith("!")
            parts.append(f"{'! ' if inv else ''}-{letter} {iface.lstrip('!')}")
    if ip.proto and (not v6 or ip.flags & IP6T_F_PROTO):
        inv = "! " if ip.invflags & IPT_INV_PROTO else ""
        parts.append(f"{inv}-p {_proto_name(ip.proto)}")
    if not v6 and ip.flags & IPT_F_FRAG:
        parts.append(("! " if ip.invflags & IPT_INV_FRAG else "") + "-f")
    comment = None
    for match in rule.matches:
        saved = _saved(match, rule)
        parts.append(f"-m {match.name}{saved}")
        if match.name == "comment":
            words = shlex.split(saved)
            if len(words) >= 2 and words[0] == "--comment":
                comment = words[1]
    target = rule.target
    if target is not None and target.name:
        flag = "-g" if getattr(target, "goto", False) else "-j"
        parts.append(f"{flag} {target.name}{_saved(target, rule)}")
    return " ".join(parts), comment


def _saved(module, rule) -> str:
    try:
        buf = module._get_saved_buf(rule.get_ip())
    except Exception:  # noqa: BLE001 - any failure means an extension this libxtables cannot load
        return " [unsupported]"
    if not buf:
        return ""
    text = buf.decode() if isinstance(buf, bytes) else buf
    return text.rstrip("\n")


def _render_addr(letter: str, text: str) -> Optional[str]:
    inv = text.startswith("!")
    addr, _, mask = text.lstrip("!").partition("/")
    if ":" in addr:  # python-iptables gives IPv6 as addr/prefixlen already
        if addr == "::" and mask == "0" and not inv:
            return None
        return f"{'! ' if inv else ''}-{letter} {addr}/{mask}"
    if addr == "0.0.0.0" and mask == "0.0.0.0" and not inv:
        return None
    try:
        suffix = str(ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen)
    except ValueError:  # non-contiguous mask: iptables-save prints it dotted
        suffix = mask
    return f"{'! ' if inv else ''}-{letter} {addr}/{suffix}"


def _proto_name(number: int) -> str:
    """The name iptables-save prints for a protocol number, as the loaded libxtables decides it.

    Up to iptables 1.8.9, /etc/protocols first, then the library's own table; later releases
    print only names from their own (longer) table and numbers otherwise (1.8.11: ``-p 47``
    where 1.8.9 printed ``-p gre``). The longer table is how the two are told apart.
    """
    builtin = compat.builtin_protocols()
    if "dccp" not in builtin.values():
        try:
            return compat.etc_protocols()[number]
        except KeyError:
            pass
    return builtin.get(number, str(number))


# --- writing -------------------------------------------------------------------------------
@contextlib.contextmanager
def xtables_lock(timeout: float = None):
    """Hold the lock iptables-legacy takes (XTABLES_LOCKFILE or /run/xtables.lock)."""
    timeout = LOCK_TIMEOUT if timeout is None else timeout
    path = os.environ.get("XTABLES_LOCKFILE") or DEFAULT_LOCKFILE
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BackendFailure(
                        f"another iptables process has held the xtables lock {path} for {timeout:g} s; "
                        "retry when it is done (see 'fuser -v {path}')."
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def apply(ruleset: model.Ruleset, where: str, lock_timeout: float = None,
          observe: Optional[Callable[["LiveTable"], dict]] = None) -> dict:
    """Make our part of the ruleset's family's nat table equal ``ruleset`` in one commit;
    leave the rest alone.

    ``observe(live)`` adds facts about the table as read for this commit to the summary
    (others' rules are not changed by our commit, so no second read is needed)."""
    def edit(table, live):
        summary = _reconcile(table, live, ruleset)
        if observe is not None:
            summary.update(observe(live))
        return summary

    return _change(edit, where, lock_timeout, ruleset.family)


def remove(where: str, lock_timeout: float = None, family: int = 4) -> dict:
    """Remove our chains and jumps from one family's nat table in one commit; a no-op when
    there are none."""
    if not table_exists(model.TABLE, family):
        return {"changed": False, "removed": 0}
    return _change(_strip, where, lock_timeout, family)


def _change(edit, where: str, lock_timeout: Optional[float], family: int = 4) -> dict:
    iptc = compat.load()
    with xtables_lock(lock_timeout):
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            table = _open(iptc, model.TABLE, family)
            live = _read(table, model.TABLE, family)
            try:
                summary = edit(table, live)
            except (iptc.IPTCError, iptc.XTablesError) as exc:
                raise _build_error(exc, where) from None
            if not summary["changed"]:
                return summary
            code = compat.commit(table)
            if code == errno_mod.EAGAIN and attempt < COMMIT_ATTEMPTS:
                continue  # someone changed the table under us; start from a fresh copy
            if code:
                raise _commit_error(code, live, where)
            return summary
    raise AssertionError("unreachable")


def _reconcile(table, live: LiveTable, ruleset: model.Ruleset) -> dict:
    """Edit the uncommitted handle so our rules become ``ruleset``; touch nothing else.

    Rules already right stay where they are (a re-run is a true no-op, and our jumps keep
    their position among other tools' rules); only what differs is removed or added.
    """
    iptc = compat.load()
    added = removed = 0
    existing = set(live.chains)
    for chain in ruleset.chains:
        if chain not in existing:
            table.create_chain(chain)

    # Our rules in built-in chains are one block, in the ruleset's order (the DNS jumps must come
    # before the TCP one), where our first rule was among other tools' rules, else at the end.
    for builtin in model.BUILTIN_CHAINS:
        wanted = [r for r in ruleset.jumps if r.chain == builtin]
        mine = [r for r in live.rules if r.chain == builtin and r.ours]
        if [r.line for r in mine] == [r.save() for r in wanted]:
            continue
        chain = iptc.Chain(table, builtin)
        position, others = None, 0
        for rule in list(chain.rules):
            _line, comment = render_rule(builtin, rule)
            if not model.is_own_comment(comment):
                others += 1
                continue
            if position is None:
                position = others
            chain.delete_rule(rule)
            removed += 1
        for offset, rule in enumerate(wanted):
            if position is None:
                chain.append_rule(to_iptc(iptc, rule, ruleset.family))
            else:
                chain.insert_rule(to_iptc(iptc, rule, ruleset.family), position + offset)
            added += 1

    # Our own chains: refill only those whose content differs.
    for chain_name in ruleset.chains:
        wanted = [r.save() for r in ruleset.chain_rules(chain_name)]
        have = [r.line for r in live.rules if r.chain == chain_name]
        if chain_name in existing and have == wanted:
            continue
        chain = iptc.Chain(table, chain_name)
        if have:
            chain.flush()
            removed += len(have)
        for rule in ruleset.chain_rules(chain_name):
            chain.append_rule(to_iptc(iptc, rule, ruleset.family))
            added += 1

    # Chains of ours the ruleset no longer has (an older layout).
    stale = [c for c in live.own_chains() if c not in ruleset.chains]
    removed += _drop_chains(table, live, stale)
    created = [c for c in ruleset.chains if c not in existing]
    return {"changed": bool(added or removed or created or stale), "added": added, "removed": removed,
            "created_chains": created}


def _strip(table, live: LiveTable) -> dict:
    iptc = compat.load()
    removed = 0
    for rule in live.rules:
        if rule.chain in model.OWN_CHAINS or not rule.ours:
            continue
        chain = iptc.Chain(table, rule.chain)
        for candidate in list(chain.rules):
            line, _ = render_rule(rule.chain, candidate)
            if line == rule.line:
                chain.delete_rule(candidate)
                removed += 1
                break
    own = live.own_chains()
    removed += _drop_chains(table, live, own)
    return {"changed": bool(removed or own), "removed": removed, "removed_chains": own}


def _drop_chains(table, live: LiveTable, chains: List[str]) -> int:
    if not chains:
        return 0
    blockers = [r for r in live.foreign_references() if r.target in chains]
    if blockers:
        raise Conflict(
            f"chain {blockers[0].target} is still used by a rule meshintercept did not add "
            f"('{blockers[0].line}' in table nat); delete that rule, then run the command again."
        )
    iptc = compat.load()
    flushed = 0
    for name in chains:  # flush all first: our chains jump into each other
        flushed += sum(1 for r in live.rules if r.chain == name)
        iptc.Chain(table, name).flush()
    for name in chains:
        table.delete_chain(name)
    return flushed


def to_iptc(iptc, rule: model.Rule, family: int = 4):
    """The model rule as a python-iptables rule (the same fields `Rule.save` prints)."""
    out = FAMILIES[family].rule(iptc)
    if rule.dst:
        out.dst = rule.dst
    if rule.out_iface:
        out.out_interface = rule.out_iface
    if rule.protocol:
        out.protocol = rule.protocol  # before matches/targets: their parsers check it
    for m in rule.all_matches:
        match = out.create_match(m.name)
        match.set_parameter(m.option, ("!" if m.invert else "") + m.value)
    target = out.create_target(rule.target)
    if rule.to_ports is not None:
        target.set_parameter("to-ports", str(rule.to_ports))
    return out


# --- errors --------------------------------------------------------------------------------
def _reason(exc: Exception) -> str:
    text = str(exc)
    for prefix in ("can't commit: ", "can't initialize nat: "):
        text = text.replace(prefix, "")
    if text.startswith("b'") and text.endswith("'"):
        text = text[2:-1]
    return text


def _build_error(exc: Exception, where: str) -> Exception:
    iptc = compat.load()
    if isinstance(exc, iptc.XTablesError):
        return EnvironmentMissing(
            f"an iptables extension could not be loaded ({exc}); install the iptables package, which ships "
            f"libxt_owner.so, libxt_comment.so, libxt_multiport.so and libxt_REDIRECT.so "
            f"(looked in {os.environ.get('XTABLES_LIBDIR', 'the default place')})."
        )
    return BackendFailure(f"building the nat rules for {where} failed ({_reason(exc)}); nothing was changed.")


def _commit_error(code: int, live: LiveTable, where: str) -> Exception:
    reason = os.strerror(code)
    if code == errno_mod.EPERM:
        from meshintercept.errors import NotPermitted

        return NotPermitted(f"the kernel refused the nat table update for {where} ({reason}); run as root with CAP_NET_ADMIN.")
    hint = "the kernel log (dmesg) says why"
    refs = live.foreign_references()
    if refs:
        hint = (f"a rule meshintercept did not add jumps into its chains ('{refs[0].line}'), and the kernel "
                f"refuses REDIRECT or owner matches reached from there; delete that rule")
    return BackendFailure(f"the kernel refused the nat table update for {where} ({reason}); nothing was changed — {hint}.")
