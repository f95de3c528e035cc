"""The project's own transparent sidecar (stdlib only).

It listens on the outbound port (15001) and the inbound port (15003), dual-stack (one
``[::]`` socket per port takes IPv4 as v4-mapped; ``0.0.0.0`` where the namespace has no
IPv6), asks every accepted socket for its original destination — ``getsockopt(SOL_IP,
SO_ORIGINAL_DST)`` for an IPv4 connection, whichever family the accepted socket has, and
``getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`` for an IPv6 one; answered by conntrack under
the iptables backend and by a ``cgroup/getsockopt`` program under the eBPF backend — and
relays bytes both ways (non-blocking sockets, one epoll per connection, half-closes passed
on; safe under eBPF ``--accelerate``):

* outbound: to the original destination, or round robin to the backends of a route when the
  original destination is a virtual service address (``--route VIP:PORT=IP:PORT,IP:PORT``);
* inbound: to ``<inbound target>:<original port>``, the app in the same pod (127.0.0.1 for
  IPv4, ``--inbound-target6`` ::1 for IPv6).

Addresses are logged as ``ip:port`` or ``[ip6]:port``, a v4-mapped address as its IPv4 one.

Every connection ends as one JSON line in the log (direction, peer, original_dst, upstream,
bytes each way, error), so tests can prove which destination the sidecar really saw.

Run it as the proxy UID: both backends skip that UID's own traffic, which is what keeps the
sidecar's upstream connections from being redirected back into itself.

    python -m meshintercept.sidecar --outbound-port 15001 --inbound-port 15003 --log FILE \\
        [--route 10.231.200.1:8080=10.231.1.3:8080,10.231.2.3:8080] [--uid 1500]
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import itertools
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import Dict, IO, List, Optional, Sequence, Tuple

try:
    from meshintercept import dnsfwd
except ImportError:  # run by path with the standard library only (the lab copies both files)
    import dnsfwd
BUFFER_SIZE = 256 * 1024  # per direction; one recv/send moves up to this much
Addr = Tuple[str, int]


def plain(host: str) -> str:
    """A v4-mapped IPv6 address (how a dual-stack socket sees IPv4) as the IPv4 address it is."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def fmt(addr: Optional[Addr]) -> Optional[str]:
    if not addr:
        return None
    host = plain(addr[0])
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def parse_addr(text: str) -> Addr:
    """``ip:port`` or ``[ip6]:port``."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not ip:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ipaddress.ip_address(host)
    port_n = int(port)
    if not 1 <= port_n <= 65535:
        raise ValueError(f"port {port_n} out of range in {text!r}")
    return host, port_n


def parse_route(text: str) -> Tuple[Addr, List[Addr]]:
    """'VIP:PORT=IP:PORT,IP:PORT' -> ((vip, port), [(ip, port), ...])."""
    vip, sep, backends = text.partition("=")
    if not sep or not backends.strip():
        raise ValueError(f"route {text!r} must look like VIP:PORT=IP:PORT[,IP:PORT...]")
    return parse_addr(vip), [parse_addr(b) for b in backends.split(",") if b.strip()]


def original_dst(sock: socket.socket) -> Addr:
    """The destination the client asked for, before REDIRECT / the eBPF rewrite.

    An IPv4 connection is asked with SOL_IP even on an AF_INET6 socket (it is v4-mapped there:
    conntrack and the eBPF program both keep it as IPv4); an IPv6 one with SOL_IPV6."""
    return dnsfwd.original_dst_tcp(sock)


class ConnectionLog:
    """One JSON object per line, flushed per line; safe to share between threads."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()


