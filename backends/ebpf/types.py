"""ctypes mirror of the structs and constants in bpf/common.h.

tests/test_ebpf_layout.py compiles a layout checker against common.h with clang and
compares every size and offset with these classes, and checks the loaded maps' key and
value sizes, so the two can never drift apart silently.

Addresses are 16-byte `Addr` values in network order, IPv4 as its v4-mapped form (`addr` /
`addr_text`); ports are host order, as in the C structs.
"""

from __future__ import annotations

import ctypes
import ipaddress
from typing import Dict, Iterable

LAYOUT_VERSION = 3
MAX_PORTS = 64
MAX_CIDRS = 32
MAX_NAMESPACES = 4096
MAX_CONNS = 65536

CFG_DEBUG = 0x1
CFG_ACCELERATE = 0x2
CFG_INBOUND_TC = 0x4
CFG_IPV4 = 0x8
CFG_IPV6 = 0x10
CFG_DNS = 0x20

ORIG_OUTBOUND = 0x1
ORIG_INBOUND_LOCAL = 0x2
ORIG_INBOUND_TC = 0x4
ORIG_CLAIMED = 0x8
ORIG_FIN_IN = 0x10
ORIG_FIN_OUT = 0x20
ORIG_DNS = 0x40

SOCK_STEERED = 0x4000
SOCK_DNS_ASKED = 0x8000

FEAT_ACCELERATE = 0x1
FEAT_LOOKUP = 0x2

#: The inbound paths of the ebpf mode (InterceptSpec.inbound_path).
INBOUND_LOOKUP = "sk_lookup"
INBOUND_TC = "tc"

EVENT_KINDS = {
    1: "connect-out", 2: "connect-in", 3: "connect-skip", 4: "established", 5: "claimed", 6: "closed",
    7: "origdst", 8: "origdst-miss", 9: "tc-syn", 10: "tc-end", 11: "msg-pass", 12: "msg-redirect",
    13: "steered", 14: "refused", 15: "listener", 16: "dns", 17: "dns-skip", 18: "dns-restored", 19: "dns-asked",
}
PROTOCOLS = {6: "tcp", 17: "udp"}

#: Worker return codes (negative errno) -> why the programs left something alone.
REASONS = {0: "", -2: "not managed", -1: "excluded", -114: "proxy's own traffic", -40: "loopback destination",
           -18: "proxy to its own pod", -12: "out of memory/map full", -28: "buffer too small",
           -93: "not IPv4/IPv6 TCP", -97: "family not intercepted", -115: "destination steers its own inbound",
           -111: "no inbound listener (refused)", -61: "DNS capture off or port 53 excluded"}


class Addr(ctypes.Structure):
    """struct mi_addr: 16 bytes in network order; IPv4 as its v4-mapped form."""
    _fields_ = [("w", ctypes.c_uint32 * 4)]


class Cidr(ctypes.Structure):
    _fields_ = [("addr", Addr), ("mask", Addr)]


