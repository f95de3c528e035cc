"""The real programs of the data path: nginx (server), HAProxy (sidecar), wrk (load).

Each runs inside a pod with its own config, pid and log files in the pod's work dir; the
machine's own nginx/haproxy services are never touched.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

from meshintercept.lab import sidecars as lab_sidecars

PROXY_UID = 1500
OUTBOUND_PORT = 15001
INBOUND_PORT = 15003
# Explicit mode: the client addresses its sidecar on EXPLICIT_OUT, which forwards to the
# server's sidecar on EXPLICIT_IN, which forwards to the app. Same proxies, same hops, no interception.
EXPLICIT_OUT = 15011  # +1, +2 ... for further servers
EXPLICIT_IN = 15013
APP_PORT = 80
SMALL_BYTES = 1024
BIG_BYTES = 64 << 20


def wait_port(pod, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Poll until something listens on host:port inside the pod (connect from inside it)."""
    deadline = time.monotonic() + timeout
    probe = ["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"]
    while time.monotonic() < deadline:
        if pod.run(probe, timeout=5).returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} in {pod.netns} after {timeout}s")


def make_site(root: str) -> str:
    """The files nginx serves: a 1 KiB page at / and a 64 MiB file at /big (shared by all pods)."""
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o755)
    with open(os.path.join(root, "index.html"), "wb") as f:
        f.write(b"x" * (SMALL_BYTES - 1) + b"\n")
    big = os.path.join(root, "big")
    if not os.path.exists(big) or os.path.getsize(big) != BIG_BYTES:
        with open(big, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(BIG_BYTES >> 20):
                f.write(chunk)
    return root


def start_nginx(pod, root: str | None = None) -> subprocess.Popen:
    """nginx, one process, no access log, its own config/pid/logs in the pod's dir."""
    root = root or make_site(os.path.join(pod.dir, "www"))
    conf = os.path.join(pod.dir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
daemon off;
master_process off;
worker_processes 1;
pid {pod.dir}/nginx.pid;
error_log {pod.dir}/nginx-error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    client_body_temp_path {pod.dir}/tmp-body;
    proxy_temp_path {pod.dir}/tmp-proxy;
    fastcgi_temp_path {pod.dir}/tmp-fcgi;
    uwsgi_temp_path {pod.dir}/tmp-uwsgi;
    scgi_temp_path {pod.dir}/tmp-scgi;
    default_type application/octet-stream;
    server {{
        listen {APP_PORT} backlog=8192;
        root {root};
        location = /whoami {{ return 200 "$remote_addr\\n"; }}
    }}
}}
""")
    proc = pod.spawn(["nginx", "-p", pod.dir, "-c", conf], stderr=open(os.path.join(pod.dir, "nginx.stderr"), "w"))
    wait_port(pod, APP_PORT)
    return proc


def haproxy_config(pod, explicit_targets: dict | None = None) -> str:
    """The lab's HAProxy sidecar, tuned for measuring: one thread, no connection log, the
    explicit-mode frontends, and a stats socket that proves a run went through the sidecar."""
    return lab_sidecars.haproxy_config(
        OUTBOUND_PORT, INBOUND_PORT, log=False, maxconn=9000, run_as=PROXY_UID, threads=1, state_dir=pod.dir,
        timeout="60s", bind="0.0.0.0", explicit_in=EXPLICIT_IN, app_port=APP_PORT, explicit_targets=explicit_targets)


def start_haproxy(pod, explicit_targets: dict | None = None) -> subprocess.Popen:
    """HAProxy as the pod's sidecar, started as root and running as the proxy UID after bind."""
    conf = os.path.join(pod.dir, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(haproxy_config(pod, explicit_targets))
    proc = pod.spawn(["haproxy", "-db", "-f", conf], stderr=open(os.path.join(pod.dir, "haproxy.stderr"), "w"))
    wait_port(pod, EXPLICIT_IN)
    return proc


def haproxy_sessions(pod) -> dict:
    """Total sessions per frontend from the stats socket: proof a run went through the sidecar."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(os.path.join(pod.dir, "haproxy.sock"))
    sock.sendall(b"show stat\n")
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("svname") == "FRONTEND":
            out[row["pxname"]] = int(row.get("stot") or 0)
    return out


# --- wrk -----------------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    """Requests/s, bytes/s, latency percentiles (ms), request and error counts from wrk --latency."""
    res = {"errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)", out)
    res["bytes_per_s"] = float(m.group(1)) * _BYTES[m.group(2)] if m else 0.0
    m = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+)(B|KB|MB|GB|TB) read", out)
    if m:
        res["requests"] = int(m.group(1))
        res["duration_ms"] = _ms(m.group(2))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+\w+)", out, re.M)
        if m:
            res[f"p{pct}_ms"] = _ms(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["errors"] += int(m.group(1))
    return res


def run_wrk(pod, url: str, seconds: float, connections: int, close: bool = False, timeout_s: int = 10) -> dict:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    res = pod.run(argv, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f"wrk failed in {pod.netns}: {res.stderr.strip()[-300:]}")
    parsed = parse_wrk(res.stdout)
    if not parsed.get("requests"):
        raise RuntimeError(f"wrk made no request to {url}: {res.stdout[-300:]}")
    return parsed
