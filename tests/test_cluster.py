"""Self-tests of the test harness: topology, process placement, sidecars, cleanup, sweep.

The sidecar tests put a throwaway REDIRECT rule set into pod namespaces (a stand-in for a
backend, so the harness is proven independently of the backends it is used to test).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from meshintercept.spec import InterceptSpec
from meshintercept.lab.cluster import (
    BPFFS_ROOT, REGISTRY_DIR, ConnectFailed, TestCluster, ip, sweep,
)
from meshintercept.lab.sidecars import haproxy_config

pytestmark = pytest.mark.root

SPEC = InterceptSpec()
MB = 1 << 20


def throwaway_redirect(pod, spec: InterceptSpec = SPEC) -> None:
    """Minimal REDIRECT interception, legacy iptables, as the mesh init containers do it."""
    out, inb = spec.outbound_port, spec.inbound_port
    rules = [
        f"-A OUTPUT -p tcp -m owner --uid-owner {spec.proxy_uid} -j RETURN",
        "-A OUTPUT -p tcp -d 127.0.0.0/8 -j RETURN",
        f"-A OUTPUT -p tcp -j REDIRECT --to-ports {out}",
        f"-A PREROUTING -p tcp -m multiport ! --dports {out},{inb} -j REDIRECT --to-ports {inb}",
    ]
    for rule in rules:
        proc = pod.run(["iptables-legacy", "-t", "nat", *rule.split()])
        assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def pods(cluster):
    """a, c on node1 and b, d on node2; a and b intercepted by the throwaway rules."""
    made = {name: cluster.add_pod(node, name) for name, node in (("a", 0), ("b", 1), ("c", 0), ("d", 1))}
    for pod in made.values():
        pod.start_server([8080, 9090])
    throwaway_redirect(made["a"])
    throwaway_redirect(made["b"])
    return made


@pytest.fixture(params=["project", "haproxy"])
def sidecars(request, pods):
    started = [pods["a"].start_sidecar(request.param), pods["b"].start_sidecar(request.param)]
    yield started
    for s in started:
        s.stop()


# --- topology ------------------------------------------------------------------------------
def test_pods_reach_each_other_directly_within_and_across_nodes(cluster, pods):
    c, d = pods["c"], pods["d"]
    cross = c.connect(d.ip, 8080, send=b"hi")
    assert cross.greeting()["pod"] == "d"
    assert cross.direct, "nothing sits between pods of this cluster"
    assert cross.trailer()["received"] == 2
    e = cluster.add_pod(1, "e")
    try:
        e.start_server(8080)
        same = d.connect(e.ip, 8080)
        assert same.greeting() == {"pod": "e", "port": 8080, "local": f"{e.ip}:8080", "peer": same.local}
    finally:
        cluster.remove_pod(e)
    assert "e" not in cluster.pods and not os.path.exists(f"/var/run/netns/{cluster.id}-e")


def test_addresses_follow_the_plan(cluster, pods):
    for index, node in enumerate(cluster.nodes):
        assert node.index == index
        assert node.pod_cidr == ipaddress.ip_network(f"10.231.{index + 1}.0/24")
        assert node.netns.name == f"{cluster.id}-node{index + 1}"
        for pod in node.pods:
            assert ipaddress.ip_address(pod.ip) in node.pod_cidr
            assert pod.netns.name == f"{cluster.id}-{pod.name}" and pod.ifname == "eth0"
            assert f"default via {node.gateway} dev eth0" in ip("route", netns=pod.netns.name)
    assert pods["a"].node is cluster.nodes[0] and pods["b"].node is cluster.nodes[1]


def _nsids_of(paths):
    """Inside the calling namespace: {nsid: path} for the namespaces in `paths` (RTM_GETNSID by fd)."""
    RTM_GETNSID, NETNSA_NSID, NETNSA_FD = 90, 1, 3
    out = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        for seq, path in enumerate(paths, 1):
            fd = os.open(path, os.O_RDONLY)
            try:
                body = struct.pack("Bxxx", socket.AF_UNSPEC) + struct.pack("HHI", 8, NETNSA_FD, fd)
                nl.send(struct.pack("IHHII", 16 + len(body), RTM_GETNSID, 1, seq, 0) + body)
                reply = nl.recv(4096)
            finally:
                os.close(fd)
            offset = 16 + 4
            while offset + 4 <= len(reply):
                length, kind = struct.unpack_from("HH", reply, offset)
                if kind == NETNSA_NSID:
                    nsid = struct.unpack_from("i", reply, offset + 4)[0]
                    if nsid >= 0:
                        out[nsid] = path
                offset += (length + 3) & ~3
    return out


def test_every_link_stays_inside_the_cluster(cluster, pods):
    spaces = [n.netns for n in cluster.nodes] + [p.netns for p in cluster.pods.values()]
    ends = []  # (namespace, ifindex, peer namespace, peer ifindex, name) of every veth end
    for space in spaces:
        nsids = space.run(_nsids_of, [s.path for s in spaces if s is not space])
        for link in json.loads(ip("-j", "link", "show", "type", "veth", netns=space.name) or "[]"):
            peer_ns = nsids.get(link.get("link_netnsid"))
            assert peer_ns, f"{space.name}/{link['ifname']} leads outside the cluster"
            ends.append((space.path, link["ifindex"], peer_ns, link["link_index"], link["ifname"]))
    names = [s.name for s in spaces]
    for ns in names:
        for addr in json.loads(ip("-j", "-4", "addr", netns=ns)):
            for info in addr.get("addr_info", []):
                a = ipaddress.ip_address(info["local"])
                assert a.is_loopback or a in ipaddress.ip_network("10.231.0.0/16")
    # Every end's peer is an end in another namespace of this cluster, pointing back.
    for ns, index, peer_ns, peer_index, name in ends:
        partners = [e for e in ends if e[0] == peer_ns and e[1] == peer_index and e[2] == ns and e[3] == index]
        assert len(partners) == 1, f"{ns}/{name} has no partner in the cluster"
    assert len(ends) == 2 * len(cluster.pods) + 2  # each pod's pair, plus the underlay pair
    for node in cluster.nodes:
        assert "default" not in ip("route", netns=node.netns.name)
        proc = subprocess.run(["ip", "-n", node.netns.name, "route", "get", "192.0.2.1"], capture_output=True, text=True)
        assert proc.returncode != 0 and "unreachable" in proc.stderr


def test_spawned_process_joins_node_cgroup_pod_netns_and_uid(cluster, pods):
    pod = pods["c"]
    proc = pod.spawn(["sleep", "30"], uid=1000)
    try:
        # Popen returns after exec, so cgroup, namespace and UID are already final.
        with open(f"/proc/{proc.pid}/cgroup") as f:
            v2 = [line for line in f.read().splitlines() if line.startswith("0::")]
        assert v2 == [f"0::/{os.path.basename(pod.node.cgroup_path)}"]
        assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == pod.netns.inode
        with open(f"/proc/{proc.pid}/status") as f:
            uids = [line.split()[1:] for line in f if line.startswith("Uid:")][0]
        assert uids == ["1000"] * 4
        assert str(proc.pid) in open(os.path.join(pod.node.cgroup_path, "cgroup.procs")).read().split()
    finally:
        proc.kill()
        proc.wait()
    done = pod.run(["id", "-u"], uid=1500)
    assert done.stdout.strip() == "1500"


def test_nodes_carry_their_own_meshintercept_node(cluster):
    seen = set()
    for node in cluster.nodes:
        n = node.node
        assert os.path.dirname(n.cgroup) in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
        assert os.path.basename(n.cgroup).startswith(cluster.id) and os.path.isdir(n.cgroup)
        assert n.pin_dir.startswith(BPFFS_ROOT + "/" + cluster.id)
        assert n.state_dir.startswith("/run/meshintercept/" + cluster.id) and os.path.isdir(n.state_dir)
        assert node.cgroup_path == n.cgroup
        seen.add((n.cgroup, n.pin_dir, n.state_dir))
        assert node.manager().node == n
    assert len(seen) == len(cluster.nodes)


# --- sidecars ------------------------------------------------------------------------------
def test_sidecar_forwards_to_the_original_destination(pods, sidecars):
    a, b = pods["a"], pods["b"]
    side_a, side_b = sidecars
    reply = a.connect(b.ip, 8080, send=b"ping")
    assert not reply.direct
    out = side_a.wait_for(lambda e: e["peer"] == reply.local)
    assert len(out) == 1, side_a.connections()
    assert out[0]["direction"] == "outbound" and out[0]["error"] is None
    assert out[0]["original_dst"] == f"{b.ip}:8080" and out[0]["upstream"] == f"{b.ip}:8080"
    inbound = side_b.wait_for(lambda e: e["peer"] == out[0]["upstream_local"])
    assert len(inbound) == 1, side_b.connections()
    assert inbound[0]["direction"] == "inbound" and inbound[0]["original_dst"] == f"{b.ip}:8080"
    assert inbound[0]["upstream"] == "127.0.0.1:8080"
    # the app saw the sidecar (on loopback), and the half-close crossed both sidecars
    assert reply.greeting()["peer"] == inbound[0]["upstream_local"]
    assert reply.trailer()["received"] == 4
    assert inbound[0]["bytes_up"] == 4 and inbound[0]["bytes_down"] == len(reply)


def test_sidecar_moves_tens_of_megabytes_and_many_connections(pods, sidecars):
    a, b = pods["a"], pods["b"]
    side_a, side_b = sidecars
    result = a.transfer(b.ip, 9090, up=24 * MB, down=24 * MB)
    assert result.intact, result
    assert result.sent == result.received == 24 * MB
    entry = side_a.wait_for(lambda e: e["peer"] == result.local)[0]
    assert entry["original_dst"] == f"{b.ip}:9090"
    assert entry["bytes_up"] > 24 * MB and entry["bytes_down"] > 24 * MB
    mark = side_b.mark()
    summary = a.connect_many(b.ip, 8080, count=300, parallel=60)
    assert summary["ok"] == 300 and summary["failed"] == 0, summary
    assert summary["greetings"] == {"b": 300}
    assert len(side_b.wait_for(lambda e: e["original_dst"] == f"{b.ip}:8080", since=mark, count=300)) == 300


@pytest.mark.parametrize("kind", ["project", "haproxy"])
def test_sidecar_routes_a_service_address_to_its_backends(pods, kind):
    a, c, d = pods["a"], pods["c"], pods["d"]
    vip = "10.231.200.1:8080"
    sidecar = a.start_sidecar(kind, routes={vip: [f"{c.ip}:8080", f"{d.ip}:9090"]})
    try:
        summary = a.connect_many("10.231.200.1", 8080, count=6, parallel=1)
        assert summary["greetings"] == {"c": 3, "d": 3}, summary
        entries = sidecar.wait_for(lambda e: e["original_dst"] == vip, count=6)
        assert {e["upstream"] for e in entries} == {f"{c.ip}:8080", f"{d.ip}:9090"}
        assert all(e["route"] for e in entries)
    finally:
        sidecar.stop()


@pytest.mark.parametrize("kind", ["project", "haproxy"])
def test_sidecar_refuses_a_connection_that_was_not_redirected(pods, kind):
    a = pods["a"]
    sidecar = a.start_sidecar(kind)
    try:
        # The proxy UID is not redirected, so this reaches the listener with itself as the
        # original destination: forwarding it would loop.
        with pytest.raises(ConnectFailed) as failed:
            a.connect(a.ip, SPEC.outbound_port, uid=SPEC.proxy_uid)
        assert failed.value.error in ("ECONNRESET", "EPIPE")
        if kind == "project":
            entry = sidecar.wait_for()[0]
            assert entry["original_dst"] == f"{a.ip}:{SPEC.outbound_port}" and "loop" in entry["error"]
    finally:
        sidecar.stop()


def test_project_sidecar_logs_a_missing_original_destination(pods):
    c, d = pods["c"], pods["d"]  # no NAT rules in d: conntrack has nothing to answer with
    sidecar = d.start_sidecar("project")
    try:
        with pytest.raises(ConnectFailed):
            c.connect(d.ip, SPEC.inbound_port)
        entry = sidecar.wait_for()[0]
        assert entry["original_dst"] is None and entry["error"].startswith("no original destination")
        assert entry["peer"].startswith(c.ip + ":")
    finally:
        sidecar.stop()


def test_sidecars_honour_other_ports_and_uids(pods):
    spec = InterceptSpec(proxy_uid=1600, outbound_port=16001, inbound_port=16003)
    sidecar = pods["c"].start_sidecar("project", spec=spec)
    try:
        with open(f"/proc/{sidecar.pid}/status") as f:
            assert [line.split()[1] for line in f if line.startswith("Uid:")] == ["1600"]
    finally:
        sidecar.stop()
    # Started as root, the sidecar binds, then drops to --uid by itself (how the demo can run it).
    proc = pods["c"].spawn([sys.executable, "-m", "meshintercept.sidecar", "--outbound-port", "17001",
                            "--inbound-port", "17003", "--uid", "1700", "--log", "-"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        pods["c"].wait_listening(proc, (17001, 17003))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/status") as f:
                uids = [line.split()[1:] for line in f if line.startswith("Uid:")][0]
            if uids == ["1700"] * 4:
                break
            time.sleep(0.01)
        assert uids == ["1700"] * 4
    finally:
        proc.terminate()
        assert proc.wait(5) == 0, "SIGTERM is a clean stop"
    config = haproxy_config(16001, 16003)
    assert "bind :16001" in config and "bind :16003" in config and "server original 0.0.0.0\n" in config


# --- cleanup ---------------------------------------------------------------------------------
def _objects_of(cluster_id: str) -> list:
    found = []
    for d in ("/var/run/netns", "/sys/fs/cgroup/unified", "/sys/fs/cgroup", BPFFS_ROOT, "/run/meshintercept",
              REGISTRY_DIR, "/tmp"):
        try:
            found += [os.path.join(d, n) for n in os.listdir(d) if n.startswith(cluster_id)]
        except (FileNotFoundError, NotADirectoryError):
            pass
    return found


def test_close_leaves_nothing_behind(make_cluster):
    cluster = make_cluster(nodes=3)
    pods = [cluster.add_pod(i, f"p{i}") for i in range(3)]
    for pod in pods:
        pod.start_server(8080)
    sidecar = pods[0].start_sidecar("haproxy")
    assert pods[0].connect(pods[2].ip, 8080).greeting()["pod"] == "p2"  # across the underlay bridge
    pids = [p.pid for p in cluster._processes] + [sidecar.pid]
    before = _objects_of(cluster.id)
    assert any("/var/run/netns/" in o for o in before) and any("cgroup" in o for o in before)
    cluster.close()
    cluster.close()  # idempotent
    assert _objects_of(cluster.id) == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} survived"


def test_a_failed_build_cleans_up_after_itself(test_prefix, monkeypatch):
    import meshintercept.lab.cluster as mod

    real = mod.TestCluster._link_nodes
    seen = {}

    def broken(self):
        seen["id"] = self.id
        real(self)
        raise RuntimeError("boom")

    monkeypatch.setattr(mod.TestCluster, "_link_nodes", broken)
    with pytest.raises(RuntimeError, match="boom"):
        TestCluster(nodes=2, prefix=test_prefix)
    assert seen["id"] and _objects_of(seen["id"]) == []


SURVIVOR = """
import sys, time
from meshintercept.lab.cluster import TestCluster
c = TestCluster(nodes=2, prefix=sys.argv[1])
pod = c.add_pod(0, "x")
server = pod.start_server(8080)
print(c.id, server.process.pid, flush=True)
time.sleep(600)
"""


def test_sweep_removes_leftovers_of_a_killed_run_only(test_prefix):
    prefix = test_prefix + "-sw"  # its own prefix: sweeping must not touch this session's clusters
    owner = subprocess.Popen([sys.executable, "-c", SURVIVOR, prefix], stdout=subprocess.PIPE, text=True)
    try:
        cluster_id, server_pid = owner.stdout.readline().split()
        assert len(_objects_of(cluster_id)) >= 6
        assert sweep(prefix) == [], "a cluster whose owner still runs is left alone"
        assert os.path.exists(f"/var/run/netns/{cluster_id}-x")
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert os.path.exists(f"/proc/{server_pid}"), "the orphaned server outlives its owner"
    removed = sweep(prefix)
    assert f"netns {cluster_id}-x" in removed
    assert _objects_of(cluster_id) == []
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{server_pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{server_pid}")
    cli = subprocess.run([sys.executable, "-m", "meshintercept.lab.cluster", "sweep", "--prefix", prefix],
                         capture_output=True, text=True)
    assert cli.returncode == 0 and "nothing to sweep" in cli.stdout
