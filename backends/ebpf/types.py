"""ctypes mirror of the structs and constants in bpf/common.h.

tests/test_ebpf_layout.py compiles a layout checker against common.h with clang and
compares every size and offset with these classes, and checks the loaded maps' key and
value sizes, so the two can never drift apart silently.

Addresses are stored as network-order bytes (`ip_to_be32` / `be32_to_ip`); ports are host
order, as in the C structs.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from typing import Dict, Iterable

LAYOUT_VERSION = 1
MAX_PORTS = 64
MAX_CIDRS = 32
MAX_NAMESPACES = 4096
MAX_CONNS = 65536

CFG_DEBUG = 0x1
CFG_ACCELERATE = 0x2

ORIG_OUTBOUND = 0x1
ORIG_INBOUND_LOCAL = 0x2
ORIG_INBOUND_TC = 0x4
ORIG_CLAIMED = 0x8
ORIG_FIN_IN = 0x10
ORIG_FIN_OUT = 0x20

FEAT_ACCELERATE = 0x1

EVENT_KINDS = {
    1: "connect-out", 2: "connect-in", 3: "connect-skip", 4: "established", 5: "claimed", 6: "closed",
    7: "origdst", 8: "origdst-miss", 9: "tc-syn", 10: "tc-end", 11: "msg-pass", 12: "msg-redirect",
}

#: Worker return codes (negative errno) -> why the programs left something alone.
REASONS = {0: "", -2: "not managed", -1: "excluded", -114: "proxy's own traffic", -40: "loopback destination",
           -18: "proxy to its own pod", -12: "out of memory/map full", -28: "buffer too small",
           -93: "not IPv4/TCP"}


class Cidr(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("mask", ctypes.c_uint32)]


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
        ("local_ip", ctypes.c_uint32),
        ("remote_ip", ctypes.c_uint32),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint32),
    ]


class Origin(ctypes.Structure):
    _fields_ = [
        ("ip", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("src_netns", ctypes.c_uint64),
        ("gen", ctypes.c_uint64),
    ]


class Sock(ctypes.Structure):
    _fields_ = [
        ("orig_ip", ctypes.c_uint32),
        ("orig_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("key_netns", ctypes.c_uint64),
        ("gen", ctypes.c_uint64),
        ("key", Tuple),
        ("peer", Tuple),
    ]


COUNTER_FIELDS = (
    "redirected_out", "inbound_same_node", "inbound_cross_node", "origdst_answers", "origdst_misses",
    "msg_redirects", "msg_redirect_bytes", "msg_passes", "map_errors", "flows_closed",
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
        ("src_ip", ctypes.c_uint32),
        ("dst_ip", ctypes.c_uint32),
        ("new_ip", ctypes.c_uint32),
        ("src_port", ctypes.c_uint16),
        ("dst_port", ctypes.c_uint16),
        ("new_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("reason", ctypes.c_int32),
        ("pad2", ctypes.c_uint32),
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
    "mi_cidr": Cidr, "mi_config": Config, "mi_pod": Pod, "mi_tuple": Tuple, "mi_origin": Origin,
    "mi_sock": Sock, "mi_counters": Counters, "mi_event": Event, "mi_meta": Meta,
}


# --- conversions -------------------------------------------------------------------------
def ip_to_be32(ip) -> int:
    """'10.0.0.1' -> the u32 whose in-memory (little-endian host) bytes are network order."""
    return struct.unpack("=I", socket.inet_aton(str(ip)))[0]


def be32_to_ip(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def _fill(array, values: Iterable[int]) -> int:
    values = list(values)
    for i, v in enumerate(values):
        array[i] = v
    return len(values)


def config_from_spec(spec, accelerate: bool = None) -> Config:
    """Pack an InterceptSpec; the caller has checked the list limits (check_limits)."""
    cfg = Config()
    cfg.proxy_uid = spec.proxy_uid
    cfg.outbound_port = spec.outbound_port
    cfg.inbound_port = spec.inbound_port
    accelerate = spec.accelerate if accelerate is None else accelerate
    cfg.flags = (CFG_DEBUG if spec.debug else 0) | (CFG_ACCELERATE if accelerate else 0)
    cfg.n_exclude_out_ports = _fill(cfg.exclude_out_ports, spec.exclude_outbound_ports)
    cfg.n_exclude_in_ports = _fill(cfg.exclude_in_ports, spec.exclude_inbound_ports)
    cfg.n_include_in_ports = _fill(cfg.include_in_ports, spec.include_inbound_ports)
    nets = list(spec.cidrs(4))
    for i, net in enumerate(nets):
        net = ipaddress.ip_network(net)
        cfg.exclude_out_cidrs[i].addr = ip_to_be32(net.network_address)
        cfg.exclude_out_cidrs[i].mask = ip_to_be32(net.netmask)
    cfg.n_exclude_out_cidrs = len(nets)
    return cfg


def limit_problems(spec) -> list:
    """Sentences for every list of the spec longer than the programs hold (never truncate)."""
    out = []
    if "ipv6" in spec.families:
        out.append("the ebpf mode intercepts IPv4 only so far (drop --family ipv6)")
    for what, values, limit in (
        ("excluded outbound ports", spec.exclude_outbound_ports, MAX_PORTS),
        ("excluded inbound ports", spec.exclude_inbound_ports, MAX_PORTS),
        ("included inbound ports", spec.include_inbound_ports, MAX_PORTS),
        ("excluded outbound IPv4 CIDRs", spec.cidrs(4), MAX_CIDRS),
    ):
        if len(values) > limit:
            out.append(f"{len(values)} {what} given, the ebpf mode holds at most {limit}")
    return out


def config_to_dict(cfg: Config) -> Dict:
    return {
        "proxy_uid": cfg.proxy_uid,
        "outbound_port": cfg.outbound_port,
        "inbound_port": cfg.inbound_port,
        "debug": bool(cfg.flags & CFG_DEBUG),
        "accelerate": bool(cfg.flags & CFG_ACCELERATE),
        "exclude_outbound_ports": list(cfg.exclude_out_ports[: cfg.n_exclude_out_ports]),
        "exclude_inbound_ports": list(cfg.exclude_in_ports[: cfg.n_exclude_in_ports]),
        "include_inbound_ports": list(cfg.include_in_ports[: cfg.n_include_in_ports]),
        "exclude_outbound_cidrs": [
            str(ipaddress.ip_network(f"{be32_to_ip(c.addr)}/{be32_to_ip(c.mask)}"))
            for c in cfg.exclude_out_cidrs[: cfg.n_exclude_out_cidrs]
        ],
    }


def origin_flags_text(flags: int) -> str:
    names = []
    for bit, name in ((ORIG_OUTBOUND, "outbound"), (ORIG_INBOUND_LOCAL, "inbound-same-node"),
                      (ORIG_INBOUND_TC, "inbound-cross-node"), (ORIG_CLAIMED, "accepted"),
                      (ORIG_FIN_IN, "fin-in"), (ORIG_FIN_OUT, "fin-out")):
        if flags & bit:
            names.append(name)
    return ",".join(names)


