"""What the ebpf mode must show, on the shared 2-node test cluster with real programs.

node1: client, server, bystander (all in node1's child cgroup)    node2: remote
Every pod runs test servers on 8080/9090 and the project's sidecar as the proxy UID.
"""

import collections
import json
import os
import re
import time

import pytest

from meshintercept.backends.ebpf import bpfsys
from meshintercept.spec import InterceptSpec
from meshintercept.lab.cluster import TestCluster

from meshintercept.backends.ebpf import maps as ebpf_maps
from meshintercept.backends.ebpf import tc as ebpf_tc
from meshintercept.backends.ebpf.pins import PROGRAMS, NodePins

pytestmark = [pytest.mark.ebpf, pytest.mark.root]

APP, OTHER = 8080, 9090
MB = 1 << 20


@pytest.fixture(scope="module")
def world(test_prefix):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with TestCluster(nodes=2, prefix=test_prefix) as cluster:
        pods = {}
        for name, node in (("client", 0), ("server", 0), ("bystander", 0), ("remote", 1)):
            pod = cluster.add_pod(node, name)
            pod.start_server([APP, OTHER])
            pod.sidecar = pod.start_sidecar("project", spec=InterceptSpec())
            pods[name] = pod
        yield cluster, pods
        for node in cluster.nodes:
            node.manager().disable_all()


@pytest.fixture(autouse=True)
def _clean(world):
    yield
    cluster, pods = world
    for node in cluster.nodes:
        manager = node.manager()
        for record in manager.records():
            manager.disable(record.path)


def enable(pod, **spec):
    if spec.get("inbound_path") == "tc":  # IPv4 only: the dual-stack pods are intercepted for IPv4
        spec.setdefault("families", ["ipv4"])
    return pod.node.manager().enable(pod.netns.name, "ebpf", InterceptSpec.build(**spec))


def counters(pod):
    return pod.node.manager().status(pod.netns.name)["namespaces"][0]["live"]["counters"]


def conn_entries(pod) -> int:
    with NodePins(pod.node.node.pin_dir) as pins:
        return ebpf_maps.count_entries(pins, "origdst") if pins.loaded() else 0


#: Kernel counters that name where a SYN can be dropped between two pods: IP forwarding in the
#: node namespaces, neighbour resolution, the listener's SYN/accept queues, the receive path.
DROP_COUNTERS = (
    "IpInDiscards", "IpInHdrErrors", "IpInAddrErrors", "IpOutDiscards", "IpOutNoRoutes", "IpFragFails",
    "TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPBacklogDrop", "TcpExtTCPReqQFullDrop",
    "TcpExtTCPReqQFullDoCookies", "TcpExtSyncookiesSent", "TcpExtTCPTimeWaitOverflow", "TcpExtTW",
    "TcpExtTWRecycled", "TcpExtPAWSEstab", "TcpExtTCPMinTTLDrop", "TcpAttemptFails", "TcpRetransSegs",
    "TcpExtTCPSynRetrans", "TcpExtTCPRcvQDrop", "TcpExtTCPZeroWindowDrop",
)


