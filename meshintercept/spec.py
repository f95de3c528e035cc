"""`InterceptSpec`: the one validated description of what to intercept, shared by every backend.

Defaults are osm / osm-edge's: proxy UID 1500, outbound port 15001, inbound port 15003.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, fields, replace
from typing import Iterable, List, Optional, Tuple, Union

from meshintercept.errors import UsageError

DEFAULT_PROXY_UID = 1500
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15003
#: merbridge's and Istio's DNS port.
DEFAULT_DNS_PORT = 15053
DNS_PORT = 53


def parse_port(value, what: str = "port") -> int:
    """Accept an int or a decimal string in 1..65535."""
    text = str(value).strip()
    try:
        port = int(text, 10)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number; give a TCP port between 1 and 65535.") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"{what} {port} is out of range; give a TCP port between 1 and 65535.")
    return port


def split_list(values: Iterable) -> list:
    """Flatten repeated options and comma lists: ("80,443", "8080") -> ["80", "443", "8080"]."""
    if isinstance(values, (str, int)):
        values = (values,)
    out = []
    for value in values or ():
        if isinstance(value, (list, tuple)):
            out.extend(split_list(value))
            continue
        for part in str(value).split(","):
            part = part.strip()
            if part:
                out.append(part)
    return out


def parse_ports(values, what: str) -> Tuple[int, ...]:
    return tuple(sorted({parse_port(v, what) for v in split_list(values)}))


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
FAMILIES = ("ipv4", "ipv6")
#: IPv4 addresses as an AF_INET6 socket sees them (RFC 4291 2.5.5.2).
V4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def parse_cidrs(values, what: str = "excluded outbound CIDR") -> Tuple[Network, ...]:
    """IPv4 and IPv6 CIDRs; a v4-mapped IPv6 range is the IPv4 range it maps (it is matched the
    same way for AF_INET and AF_INET6 sockets)."""
    nets = set()
    for text in split_list(values):
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise UsageError(f"{what} {text!r} is not a valid CIDR; write it like 10.0.0.0/8, 192.168.1.5/32 "
                             "or fd00::/8.") from None
        if net.version == 6 and net.prefixlen == 0:
            raise UsageError(f"{what} {text!r} would send every IPv6 connection, and every IPv4 one made from an "
                             "IPv6 socket, around the sidecar; to leave IPv6 alone use --family ipv4.")
        if net.version == 6 and net.subnet_of(V4_MAPPED):
            net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
        nets.add(net)
    return tuple(sorted(nets, key=lambda n: (n.version, n)))


def parse_families(values) -> Tuple[str, ...]:
    """``ipv4``, ``ipv6`` or both; empty means every family the namespace has."""
    found = set()
    for text in split_list(values):
        word = text.lower()
        if word in ("4", "inet"):
            word = "ipv4"
        elif word in ("6", "inet6"):
            word = "ipv6"
        if word not in FAMILIES:
            raise UsageError(f"family {text!r} is not one of ipv4, ipv6.")
        found.add(word)
    return tuple(f for f in FAMILIES if f in found)


def plain_address(addr) -> ipaddress._BaseAddress:
    """The address a destination really is: a v4-mapped IPv6 address is its IPv4 address."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_bool(value, what: str) -> bool:
    """A JSON/YAML boolean or the words a CNI config, an annotation or the environment use."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    word = str(value).strip().lower()
    if word in ("true", "yes", "on", "1", "enabled"):
        return True
    if word in ("false", "no", "off", "0", "disabled", ""):
        return False
    raise UsageError(f"{what} {value!r} is not a boolean; write true or false.")


#: How the ebpf mode steers inbound connections: sk_lookup (default; IPv4 and IPv6, no packet
#: rewritten) or tc (the seed's port rewrite on the pod's interfaces; IPv4 only).
INBOUND_PATHS = ("sk_lookup", "tc")


def parse_inbound_path(value) -> str:
    text = str(value).strip().lower().replace("-", "_")
    if text not in INBOUND_PATHS:
        raise UsageError(f"inbound path {value!r} is not one of {', '.join(INBOUND_PATHS)}.")
    return text


def parse_uid(value) -> int:
    text = str(value).strip()
    try:
        uid = int(text, 10)
    except ValueError:
        raise UsageError(f"proxy UID {text!r} is not a number; give the numeric UID the sidecar runs as.") from None
    if not 0 <= uid <= 0xFFFFFFFE:
        raise UsageError(f"proxy UID {uid} is out of range; give a UID between 0 and 4294967294.")
    return uid


@dataclass(frozen=True)
class InterceptSpec:
    proxy_uid: int = DEFAULT_PROXY_UID
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    exclude_outbound_ports: Tuple[int, ...] = ()
    exclude_inbound_ports: Tuple[int, ...] = ()
    exclude_outbound_cidrs: Tuple[Network, ...] = ()
    #: Empty means every inbound port (except exclusions and the proxy's own ports).
    include_inbound_ports: Tuple[int, ...] = ()
    #: IP families to intercept; empty means every family the namespace has (a namespace with
    #: IPv6 disabled is intercepted for IPv4, with a note). Naming one the namespace lacks is an error.
    families: Tuple[str, ...] = ()
    #: eBPF only: programs write bpf_trace_printk lines and trace events for this namespace.
    debug: bool = False
    #: eBPF only: sockhash + sk_msg redirect between local sockets (opt-in, fail-open).
    accelerate: bool = False
    #: eBPF only: inbound by sk_lookup (default) or by the tc port rewrite (IPv4 only).
    inbound_path: str = INBOUND_PATHS[0]
    #: Send the app's DNS (UDP and TCP port 53, any address but loopback) to the sidecar's DNS port.
    capture_dns: bool = False
    dns_port: int = DEFAULT_DNS_PORT

    def __post_init__(self):
        if self.outbound_port == self.inbound_port:
            raise UsageError(
                f"inbound and outbound port are both {self.inbound_port}; the sidecar needs two different ports."
            )
        for port in self.include_inbound_ports:
            if port in self.exclude_inbound_ports:
                raise UsageError(f"inbound port {port} is both included and excluded; keep it in one list only.")
        if self.capture_dns and self.dns_port in (self.outbound_port, self.inbound_port):
            raise UsageError(f"the DNS port {self.dns_port} is also the sidecar's {'outbound' if self.dns_port == self.outbound_port else 'inbound'} "
                             "port; give --dns-port a port of its own.")

    @classmethod
    def build(cls, **options) -> "InterceptSpec":
        """Build from loosely typed input (CLI strings, CNI JSON, env) with validation."""
        kwargs = {}
        if options.get("proxy_uid") is not None:
            kwargs["proxy_uid"] = parse_uid(options["proxy_uid"])
        if options.get("outbound_port") is not None:
            kwargs["outbound_port"] = parse_port(options["outbound_port"], "outbound port")
        if options.get("inbound_port") is not None:
            kwargs["inbound_port"] = parse_port(options["inbound_port"], "inbound port")
        kwargs["exclude_outbound_ports"] = parse_ports(options.get("exclude_outbound_ports"), "excluded outbound port")
        kwargs["exclude_inbound_ports"] = parse_ports(options.get("exclude_inbound_ports"), "excluded inbound port")
        kwargs["include_inbound_ports"] = parse_ports(options.get("include_inbound_ports"), "included inbound port")
        kwargs["exclude_outbound_cidrs"] = parse_cidrs(options.get("exclude_outbound_cidrs"))
        kwargs["families"] = parse_families(options.get("families"))
        kwargs["debug"] = parse_bool(options.get("debug", False), "debug")
        kwargs["accelerate"] = parse_bool(options.get("accelerate", False), "accelerate")
        kwargs["capture_dns"] = parse_bool(options.get("capture_dns", False), "capture_dns")
        if options.get("dns_port") is not None:
            kwargs["dns_port"] = parse_port(options["dns_port"], "DNS port")
        if options.get("inbound_path") is not None:
            kwargs["inbound_path"] = parse_inbound_path(options["inbound_path"])
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown spec field(s) {', '.join(sorted(unknown))}; see 'meshintercept enable --help'.")
        return cls(**kwargs)

    def with_changes(self, **changes) -> "InterceptSpec":
        return replace(self, **changes)

    # The proxy's own listeners must never be redirected, or it would loop into itself.
    @property
    def proxy_ports(self) -> Tuple[int, int]:
        return (self.outbound_port, self.inbound_port)

    def inbound_redirected(self, port: int) -> bool:
        if port in self.proxy_ports or port in self.exclude_inbound_ports:
            return False
        return not self.include_inbound_ports or port in self.include_inbound_ports

    def outbound_redirected(self, addr: str, port: int) -> bool:
        """The rule every backend applies; a v4-mapped destination is its IPv4 address."""
        ip = plain_address(addr)
        if ip.is_loopback or port in self.exclude_outbound_ports:
            return False
        return not any(ip.version == net.version and ip in net for net in self.exclude_outbound_cidrs)

    def dns_captured(self, addr: str, port: int = DNS_PORT) -> bool:
        """The DNS rule every backend applies: queries to port 53, unless the proxy's own, to a
        loopback resolver, or excluded (ports and CIDRs win)."""
        return self.capture_dns and port == DNS_PORT and self.outbound_redirected(addr, port)

    def cidrs(self, version: int) -> Tuple[Network, ...]:
        """The excluded outbound CIDRs of one IP version (4 or 6)."""
        return tuple(n for n in self.exclude_outbound_cidrs if n.version == version)

    def wants(self, family: str) -> bool:
        """Whether this spec asks for ``family`` (``ipv4``/``ipv6``); an empty list asks for both."""
        return not self.families or family in self.families

    def effective_families(self, ipv6_unavailable: Optional[str]) -> Tuple[Tuple[str, ...], List[str]]:
        """The families to intercept in a namespace, and notes on the ones left out.

        ``ipv6_unavailable`` is the namespace's reason it has no IPv6 (`netns.ipv6_unavailable`).
        Asked for by default, a missing IPv6 is a note; asked for by name, an error (nothing applied).
        """
        if ipv6_unavailable is None or not self.wants("ipv6"):
            return tuple(f for f in FAMILIES if self.wants(f)), []
        if "ipv6" in self.families:
            raise UsageError(f"--family ipv6 was asked for but {ipv6_unavailable}; enable IPv6 there or "
                             "drop --family ipv6.")
        families = tuple(f for f in FAMILIES if f != "ipv6" and self.wants(f))
        return families, [f"IPv6 is not intercepted: {ipv6_unavailable}."]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["exclude_outbound_cidrs"] = [str(n) for n in self.exclude_outbound_cidrs]
        for key in ("exclude_outbound_ports", "exclude_inbound_ports", "include_inbound_ports", "families"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "InterceptSpec":
        return cls.build(**data)
