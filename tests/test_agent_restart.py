"""The node agent (deploy/entrypoint.sh) stopped and started with its defaults, as a rolling
upgrade does, while a meshed pod keeps opening connections: not one of them may go around
the sidecar, before, during or after."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from meshintercept.spec import InterceptSpec

pytestmark = pytest.mark.root
DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")
MODES = ["iptables", pytest.param("ebpf", marks=pytest.mark.ebpf)]
CONNECTIONS = 600


def start_agent(node, workdir):
    """The entrypoint with its defaults, on the lab node, against a CNI dir of its own."""
    conf_dir = os.path.join(workdir, "net.d")
    os.makedirs(conf_dir, exist_ok=True)
    conflist = os.path.join(conf_dir, "10-k8s.conflist")
    if not os.path.exists(conflist):
        with open(conflist, "w") as f:
            json.dump({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "ptp"}]}, f)
    with open(os.path.join(workdir, "plugin.json"), "w") as f:
        json.dump({"mode": "iptables"}, f)
    env = node.cli_env(
        PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"],
        MESHINTERCEPT_CNI_CONF_DIR=conf_dir, MESHINTERCEPT_CNI_BIN_DIR=os.path.join(workdir, "bin"),
        MESHINTERCEPT_PLUGIN_CONF=os.path.join(workdir, "plugin.json"),
        MESHINTERCEPT_AGENT_PIDFILE=os.path.join(workdir, "agent.pid"))
    agent = subprocess.Popen(["sh", os.path.join(DEPLOY, "entrypoint.sh")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(workdir, "agent.pid")):
        assert agent.poll() is None and time.monotonic() < deadline, agent.stdout.read()
        time.sleep(0.05)
    return agent


def stop_agent(agent) -> str:
    agent.send_signal(signal.SIGTERM)
    out, _ = agent.communicate(timeout=60)
    assert agent.returncode == 0, out
    return out


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