def drop_counters(place) -> dict:
    """The non-zero DROP_COUNTERS of a node or pod namespace (nstat, not touching its history)."""
    out = place.run(["nstat", "-a", "-z", "-s", "--json"], timeout=10)
    try:
        values = json.loads(out.stdout)["kernel"]
    except (ValueError, KeyError):
        return {"nstat": out.stderr.strip() or out.stdout[:200]}
    found = {k: v for k, v in values.items()
             if v and (k in DROP_COUNTERS or re.search(r"Fail|Drop|Discard|Spurious|Overflow|Err|Forw|InReceives|OutRequests|ActiveOpens", k))}
    neigh = place.run(["ip", "-4", "neigh", "show", "nud", "failed"], timeout=10).stdout.strip()
    if neigh:
        found["neigh_failed"] = neigh
    # Drops no SNMP counter sees: unresolved neighbours, conntrack, device queues.
    for table, columns in (("arp_cache", ("unresolved_discards", "table_fulls")),
                           ("nf_conntrack", ("invalid", "insert_failed", "drop", "early_drop"))):
        text = place.run(["cat", f"/proc/net/stat/{table}"], timeout=10).stdout.split("\n")
        if len(text) > 1:
            head = text[0].split()
            for col in columns:
                if col in head:
                    i = head.index(col)
                    total = sum(int(row.split()[i], 16) for row in text[1:] if len(row.split()) > i)
                    if total:
                        found[f"{table}.{col}"] = total
    links = place.run(["ip", "-s", "-j", "link", "show"], timeout=10).stdout
    try:
        for link in json.loads(links):
            stats = link.get("stats64", {})
            for way in ("rx", "tx"):
                if stats.get(way, {}).get("dropped"):
                    found[f"{link['ifname']}.{way}_dropped"] = stats[way]["dropped"]
    except ValueError:
        pass
    for link in json.loads(links or "[]"):
        if link.get("ifname") in ("br0", "eth0"):
            found[f"{link['ifname']}.mac"] = link.get("address")
    with open("/proc/net/softnet_stat") as f:  # machine-wide, per CPU
        backlog = sum(int(row.split()[1], 16) for row in f if row.strip())
    if backlog:
        found["softnet_dropped"] = backlog
    return found


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.parametrize("path", ["sk_lookup", "tc"])
def test_inbound_same_node_and_cross_node_reach_the_app_through_the_destination_sidecar(world, path):
    cluster, p = world
    client, server, remote = p["client"], p["server"], p["remote"]
    for pod in (client, server, remote):
        enable(pod, inbound_path=path)
    counted = {"tc": ("inbound_same_node", "inbound_cross_node"), "sk_lookup": ("inbound_steered",) * 2}[path]
    for target, counter in zip((server, remote), counted):
        mark_out, mark_in = client.sidecar.mark(), target.sidecar.mark()
        reply = client.connect(target.ip, APP, send=b"hi")
        out = client.sidecar.wait_for(lambda e, local=reply.local: e["peer"] == local, since=mark_out)
        assert out and out[0]["original_dst"] == f"{target.ip}:{APP}"
        inbound = target.sidecar.wait_for(lambda e: e["direction"] == "inbound", since=mark_in)
        assert inbound and inbound[0]["original_dst"] == f"{target.ip}:{APP}", inbound
        assert reply.greeting()["pod"] == target.name
        assert reply.greeting()["peer"] == inbound[0]["upstream_local"]  # the app saw its own sidecar
        assert counters(target)[counter] == 1, counters(target)
        assert counters(target)["origdst_answers"] >= 1
    assert counters(client)["redirected_out"] == 2
    if path == "tc":  # the path the programs took differs: same-node by connect4, cross-node by tc
        assert counters(server)["inbound_cross_node"] == 0
        assert counters(remote)["inbound_same_node"] == 0
    else:  # one path for both, and it leaves no entry behind
        assert counters(server)["inbound_same_node"] == counters(remote)["inbound_cross_node"] == 0


def test_managed_and_unmanaged_namespaces_in_the_same_cgroup(world):
    cluster, p = world
    client, bystander, remote = p["client"], p["bystander"], p["remote"]
    assert client.node is bystander.node  # same node => same cgroup, same programs
    enable(client)
    mark = bystander.sidecar.mark()
    direct = bystander.connect(remote.ip, APP)
    assert direct.direct
    assert bystander.sidecar.connections(mark) == []
    proxied = client.connect(remote.ip, APP)
    assert not proxied.direct
    dump = ebpf_maps.dump(client.node.node, client.node.manager().records())
    assert [row["namespace"] for row in dump["config"]] == [client.netns.name]
    assert {row["ip"] for row in dump["podip"]} == {client.ip, client.ip6}


