"""The node agent (deploy/entrypoint.sh) stopped and started with its defaults, as a rolling
upgrade does, while a meshed pod keeps opening connections: not one of them may go around
the sidecar, before, during or after."""

import os
import threading
import time

import pytest

from meshintercept.lab.agent import start_agent, stop_agent
from meshintercept.spec import InterceptSpec

pytestmark = pytest.mark.root
MODES = ["iptables", pytest.param("ebpf", marks=pytest.mark.ebpf)]
CONNECTIONS = 600


@pytest.mark.parametrize("mode", MODES)
def test_stopping_and_starting_the_agent_leaves_a_meshed_pod_intercepted_the_whole_time(make_cluster, mode):
    cluster = make_cluster(nodes=1)
    node = cluster.nodes[0]
    client, server = node.add_pod("client"), node.add_pod("server")
    server.start_server(8080)
    sidecar = client.start_sidecar("project")
    node.manager().enable(client.netns.name, mode, InterceptSpec())
    agent = start_agent(node, os.path.join(cluster.workdir, "agent"))
    mark = sidecar.mark()
    result = {}
    load = threading.Thread(target=lambda: result.update(
        client.connect_many(server.ip, 8080, count=CONNECTIONS, parallel=2, timeout=10)))
    load.start()
    time.sleep(0.5)
    out = stop_agent(agent)  # an upgrade: the old agent goes ...
    assert "every pod stays intercepted" in out
    agent = start_agent(node, os.path.join(cluster.workdir, "agent"))  # ... and the new one comes
    load.join(120)
    try:
        assert result.get("ok") == CONNECTIONS, result
        through = sidecar.wait_for(lambda e: e["original_dst"] == f"{server.ip}:8080", since=mark,
                                   count=CONNECTIONS)
        assert len(through) == CONNECTIONS, f"{CONNECTIONS - len(through)} connections went around the sidecar"
        assert node.manager().status(client.netns.name)["namespaces"][0]["live"]["in_place"]
    finally:
        stop_agent(agent)
        node.manager().disable_all()
