"""Tiny TCP apps that run inside test pods: a server that says who it is, and clients.

Stdlib only: these run as ordinary UIDs inside pod namespaces, started by
`meshintercept.lab.cluster.Pod`.

Server protocol (mode ``hello``, the default), one connection:
  1. the server sends a greeting at once: one JSON line naming the pod, the local port and
     address, and the peer address it sees (``reply`` replaces it with a fixed text,
     where ``{pod} {port} {local} {peer}`` are filled in, and ``{origdst}``: what
     SO_ORIGINAL_DST says, as a transparent proxy would ask it, else the local address);
  2. if the client's first line is ``BULK <n>``, the server sends n random bytes while it
     reads the client's bytes until EOF (both ways at once), then a trailer line;
     otherwise it reads until EOF and sends the trailer line;
  3. trailer: ``{"received": n, "received_sha256": h, "sent": n, "sent_sha256": h}``; close
     (with a fixed ``reply`` and no BULK, no trailer: the reply is the whole answer).
Mode ``http`` answers every HTTP/1.x request with ``200`` and the reply text as body.

Clients send, wait for the first bytes of the answer, then half-close and read to EOF.
They print one JSON document on stdout, which the harness parses:
  connect:  {"ok", "local", "peer", "data_b64"} or {"ok": false, "error": "ECONNREFUSED", ...}
  many:     {"ok": n, "failed": n, "errors": {...}, "greetings": {pod: n}}
  transfer: {"ok", "local", "sent", "sent_sha256", "received", "received_sha256", "server": trailer}
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

CHUNK = 256 * 1024
SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>; IP6T_SO_ORIGINAL_DST has the same number


def fmt(addr) -> str:
    """``ip:port``, ``[ip6]:port``; a v4-mapped address as the IPv4 one (the lab's one spelling)."""
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listener(bind: str | None, port: int) -> socket.socket:
    """A listening socket: on ``bind``, or dual-stack ``[::]`` (IPv4 arrives v4-mapped), or
    ``0.0.0.0`` where the namespace has no IPv6."""
    candidates = [bind] if bind else ["::", "0.0.0.0"]
    for i, host in enumerate(candidates):
        sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sock.family == socket.AF_INET6 and not bind:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(1024)
            return sock
        except OSError:
            sock.close()
            if i == len(candidates) - 1:
                raise
    raise AssertionError("unreachable")


def error_name(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "TIMEOUT"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


# --- server ------------------------------------------------------------------------------
class _Hasher:
    def __init__(self):
        self.sha = hashlib.sha256()
        self.count = 0

    def add(self, data) -> None:
        self.sha.update(data)
        self.count += len(data)


def send_random(sock: socket.socket, total: int, hasher: _Hasher) -> None:
    """Send `total` fresh random bytes (not a repeated block, so reordering would show)."""
    left = total
    while left:
        chunk = os.urandom(min(CHUNK, left))
        sock.sendall(chunk)
        hasher.add(chunk)
        left -= len(chunk)


def original_dst(conn: socket.socket) -> str:
    """The original destination as a sidecar asks it (SO_ORIGINAL_DST for IPv4, also on a
    v4-mapped AF_INET6 socket; IP6T_SO_ORIGINAL_DST for IPv6); the socket's own address when
    nothing redirected it."""
    try:
        if conn.family == socket.AF_INET6 and not conn.getpeername()[0].startswith("::ffff:"):
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port, addr = struct.unpack("!2xH4x16s4x", raw)
            return fmt((socket.inet_ntop(socket.AF_INET6, addr), port))
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return fmt(conn.getsockname())
    port, addr = struct.unpack("!2xH4s8x", raw)
    return f"{socket.inet_ntoa(addr)}:{port}"


def _serve_hello(conn: socket.socket, name: str, reply: str | None) -> None:
    local, peer = conn.getsockname(), conn.getpeername()
    if reply is None:
        greeting = json.dumps({"pod": name, "port": local[1], "local": fmt(local), "peer": fmt(peer)}) + "\n"
    else:
        origdst = original_dst(conn) if "{origdst}" in reply else ""
        greeting = reply.format(pod=name, port=local[1], local=fmt(local), peer=fmt(peer), origdst=origdst)
    conn.sendall(greeting.encode())
    reader = conn.makefile("rb", buffering=CHUNK)
    received, sent = _Hasher(), _Hasher()
    first = reader.readline(256)
    sender = None
    if first.startswith(b"BULK "):
        want = int(first.split()[1])
        sender = threading.Thread(target=send_random, args=(conn, want, sent), daemon=True)
        sender.start()
    else:
        received.add(first)
    while True:
        data = reader.read1(CHUNK)
        if not data:
            break
        received.add(data)
    if sender is not None:
        sender.join()
    elif reply is not None:
        return  # a fixed reply (the demo's "Hi, I am ...") is the whole answer
    trailer = {"received": received.count, "received_sha256": received.sha.hexdigest(),
               "sent": sent.count, "sent_sha256": sent.sha.hexdigest()}
    conn.sendall((json.dumps(trailer) + "\n").encode())


def _serve_http(conn: socket.socket, name: str, reply: str | None) -> None:
    reader = conn.makefile("rb")
    while True:
        request = reader.readline(65536)
        if not request:
            return
        keep_alive = request.rstrip().endswith(b"HTTP/1.1")
        while True:
            header = reader.readline(65536)
            if header in (b"\r\n", b"\n", b""):
                break
            if header.lower().startswith(b"connection:"):
                keep_alive = b"keep-alive" in header.lower()
        local, peer = conn.getsockname(), conn.getpeername()
        text = (reply or "Hi, I am {pod} !\n").format(pod=name, port=local[1], local=fmt(local), peer=fmt(peer))
        body = text.encode()
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                f"Connection: {'keep-alive' if keep_alive else 'close'}\r\nX-Pod: {name}\r\n\r\n")
        conn.sendall(head.encode() + body)
        if not keep_alive:
            return


def _serve_conn(conn: socket.socket, mode: str, name: str, reply: str | None) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        (_serve_http if mode == "http" else _serve_hello)(conn, name, reply)
    except OSError:
        pass
    finally:
        conn.close()


def serve(ports, name: str, mode: str = "hello", reply: str | None = None, bind: str | None = None) -> None:
    listeners = [listener(bind, port) for port in ports]

    def accept_loop(lsock):
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=_serve_conn, args=(conn, mode, name, reply), daemon=True).start()

    threading.stack_size(512 * 1024)
    for sock in listeners:
        threading.Thread(target=accept_loop, args=(sock,), daemon=True).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    while not done.wait(3600):
        pass