@pytest.mark.parametrize("path", ["sk_lookup", "tc"])
@pytest.mark.parametrize("kind", ["project", "haproxy"])
def test_accelerate_moves_payload_socket_to_socket_and_keeps_it_intact(world, kind, path):
    """Both directions, multi-MB, checksummed, through two accelerated pairs
    (app <-> own sidecar on loopback, sidecar -> other pod's sidecar across namespaces),
    with the project's event-driven sidecar and with HAProxy. A sidecar that reads with
    splice(2) hangs here (docs/ebpf.md, "--accelerate").
    """
    cluster, p = world
    if kind == "project":
        client, server = p["client"], p["server"]
    else:
        client = p.get("haclient") or cluster.add_pod(0, "haclient")
        server = p.get("haserver") or cluster.add_pod(0, "haserver")
        for pod in (client, server):
            if not getattr(pod, "sidecar", None):
                pod.start_server([APP, OTHER])
                pod.sidecar = pod.start_sidecar("haproxy", spec=InterceptSpec())
                p[pod.name] = pod
    enable(client, accelerate=True, inbound_path=path)
    enable(server, accelerate=True, inbound_path=path)
    record = client.node.manager().record(client.netns)
    assert record.extra["accelerate"] is True, record.extra.get("warnings")
    c0, s0 = counters(client), counters(server)
    mark = client.sidecar.mark()
    for _ in range(3):
        transfer = client.transfer(server.ip, OTHER, up=8 * MB, down=8 * MB, timeout=30)
        assert transfer.intact, transfer
        assert transfer.sent == transfer.received == 8 * MB
    c, s = counters(client), counters(server)
    # app -> sidecar and sidecar -> app in the client pod, sidecar <-> sidecar to the server:
    # every payload byte of both directions went socket to socket at least once.
    assert c["msg_redirect_bytes"] - c0["msg_redirect_bytes"] >= 3 * 2 * 8 * MB, (c0, c)
    assert s["msg_redirect_bytes"] - s0["msg_redirect_bytes"] >= 3 * 8 * MB, (s0, s)
    assert c["map_errors"] == s["map_errors"] == 0
    out = client.sidecar.wait_for(lambda e: e["direction"] == "outbound", since=mark, count=3)
    assert len(out) == 3 and all(e["error"] is None for e in out), out


@pytest.mark.parametrize("path", ["sk_lookup", "tc"])
def test_per_connection_maps_do_not_grow_after_10000_connections(world, path):
    cluster, p = world
    client, server, remote = p["client"], p["server"], p["remote"]
    for pod in (client, server, remote):
        enable(pod, inbound_path=path)
    before = {node.name: None for node in cluster.nodes}
    for node, pod in ((client.node, client), (remote.node, remote)):
        before[node.name] = conn_entries(pod)
    base = {pod.name: counters(pod) for pod in (server, remote)}
    results = [
        client.connect_many(server.ip, APP, count=4000, parallel=40),   # outbound + same-node inbound
        client.connect_many(remote.ip, APP, count=3000, parallel=40),   # outbound + cross-node inbound
        p["bystander"].connect_many(server.ip, OTHER, count=3000, parallel=40),  # unmanaged -> inbound
    ]
    # Seen twice on a loaded machine: a ~25 s stall of the node-to-node link in which cross-node
    # SYNs never reached the remote pod (its tc counter shows no attempt at all). The point here
    # is the maps after 10,000 connections, so top up what a stall lost (bounded), and report it.
    ok = sum(r["ok"] for r in results)
    if ok < 10000:
        # Where did the lost SYNs die? Printed so a rare occurrence leaves evidence behind.
        print("hygiene: lost", 10000 - ok, [(r["ok"], r["failed"], r.get("errors")) for r in results],
              {place.name: drop_counters(place) for place in (*cluster.nodes, client, remote)},
              "remote counters", counters(remote),
              "failed sidecar entries (sample)", [
                  {k: e.get(k) for k in ("peer", "original_dst", "upstream", "upstream_local", "error", "ts")}
                  for e in client.sidecar.connections() if e.get("error")][:5],
              "neighbours", {place.name: place.run(["ip", "-4", "neigh"], timeout=10).stdout
                             for place in (*cluster.nodes, client, remote)})
    if path == "sk_lookup":  # no packet rewritten, nothing remembered per flow: nothing may be lost
        assert ok == 10000 and sum(r["failed"] for r in results) == 0, (
            [(r["ok"], r["failed"], r.get("errors")) for r in results], counters(server), counters(remote))
    for _ in range(2):
        if ok >= 10000:
            break
        extra = client.connect_many(remote.ip, APP, count=10000 - ok, parallel=40)
        results.append(extra)
        ok += extra["ok"]
    sidecar_errors = collections.Counter(
        (pod.name, e.get("error")) for pod in (client, server, remote) for e in pod.sidecar.connections() if e.get("error"))
    if sidecar_errors:
        print("connections lost and replaced:", dict(sidecar_errors))
    assert ok >= 10000 and sum(r["failed"] for r in results) <= 1000, (
        [(r["ok"], r["failed"], r.get("errors")) for r in results], sidecar_errors, counters(remote))
    assert wait_until(lambda: conn_entries(client) <= before[client.node.name], timeout=15), conn_entries(client)
    assert wait_until(lambda: conn_entries(remote) <= before[remote.node.name], timeout=15), conn_entries(remote)
    grew = {pod.name: {k: v - base[pod.name][k] for k, v in counters(pod).items()} for pod in (server, remote)}
    if path == "sk_lookup":
        assert grew[server.name]["inbound_steered"] == 7000 and grew[remote.name]["inbound_steered"] == 3000, grew
        assert grew[server.name]["inbound_refused"] == grew[remote.name]["inbound_refused"] == 0, grew
        return
    assert grew[server.name]["inbound_same_node"] >= 4000
    assert grew[server.name]["inbound_cross_node"] >= 3000
    assert grew[remote.name]["inbound_cross_node"] >= 3000 - sum(r["failed"] for r in results)


