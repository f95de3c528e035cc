"""Run a transparent sidecar in a test pod: the project's own, HAProxy or squid from Debian.

All run as the proxy UID, listen on the spec's outbound and inbound ports, learn the
original destination with ``getsockopt(SO_ORIGINAL_DST)`` (``IP6T_SO_ORIGINAL_DST`` for
IPv6: the project's sidecar and squid; HAProxy 2.6 cannot) and write one log line per
connection. `Sidecar.connections()` turns every log into the same normalised entries:

    {"kind", "direction": "outbound"|"inbound", "peer": "ip:port",
     "original_dst": "ip:port", "upstream": "ip:port", "upstream_local": "ip:port",
     "bytes_up": n (client -> upstream), "bytes_down": n, "error": None|str, "raw": {...}}

HAProxy: ``server x 0.0.0.0`` (no port) connects to the original destination and
``server app 127.0.0.1`` (no port) to the original port on loopback. HAProxy reads the
original destination with SO_ORIGINAL_DST on the accepted socket, which is what its
``%fi:%fp`` (frontend address) log variables show — checked on this machine with a REDIRECT
rule, see tests/test_cluster.py.

squid (``http_port ... intercept``) is an HTTP proxy written by nobody here that reads the
IPv6 original destination: it forwards each request to the original destination (with
``client_dst_passthru``), inbound too, as the proxy UID, so the app sees the pod's own
address as peer. Its ``%>la:%>lp`` is the original destination, ``%<a:%<p`` the server it
connected to. Only HTTP goes through it (the lab's ``http`` server mode).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from meshintercept.spec import InterceptSpec

if TYPE_CHECKING:  # pragma: no cover
    from meshintercept.lab.cluster import Pod

KINDS = ("project", "haproxy", "squid")
Routes = Dict[str, Sequence[str]]  # {"10.231.200.1:8080": ["10.231.1.3:8080", ...]}

# JSON on one line per connection; %fi:%fp is the frontend address HAProxy got from
# SO_ORIGINAL_DST, %si:%sp the server it really connected to, %bi:%bp its source.
HAPROXY_LOG_FORMAT = (
    '{"ci":"%ci","cp":%cp,"fi":"%fi","fp":%fp,"bi":"%bi","bp":"%bp","si":"%si","sp":"%sp",'
    '"f":"%f","b":"%b","s":"%s","B":%B,"U":%U,"ts":"%ts","Tt":%Tt}'
)


def haproxy_config(outbound_port: int = 15001, inbound_port: int = 15003, inbound_target: str = "127.0.0.1",
                   routes: Optional[Routes] = None, maxconn: int = 4096, log: bool = True, bind: str = "",
                   run_as: Optional[int] = None, threads: Optional[int] = None, state_dir: Optional[str] = None,
                   timeout: str = "10m", explicit_in: Optional[int] = None, app_port: Optional[int] = None,
                   explicit_targets: Optional[Dict[int, str]] = None) -> str:
    """A transparent HAProxy sidecar: outbound to the original destination, inbound to the app.

    ``server original 0.0.0.0`` takes address and port from the accepted socket's original
    destination (HAProxy asks getsockopt(SO_ORIGINAL_DST), answered by conntrack or by our
    getsockopt program); ``server app 127.0.0.1`` keeps the original port and sends it to the
    app on loopback. Without an original destination (a connection that was not redirected)
    HAProxy would connect to itself in a loop; the reject rules stop that.

    For benchmarks: ``run_as`` (uid/gid after binding), ``threads``, ``state_dir`` (pid file and
    stats socket there), and the explicit mode: the client addresses its sidecar on a local
    port of ``explicit_targets`` (port -> peer IP), which forwards to the peer sidecar's
    ``explicit_in``, which forwards to the app on ``app_port``. Same proxies, no interception.
    """
    esc = HAPROXY_LOG_FORMAT.replace('"', '\\"')
    reject = f"    tcp-request connection reject if {{ dst_port {outbound_port} }} || {{ dst_port {inbound_port} }}"
    lines = ["global", f"    maxconn {maxconn}"]
    if threads:
        lines.append(f"    nbthread {threads}")
    if run_as is not None:
        lines += [f"    uid {run_as}", f"    gid {run_as}"]
    if state_dir:
        lines += [f"    pidfile {state_dir}/haproxy.pid", f"    stats socket {state_dir}/haproxy.sock mode 600 level admin"]
    lines.append("    log stdout format raw local0 info" if log else "    # connection log off")
    lines += ["defaults", "    mode tcp"]
    lines += ["    log global", f'    log-format "{esc}"'] if log else ["    option dontlognull"]
    lines += ["    timeout connect 5s", f"    timeout client {timeout}", f"    timeout server {timeout}",
              "frontend outbound", f"    bind {bind}:{outbound_port}", reject]
    route_backends = []
    for i, (vip, backends) in enumerate(sorted((routes or {}).items())):
        ip, port = vip.rsplit(":", 1)
        lines.append(f"    use_backend route_{i} if {{ dst {ip} }} {{ dst_port {port} }}")
        route_backends += [f"backend route_{i}", "    balance roundrobin"]
        route_backends += [f"    server b{j} {addr}" for j, addr in enumerate(backends)]
    lines += [
        "    default_backend original_destination",
        "backend original_destination",
        "    server original 0.0.0.0",
        "frontend inbound",
        f"    bind {bind}:{inbound_port}",
        reject,
        "    default_backend local_app",
        "backend local_app",
        f"    server app {inbound_target}",
    ]
    if explicit_in is not None:
        lines += ["frontend explicit_in", f"    bind {bind}:{explicit_in}", "    default_backend local_app_explicit",
                  "backend local_app_explicit", f"    server app {inbound_target}:{app_port}"]
        for port, ip in sorted((explicit_targets or {}).items()):
            lines += [f"frontend explicit_out_{port}", f"    bind 127.0.0.1:{port}",
                      f"    default_backend explicit_peer_{port}", f"backend explicit_peer_{port}",
                      f"    server peer {ip}:{explicit_in}"]
    return "\n".join(lines + route_backends) + "\n"


def _normalise_project(raw: dict) -> dict:
    entry = {k: raw.get(k) for k in ("direction", "peer", "local", "original_dst", "upstream", "upstream_local",
                                     "route", "bytes_up", "bytes_down", "error", "transport", "name", "answered")}
    entry.update(kind="project", raw=raw)
    return entry


def _normalise_haproxy(raw: dict) -> dict:
    def addr(ip_key, port_key):
        ip, port = raw.get(ip_key), raw.get(port_key)
        return None if ip in (None, "", "-") or port in (None, "", "-") else f"{ip}:{port}"

    backend = raw.get("b", "")
    return {
        "kind": "haproxy",
        "direction": "inbound" if raw.get("f") == "inbound" else "outbound",
        "peer": addr("ci", "cp"),
        "local": None,  # HAProxy logs the original destination as the frontend address
        "original_dst": addr("fi", "fp"),
        "upstream": addr("si", "sp"),
        "upstream_local": addr("bi", "bp"),
        "route": backend if backend.startswith("route_") else None,
        "bytes_up": raw.get("U"),
        "bytes_down": raw.get("B"),
        "error": None if raw.get("ts") == "--" else raw.get("ts"),
        "raw": raw,
    }


# One access log per listening port (squid cannot say which port took a request); fields as
# the normalised entry needs them. %>la:%>lp is the original destination in intercept mode.
SQUID_LOG_FORMAT = ('{"ts":"%ts.%03tu","peer_ip":"%>a","peer_port":"%>p","orig_ip":"%>la","orig_port":"%>lp",'
                    '"server_ip":"%<a","server_port":"%<p","server_local_ip":"%<la","server_local_port":"%<lp",'
                    '"status":"%>Hs","up":"%>st","down":"%<st"}')


def squid_config(outbound_port: int, inbound_port: int, state_dir: str) -> str:
    """squid as a transparent sidecar: both ports intercept, no cache, logs in ``state_dir``."""
    return "\n".join([
        "http_port 127.0.0.1:3128",  # squid refuses to start without one plain forward port
        f"http_port [::]:{outbound_port} intercept name=outbound",
        f"http_port [::]:{inbound_port} intercept name=inbound",
        "acl outbound myportname outbound",
        "acl inbound myportname inbound",
        "http_access allow all",
        "cache deny all",
        # Forward to the connection's original destination whatever the Host header says.
        "host_verify_strict off",
        "client_dst_passthru on",
        "visible_hostname meshintercept-lab",
        "dns_nameservers 127.0.0.1",  # IP literals only: never ask a resolver outside the lab
        "forwarded_for delete",
        "shutdown_lifetime 0 seconds",
        f"logformat meshintercept {SQUID_LOG_FORMAT}",
        f"access_log stdio:{state_dir}/access-outbound.log meshintercept outbound",
        f"access_log stdio:{state_dir}/access-inbound.log meshintercept inbound",
        f"cache_log {state_dir}/cache.log",
        f"pid_filename {state_dir}/squid.pid",
        f"coredump_dir {state_dir}",
    ]) + "\n"


def _normalise_squid(raw: dict, direction: str) -> dict:
    def addr(ip_key, port_key):
        ip, port = raw.get(ip_key), raw.get(port_key)
        if ip in (None, "", "-") or port in (None, "", "-", "0"):
            return None
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    status = raw.get("status", "")
    return {
        "kind": "squid", "direction": direction, "peer": addr("peer_ip", "peer_port"), "local": None,
        "original_dst": addr("orig_ip", "orig_port"), "upstream": addr("server_ip", "server_port"),
        "upstream_local": addr("server_local_ip", "server_local_port"), "route": None,
        "bytes_up": int(raw.get("up") or 0), "bytes_down": int(raw.get("down") or 0),
        "error": None if status.startswith("2") else f"HTTP {status}", "raw": raw,
    }


class Sidecar:
    """A running sidecar in a pod; `connections()` reads its log as normalised entries."""

    def __init__(self, kind: str, pod: "Pod", spec: InterceptSpec, process: subprocess.Popen,
                 log_path: str, stderr_path: str, config_path: Optional[str] = None):
        self.kind = kind
        self.pod = pod
        self.spec = spec
        self.process = process
        self.log_path = log_path
        self.stderr_path = stderr_path
        self.config_path = config_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def connections(self, since: int = 0) -> List[dict]:
        """Entries logged so far (connections that have ended), oldest first."""
        if self.kind == "squid":
            entries = [_normalise_squid(raw, d) for d in ("outbound", "inbound")
                       for raw in _json_lines(os.path.join(self.log_path, f"access-{d}.log"))]
            return sorted(entries, key=lambda e: float(e["raw"]["ts"]))[since:]
        normalise = _normalise_project if self.kind == "project" else _normalise_haproxy
        return [normalise(raw) for raw in _json_lines(self.log_path)][since:]

    def mark(self) -> int:
        """Position to pass as ``since`` so later calls only see newer connections."""
        return len(self.connections())

    def wait_for(self, predicate: Optional[Callable[[dict], bool]] = None, since: int = 0, count: int = 1,
                 timeout: Optional[float] = None) -> List[dict]:
        """Wait until `count` entries (matching `predicate`) are logged; return them all.

        A sidecar logs a connection when it ends, a moment after the client saw EOF.
        """
        if timeout is None:
            timeout = 10.0 + count / 20  # generous: a loaded 2-core machine delays log lines, not results
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.connections(since) if predicate is None or predicate(e)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def stderr(self) -> str:
        try:
            with open(self.stderr_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 3.0) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __repr__(self) -> str:
        return f"<Sidecar {self.kind} in {self.pod.name} pid={self.process.pid}>"


def _json_lines(path: str) -> List[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue  # HAProxy's own start-up notices share the stream
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line being written right now
    except FileNotFoundError:
        pass
    return out


def _hosts_file(path: str, hosts: Dict[str, str]) -> str:
    with open(path, "w") as f:
        f.writelines(f"{addr} {name}\n" for name, addr in sorted(hosts.items()))
    os.chmod(path, 0o644)
    return path


def start_sidecar(pod: "Pod", kind: str = "project", spec: Optional[InterceptSpec] = None,
                  routes: Optional[Routes] = None, inbound_target: str = "127.0.0.1",
                  timeout: float = 10.0, dns_hosts: Optional[Dict[str, str]] = None, bind: str = "") -> Sidecar:
    if kind not in KINDS:
        raise ValueError(f"unknown sidecar kind {kind!r}; use one of {', '.join(KINDS)}")
    spec = spec or InterceptSpec()
    base = os.path.join(pod.cluster.workdir, f"sidecar-{pod.name}-{kind}-{time.monotonic_ns()}")
    log_path, stderr_path = base + ".log", base + ".stderr"
    config_path = None
    with open(stderr_path, "wb") as err:
        if kind == "project":
            argv = pod.cluster.unprivileged_argv(
                "sidecar", "--outbound-port", str(spec.outbound_port), "--inbound-port", str(spec.inbound_port),
                "--inbound-target", inbound_target, "--log", log_path)
            if bind:
                argv += ["--bind", bind]
            for vip, backends in (routes or {}).items():
                argv += ["--route", f"{vip}={','.join(backends)}"]
            # Opened here so the file exists (and is ours) before the sidecar drops to the proxy UID.
            open(log_path, "a").close()
            os.chown(log_path, spec.proxy_uid, spec.proxy_uid)
            uid = spec.proxy_uid
            if dns_hosts is not None:
                argv += ["--dns-port", str(spec.dns_port), "--dns-hosts", _hosts_file(base + ".hosts", dns_hosts)]
                # Under the NAT modes the forwarder asks conntrack where a UDP query was going, which
                # takes CAP_NET_ADMIN: the proxy UID keeps that one capability (and only that one).
                argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=+net_admin",
                        "--ambient-caps=+net_admin", *argv]
                uid = None
            process = pod.spawn(argv, uid=uid, stdout=subprocess.DEVNULL, stderr=err)
        elif kind == "squid":
            squid = shutil.which("squid") or "/usr/sbin/squid"
            os.mkdir(base, 0o755)
            os.chown(base, spec.proxy_uid, spec.proxy_uid)  # squid writes its logs and pid file here
            config_path, log_path = os.path.join(base, "squid.conf"), base
            with open(config_path, "w") as f:
                f.write(squid_config(spec.outbound_port, spec.inbound_port, base))
            process = pod.spawn([squid, "-N", "-f", config_path], uid=spec.proxy_uid, stdout=subprocess.DEVNULL,
                                stderr=err)
        else:
            haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
            config_path = base + ".cfg"
            with open(config_path, "w") as f:
                f.write(haproxy_config(spec.outbound_port, spec.inbound_port, inbound_target, routes))
            with open(log_path, "ab") as out:
                process = pod.spawn([haproxy, "-db", "-f", config_path], uid=spec.proxy_uid, stdout=out, stderr=err)
    sidecar = Sidecar(kind, pod, spec, process, log_path, stderr_path, config_path)
    try:
        pod.wait_listening(process, (spec.outbound_port, spec.inbound_port), timeout)
    except Exception as exc:  # noqa: BLE001 - re-raised, with the sidecar's own words added
        sidecar.stop()
        raise type(exc)(f"{exc}; {kind} sidecar stderr: {sidecar.stderr().strip()[-2000:]}") from None
    return sidecar


class DnsServer(Sidecar):
    """dnsmasq in a pod; `queries()` are the names it was asked, from its query log."""

    def queries(self) -> List[str]:
        try:
            with open(self.log_path) as f:
                return [line.split("query[", 1)[1].split()[1] for line in f if "query[" in line]
        except FileNotFoundError:
            return []


def start_dns_server(pod: "Pod", hosts: Dict[str, str], port: int = 53, uid: Optional[int] = None,
                     loopback_only: bool = False, timeout: float = 10.0) -> DnsServer:
    """Debian's dnsmasq: answers ``hosts`` and nothing else (no upstream, no /etc/hosts), UDP and TCP."""
    base = os.path.join(pod.cluster.workdir, f"dnsmasq-{pod.name}-{port}-{time.monotonic_ns()}")
    log_path, stderr_path = base + ".log", base + ".stderr"
    open(log_path, "a").close()
    if uid is not None:
        os.chown(log_path, uid, uid)
    argv = [shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--keep-in-foreground", f"--port={port}", "--no-resolv",
            "--no-hosts", f"--addn-hosts={_hosts_file(base + '.hosts', hosts)}", "--log-queries",
            f"--log-facility={log_path}", f"--pid-file={base}.pid"]
    if uid is None:
        argv.append("--user=root")  # started as root, dnsmasq would switch to a user of its own
    if loopback_only:
        argv += ["--listen-address=127.0.0.1,::1", "--bind-interfaces"]
    if uid is not None:
        open(base + ".pid", "a").close()
        os.chown(base + ".pid", uid, uid)
    with open(stderr_path, "wb") as err:
        process = pod.spawn(argv, uid=uid, stdout=subprocess.DEVNULL, stderr=err)
    server = DnsServer("dnsmasq", pod, InterceptSpec(), process, log_path, stderr_path)
    try:
        pod.wait_listening(process, (port,), timeout)
    except Exception as exc:  # noqa: BLE001 - re-raised, with dnsmasq's own words added
        server.stop()
        raise type(exc)(f"{exc}; dnsmasq stderr: {server.stderr().strip()[-2000:]}") from None
    return server
