"""The iptables backend's rules as plain data: what we put in a namespace's nat table.

One model feeds both the dry run (rendered as an ``iptables-save`` / ``iptables-restore
--noflush`` document) and the apply step (turned into python-iptables objects), so what
``--dry-run`` prints is, line for line, what ``iptables-legacy-save -t nat`` shows afterwards.
Nothing here touches the kernel.

Layout (all TCP; every rule carries a ``meshintercept:`` comment), the same in the IPv4 nat
table (iptables) and the IPv6 one (ip6tables)::

    PREROUTING -> MI_INBOUND:  proxy ports RETURN, excluded ports RETURN,
                               (included ports | everything) -> MI_IN_REDIRECT
    OUTPUT     -> MI_OUTPUT:   proxy UID RETURN, 127.0.0.0/8 (::1/128) RETURN, excluded CIDRs
                               of the family and ports RETURN, everything else -> MI_OUT_REDIRECT
    MI_IN_REDIRECT:  REDIRECT --to-ports <inbound port>
    MI_OUT_REDIRECT: REDIRECT --to-ports <outbound port>

With --capture-dns, before the TCP jump: OUTPUT udp/tcp dport 53 -> MI_DNS: proxy UID
RETURN, loopback RETURN, excluded CIDRs RETURN, then udp and tcp REDIRECT --to-ports <DNS
port>. conntrack un-NATs every reply, so it comes back from the server the app asked. An
excluded outbound port 53 means no DNS rules at all.

An AF_INET6 socket connected to a v4-mapped address sends IPv4 packets: the IPv4 table
intercepts it, and its CIDR exclusions apply. ip6tables' REDIRECT sends outbound to [::1]
and inbound to the address the connection came in on, so the sidecar listens on [::].

The app calling its own pod address (hairpin, leaves through ``lo``) is outbound traffic
like any other: the outbound proxy gets it and forwards it, as the proxy UID, straight to
the app. That is what the eBPF backend's connect4 program does, so a sidecar sees the same
connections under both modes. Istio and OSM add a rule sending the *proxy UID's* ``-o lo``
connections to the inbound port; that only works when the sidecar forwards inbound traffic
from a marker source (Istio binds 127.0.0.6). A plain transparent sidecar (HAProxy
``server x 0.0.0.0``) forwards inbound connections to the pod address as the proxy UID,
which that rule would redirect again, forever. Here the proxy UID's traffic is always left
alone, so no sidecar can loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from meshintercept.spec import DNS_PORT, InterceptSpec

TABLE = "nat"
PREFIX = "MI_"
COMMENT_PREFIX = "meshintercept:"

INBOUND = "MI_INBOUND"
IN_REDIRECT = "MI_IN_REDIRECT"
OUTPUT = "MI_OUTPUT"
OUT_REDIRECT = "MI_OUT_REDIRECT"
DNS = "MI_DNS"
BASE_CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, OUT_REDIRECT)
#: Every chain this backend owns. A later layout that renames a chain keeps the old name
#: here so disable still removes what an older version added.
OWN_CHAINS = frozenset(BASE_CHAINS + (DNS,))
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")

#: The kernel's multiport match takes at most 15 ports per rule.
MULTIPORT_LIMIT = 15

#: Chain-name prefixes of other meshes' interception (Istio, Linkerd, OSM, Kuma, and the
#: older names some of them used).
FOREIGN_MESH_PREFIXES = ("ISTIO_", "PROXY_INIT_", "PROXY_", "OSM_", "KUMA_", "MESH_")
REDIRECTING_TARGETS = ("REDIRECT", "TPROXY")
SAFE_COMMENT = re.compile(r"[A-Za-z0-9 .,:/()_-]*")


@dataclass(frozen=True)
class Match:
    """One ``-m NAME [!] --OPTION VALUE`` clause."""

    name: str
    option: str
    value: str
    invert: bool = False

    def save(self) -> str:
        value = quote(self.value) if self.name == "comment" else self.value
        return f"-m {self.name} {'! ' if self.invert else ''}--{self.option} {value}"


@dataclass(frozen=True)
class Rule:
    """One rule, with fields in the order ``iptables-save`` prints them."""

    chain: str
    target: str
    comment: str
    protocol: str = "tcp"
    dst: Optional[str] = None  # canonical "a.b.c.d/len"
    out_iface: Optional[str] = None
    matches: Tuple[Match, ...] = ()
    #: REDIRECT's --to-ports; None for jumps and RETURN.
    to_ports: Optional[int] = None

    def __post_init__(self):
        # python-iptables escapes quotes and backslashes on the way in, so a comment using
        # them would not read back as written; the kernel caps comments at 256 bytes.
        text = f"{COMMENT_PREFIX} {self.comment}"
        if not SAFE_COMMENT.fullmatch(text) or len(text) > 255:
            raise ValueError(f"comment {text!r} must be under 256 characters of [A-Za-z0-9 .,:/()_-]")

    @property
    def all_matches(self) -> Tuple[Match, ...]:
        return self.matches + (Match("comment", "comment", f"{COMMENT_PREFIX} {self.comment}"),)

    def save(self) -> str:
        parts = [f"-A {self.chain}"]
        if self.dst:
            parts.append(f"-d {self.dst}")
        if self.out_iface:
            parts.append(f"-o {self.out_iface}")
        if self.protocol:
            parts.append(f"-p {self.protocol}")
        parts.extend(m.save() for m in self.all_matches)
        parts.append(f"-j {self.target}")
        if self.to_ports is not None:
            parts.append(f"--to-ports {self.to_ports}")
        return " ".join(parts)


@dataclass(frozen=True)
class Ruleset:
    """Our chains and rules for one spec and IP family, in ``iptables-save`` order."""

    chains: Tuple[str, ...]
    rules: Tuple[Rule, ...]
    family: int = 4

    @property
    def tool(self) -> str:
        return "iptables" if self.family == 4 else "ip6tables"

    def chain_rules(self, chain: str) -> List[Rule]:
        return [r for r in self.rules if r.chain == chain]

    @property
    def jumps(self) -> List[Rule]:
        """Our rules in built-in chains (the only ones outside our own chains)."""
        return [r for r in self.rules if r.chain in BUILTIN_CHAINS]

    def lines(self) -> List[str]:
        """Chain declarations and rules exactly as ``iptables-legacy-save -t nat`` prints ours."""
        return [chain_declaration(c) for c in self.chains] + [r.save() for r in self.rules]

    def render(self, header: Sequence[str] = ()) -> str:
        """A complete document; ``iptables-legacy-restore --noflush`` (``ip6tables-`` for IPv6)
        accepts it as is."""
        out = [f"# {line}" for line in header]
        out.append(f"*{TABLE}")
        out.extend(self.lines())
        out.append("COMMIT")
        return "\n".join(out) + "\n"


def chain_declaration(chain: str) -> str:
    return f":{chain} - [0:0]"


def quote(text: str) -> str:
    """Quote the way iptables-save quotes comment text."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def is_own_comment(comment: Optional[str]) -> bool:
    return bool(comment) and comment.startswith(COMMENT_PREFIX)