def test_disable_all_leaves_no_pin_attachment_filter_or_qdisc(world):
    cluster, p = world
    client, server, remote = p["client"], p["server"], p["remote"]
    enable(client, inbound_path="tc")
    enable(server)  # the sk_lookup path: a netns link
    enable(remote)
    node = client.node
    pin_dir, cgroup = node.node.pin_dir, node.node.cgroup
    assert os.listdir(pin_dir)
    state = ebpf_tc.status(client.netns)["eth0"]
    assert state["ingress"] and state["egress"]
    tcx_pins = [e for e in client.node.manager().record(client.netns).extra["tc"] if e.get("tcx")]
    if tcx_pins:  # kernel >= 6.6: pinned tcx links, no qdisc of ours
        assert state.get("tcx") and not state["clsact"]
        assert all(os.path.exists(p) for e in tcx_pins for p in e["pins"].values())
    lookup_link = client.node.manager().record(server.netns).extra["lookup_link"]
    assert os.path.exists(lookup_link)
    program_ids = [p["id"] for p in ebpf_maps.node_status(node.node)["programs"].values()]
    assert len(program_ids) == len(PROGRAMS)
    node.manager().disable_all()
    assert not os.path.exists(pin_dir)

    def freed(prog_id):
        try:
            bpfsys.close(bpfsys.prog_fd_by_id(prog_id))
            return False
        except OSError:
            return True

    # nothing holds our programs any more: the kernel frees them (after an RCU grace period)
    assert wait_until(lambda: all(freed(i) for i in program_ids)), program_ids
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for attach in (bpfsys.BPF_CGROUP_INET4_CONNECT, bpfsys.BPF_CGROUP_INET6_CONNECT, bpfsys.BPF_CGROUP_SOCK_OPS,
                       bpfsys.BPF_CGROUP_GETSOCKOPT):
            assert bpfsys.prog_query(fd, attach) == []
    finally:
        os.close(fd)
    # no tcx link or filter of ours, and the clsact we made (fallback path) is gone
    assert ebpf_tc.status(client.netns) == {}
    # no sk_lookup program on the server's namespace any more
    ns_fd = os.open(server.netns.path, os.O_RDONLY)
    try:
        assert bpfsys.prog_query(ns_fd, bpfsys.BPF_SK_LOOKUP) == []
    finally:
        os.close(ns_fd)
    # the other node is untouched until its own disable --all
    assert os.listdir(remote.node.node.pin_dir)
    remote.node.manager().disable_all()
    assert not os.path.exists(remote.node.node.pin_dir)
    assert ebpf_tc.status(remote.netns) == {}
    # and traffic is direct again
    assert client.connect(remote.ip, APP).direct
    assert client.connect(server.ip, APP).direct
