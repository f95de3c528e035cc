"""The sk_lookup inbound path (the ebpf mode's default), on a 2-node lab cluster, for real.

node1: server, client, bystander          node2: remote
Every pod runs test servers on 8080/9090 and the project's sidecar as the proxy UID.

What it must show (issue 12): inbound to a managed pod reaches its sidecar through an sk_lookup
link on the pod's namespace, with no tc object of ours on its interfaces and no per-connection
map entry; it fails closed while no inbound listener exists; a sidecar that (re)starts after
enable is picked up by the listen callback, one listening before enable by the /proc scan;
established connections run no eBPF program per packet.
"""

import contextlib
import os
import time

import pytest

from meshintercept.backends.ebpf import bpfsys
from meshintercept.backends.ebpf import maps as ebpf_maps
from meshintercept.backends.ebpf import tc as ebpf_tc
from meshintercept.backends.ebpf.pins import NodePins
from meshintercept.errors import UsageError
from meshintercept.lab.cluster import BASE_PYTHON, ConnectFailed, TestCluster
from meshintercept.spec import InterceptSpec

pytestmark = [pytest.mark.ebpf, pytest.mark.root]

APP, OTHER = 8080, 9090


@pytest.fixture(scope="module")
def world(test_prefix):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with TestCluster(nodes=2, prefix=test_prefix) as cluster:
        pods = {}
        for name, node in (("server", 0), ("client", 0), ("bystander", 0), ("remote", 1)):
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
    for pod in pods.values():
        if not pod.sidecar.running():
            pod.sidecar = pod.start_sidecar("project", spec=InterceptSpec())


def enable(pod, **spec):
    if spec.get("inbound_path") == "tc":  # IPv4 only: the dual-stack pods are intercepted for IPv4
        spec.setdefault("families", ["ipv4"])
    return pod.node.manager().enable(pod.netns.name, "ebpf", InterceptSpec.build(**spec))


def live(pod):
    return pod.node.manager().status(pod.netns.name)["namespaces"][0]["live"]


def inbound_entries(pod, since):
    return [e for e in pod.sidecar.connections(since) if e["direction"] == "inbound"]


def test_inbound_is_steered_by_a_netns_link_with_no_tc_object_and_no_connection_entry(world):
    cluster, p = world
    server = p["server"]
    record_extra = None
    enable(server)
    record_extra = server.node.manager().record(server.netns).extra
    assert record_extra["inbound_path"] == "sk_lookup" and record_extra["tc"] == []
    # found at enable: the project sidecar's one dual-stack listener
    assert record_extra["listeners"] == [{"pid": server.sidecar.pid, "family": 6}]
    link = record_extra["lookup_link"]
    fd = bpfsys.obj_get(link)
    try:
        info = bpfsys.link_info(fd)
    finally:
        bpfsys.close(fd)
    assert info["type"] == bpfsys.BPF_LINK_TYPE_NETNS and info["netns_ino"] == server.netns.inode
    assert info["attach_type"] == bpfsys.BPF_SK_LOOKUP
    assert ebpf_tc.status(server.netns) == {}, "no qdisc, filter or tcx link of ours on the pod's interfaces"
    mark = server.sidecar.mark()
    for src in (p["bystander"], p["remote"]):
        reply = src.connect(server.ip, APP, send=b"in")
        assert not reply.direct and reply.greeting()["pod"] == "server"
        assert reply.greeting()["peer"].startswith("127.0.0.1:")  # the app saw its sidecar
        [entry] = server.sidecar.wait_for(lambda e, local=reply.local: e["peer"] == local, since=mark)
        assert entry["original_dst"] == f"{server.ip}:{APP}" and entry["error"] is None
        # the sidecar's accepted socket has the original destination as its own address
        assert entry["local"] == f"{server.ip}:{APP}"
    counters = live(server)["counters"]
    assert counters["inbound_steered"] == 2 and counters["inbound_refused"] == 0
    assert counters["origdst_answers"] == 2
    assert counters["inbound_cross_node"] == counters["inbound_same_node"] == 0
    with NodePins(server.node.node.pin_dir) as pins:
        assert ebpf_maps.count_entries(pins, "origdst") == 0, "inbound needs no per-connection entry"


