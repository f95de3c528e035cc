"""The nftables backend's ruleset as plain data: the one table we put in a pod's namespace.

One model feeds the transaction (libnftables JSON commands), the dry run (the text ``nft list
table inet meshintercept`` prints) and the comparison that makes enable idempotent and status
truthful (the JSON ``nft -j list table`` returns, counters and handles left out). Nothing here
touches the kernel.

Layout (an ``inet`` table, so each rule serves IPv4 and IPv6; every rule has a counter and a
``meshintercept:`` comment)::

    table inet meshintercept
      chain prerouting  nat hook, priority dstnat:  TCP -> jump inbound
      chain output      nat hook, priority -100:    TCP -> jump outbound
      chain inbound     proxy ports return, excluded ports return,
                        (included ports | all other TCP) redirect to :<inbound port>
      chain outbound    proxy UID return, 127.0.0.0/8 and ::1 return, excluded CIDRs return,
                        excluded ports return, all other TCP redirect to :<outbound port>
      chain dns         (--capture-dns; output jumps here for udp and tcp dport 53 before
                        the TCP jump) proxy UID return, loopback resolvers return, excluded
                        CIDRs return, UDP and TCP redirect to :<DNS port>

The decisions are the iptables backend's (see its ``rules`` module for the reasons): the
proxy's ports are never redirected, the proxy UID's connections are never redirected (not
even to its own pod, so no sidecar can loop), all of loopback goes direct, exclusions come
first, an include list restricts inbound, DNS goes to the DNS port unless it is the proxy's,
to a loopback resolver or to an excluded CIDR, and an excluded outbound port 53 means no DNS
rules at all. The priorities are the ones the iptables nat table
hooks at (-100 in both hooks). ``redirect to :port`` sends outbound IPv4 to 127.0.0.1 and
IPv6 to ::1, inbound to the address the connection came in on; an AF_INET6 socket connected
to a v4-mapped address sends IPv4 packets, which meet the IPv4 rules. Restricted to one
family (``--family``, or a namespace without IPv6), the two jumps match ``meta nfproto``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from meshintercept.spec import DNS_PORT, FAMILIES, InterceptSpec

FAMILY = "inet"
TABLE = "meshintercept"
COMMENT_PREFIX = "meshintercept:"

PREROUTING, OUTPUT, INBOUND, OUTBOUND, DNS = "prerouting", "output", "inbound", "outbound", "dns"
#: Every chain this backend creates. A later layout that renames or reshapes one keeps the old
#: one in CHAIN_SHAPES so a table an older version made is still recognised as ours.
OWN_CHAINS = frozenset({PREROUTING, OUTPUT, INBOUND, OUTBOUND, DNS})
#: NAT priority of the iptables nat table (NF_IP_PRI_NAT_DST) in both hooks; nft prints it
#: by name only in prerouting.
NAT_PRIORITY = -100
PRIORITY_NAMES = {("prerouting", -100): "dstnat"}

#: nft keeps comments up to 128 bytes; these characters read back as written in both syntaxes.
SAFE_COMMENT = re.compile(r"[A-Za-z0-9 .,:/()_-]{1,128}")

#: The left-hand side of each match we use, in libnftables JSON.
LEFT = {
    "meta l4proto": {"meta": {"key": "l4proto"}},
    "meta nfproto": {"meta": {"key": "nfproto"}},
    "meta skuid": {"meta": {"key": "skuid"}},
    "tcp dport": {"payload": {"protocol": "tcp", "field": "dport"}},
    "udp dport": {"payload": {"protocol": "udp", "field": "dport"}},
    "ip daddr": {"payload": {"protocol": "ip", "field": "daddr"}},
    "ip6 daddr": {"payload": {"protocol": "ip6", "field": "daddr"}},
}
LOOPBACK = {4: ipaddress.ip_network("127.0.0.0/8"), 6: ipaddress.ip_network("::1/128")}
DADDR = {4: "ip daddr", 6: "ip6 daddr"}
NFPROTO = {"ipv4": "ipv4", "ipv6": "ipv6"}

Value = Union[int, str, ipaddress.IPv4Network, ipaddress.IPv6Network]


def _address(net) -> Tuple[str, object]:
    """A network as nft prints it (text) and returns it (JSON): a host without its length,
    IPv6 in inet_ntop's form (``::1.2.3.4``, not Python's ``::102:304``)."""
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    addr = socket.inet_ntop(family, net.network_address.packed)
    if net.prefixlen == net.max_prefixlen:
        return addr, addr
    return f"{addr}/{net.prefixlen}", {"prefix": {"addr": addr, "len": net.prefixlen}}


def _value(value: Value) -> Tuple[str, object]:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return _address(value)
    return str(value), value


@dataclass(frozen=True)
class Match:
    """``<left> <value>`` or, with several values, ``<left> { v1, v2 }`` (an anonymous set)."""

    left: str
    values: Tuple[Value, ...]

    def text(self) -> str:
        shown = [_value(v)[0] for v in self.values]
        return f"{self.left} {shown[0]}" if len(shown) == 1 else f"{self.left} {{ {', '.join(shown)} }}"

    def json(self) -> dict:
        parsed = [_value(v)[1] for v in self.values]
        right = parsed[0] if len(parsed) == 1 else {"set": parsed}
        return {"match": {"op": "==", "left": LEFT[self.left], "right": right}}


@dataclass(frozen=True)
class Rule:
    chain: str
    matches: Tuple[Match, ...]
    comment: str
    #: ``return`` or ``jump <chain>``; ignored when ``redirect`` is set.
    verdict: str = "return"
    #: ``redirect to :<port>``.
    redirect: Optional[int] = None

    def __post_init__(self):
        if not SAFE_COMMENT.fullmatch(self.full_comment):
            raise ValueError(f"comment {self.full_comment!r} must be 1-128 characters of [A-Za-z0-9 .,:/()_-]")

    @property
    def full_comment(self) -> str:
        return f"{COMMENT_PREFIX} {self.comment}"

    def statement_json(self) -> dict:
        if self.redirect is not None:
            return {"redirect": {"port": self.redirect}}
        if self.verdict.startswith("jump "):
            return {"jump": {"target": self.verdict[5:]}}
        return {self.verdict: None}

    def expr(self) -> List[dict]:
        return [m.json() for m in self.matches] + [{"counter": None}, self.statement_json()]

    def json(self) -> dict:
        return {"family": FAMILY, "table": TABLE, "chain": self.chain, "comment": self.full_comment,
                "expr": self.expr()}

    def text(self, packets: int = 0, nbytes: int = 0) -> str:
        statement = f"redirect to :{self.redirect}" if self.redirect is not None else self.verdict
        parts = [m.text() for m in self.matches]
        parts += [f"counter packets {packets} bytes {nbytes}", statement, f'comment "{self.full_comment}"']
        return " ".join(parts)


@dataclass(frozen=True)
class Chain:
    name: str
    #: The netfilter hook of a base chain; None for a chain reached by jumps only.
    hook: Optional[str] = None
    priority: int = NAT_PRIORITY

    def json(self) -> dict:
        out = {"family": FAMILY, "table": TABLE, "name": self.name}
        if self.hook:
            out.update(type="nat", hook=self.hook, prio=self.priority, policy="accept")
        return out

    def header(self) -> Optional[str]:
        if not self.hook:
            return None
        priority = PRIORITY_NAMES.get((self.hook, self.priority), str(self.priority))
        return f"type nat hook {self.hook} priority {priority}; policy accept;"


CHAINS = (Chain(PREROUTING, "prerouting"), Chain(OUTPUT, "output"), Chain(INBOUND), Chain(OUTBOUND), Chain(DNS))
#: Each chain as the kernel returns it: a chain of one of our names but another kind (a filter
#: hook, a base chain where ours is reached by jumps) is not ours.
CHAIN_SHAPES = {c.name: c.json() for c in CHAINS}


def normalized_expr(expr: Sequence[dict]) -> List[dict]:
    """An expression list with counter values dropped, so a live rule compares with a planned one."""
    return [{"counter": None} if "counter" in e else e for e in expr]


@dataclass(frozen=True)
class Ruleset:
    """Our table for one spec: chains in creation order, rules chain by chain."""

    chains: Tuple[Chain, ...]
    rules: Tuple[Rule, ...]
    families: Tuple[str, ...]

    def chain_rules(self, chain: str) -> List[Rule]:
        return [r for r in self.rules if r.chain == chain]

    def commands(self, live_chains: Optional[Sequence[dict]] = None) -> List[dict]:
        """One transaction: the table's whole ruleset replaced (``live_chains``: the chains it holds
        now), or the table created where there is none (None).

        ``create`` fails if a table of that name appeared since we looked, so we never fill
        someone else's. A replace flushes every rule and adds the new ones in the same batch (no
        packet meets an empty chain); the table and the chains that stay as they are keep their
        handles and hooks, and a chain of an older layout is deleted.
        """
        table = {"family": FAMILY, "name": TABLE}
        if live_chains is None:
            head = [{"create": {"table": dict(table)}}]
        else:
            wanted = [c.json() for c in self.chains]
            head = [{"flush": {"table": dict(table)}}]
            head += [{"delete": {"chain": c}} for c in live_chains if c not in wanted]
        return (head + [{"add": {"chain": c.json()}} for c in self.chains]
                + [{"add": {"rule": r.json()}} for r in self.rules])

    def normalized(self) -> Dict[str, list]:
        """What the kernel must hold for this plan to be in place: ``{"chains": [...], "rules": [...]}``
        in the form `table.read_table` reads it back."""
        return {"chains": [c.json() for c in self.chains],
                "rules": [(r.chain, r.full_comment, normalized_expr(r.expr())) for r in self.rules]}

    def lines(self, counters: Optional[Sequence[Tuple[int, int]]] = None) -> List[str]:
        """The table exactly as ``nft list table inet meshintercept`` prints it (counters zero
        unless given, one (packets, bytes) per rule in order)."""
        values = iter(counters or [])
        out = [f"table {FAMILY} {TABLE} {{"]
        for i, chain in enumerate(self.chains):
            if i:
                out.append("")
            out.append(f"\tchain {chain.name} {{")
            if chain.header():
                out.append(f"\t\t{chain.header()}")
            for rule in self.chain_rules(chain.name):
                out.append(f"\t\t{rule.text(*next(values, (0, 0)))}")
            out.append("\t}")
        out.append("}")
        return out

    def render(self, header: Sequence[str] = ()) -> str:
        """A complete document; ``nft -f`` accepts it as is (the header lines are comments)."""
        return "\n".join([f"# {line}" for line in header] + self.lines()) + "\n"


def _ports(ports) -> Tuple[int, ...]:
    return tuple(sorted(set(ports)))


def _dns_rules(spec: InterceptSpec, versions: Sequence[int]) -> List[Rule]:
    rules = [Rule(DNS, (Match("meta skuid", (spec.proxy_uid,)),), f"DNS of the proxy (uid {spec.proxy_uid}) goes direct")]
    rules += [Rule(DNS, (Match(DADDR[v], (LOOPBACK[v],)),), f"IPv{v} loopback resolvers are left alone") for v in versions]
    rules += [Rule(DNS, (Match(DADDR[v], (net,)),), "DNS to an excluded CIDR goes direct")
              for v in versions for net in spec.cidrs(v)]
    rules += [Rule(DNS, (Match("meta l4proto", (proto,)),), f"DNS over {proto.upper()} goes to the proxy DNS port",
                   redirect=spec.dns_port) for proto in ("udp", "tcp")]
    return rules


def build(spec: InterceptSpec, families: Sequence[str] = FAMILIES) -> Ruleset:
    """The complete table for a spec, intercepting ``families`` (see `InterceptSpec.effective_families`).
    Pure: same spec and families, same ruleset."""
    families = tuple(f for f in FAMILIES if f in families)
    versions = [4 if f == "ipv4" else 6 for f in families]
    only = (Match("meta nfproto", (NFPROTO[families[0]],)),) if len(families) == 1 else ()
    tcp = Match("meta l4proto", ("tcp",))
    proxy_ports = set(spec.proxy_ports)
    dns = spec.capture_dns and DNS_PORT not in spec.exclude_outbound_ports
    chains = tuple(c for c in CHAINS if dns or c.name != DNS)
    rules: List[Rule] = [
        Rule(PREROUTING, only + (tcp,), "inbound TCP is checked in chain inbound", verdict=f"jump {INBOUND}")]
    if dns:
        # Before the TCP jump, so TCP to port 53 reaches the DNS port rather than the outbound one.
        for proto in ("udp", "tcp"):
            rules.append(Rule(OUTPUT, only + (Match(f"{proto} dport", (DNS_PORT,)),),
                              f"DNS over {proto.upper()} is checked in chain dns", verdict=f"jump {DNS}"))
    rules += [
        Rule(OUTPUT, only + (tcp,), "outbound TCP is checked in chain outbound", verdict=f"jump {OUTBOUND}"),
        # Inbound. Reached from prerouting only, where no socket owner is known.
        Rule(INBOUND, (Match("tcp dport", _ports(proxy_ports)),), "the proxy ports are never redirected"),
    ]
    excluded_in = _ports(set(spec.exclude_inbound_ports) - proxy_ports)
    if excluded_in:
        rules.append(Rule(INBOUND, (Match("tcp dport", excluded_in),), "excluded inbound ports go direct"))
    if spec.include_inbound_ports:
        included = _ports(set(spec.include_inbound_ports) - proxy_ports)
        # An include list made only of proxy ports redirects nothing, as the spec says.
        if included:
            rules.append(Rule(INBOUND, (Match("tcp dport", included),),
                              "included inbound ports go to the proxy inbound port", redirect=spec.inbound_port))
    else:
        rules.append(Rule(INBOUND, (tcp,), "all other inbound TCP goes to the proxy inbound port",
                          redirect=spec.inbound_port))
    # Outbound.
    rules.append(Rule(OUTBOUND, (Match("meta skuid", (spec.proxy_uid,)),),
                      f"connections of the proxy (uid {spec.proxy_uid}) go direct"))
    for version in versions:
        rules.append(Rule(OUTBOUND, (Match(DADDR[version], (LOOPBACK[version],)),),
                          f"IPv{version} loopback destinations go direct"))
    for version in versions:
        for net in spec.cidrs(version):
            rules.append(Rule(OUTBOUND, (Match(DADDR[version], (net,)),), "excluded outbound CIDR goes direct"))
    if spec.exclude_outbound_ports:
        rules.append(Rule(OUTBOUND, (Match("tcp dport", _ports(spec.exclude_outbound_ports)),),
                          "excluded outbound ports go direct"))
    rules.append(Rule(OUTBOUND, (tcp,), "all other outbound TCP goes to the proxy outbound port",
                      redirect=spec.outbound_port))
    if dns:
        rules += _dns_rules(spec, versions)
    order = {c.name: i for i, c in enumerate(chains)}
    rules.sort(key=lambda r: order[r.chain])  # stable: keeps the order inside a chain
    return Ruleset(chains=chains, rules=tuple(rules), families=families)