#: Errors that only mean "not now": wait for readiness and try again. A sockmap-redirected
#: socket (eBPF --accelerate) returns EAGAIN from recv() even when it was woken for data, so
#: the relay never trusts one readiness report (see docs/ebpf.md, "--accelerate").
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class _Flow:
    """One proxied connection relayed by one thread with its own epoll: both sockets are
    non-blocking, each direction has one buffer, and a direction only reads again when its
    buffer has been written out (back-pressure without unbounded memory).

    No splice(2): under eBPF --accelerate, sk_msg puts redirected bytes on the psock's
    ingress queue, which only recvmsg() reads; splice-read waits on the socket's receive
    queue forever. The copy path moves as fast here (docs/ebpf.md has the figures).
    """

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.bytes_up = 0
        self.bytes_down = 0
        self.error: Optional[str] = None

    def run(self) -> None:
        client, upstream = self.client, self.upstream
        names = {client.fileno(): "client", upstream.fileno(): "upstream"}
        # direction state: [src, dst, buffer, view, pending_start, pending_end, eof, up]
        dirs = []
        for src, dst, up in ((client, upstream, True), (upstream, client, False)):
            buf = bytearray(BUFFER_SIZE)
            dirs.append({"src": src, "dst": dst, "buf": buf, "view": memoryview(buf), "lo": 0, "hi": 0,
                         "eof": False, "shut": False, "up": up})
        for sock in (client, upstream):
            sock.setblocking(False)
        ep = select.epoll(2)
        registered: Dict[int, int] = {}
        failing = None  # the socket whose error ended the flow
        try:
            while not all(d["shut"] for d in dirs):
                progress = False
                for d in dirs:
                    if d["shut"]:
                        continue
                    failing = d["src"]
                    if d["lo"] == d["hi"] and not d["eof"]:
                        try:
                            n = d["src"].recv_into(d["buf"])
                        except OSError as exc:
                            if exc.errno not in _RETRY:
                                raise
                        else:
                            if n == 0:
                                d["eof"] = True
                            else:
                                d["lo"], d["hi"] = 0, n
                            progress = True
                    failing = d["dst"]
                    while d["lo"] < d["hi"]:
                        try:
                            m = d["dst"].send(d["view"][d["lo"]:d["hi"]])
                        except OSError as exc:
                            if exc.errno not in _RETRY:
                                raise
                            break
                        d["lo"] += m
                        if d["up"]:
                            self.bytes_up += m
                        else:
                            self.bytes_down += m
                        progress = True
                    if d["eof"] and d["lo"] == d["hi"]:
                        # Half-close: the peer finished sending; tell the other side, keep the reverse open.
                        try:
                            d["dst"].shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        d["shut"] = True
                        progress = True
                failing = None
                if progress:
                    continue
                # Nothing moved: wait until a socket we need is readable / writable.
                want: Dict[int, int] = {}
                for d in dirs:
                    if d["shut"]:
                        continue
                    if d["lo"] < d["hi"]:
                        fd = d["dst"].fileno()
                        want[fd] = want.get(fd, 0) | select.EPOLLOUT
                    elif not d["eof"]:
                        fd = d["src"].fileno()
                        want[fd] = want.get(fd, 0) | select.EPOLLIN | select.EPOLLRDHUP
                for fd, mask in want.items():
                    if fd not in registered:
                        ep.register(fd, mask)
                    elif registered[fd] != mask:
                        ep.modify(fd, mask)
                for fd in [fd for fd in registered if fd not in want]:
                    ep.unregister(fd)
                registered = {fd: want[fd] for fd in want}
                try:
                    events = ep.poll()
                except InterruptedError:
                    continue
                for fd, ev in events:
                    if ev & select.EPOLLERR:
                        # Read the pending error now rather than after another round of EAGAIN.
                        sock = client if fd == client.fileno() else upstream
                        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if code:
                            failing = sock
                            raise OSError(code, os.strerror(code))
        except OSError as exc:
            side = names.get(failing.fileno() if failing is not None else -1, "relay")
            self.error = f"{side} {errno.errorcode.get(exc.errno, exc.errno)}"
            self.abort()
        finally:
            ep.close()

    def abort(self) -> None:
        """Make the final close send RST on both sides."""
        for sock in (self.client, self.upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass


def listen_socket(bind: str, port: int) -> socket.socket:
    """On ``bind``; or, when empty, dual-stack ``[::]`` (IPv4 as v4-mapped), else ``0.0.0.0``
    where the namespace has no IPv6."""
    candidates = [bind] if bind else ["::", "0.0.0.0"]
    for i, host in enumerate(candidates):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(4096)
            return sock
        except OSError:
            sock.close()
            if i == len(candidates) - 1:
                raise
    raise AssertionError("unreachable")


class Sidecar:
    def __init__(
        self,
        outbound_port: int = 15001,
        inbound_port: int = 15003,
        bind: str = "",
        inbound_target: str = "127.0.0.1",
        inbound_target6: str = "::1",
        routes: Optional[Dict[Addr, Sequence[Addr]]] = None,
        log: Optional[ConnectionLog] = None,
        connect_timeout: float = 5.0,
        dns: Optional["dnsfwd.DnsForwarder"] = None,
    ):
        self.ports = {"outbound": outbound_port, "inbound": inbound_port}
        self.bind = bind
        self.inbound_target = inbound_target
        self.inbound_target6 = inbound_target6
        self.routes = {vip: list(b) for vip, b in (routes or {}).items()}
        self._cursors = {vip: itertools.cycle(b) for vip, b in self.routes.items()}
        self._route_lock = threading.Lock()
        self.log = log or ConnectionLog(sys.stdout)
        self.connect_timeout = connect_timeout
        self.listeners: Dict[str, socket.socket] = {}
        self.dns = dns
        self._stop = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------
    def listen(self) -> None:
        for direction, port in self.ports.items():
            self.listeners[direction] = listen_socket(self.bind, port)
        if self.dns:
            self.dns.listen(listen_socket)

    def start(self) -> None:
        if not self.listeners:
            self.listen()
        for direction, sock in self.listeners.items():
            threading.Thread(target=self._accept_loop, args=(direction, sock), name=f"accept-{direction}", daemon=True).start()
        if self.dns:
            self.dns.start(lambda fn, *args: threading.Thread(target=fn, args=args, daemon=True).start())

    def close(self) -> None:
        self._stop.set()
        if self.dns:
            self.dns.close()
        for sock in self.listeners.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept_loop(self, direction: str, lsock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = lsock.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.05)  # out of descriptors: let connections drain instead of spinning
                continue
            try:
                threading.Thread(target=self._handle, args=(direction, conn, peer), daemon=True).start()
            except RuntimeError:
                conn.close()  # cannot start a thread: refuse this one rather than die

    # --- one connection -----------------------------------------------------------------
    def _target(self, direction: str, orig: Addr) -> Tuple[Addr, Optional[str]]:
        if direction == "inbound":
            target = self.inbound_target6 if ":" in orig[0] else self.inbound_target
            return (target, orig[1]), None
        if orig in self._cursors:
            with self._route_lock:
                return next(self._cursors[orig]), fmt(orig)
        return orig, None

    def _loops(self, orig: Addr, local: Addr) -> bool:
        """Would forwarding to orig reach one of our own listeners? (orig == local alone is no
        loop: where interception steers sockets instead of rewriting them, sk_lookup or
        TPROXY, the accepted socket's local address is the original destination.)"""
        local = (plain(local[0]), local[1])
        if orig[1] in self.ports.values():
            ip = ipaddress.ip_address(orig[0])
            return ip.is_loopback or ip.is_unspecified or orig[0] == local[0]
        return False

    def _handle(self, direction: str, conn: socket.socket, peer: Addr) -> None:
        started = time.monotonic()
        entry = {
            "ts": round(time.time(), 6), "direction": direction, "peer": fmt(peer), "local": None,
            "original_dst": None, "upstream": None, "upstream_local": None, "route": None,
            "bytes_up": 0, "bytes_down": 0, "error": None,
        }
        upstream = None
        try:
            local = conn.getsockname()
            entry["local"] = fmt(local)
            try:
                orig = original_dst(conn)
            except OSError as exc:
                entry["error"] = f"no original destination ({errno.errorcode.get(exc.errno, exc.errno)})"
                return
            entry["original_dst"] = fmt(orig)
            if self._loops(orig, local):
                entry["error"] = "original destination is this sidecar (would loop)"
                return
            target, route = self._target(direction, orig)
            entry["route"] = route
            entry["upstream"] = fmt(target)
            try:
                upstream = socket.create_connection(target, timeout=self.connect_timeout)
            except OSError as exc:
                code = errno.errorcode.get(exc.errno, None) if exc.errno else None
                entry["error"] = f"connect {code or type(exc).__name__}"
                return
            upstream.settimeout(None)
            entry["upstream_local"] = fmt(upstream.getsockname())
            for sock in (conn, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            flow = _Flow(conn, upstream)
            flow.run()
            entry.update(bytes_up=flow.bytes_up, bytes_down=flow.bytes_down, error=flow.error)
        except Exception as exc:  # noqa: BLE001 - one bad connection must not kill the sidecar
            entry["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if entry["error"] and upstream is None:
                # Refuse loudly: a reset tells the client something is wrong, unlike a clean EOF.
                try:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            conn.close()
            if upstream is not None:
                upstream.close()
            entry["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
            self.log.write(entry)


def drop_privileges(uid: int, gid: Optional[int] = None) -> None:
    gid = uid if gid is None else gid
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m meshintercept.sidecar", description=__doc__.split("\n\n")[0])
    p.add_argument("--outbound-port", type=int, default=15001)
    p.add_argument("--inbound-port", type=int, default=15003)
    p.add_argument("--bind", default="", help="listen address (default: [::] dual-stack, 0.0.0.0 without IPv6)")
    p.add_argument("--inbound-target", default="127.0.0.1", help="address of the app IPv4 inbound traffic goes to")
    p.add_argument("--inbound-target6", default="::1", help="address of the app IPv6 inbound traffic goes to")
    p.add_argument("--route", action="append", default=[], metavar="VIP:PORT=IP:PORT[,IP:PORT]",
                   help="send outbound traffic for a service address to these backends, round robin")
    p.add_argument("--log", default="-", help="connection log file (JSON lines); '-' for stdout")
    p.add_argument("--uid", type=int, help="drop to this UID after binding (the proxy UID, e.g. 1500)")
    p.add_argument("--gid", type=int, help="drop to this GID (default: same as --uid)")
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.add_argument("--dns-port", type=int, default=0,
                   help="answer or forward captured DNS on this port, UDP and TCP (0: off; the mesh default is 15053)")
    p.add_argument("--dns-hosts", help="hosts(5) file of names answered here; every other query is forwarded")
    p.add_argument("--dns-upstream", metavar="IP:PORT",
                   help="where UDP queries go when the original server cannot be learnt (see meshintercept.dnsfwd)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        routes = dict(parse_route(r) for r in args.route)
    except ValueError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    stream = sys.stdout if args.log == "-" else open(args.log, "a", buffering=1)
    log = ConnectionLog(stream)
    dns = None
    if args.dns_port:
        try:
            hosts = dnsfwd.load_hosts(args.dns_hosts)
            upstream = parse_addr(args.dns_upstream) if args.dns_upstream else None
        except (OSError, ValueError) as exc:
            print(f"sidecar: DNS settings: {exc}", file=sys.stderr)
            return 2
        dns = dnsfwd.DnsForwarder(args.dns_port, hosts, upstream, log.write, fmt)
    sidecar = Sidecar(args.outbound_port, args.inbound_port, args.bind, args.inbound_target, args.inbound_target6,
                      routes, log, args.connect_timeout, dns)
    try:
        sidecar.listen()
    except OSError as exc:
        print(f"sidecar: cannot listen on {args.bind or '[::]'}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.uid is not None:
        drop_privileges(args.uid, args.gid)
    threading.stack_size(512 * 1024)  # many connections x one thread each
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    sidecar.start()
    where = {d: fmt(s.getsockname()[:2]) for d, s in sidecar.listeners.items()}
    print(f"sidecar: listening outbound {where['outbound']} inbound {where['inbound']} as uid {os.getuid()}",
          file=sys.stderr, flush=True)
    while not done.wait(3600):
        pass
    sidecar.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