class Config(ctypes.Structure):
    _fields_ = [
        ("proxy_uid", ctypes.c_uint32),
        ("outbound_port", ctypes.c_uint16),
        ("inbound_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("n_exclude_out_ports", ctypes.c_uint16),
        ("n_exclude_in_ports", ctypes.c_uint16),
        ("n_include_in_ports", ctypes.c_uint16),
        ("n_exclude_out_cidrs", ctypes.c_uint16),
        ("dns_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("exclude_out_ports", ctypes.c_uint16 * MAX_PORTS),
        ("exclude_in_ports", ctypes.c_uint16 * MAX_PORTS),
        ("include_in_ports", ctypes.c_uint16 * MAX_PORTS),
        ("exclude_out_cidrs", Cidr * MAX_CIDRS),
    ]


class Pod(ctypes.Structure):
    _fields_ = [("netns", ctypes.c_uint64), ("ifindex", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Tuple(ctypes.Structure):
    _fields_ = [
        ("netns", ctypes.c_uint64),
        ("local_ip", Addr),
        ("remote_ip", Addr),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint32),
    ]


class Origin(ctypes.Structure):
    _fields_ = [
        ("ip", Addr),
        ("port", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("pad", ctypes.c_uint32),
        ("src_netns", ctypes.c_uint64),
        ("gen", ctypes.c_uint64),
    ]


class Sock(ctypes.Structure):
    _fields_ = [
        ("orig_ip", Addr),
        ("orig_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("redirect_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("key_netns", ctypes.c_uint64),
        ("gen", ctypes.c_uint64),
        ("key", Tuple),
        ("peer", Tuple),
    ]


class ListenKey(ctypes.Structure):
    _fields_ = [("netns", ctypes.c_uint64), ("family", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


COUNTER_FIELDS = (
    "redirected_out", "inbound_same_node", "inbound_cross_node", "origdst_answers", "origdst_misses",
    "msg_redirects", "msg_redirect_bytes", "msg_passes", "map_errors", "flows_closed",
    "inbound_steered", "inbound_refused", "listeners", "redirected_out6", "dns_redirected", "dns_restored",
)


class Counters(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in COUNTER_FIELDS]


class Event(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("netns", ctypes.c_uint64),
        ("kind", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("reason", ctypes.c_int32),
        ("src_ip", Addr),
        ("dst_ip", Addr),
        ("new_ip", Addr),
        ("src_port", ctypes.c_uint16),
        ("dst_port", ctypes.c_uint16),
        ("new_port", ctypes.c_uint16),
        ("proto", ctypes.c_uint16),
    ]


class Meta(ctypes.Structure):
    _fields_ = [
        ("layout_version", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("build_hash", ctypes.c_uint64),
        ("loaded_at_ns", ctypes.c_uint64),
    ]


#: C struct name -> ctypes class, for the layout test.
STRUCTS = {
    "mi_addr": Addr, "mi_cidr": Cidr, "mi_config": Config, "mi_pod": Pod, "mi_tuple": Tuple,
    "mi_origin": Origin, "mi_sock": Sock, "mi_listen_key": ListenKey, "mi_counters": Counters,
    "mi_event": Event, "mi_meta": Meta,
}


# --- conversions -------------------------------------------------------------------------
def addr(ip) -> Addr:
    """'10.0.0.1' or 'fd00::1' -> struct mi_addr (IPv4 as ::ffff:10.0.0.1)."""
    parsed = ipaddress.ip_address(str(ip))
    if parsed.version == 4:
        parsed = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + parsed.packed)
    return Addr.from_buffer_copy(parsed.packed)


def addr_text(value: Addr) -> str:
    """struct mi_addr -> '10.0.0.1' (a mapped address is shown as the IPv4 one) or 'fd00::1'."""
    ip = ipaddress.IPv6Address(bytes(value))
    return str(ip.ipv4_mapped or ip)


def endpoint_text(value: Addr, port: int) -> str:
    """'10.0.0.1:80' or '[fd00::1]:80'."""
    text = addr_text(value)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def is_zero(value: Addr) -> bool:
    return not any(value.w)


def _fill(array, values: Iterable[int]) -> int:
    values = list(values)
    for i, v in enumerate(values):
        array[i] = v
    return len(values)


def _cidr(net) -> Cidr:
    net = ipaddress.ip_network(net)
    if net.version == 4:
        net = ipaddress.ip_network(f"::ffff:{net.network_address}/{net.prefixlen + 96}")
    return Cidr(addr=Addr.from_buffer_copy(net.network_address.packed),
                mask=Addr.from_buffer_copy(net.netmask.packed))


def config_from_spec(spec, accelerate: bool = None, families: Iterable[str] = ("ipv4",)) -> Config:
    """Pack an InterceptSpec; the caller has checked the list limits (limit_problems).

    ``families`` are the ones captured in this namespace (what it has, of what the spec wants)."""
    cfg = Config()
    cfg.proxy_uid = spec.proxy_uid
    cfg.outbound_port = spec.outbound_port
    cfg.inbound_port = spec.inbound_port
    accelerate = spec.accelerate if accelerate is None else accelerate
    families = set(families)
    cfg.flags = ((CFG_DEBUG if spec.debug else 0) | (CFG_ACCELERATE if accelerate else 0)
                 | (CFG_INBOUND_TC if spec.inbound_path == INBOUND_TC else 0)
                 | (CFG_IPV4 if "ipv4" in families else 0) | (CFG_IPV6 if "ipv6" in families else 0)
                 | (CFG_DNS if spec.capture_dns else 0))
    cfg.dns_port = spec.dns_port if spec.capture_dns else 0
    cfg.n_exclude_out_ports = _fill(cfg.exclude_out_ports, spec.exclude_outbound_ports)
    cfg.n_exclude_in_ports = _fill(cfg.exclude_in_ports, spec.exclude_inbound_ports)
    cfg.n_include_in_ports = _fill(cfg.include_in_ports, spec.include_inbound_ports)
    nets = list(spec.cidrs(4)) + list(spec.cidrs(6))
    for i, net in enumerate(nets):
        cfg.exclude_out_cidrs[i] = _cidr(net)
    cfg.n_exclude_out_cidrs = len(nets)
    return cfg


def limit_problems(spec) -> list:
    """Sentences for every list of the spec longer than the programs hold (never truncate)."""
    out = []
    for what, values, limit in (
        ("excluded outbound ports", spec.exclude_outbound_ports, MAX_PORTS),
        ("excluded inbound ports", spec.exclude_inbound_ports, MAX_PORTS),
        ("included inbound ports", spec.include_inbound_ports, MAX_PORTS),
        ("excluded outbound CIDRs (IPv4 and IPv6 together)", spec.exclude_outbound_cidrs, MAX_CIDRS),
    ):
        if len(values) > limit:
            out.append(f"{len(values)} {what} given, the ebpf mode holds at most {limit}")
    return out


def _cidr_text(c: Cidr) -> str:
    net = ipaddress.ip_network(f"{ipaddress.IPv6Address(bytes(c.addr))}/"
                               f"{bin(int.from_bytes(bytes(c.mask), 'big')).count('1')}")
    if net.subnet_of(ipaddress.ip_network("::ffff:0:0/96")):
        return f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}"
    return str(net)


def config_families(cfg: Config) -> list:
    return [name for bit, name in ((CFG_IPV4, "ipv4"), (CFG_IPV6, "ipv6")) if cfg.flags & bit]


def config_to_dict(cfg: Config) -> Dict:
    return {
        "proxy_uid": cfg.proxy_uid,
        "outbound_port": cfg.outbound_port,
        "inbound_port": cfg.inbound_port,
        "debug": bool(cfg.flags & CFG_DEBUG),
        "accelerate": bool(cfg.flags & CFG_ACCELERATE),
        "inbound_path": INBOUND_TC if cfg.flags & CFG_INBOUND_TC else INBOUND_LOOKUP,
        "families": config_families(cfg),
        "capture_dns": bool(cfg.flags & CFG_DNS),
        "dns_port": cfg.dns_port if cfg.flags & CFG_DNS else None,
        "exclude_outbound_ports": list(cfg.exclude_out_ports[: cfg.n_exclude_out_ports]),
        "exclude_inbound_ports": list(cfg.exclude_in_ports[: cfg.n_exclude_in_ports]),
        "include_inbound_ports": list(cfg.include_in_ports[: cfg.n_include_in_ports]),
        "exclude_outbound_cidrs": [_cidr_text(c) for c in cfg.exclude_out_cidrs[: cfg.n_exclude_out_cidrs]],
    }


def origin_flags_text(flags: int) -> str:
    names = []
    for bit, name in ((ORIG_OUTBOUND, "outbound"), (ORIG_INBOUND_LOCAL, "inbound-same-node"),
                      (ORIG_INBOUND_TC, "inbound-cross-node"), (ORIG_CLAIMED, "accepted"),
                      (ORIG_FIN_IN, "fin-in"), (ORIG_FIN_OUT, "fin-out"), (ORIG_DNS, "dns")):
        if flags & bit:
            names.append(name)
    return ",".join(names)
