"""The project sidecar's DNS forwarder (stdlib only; `meshintercept.sidecar --dns-port`).

Captured queries (``--capture-dns``) arrive on the DNS port over UDP and TCP. Names listed in
``--dns-hosts`` (hosts(5) format) are answered here; every other query is forwarded to the
server the app asked and the answer relayed back, so the app cannot tell (the interception
makes the reply come from the address and port it asked: conntrack un-NATs it under the NAT
modes, the recvmsg program rewrites its source under the eBPF mode).

Where the app sent a query:
* TCP: ``getsockopt(SO_ORIGINAL_DST)`` / ``IP6T_SO_ORIGINAL_DST`` on the accepted socket, as for
  any TCP connection, in every mode.
* UDP: the same getsockopt on a UDP socket connected to the app's address; the eBPF mode's
  getsockopt program answers it from what its connect/sendmsg programs recorded. The kernel
  itself answers SO_ORIGINAL_DST for TCP only, so under the NAT modes the forwarder asks
  conntrack over netlink instead, which needs CAP_NET_ADMIN in the pod (Istio's DNS proxy
  avoids the question by forwarding to resolv.conf's server). Without either, ``--dns-upstream``;
  without that, the query is answered REFUSED: never a guess at a resolver outside the pod.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Dict, List, Optional, Tuple

Addr = Tuple[str, int]
SO_ORIGINAL_DST = 80  # IP6T_SO_ORIGINAL_DST too, at level SOL_IPV6
SOL_IPV6 = 41
TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
RCODE_REFUSED, RCODE_SERVFAIL = 5, 2
TTL = 5

# netlink / ctnetlink (linux/netlink.h, linux/netfilter/nfnetlink*.h)
NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET = 1, 1
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY = 1, 2
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3


def plain(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


# --- names we answer ------------------------------------------------------------------------
def load_hosts(path: Optional[str]) -> Dict[str, List[str]]:
    """hosts(5): name (lower case, no trailing dot) -> addresses."""
    out: Dict[str, List[str]] = {}
    if not path:
        return out
    with open(path) as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if len(words) < 2:
                continue
            ipaddress.ip_address(words[0])
            for name in words[1:]:
                out.setdefault(name.lower().rstrip("."), []).append(words[0])
    return out


def parse_question(msg: bytes) -> Optional[Tuple[str, int, int, int]]:
    """(name, qtype, qclass, end offset) of a query's first question, or None if it is none."""
    if len(msg) < 12 or msg[2] & 0x80 or struct.unpack("!H", msg[4:6])[0] < 1:
        return None
    labels, i = [], 12
    while i < len(msg) and msg[i]:
        n = msg[i]
        if n & 0xC0 or i + 1 + n > len(msg):
            return None  # compression does not occur in a question; anything else is garbage
        labels.append(msg[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    if i + 5 > len(msg):
        return None
    qtype, qclass = struct.unpack("!HH", msg[i + 1:i + 5])
    return ".".join(labels).lower(), qtype, qclass, i + 5


def answer(query: bytes, hosts: Dict[str, List[str]]) -> Optional[bytes]:
    """A reply from ``hosts`` for a name listed there, else None (to be forwarded)."""
    q = parse_question(query)
    if q is None or q[0] not in hosts:
        return None
    name, qtype, qclass, end = q
    family = {TYPE_A: socket.AF_INET, TYPE_AAAA: socket.AF_INET6}.get(qtype)
    records = []
    if qclass == CLASS_IN and family:
        for addr in hosts[name]:
            if (":" in addr) == (family == socket.AF_INET6):
                data = socket.inet_pton(family, addr)
                records.append(b"\xc0\x0c" + struct.pack("!HHIH", qtype, CLASS_IN, TTL, len(data)) + data)
    flags = 0x8000 | 0x0400 | (query[2] & 0x01) << 8 | 0x0080  # response, authoritative, RD copied, RA
    head = query[:2] + struct.pack("!HHHHH", flags, 1, len(records), 0, 0)
    return head + query[12:end] + b"".join(records)


def error_reply(query: bytes, rcode: int) -> bytes:
    flags = 0x8000 | (query[2] & 0x01) << 8 | 0x0080 | rcode if len(query) >= 4 else 0x8000 | rcode
    return query[:2] + struct.pack("!HHHHH", flags, 0, 0, 0, 0) if len(query) >= 2 else b""


# --- where the app sent a UDP query ----------------------------------------------------------
def udp_original_dst(client: Addr, local: Addr, upstream: Optional[Addr]) -> Optional[Addr]:
    """The server a UDP query from ``client`` to our ``local`` address was sent to (see above)."""
    for ask in (_ask_getsockopt, _ask_conntrack):
        try:
            found = ask(client, local)
        except OSError:
            continue
        if found:
            return found
    return upstream


def _ask_getsockopt(client: Addr, local: Addr) -> Optional[Addr]:
    host = plain(client[0])
    v6 = ":" in host
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect((host, client[1]))
        if v6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
            port, addr = struct.unpack("!2xH4x16s4x", raw[:28])
            return socket.inet_ntop(socket.AF_INET6, addr), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack("!2xH4s8x", raw[:16])
        return socket.inet_ntoa(addr), port
    finally:
        sock.close()


def _nla(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _attrs(data: bytes) -> Dict[int, bytes]:
    out, i = {}, 0
    while i + 4 <= len(data):
        length, kind = struct.unpack("=HH", data[i:i + 4])
        if length < 4:
            break
        out[kind & ~NLA_F_NESTED] = data[i + 4:i + length]
        i += (length + 3) & ~3
    return out


def _ask_conntrack(client: Addr, local: Addr) -> Optional[Addr]:
    """conntrack's entry for the query's flow, found by its reply direction (our local address
    to the client): its original direction's destination is where the app sent it."""
    src, dst = plain(local[0]), plain(client[0])
    v6 = ":" in src
    family = socket.AF_INET6 if v6 else socket.AF_INET
    ip_src, ip_dst = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if v6 else (CTA_IP_V4_SRC, CTA_IP_V4_DST)
    ips = _nla(ip_src, socket.inet_pton(family, src)) + _nla(ip_dst, socket.inet_pton(family, dst))
    proto = (_nla(CTA_PROTO_NUM, bytes([socket.IPPROTO_UDP])) + _nla(CTA_PROTO_SRC_PORT, struct.pack("!H", local[1]))
             + _nla(CTA_PROTO_DST_PORT, struct.pack("!H", client[1])))
    tuple_ = _nla(CTA_TUPLE_IP | NLA_F_NESTED, ips) + _nla(CTA_TUPLE_PROTO | NLA_F_NESTED, proto)
    body = struct.pack("=BBH", family, 0, 0) + _nla(CTA_TUPLE_REPLY | NLA_F_NESTED, tuple_)
    msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    msg = struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST, 1, 0) + body
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.settimeout(1.0)
        sock.send(msg)
        data = sock.recv(65536)
    finally:
        sock.close()
    length, kind = struct.unpack("=IH", data[:6])
    if kind == NLMSG_ERROR:
        code = -struct.unpack("=i", data[16:20])[0]
        raise OSError(code, os.strerror(code))  # EPERM without CAP_NET_ADMIN, ENOENT without an entry
    orig = _attrs(_attrs(data[20:length]).get(CTA_TUPLE_ORIG, b""))
    ip = _attrs(orig.get(CTA_TUPLE_IP, b""))
    port = _attrs(orig.get(CTA_TUPLE_PROTO, b"")).get(CTA_PROTO_DST_PORT)
    addr = ip.get(ip_dst)
    if addr is None or port is None:
        return None
    return socket.inet_ntop(family, addr), struct.unpack("!H", port)[0]


# --- forwarding ------------------------------------------------------------------------------
def _ports_apps_do_not_pick() -> List[int]:
    """Local ports outside the namespace's ephemeral range (net.ipv4.ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return [p for p in range(10000, 65536) if not low <= p <= high]


def _bind_outside_ephemeral(sock: socket.socket) -> None:
    """Send upstream queries from a port no app's resolver picks by itself.

    conntrack keeps a UDP flow for 30 s after its last packet; if the app later sent a query
    from the very port and to the very server of one of our (never NATed) upstream queries, it
    would match our flow and go straight to the server, around the sidecar. Istio separates the
    two with conntrack zones; keeping our source ports out of the ephemeral range does the same
    without rules (an app binding one of those ports on purpose is not a resolver)."""
    import random

    ports = _ports_apps_do_not_pick()
    for port in random.sample(ports, min(20, len(ports))):
        try:
            sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", port))
            return
        except OSError:
            continue


def forward_udp(query: bytes, server: Addr, timeout: float = 3.0) -> Optional[bytes]:
    host = plain(server[0])
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        _bind_outside_ephemeral(sock)
        sock.connect((host, server[1]))
        sock.send(query)
        return sock.recv(65535)
    except OSError:
        return None
    finally:
        sock.close()


def forward_tcp(query: bytes, server: Addr, timeout: float = 3.0) -> Optional[bytes]:
    try:
        with socket.create_connection((plain(server[0]), server[1]), timeout=timeout) as sock:
            sock.sendall(struct.pack("!H", len(query)) + query)
            return read_tcp_message(sock)
    except OSError:
        return None


def read_tcp_message(sock: socket.socket) -> Optional[bytes]:
    """One length-prefixed DNS message from a TCP stream (RFC 1035 4.2.2), or None at EOF."""
    head = _read_exactly(sock, 2)
    if head is None:
        return None
    return _read_exactly(sock, struct.unpack("!H", head)[0])


def _read_exactly(sock: socket.socket, n: int) -> Optional[bytes]:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


# --- the forwarder -----------------------------------------------------------------------------
class DnsForwarder:
    """UDP on 127.0.0.1 and [::1] (where captured queries land, so replies leave from the address
    the interception expects), TCP dual-stack; one JSON log entry per query via ``log(entry)``."""

    def __init__(self, port: int, hosts: Dict[str, List[str]], upstream: Optional[Addr], log, fmt):
        self.port, self.hosts, self.upstream, self.log, self.fmt = port, hosts, upstream, log, fmt
        self.udp: List[socket.socket] = []
        self.tcp: Optional[socket.socket] = None

    def listen(self, tcp_listener) -> None:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, self.port))
            except OSError:
                sock.close()
                if family == socket.AF_INET:
                    raise
                continue  # no IPv6 in the namespace
            self.udp.append(sock)
        self.tcp = tcp_listener("", self.port)

    def start(self, spawn) -> None:
        for sock in self.udp:
            spawn(self._udp_loop, sock)
        spawn(self._tcp_loop, self.tcp)

    def close(self) -> None:
        for sock in self.udp + ([self.tcp] if self.tcp else []):
            sock.close()

    def _udp_loop(self, sock: socket.socket) -> None:
        import threading

        local = sock.getsockname()[:2]
        while True:
            try:
                query, peer = sock.recvfrom(65535)
            except OSError:
                return
            threading.Thread(target=self._udp_one, args=(sock, local, query, peer[:2]), daemon=True).start()

    def _udp_one(self, sock, local: Addr, query: bytes, peer: Addr) -> None:
        entry = {"direction": "dns", "transport": "udp", "peer": self.fmt(peer)}
        reply = answer(query, self.hosts)
        if reply is not None:
            entry["answered"] = "local"
        else:
            server = udp_original_dst(peer, local, self.upstream)
            entry["original_dst"] = self.fmt(server) if server else None
            reply = forward_udp(query, server) if server else None
            entry["answered"] = "forwarded" if reply else "refused" if server is None else "no answer"
            if reply is None:
                reply = error_reply(query, RCODE_REFUSED if server is None else RCODE_SERVFAIL)
        q = parse_question(query)
        entry["name"] = q[0] if q else None
        try:
            sock.sendto(reply, peer)
        except OSError as exc:
            entry["error"] = f"send {exc.strerror}"
        self.log(entry)

    def _tcp_loop(self, lsock: socket.socket) -> None:
        import threading

        while True:
            try:
                conn, peer = lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_one, args=(conn, peer[:2]), daemon=True).start()

    def _tcp_one(self, conn: socket.socket, peer: Addr) -> None:
        with conn:
            try:
                server = original_dst_tcp(conn)
            except OSError:
                server = self.upstream
            while True:
                try:
                    query = read_tcp_message(conn)
                except OSError:
                    return
                if query is None:
                    return
                entry = {"direction": "dns", "transport": "tcp", "peer": self.fmt(peer),
                         "original_dst": self.fmt(server) if server else None}
                reply = answer(query, self.hosts)
                entry["answered"] = "local" if reply is not None else None
                if reply is None:
                    reply = forward_tcp(query, server) if server else None
                    entry["answered"] = "forwarded" if reply else "refused" if server is None else "no answer"
                    reply = reply or error_reply(query, RCODE_REFUSED if server is None else RCODE_SERVFAIL)
                q = parse_question(query)
                entry["name"] = q[0] if q else None
                try:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:
                    return
                finally:
                    self.log(entry)


def original_dst_tcp(sock: socket.socket) -> Addr:
    """SO_ORIGINAL_DST of an accepted TCP socket (IPv4 also when v4-mapped), or IP6T_SO_ORIGINAL_DST."""
    if sock.family == socket.AF_INET6 and plain(sock.getpeername()[0]) == sock.getpeername()[0]:
        raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port, addr = struct.unpack("!2xH4x16s4x", raw[:28])
        return socket.inet_ntop(socket.AF_INET6, addr), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw[:16])
    return socket.inet_ntoa(addr), port