# --- clients -----------------------------------------------------------------------------
def _read_all(sock: socket.socket) -> bytes:
    parts = []
    while True:
        data = sock.recv(CHUNK)
        if not data:
            return b"".join(parts)
        parts.append(data)


def connect_once(host: str, port: int, send: bytes = b"", timeout: float = 5.0) -> dict:
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    result = {"ok": False, "local": None, "peer": None}
    try:
        sock.connect((host, port))
        result["local"] = fmt(sock.getsockname())
        try:
            result["peer"] = fmt(sock.getpeername())
        except OSError:
            pass  # already reset by the peer: recv below reports ECONNRESET
        if send:
            sock.sendall(send)
        # Read the first answer before half-closing, as a real client does: a proxy may take
        # a FIN that arrives while it is still connecting upstream as an abort (HAProxy: "CC").
        first = sock.recv(CHUNK)
        if first:
            sock.shutdown(socket.SHUT_WR)
        data = first + _read_all(sock) if first else b""
        result.update(ok=True, data_b64=base64.b64encode(data).decode())
    except (OSError, socket.timeout) as exc:
        result.update(error=error_name(exc), message=str(exc))
    finally:
        sock.close()
    return result


def connect_many(host: str, port: int, count: int, parallel: int, timeout: float) -> dict:
    summary = {"ok": 0, "failed": 0, "errors": {}, "greetings": {}}
    lock = threading.Lock()

    def one(_):
        r = connect_once(host, port, b"ping", timeout)
        with lock:
            if r["ok"]:
                data = base64.b64decode(r["data_b64"])
                try:
                    pod = json.loads(data.split(b"\n", 1)[0])["pod"]
                except (ValueError, KeyError, TypeError):
                    pod = "?"
                summary["ok"] += 1
                summary["greetings"][pod] = summary["greetings"].get(pod, 0) + 1
            else:
                summary["failed"] += 1
                summary["errors"][r["error"]] = summary["errors"].get(r["error"], 0) + 1

    from concurrent.futures import ThreadPoolExecutor  # only this client needs it; keep start-up quick

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(one, range(count)))
    return summary


