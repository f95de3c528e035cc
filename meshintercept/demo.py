"""`meshintercept demo`: the seed's walk-through (osm-edge eBPF demo) on one machine.

Two nodes made of network namespaces, a client pod ``curl`` and ``pipy-ok`` v1 (same node)
and v2 (other node). Every pod has the project's sidecar running as the proxy UID; the
client's sidecar routes the service address to both versions. Interception is enabled in
all three pods with the chosen mode, the client calls the service twice over IPv4 and
twice over IPv6 and both versions answer each time; the sidecars' logs show the path each call
took. With ``capture_dns`` the client's DNS goes to its sidecar too, which alone knows the
service's name: the libc resolver, asking a cluster DNS address where nothing listens, gets the
service address from the sidecar, and the client calls the service by name. Everything is torn
down at the end, also on Ctrl-C, and nothing is ever attached to the machine's root cgroup.
"""

from __future__ import annotations

import time
from typing import Callable

from meshintercept.spec import InterceptSpec

SERVICE_IP = "10.231.200.1"
SERVICE_IP6 = "fd00:231:200::1"
SERVICE_PORT = 8080
APP_PORT = 8080
#: The name only the client's sidecar answers, and the pod's nameserver: a cluster DNS address
#: (kube-dns's role) where nothing listens, so an answer can only come from the sidecar.
SERVICE_NAME = "pipy-ok.mesh"
CLUSTER_DNS = "10.231.200.53"


def _body(raw: bytes) -> str:
    head, _, body = raw.partition(b"\r\n\r\n")
    return (body or head).decode(errors="replace").strip()


def _nonzero(counters: dict) -> str:
    """Counters worth showing: eBPF's flat ones, or iptables' per-chain packet counts."""
    parts = []
    for key, value in counters.items():
        if isinstance(value, dict):
            value = value.get("packets", 0)
            key = f"{key} packets"
        if value:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _path_line(pod: str, entry: dict) -> str:
    if entry["direction"] == "dns":
        return (f"  {pod:<11} dns      {entry['transport']} from {entry['peer']} {entry['name']}: "
                f"answered {entry['answered']}")
    return (f"  {pod:<11} {entry['direction']:<8} from {entry['peer']} original dst {entry['original_dst']}"
            f" -> {entry['upstream']}")


def _resolve_and_call(client, echo: Callable[[str], None]) -> tuple:
    """getent hosts SERVICE_NAME with CLUSTER_DNS as the pod's nameserver, then the service by name:
    (the address the resolver got or None, the answer's body or None)."""
    echo(f"\n$ getent hosts {SERVICE_NAME}    # from pod curl; resolv.conf: nameserver {CLUSTER_DNS} "
         "(nothing listens there)")
    proc = client.resolve(SERVICE_NAME, CLUSTER_DNS)
    fields = proc.stdout.split()
    echo(proc.stdout.strip() or f"(no answer, exit {proc.returncode})")
    if not fields:
        return None, None
    echo(f"$ curl -s http://{SERVICE_NAME}:{SERVICE_PORT}/")
    body = _body(client.connect(fields[0], SERVICE_PORT, send=b"GET / HTTP/1.0\r\nHost: pipy-ok\r\n\r\n"))
    echo(body)
    return fields[0], body