def test_inbound_fails_closed_without_a_listener_and_a_restarted_sidecar_is_picked_up(world):
    cluster, p = world
    server, bystander, remote = p["server"], p["bystander"], p["remote"]
    enable(server)
    server.sidecar.stop()
    app_seen = []
    for src in (bystander, remote):
        with pytest.raises(ConnectFailed) as failed:
            app_seen.append(src.connect(server.ip, APP))
        assert failed.value.error == "ECONNREFUSED"
    assert app_seen == []
    status = live(server)
    assert status["in_place"] and status["lookup"] == {"link": True, "listeners": []}
    assert "refused" in status["note"]
    assert status["counters"]["inbound_refused"] == 2
    server.sidecar = server.start_sidecar("project", spec=InterceptSpec())  # listen() -> sockops registers it
    reply = bystander.connect(server.ip, APP)
    assert not reply.direct
    after = live(server)
    assert after["lookup"]["listeners"] == ["AF_INET6"] and after["counters"]["listeners"] == 1


def test_a_sidecar_started_after_enable_is_registered_by_the_listen_callback(world):
    cluster, p = world
    server, remote = p["server"], p["remote"]
    server.sidecar.stop()
    enable(server)
    assert server.node.manager().record(server.netns).extra["listeners"] == []
    server.sidecar = server.start_sidecar("project", spec=InterceptSpec())
    reply = remote.connect(server.ip, APP)
    assert not reply.direct
    assert live(server)["counters"]["listeners"] == 1


def test_inbound_exclusions_inclusions_and_the_proxy_ports(world):
    cluster, p = world
    server, src = p["server"], p["remote"]
    enable(server, exclude_inbound_ports=[OTHER])
    mark = server.sidecar.mark()
    assert src.connect(server.ip, OTHER).direct
    assert not src.connect(server.ip, APP).direct
    enable(server, include_inbound_ports=[OTHER])
    assert src.connect(server.ip, APP).direct
    assert not src.connect(server.ip, OTHER).direct
    # the sidecar's own outbound port is reached as itself, never steered to the inbound one
    with contextlib.suppress(ConnectFailed):
        src.connect(server.ip, 15001)
    own = [e for e in server.sidecar.wait_for(lambda e: e["local"] == f"{server.ip}:15001", since=mark)]
    assert own and own[0]["direction"] == "outbound"
    assert {e["original_dst"] for e in inbound_entries(server, mark)} == {f"{server.ip}:{APP}", f"{server.ip}:{OTHER}"}


def test_the_pod_reaching_its_own_address_is_not_steered_back_into_its_sidecar(world):
    """Loopback is skipped: the sidecar's connection to its own app on the pod address (the
    proxy UID to its own pod is never redirected) must reach the app, not loop."""
    cluster, p = world
    server = p["server"]
    enable(server)
    mark = server.sidecar.mark()
    reply = server.connect(server.ip, APP)  # the app: outbound to its sidecar, which dials the pod address
    assert reply.greeting()["pod"] == "server"
    entries = server.sidecar.wait_for(since=mark)
    assert [e["direction"] for e in entries] == ["outbound"] and entries[0]["error"] is None
    own = server.connect(server.ip, APP, uid=1500)  # the proxy UID itself: straight to the app
    assert own.direct


def test_switching_between_the_inbound_paths_moves_the_attachment(world):
    cluster, p = world
    server, src = p["server"], p["remote"]
    enable(server, inbound_path="tc")
    extra = server.node.manager().record(server.netns).extra
    assert extra["lookup_link"] is None and ebpf_tc.status(server.netns)["eth0"]["ingress"]
    assert not src.connect(server.ip, APP).direct
    enable(server)
    extra = server.node.manager().record(server.netns).extra
    assert os.path.exists(extra["lookup_link"]) and ebpf_tc.status(server.netns) == {}
    assert not src.connect(server.ip, APP).direct
    enable(server, inbound_path="tc")
    assert not os.path.exists(extra["lookup_link"])
    assert not src.connect(server.ip, APP).direct
    assert live(server)["inbound_path"] == "tc"


def _program_runs(pin_dir):
    with NodePins(pin_dir) as pins:
        return {name: bpfsys.prog_info(pins.prog(name))["run_cnt"]
                for name in ("lookup", "sockops", "getsockopt", "connect4", "connect6", "tc_ingress", "tc_egress")}


