"""A node taken over from the previous eBPF layout's build while pods keep connecting.

The earlier build (the newest commit of the previous layout, from the repository history)
enables two pods; this build's `meshintercept upgrade` loads its own programs beside the old
ones, moves both namespaces over and removes the old set. Every connection made during it
must pass both sidecars with the right original destination; none may go around one."""

import json
import os
import threading

import pytest

from meshintercept.backends.ebpf import types as T
from meshintercept.lab.agent import start_agent, stop_agent, wait_ready
from meshintercept.lab.previous_build import NoPreviousBuild, PreviousBuild

pytestmark = [pytest.mark.root, pytest.mark.ebpf]
#: Connections per round; rounds run back to back from before the upgrade starts until it ends.
ROUND = 50
#: IPv4 listeners: layout 1 answered the original destination of AF_INET sockets only.
BIND = "0.0.0.0"
EXE = os.path.join(os.path.dirname(__import__("sys").executable), "meshintercept")


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    try:
        build = PreviousBuild.install(T.LAYOUT_VERSION - 1, str(tmp_path_factory.mktemp("previous")))
    except NoPreviousBuild as exc:
        pytest.skip(f"no build of eBPF layout {T.LAYOUT_VERSION - 1} to upgrade from: {exc}")
    yield build
    build.remove()


def _old(previous, node, *args):
    proc = previous.run(list(args), node.cli_env())
    assert proc.returncode == 0, f"earlier build: meshintercept {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def _new(node, *args, check=True):
    import subprocess

    proc = subprocess.run([EXE, *args], env=node.cli_env(), capture_output=True, text=True, timeout=180)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _keep_connecting(client, ip, done, rounds):
    while True:
        rounds.append(client.connect_many(ip, 8080, count=ROUND, parallel=2, timeout=10))
        if done.is_set() and len(rounds) >= 2:
            return


def _layouts(node):
    return sorted(n for n in os.listdir(node.node.pin_dir) if n.startswith("v"))


def test_upgrade_from_the_previous_layout_moves_every_pod_with_no_connection_around_a_sidecar(node, previous):
    client, server = node.add_pod("client"), node.add_pod("server")
    server.start_server(8080)
    out_sidecar = client.start_sidecar("project", bind=BIND)
    in_sidecar = server.start_sidecar("project", bind=BIND)
    for pod in (client, server):
        _old(previous, node, "enable", "--mode", "ebpf", "--netns", pod.netns.name)
    assert _layouts(node) == [f"v{T.LAYOUT_VERSION - 1}"]
    assert client.connect(server.ip, 8080, send=b"x")  # the earlier build intercepts

    out_mark, in_mark = out_sidecar.mark(), in_sidecar.mark()
    done, rounds = threading.Event(), []
    load = threading.Thread(target=_keep_connecting, args=(client, server.ip, done, rounds))
    load.start()
    try:
        report = json.loads(_new(node, "upgrade", "--json").stdout)["modes"]["ebpf"]
    finally:
        done.set()
        load.join(180)

    assert report["superseded"] == [f"v{T.LAYOUT_VERSION - 1}"] and len(report["moved"]) == 2, report
    assert not report["unknown"] and not report["failed"], report
    made = sum(r.get("ok", 0) for r in rounds)
    assert made >= 2 * ROUND and all(r.get("ok") == ROUND for r in rounds), rounds
    target = f"{server.ip}:8080"
    outbound = out_sidecar.wait_for(lambda e: e["original_dst"] == target, since=out_mark, count=made)
    inbound = in_sidecar.wait_for(lambda e: e["original_dst"] == target, since=in_mark, count=made)
    assert len(outbound) == made, f"{made - len(outbound)} of {made} connections went around the client's sidecar"
    assert len(inbound) == made, f"{made - len(inbound)} of {made} connections went around the server's sidecar"

    # Only this build's set is left, both pods are in it, and a second upgrade has nothing to do.
    assert _layouts(node) == [f"v{T.LAYOUT_VERSION}"]
    status = json.loads(_new(node, "status", "--json", "--live").stdout)
    assert [n["live"]["in_place"] for n in status["namespaces"]] == [True, True], status
    assert json.loads(_new(node, "upgrade", "--json").stdout)["modes"] == {}
    assert "nothing to take over" in _new(node, "upgrade").stdout
    mark = in_sidecar.mark()
    client.connect(server.ip, 8080, send=b"y")
    assert in_sidecar.wait_for(lambda e: e["original_dst"] == target, since=mark, count=1)


def test_a_namespace_the_node_has_no_record_of_keeps_the_old_set_running(node, previous):
    known, unknown, server = node.add_pod("known"), node.add_pod("unknown"), node.add_pod("server")
    server.start_server(8080)
    sidecars = {p.name: p.start_sidecar("project", bind=BIND) for p in (known, unknown)}
    for pod in (known, unknown):
        _old(previous, node, "enable", "--mode", "ebpf", "--netns", pod.netns.name)
    record = node.manager().record(unknown.netns)
    os.unlink(os.path.join(node.node.state_dir, "namespaces", record.key.replace(":", "_") + ".json"))

    proc = _new(node, "upgrade", check=False)
    assert proc.returncode == 6, proc.stdout + proc.stderr
    assert "have no record on this node" in proc.stdout
    assert _layouts(node) == [f"v{T.LAYOUT_VERSION - 1}", f"v{T.LAYOUT_VERSION}"]
    # Both sets run side by side: the moved pod and the unknown one are both still intercepted.
    for pod in (known, unknown):
        mark = sidecars[pod.name].mark()
        pod.connect(server.ip, 8080, send=b"x")
        assert sidecars[pod.name].wait_for(lambda e: e["original_dst"] == f"{server.ip}:8080", since=mark, count=1)
    _new(node, "disable", "--all")
    assert not os.path.exists(node.node.pin_dir) or _layouts(node) == []


def test_the_new_agent_takes_over_on_start_while_the_old_builds_pods_keep_connecting(make_cluster, previous):
    cluster = make_cluster(nodes=1)
    node = cluster.nodes[0]
    client, server = node.add_pod("client"), node.add_pod("server")
    server.start_server(8080)
    out_sidecar = client.start_sidecar("project", bind=BIND)
    server.start_sidecar("project", bind=BIND)
    for pod in (client, server):  # what the old agent left when it stopped
        _old(previous, node, "enable", "--mode", "ebpf", "--netns", pod.netns.name)
    mark = out_sidecar.mark()
    done, rounds = threading.Event(), []
    load = threading.Thread(target=_keep_connecting, args=(client, server.ip, done, rounds))
    load.start()
    try:
        agent = start_agent(node, os.path.join(cluster.workdir, "agent"))
        said = wait_ready(agent)
        out = stop_agent(agent)
    finally:
        done.set()
        load.join(180)
    assert "took" not in out and "upgrade left" not in said, said
    assert f"layout v{T.LAYOUT_VERSION - 1} -> v{T.LAYOUT_VERSION}: 2 namespaces moved" in said, said
    made = sum(r.get("ok", 0) for r in rounds)
    assert all(r.get("ok") == ROUND for r in rounds), rounds
    through = out_sidecar.wait_for(lambda e: e["original_dst"] == f"{server.ip}:8080", since=mark, count=made)
    assert len(through) == made, f"{made - len(through)} of {made} connections went around the sidecar"
    assert _layouts(node) == [f"v{T.LAYOUT_VERSION}"]
    node.manager().disable_all()