def run_demo(mode: str, keep: bool = False, echo: Callable[[str], None] = print, capture_dns: bool = False) -> list:
    from meshintercept import registry
    from meshintercept.manager import require_root
    from meshintercept.lab.cluster import DEMO_PREFIX, TestCluster

    registry.require(mode)
    require_root("the demo")
    spec = InterceptSpec()
    client_spec = InterceptSpec.build(capture_dns=True) if capture_dns else spec
    answers = []
    resolved = by_name = None
    echo(f"meshintercept demo: mode {mode}" + (", --capture-dns in pod curl" if capture_dns else ""))
    with TestCluster(nodes=2, prefix=DEMO_PREFIX) as cluster:
        node1, node2 = cluster.nodes
        for n in cluster.nodes:
            echo(f"  {n.name}: pods {n.pod_cidr}, cgroup {n.node.cgroup}, pin dir {n.node.pin_dir}")
        client = cluster.add_pod(node1, "curl")
        v1 = cluster.add_pod(node1, "pipy-ok-v1")
        v2 = cluster.add_pod(node2, "pipy-ok-v2")
        for pod, version in ((v1, "v1"), (v2, "v2")):
            pod.start_server(APP_PORT, reply=f"Hi, I am pipy ok {version} !\n", mode="http")
        echo(f"  pods: curl {client.ip} {client.ip6} ({node1.name}), pipy-ok-v1 {v1.ip} {v1.ip6} ({node1.name}), "
             f"pipy-ok-v2 {v2.ip} {v2.ip6} ({node2.name})")
        service = f"{SERVICE_IP}:{SERVICE_PORT}"
        service6 = f"[{SERVICE_IP6}]:{SERVICE_PORT}"
        routes = {service: [f"{v1.ip}:{APP_PORT}", f"{v2.ip}:{APP_PORT}"],
                  service6: [f"[{v1.ip6}]:{APP_PORT}", f"[{v2.ip6}]:{APP_PORT}"]}
        sidecars = {
            "curl": client.start_sidecar("project", client_spec, routes=routes,
                                         dns_hosts={SERVICE_NAME: SERVICE_IP} if capture_dns else None),
            "pipy-ok-v1": v1.start_sidecar("project", spec),
            "pipy-ok-v2": v2.start_sidecar("project", spec),
        }
        echo(f"  sidecars: uid {spec.proxy_uid}, outbound :{spec.outbound_port}, inbound :{spec.inbound_port}; "
             f"service pipy-ok {service} and {service6} -> v1, v2"
             + (f"; pod curl's sidecar answers DNS on :{client_spec.dns_port} ({SERVICE_NAME} -> {SERVICE_IP})"
                if capture_dns else ""))
        for pod in (client, v1, v2):
            pod_spec = client_spec if pod is client else spec
            result = pod.node.manager().enable(pod.netns.path, mode, pod_spec)
            echo(f"  enable --mode {mode} --netns {pod.netns.name}: {result['elapsed_ms']:.1f} ms")

        for address, shown in ((SERVICE_IP, service), (SERVICE_IP6, service6)):
            echo(f"\n$ curl -s http://{shown}/    # twice, from pod curl")
            for _ in range(2):
                raw = client.connect(address, SERVICE_PORT, send=b"GET / HTTP/1.0\r\nHost: pipy-ok\r\n\r\n")
                answers.append(_body(raw))
                echo(answers[-1])
        if capture_dns:
            resolved, by_name = _resolve_and_call(client, echo)

        echo("\npath, from the sidecars' logs (each read the original destination with SO_ORIGINAL_DST):")
        time.sleep(0.2)  # sidecars log a connection when it has closed
        for name, sidecar in sidecars.items():
            for entry in sidecar.connections():
                echo(_path_line(name, entry))
        echo(f"\nkernel counters ({mode}), from 'meshintercept status':")
        for pod in (client, v1, v2):
            items = pod.node.manager().status(pod.netns.path)["namespaces"]
            counters = items[0].get("live", {}).get("counters", {}) if items else {}
            echo(f"  {pod.name:<11} {_nonzero(counters) or 'no counters'}")
        if keep:
            input("\ncluster is up; press Enter to tear it down ")
        echo("\ntearing down")
        for n in cluster.nodes:
            n.manager().disable_all()
    echo("done: namespaces, cgroups, pins and processes removed")
    expected = {"Hi, I am pipy ok v1 !", "Hi, I am pipy ok v2 !"}
    if set(answers[:2]) != expected or set(answers[2:]) != expected:
        from meshintercept.errors import BackendFailure

        raise BackendFailure(f"the demo expected answers from v1 and v2 over IPv4 and over IPv6 but got {answers!r}; "
                             "run 'meshintercept doctor'.")
    if capture_dns and (resolved != SERVICE_IP or not (by_name or "").startswith("Hi, I am pipy ok")):
        from meshintercept.errors import BackendFailure

        raise BackendFailure(f"the demo expected pod curl's sidecar to resolve {SERVICE_NAME} to {SERVICE_IP} and the "
                             f"service to answer by name, but the resolver got {resolved!r}; run 'meshintercept doctor'.")
    return answers
