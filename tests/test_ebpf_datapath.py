"""The ebpf backend's data path with real programs in a child cgroup and real sidecars."""

import json

import pytest

from meshintercept.manager import Manager
from meshintercept.spec import InterceptSpec


from ebpf_support import topo  # noqa: F401  (fixture)

pytestmark = [pytest.mark.ebpf, pytest.mark.root]


def test_outbound_goes_through_sidecar_with_true_original_dst(topo):
    client, server = topo.add_pod("a"), topo.add_pod("b")
    server.start_server(8080)
    topo.wait_listening(server, 8080)
    client.start_sidecar()
    manager = Manager(topo.node)
    manager.enable(client.name, "ebpf", InterceptSpec())
    answer = client.call(server.ip, 8080)
    assert answer.startswith(f"{server.name} {server.ip}:8080 {client.ip}:")
    log = client.sidecar_log()
    assert [e["original_dst"] for e in log] == [f"{server.ip}:8080"]
    assert log[0]["direction"] == "outbound" and log[0]["local"] == "127.0.0.1:15001"
    live = manager.status(client.name)["namespaces"][0]["live"]
    assert live["in_place"] and live["counters"]["redirected_out"] == 1
    assert live["counters"]["origdst_answers"] == 1
