"""A pod's addresses and IP families, read in the calling thread's namespace (no netlink).

IPv4 comes from one ``SIOCGIFCONF`` ioctl, IPv6 from ``/proc/thread-self/net/if_inet6`` (the
thread's namespace, not the process's: `Netns.entered` switches only the calling thread).
Loopback and link-local addresses are not pod addresses: nothing from outside reaches them.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Dict, List

from meshintercept.errors import UsageError

SIOCGIFCONF = 0x8912
_IFREQ = 40  # struct ifreq on 64-bit Linux: name[16] + union (24)
IF_INET6 = "/proc/thread-self/net/if_inet6"
DISABLE_IPV6 = "/proc/sys/net/ipv6/conf/all/disable_ipv6"


def ipv4_by_interface() -> Dict[int, List[str]]:
    """Non-loopback IPv4 addresses per ifindex, with one ioctl (SIOCGIFCONF lists every
    address, secondary ones under a ``dev:label`` name)."""
    out: Dict[int, List[str]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        size = 64
        while True:
            buf = array.array("B", bytes(size * _IFREQ))
            addr, _ = buf.buffer_info()
            ifc = struct.pack("iL", size * _IFREQ, addr)
            used = struct.unpack("iL", fcntl.ioctl(sock.fileno(), SIOCGIFCONF, ifc))[0]
            if used < size * _IFREQ:
                break
            size *= 4
        raw = buf.tobytes()
        index_of: Dict[str, int] = {}
        for off in range(0, used, _IFREQ):
            name = raw[off:off + 16].split(b"\0", 1)[0].decode().split(":", 1)[0]
            ip = socket.inet_ntoa(raw[off + 20:off + 24])
            if ip.startswith("127."):
                continue
            if name not in index_of:
                index_of[name] = socket.if_nametoindex(name)
            out.setdefault(index_of[name], []).append(ip)
    return out


def ipv6_by_interface() -> Dict[int, List[str]]:
    """Global-scope IPv6 addresses (ULA included) per ifindex; none when IPv6 is off."""
    out: Dict[int, List[str]] = {}
    try:
        with open(IF_INET6) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:  # no IPv6 in this kernel
        return out
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or int(parts[3], 16) != 0:  # scope: 0 global, 0x20 link, 0x10 host
            continue
        ip = ipaddress.IPv6Address(bytes.fromhex(parts[0]))
        out.setdefault(int(parts[1], 16), []).append(str(ip))
    return out


def ipv6_disabled() -> bool:
    try:
        with open(DISABLE_IPV6) as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        return True  # the kernel has no IPv6 at all


@dataclass
class PodAddresses:
    """What a namespace has: addresses by family and interface, and why a family is missing."""

    ipv4: Dict[int, List[str]] = field(default_factory=dict)
    ipv6: Dict[int, List[str]] = field(default_factory=dict)
    ipv6_disabled: bool = False

    def pod_ips(self) -> List[dict]:
        return [{"ip": ip, "ifindex": index} for table in (self.ipv4, self.ipv6)
                for index in sorted(table) for ip in table[index]]

    def has(self, family: str) -> bool:
        return bool(self.ipv4 if family == "ipv4" else self.ipv6)

    def missing_reason(self, family: str) -> str:
        if family == "ipv6" and self.ipv6_disabled:
            return "IPv6 is disabled in the namespace (net.ipv6.conf.all.disable_ipv6=1)"
        return f"the namespace has no {'IPv4' if family == 'ipv4' else 'IPv6'} address"


def read() -> PodAddresses:
    """The calling thread's namespace (call inside `Netns.entered`)."""
    disabled = ipv6_disabled()
    return PodAddresses(ipv4_by_interface(), {} if disabled else ipv6_by_interface(), disabled)


def captured_families(spec, found: PodAddresses, netns_name: str, inbound_path: str) -> Dict[str, str]:
    """Per family: "captured", or the reason it is not (a note). A family the spec names and
    the namespace lacks is an error, and so is IPv6 on the IPv4-only tc inbound path."""
    out = {}
    for family in ("ipv4", "ipv6"):
        if not spec.wants(family):
            out[family] = "not asked for (--family)"
            continue
        if not found.has(family):
            if family in spec.families:
                raise UsageError(f"{family} was asked for but in {netns_name} {found.missing_reason(family)}; "
                                 f"drop --family {family} or give the namespace an {family} address.")
            out[family] = found.missing_reason(family)
            continue
        if family == "ipv6" and inbound_path == "tc":
            raise UsageError(f"namespace {netns_name} has IPv6 and the tc inbound path is IPv4-only (inbound "
                             "IPv6 would bypass the sidecar); use --inbound-path sk_lookup or --family ipv4.")
        out[family] = "captured"
    if not any(v == "captured" for v in out.values()):
        raise UsageError(f"namespace {netns_name} has no address of the families asked for "
                         f"({'; '.join(f'{k}: {v}' for k, v in out.items())}); nothing could be intercepted.")
    return out