def port_matches(ports: Iterable[int]) -> List[Match]:
    """One match per chunk of at most 15 ports; a single port uses the plain tcp match."""
    ports = sorted(set(ports))
    chunks = [ports[i:i + MULTIPORT_LIMIT] for i in range(0, len(ports), MULTIPORT_LIMIT)]
    out = []
    for chunk in chunks:
        if len(chunk) == 1:
            out.append(Match("tcp", "dport", str(chunk[0])))
        else:
            out.append(Match("multiport", "dports", ",".join(str(p) for p in chunk)))
    return out


def _ports_phrase(match: Match) -> str:
    ports = match.value.split(",")
    if len(ports) == 1:
        return f"port {ports[0]} goes"
    return "ports " + ", ".join(ports) + " go"


LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}


def build(spec: InterceptSpec, family: int = 4) -> Ruleset:
    """The complete rule set for a spec in one IP family's table. Pure: same spec, same rules,
    same order."""
    proxy_ports = set(spec.proxy_ports)
    dns = spec.capture_dns and DNS_PORT not in spec.exclude_outbound_ports
    rules: List[Rule] = [Rule("PREROUTING", INBOUND, "inbound TCP is checked by MI_INBOUND")]
    if dns:
        # Before the TCP jump, so TCP to port 53 reaches the DNS port rather than the outbound one.
        for proto in ("udp", "tcp"):
            rules.append(Rule("OUTPUT", DNS, f"DNS over {proto.upper()} is checked by MI_DNS", protocol=proto,
                              matches=(Match(proto, "dport", str(DNS_PORT)),)))
    rules.append(Rule("OUTPUT", OUTPUT, "outbound TCP is checked by MI_OUTPUT"))

    # Inbound. Reached from PREROUTING only, where the owner match is invalid: the kernel
    # would refuse the whole table if one were used here.
    rules.append(Rule(INBOUND, "RETURN", "the proxy outbound port is never redirected",
                      matches=(Match("tcp", "dport", str(spec.outbound_port)),)))
    rules.append(Rule(INBOUND, "RETURN", "the proxy inbound port is never redirected",
                      matches=(Match("tcp", "dport", str(spec.inbound_port)),)))
    for m in port_matches(set(spec.exclude_inbound_ports) - proxy_ports):
        rules.append(Rule(INBOUND, "RETURN", f"excluded inbound {_ports_phrase(m)} direct", matches=(m,)))
    included = set(spec.include_inbound_ports) - proxy_ports
    if spec.include_inbound_ports:
        # An include list made only of proxy ports redirects nothing, as the spec says.
        for m in port_matches(included):
            rules.append(Rule(INBOUND, IN_REDIRECT, f"included inbound {_ports_phrase(m)} to the proxy",
                              matches=(m,)))
    else:
        rules.append(Rule(INBOUND, IN_REDIRECT, "all other inbound TCP goes to the proxy"))
    rules.append(Rule(IN_REDIRECT, "REDIRECT", "to the proxy inbound port", to_ports=spec.inbound_port))

    # Outbound.
    rules.append(Rule(OUTPUT, "RETURN", f"connections of the proxy (uid {spec.proxy_uid}) go direct",
                      matches=(Match("owner", "uid-owner", str(spec.proxy_uid)),)))
    rules.append(Rule(OUTPUT, "RETURN", "loopback destinations go direct", dst=LOOPBACK[family]))
    for net in spec.cidrs(family):
        # iptables-save omits a /0 destination (it matches everything), so we do too.
        dst = str(net) if net.prefixlen else None
        rules.append(Rule(OUTPUT, "RETURN", f"excluded outbound CIDR {net} goes direct", dst=dst))
    for m in port_matches(spec.exclude_outbound_ports):
        rules.append(Rule(OUTPUT, "RETURN", f"excluded outbound {_ports_phrase(m)} direct", matches=(m,)))
    rules.append(Rule(OUTPUT, OUT_REDIRECT, "all other outbound TCP goes to the proxy"))
    rules.append(Rule(OUT_REDIRECT, "REDIRECT", "to the proxy outbound port", to_ports=spec.outbound_port))
    if dns:
        rules += _dns_rules(spec, family)

    chains = tuple(sorted(BASE_CHAINS + ((DNS,) if dns else ())))  # libiptc keeps user chains sorted by name
    order = {name: i for i, name in enumerate(BUILTIN_CHAINS + chains)}
    # iptables-save prints chain by chain: built-ins in hook order, then user chains by name.
    rules.sort(key=lambda r: order[r.chain])  # stable: keeps rule order inside a chain
    return Ruleset(chains=chains, rules=tuple(rules), family=family)


def _dns_rules(spec: InterceptSpec, family: int) -> List[Rule]:
    rules = [Rule(DNS, "RETURN", f"DNS of the proxy (uid {spec.proxy_uid}) goes direct", protocol=None,
                  matches=(Match("owner", "uid-owner", str(spec.proxy_uid)),)),
             Rule(DNS, "RETURN", "loopback resolvers are left alone", protocol=None, dst=LOOPBACK[family])]
    for net in spec.cidrs(family):
        rules.append(Rule(DNS, "RETURN", f"DNS to excluded CIDR {net} goes direct", protocol=None,
                          dst=str(net) if net.prefixlen else None))
    for proto in ("udp", "tcp"):
        rules.append(Rule(DNS, "REDIRECT", f"DNS over {proto.upper()} to the proxy DNS port", protocol=proto,
                          to_ports=spec.dns_port))
    return rules


def is_foreign_mesh_chain(chain: str) -> bool:
    return chain.startswith(FOREIGN_MESH_PREFIXES)