PINGPONG = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.recv(4096)                     # the test server's greeting line
print("ready", flush=True)
sys.stdin.readline()             # established: the test counts program runs from here
for _ in range(int(sys.argv[3])):
    s.sendall(b"x" * 512)
    time.sleep(0.001)
print("sent", flush=True)
sys.stdin.readline()
s.close()
"""


def test_an_established_inbound_connection_runs_no_program_per_packet(world):
    cluster, p = world
    server, remote = p["server"], p["remote"]
    enable(server)
    stats = "/proc/sys/kernel/bpf_stats_enabled"
    old = open(stats).read().strip()
    with open(stats, "w") as f:
        f.write("1")
    script = os.path.join(cluster.workdir, "pingpong.py")
    with open(script, "w") as f:
        f.write(PINGPONG)
    os.chmod(script, 0o644)
    proc = remote.spawn([BASE_PYTHON, "-S", "-E", script, server.ip, str(APP), "300"], uid=1000,
                        stdin=__import__("subprocess").PIPE, stdout=__import__("subprocess").PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # the sidecar's upstream to the app is set up by now
        before = _program_runs(server.node.node.pin_dir)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "sent"
        time.sleep(0.3)
        after = _program_runs(server.node.node.pin_dir)
        proc.stdin.write("end\n")
        proc.stdin.flush()
        proc.wait(10)
    finally:
        with open(stats, "w") as f:
            f.write(old)
        if proc.poll() is None:
            proc.kill()
    assert before["lookup"] >= 1, "the connection was steered by sk_lookup"
    # 300 messages into the pod (and the sidecar relaying them to the app over loopback):
    # not one run of any program on the node.
    assert {k: after[k] - before[k] for k in after} == {k: 0 for k in after}


def test_a_namespace_with_ipv6_disabled_is_intercepted_for_ipv4_with_a_note(world):
    cluster, p = world
    pod = p.get("v4only") or cluster.add_pod(0, "v4only", families=("ipv4",))
    p["v4only"] = pod
    if not getattr(pod, "sidecar", None):
        pod.start_server([APP, OTHER])
        pod.sidecar = pod.start_sidecar("project", spec=InterceptSpec())
    result = enable(pod)
    assert any("IPv6 is not intercepted" in w and "disable_ipv6" in w for w in result["warnings"])
    families = live(pod)["families"]
    assert families["ipv4"] == "captured" and "disabled" in families["ipv6"]
    assert not p["remote"].connect(pod.ip, APP).direct
    with pytest.raises(UsageError, match="ipv6 was asked for"):
        enable(pod, families=["ipv6"])
    assert live(pod)["families"]["ipv4"] == "captured", "the refused enable changed nothing"


def test_the_tc_path_is_refused_where_ipv6_would_bypass_it(world):
    cluster, p = world
    server = p["server"]
    with pytest.raises(UsageError, match="tc inbound path is IPv4-only"):
        server.node.manager().enable(server.netns.name, "ebpf", InterceptSpec.build(inbound_path="tc"))
    assert server.node.manager().record(server.netns) is None
    assert ebpf_tc.status(server.netns) == {}
    enable(server, inbound_path="tc")  # with --family ipv4
    assert live(server)["families"] == {"ipv4": "captured", "ipv6": "not asked for (--family)"}
    mark = server.sidecar.mark()
    assert p["remote"].connect(server.ip6, APP).direct  # IPv6 left alone, as asked
    assert not p["remote"].connect(server.ip, APP).direct
    assert [e["original_dst"] for e in inbound_entries(server, mark)] == [f"{server.ip}:{APP}"]


@pytest.mark.parametrize("via", ["v4mapped", "ipv6"])
def test_inbound_over_both_families_is_steered_and_answered(world, via):
    cluster, p = world
    server = p["server"]
    enable(server)
    mark = server.sidecar.mark()
    for src in (p["bystander"], p["remote"]):
        reply = src.connect(server.address(via), APP, send=b"in")
        assert not reply.direct
        [entry] = server.sidecar.wait_for(lambda e, local=reply.local: e["peer"] == local, since=mark)
        assert entry["original_dst"] == server.endpoint(APP, via) and entry["error"] is None
    counters = live(server)["counters"]
    assert counters["inbound_steered"] == 2 and counters["origdst_answers"] == 2
    with NodePins(server.node.node.pin_dir) as pins:
        assert ebpf_maps.count_entries(pins, "origdst") == 0