def transfer(host: str, port: int, up: int, down: int, timeout: float) -> dict:
    """Push `up` random bytes while receiving `down`; report hashes of both ends."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect((host, port))
    result = {"ok": False, "local": fmt(sock.getsockname())}
    sent, received = _Hasher(), _Hasher()
    started = time.monotonic()
    try:
        reader = sock.makefile("rb", buffering=CHUNK)
        result["greeting"] = json.loads(reader.readline())
        sock.sendall(f"BULK {down}\n".encode())

        def push():
            send_random(sock, up, sent)
            sock.shutdown(socket.SHUT_WR)

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        left = down
        while left:
            data = reader.read1(min(CHUNK, left))
            if not data:
                break
            received.add(data)
            left -= len(data)
        result["server"] = json.loads(reader.readline() or b"null")
        pusher.join()
        result["ok"] = True
    except (OSError, ValueError) as exc:
        result.update(error=error_name(exc), message=str(exc))
    finally:
        sock.close()
    result.update(sent=sent.count, sent_sha256=sent.sha.hexdigest(), received=received.count,
                  received_sha256=received.sha.hexdigest(), seconds=round(time.monotonic() - started, 3))
    return result


def dns_query(server: str, port: int, name: str, qtype: int = 1, transport: str = "udp",
              connected: bool = True, timeout: float = 3.0) -> dict:
    """One DNS query as a resolver sends it: over UDP from a connected socket (libc's way) or
    with sendto on an unconnected one, or over TCP. Reports the answer's addresses, its rcode and,
    for UDP, where the reply came from (a resolver drops replies from anywhere but the server)."""
    import random
    import struct

    qid = random.randrange(65536)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", qtype, 1)
    sock = socket.socket(family_of(server), socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    out = {"ok": False, "from": None}
    try:
        if transport == "tcp":
            sock.connect((server, port))
            sock.sendall(struct.pack("!H", len(query)) + query)
            length = struct.unpack("!H", _recv_exactly(sock, 2))[0]
            reply, out["from"] = _recv_exactly(sock, length), fmt(sock.getpeername())
        else:
            if connected:
                sock.connect((server, port))
                sock.send(query)
            else:
                sock.sendto(query, (server, port))
            reply, peer = sock.recvfrom(65535)
            out["from"] = fmt(peer)
        out.update(ok=True, **_parse_reply(reply, qid))
    except (OSError, socket.timeout, ValueError) as exc:
        out.update(error=error_name(exc), message=str(exc))
    finally:
        sock.close()
    return out


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ValueError("connection closed in the middle of a DNS message")
        buf += chunk
    return buf


def _parse_reply(reply: bytes, qid: int) -> dict:
    import struct

    rid, flags, qd, an = struct.unpack("!HHHH", reply[:8])
    if rid != qid:
        raise ValueError(f"reply id {rid} is not the query's {qid}")
    i = 12
    for _ in range(qd):  # skip the question
        while reply[i]:
            i += 1 + reply[i]
        i += 5
    addresses = []
    for _ in range(an):
        i += 2 if reply[i] & 0xC0 else 0  # a compressed name, as every server here writes
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", reply[i:i + 10])
        data = reply[i + 10:i + 10 + rdlen]
        if rtype in (1, 28):
            addresses.append(socket.inet_ntop(socket.AF_INET if rtype == 1 else socket.AF_INET6, data))
        i += 10 + rdlen
    return {"rcode": flags & 0xF, "addresses": addresses}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshintercept.lab.apps")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, action="append", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--mode", choices=("hello", "http"), default="hello")
    s.add_argument("--reply")
    s.add_argument("--bind", default=None, help="default: [::] dual-stack, or 0.0.0.0 without IPv6")
    for name in ("connect", "many", "transfer"):
        c = sub.add_parser(name)
        c.add_argument("--host", required=True)
        c.add_argument("--port", type=int, required=True)
        c.add_argument("--timeout", type=float, default=5.0)
        if name == "connect":
            c.add_argument("--send-b64", default="")
        if name == "many":
            c.add_argument("--count", type=int, default=100)
            c.add_argument("--parallel", type=int, default=20)
        if name == "transfer":
            c.add_argument("--up", type=int, default=20 << 20)
            c.add_argument("--down", type=int, default=20 << 20)
    d = sub.add_parser("dns")
    d.add_argument("--server", required=True)
    d.add_argument("--port", type=int, default=53)
    d.add_argument("--name", required=True)
    d.add_argument("--type", type=int, default=1, help="1 A, 28 AAAA")
    d.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    d.add_argument("--unconnected", action="store_true", help="UDP with sendto, no connect (dig's way)")
    d.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    if args.cmd == "dns":
        print(json.dumps(dns_query(args.server, args.port, args.name, args.type, args.transport,
                                   not args.unconnected, args.timeout)))
        return 0
    if args.cmd == "serve":
        serve(args.port, args.name, args.mode, args.reply, args.bind)
        return 0
    if args.cmd == "connect":
        out = connect_once(args.host, args.port, base64.b64decode(args.send_b64), args.timeout)
    elif args.cmd == "many":
        out = connect_many(args.host, args.port, args.count, args.parallel, args.timeout)
    else:
        out = transfer(args.host, args.port, args.up, args.down, args.timeout)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
