"""The node agent image, built here and run as deploy/daemonset.yaml runs it (privileged, host
network and PID, the DaemonSet's mounts and env), against a CNI conf dir and a lab node of the
test's own:

* ``meshintercept doctor`` passes inside it and finds the modes usable that the host finds;
* the agent installs the plugin into the conf dir (readiness probe passes, metrics served);
* a podman container started on that conflist (podman's CNI backend, from the lab node's
  namespace) is intercepted: its connections go through a sidecar in its namespace;
* stopping the agent container (SIGTERM, as every upgrade does) leaves that pod intercepted
  with traffic flowing through the stop, and a pod started while no agent runs is refused.

The image is tagged by a hash of its sources (meshintercept/lab/image.py): the first run builds it
(a few minutes), later runs with the same sources reuse it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from meshintercept import registry
from meshintercept.errors import MeshInterceptError
from meshintercept.lab.cluster import Pod
from meshintercept.lab.cni_testbed import NETWORK, CniTestbed
from meshintercept.netns import Netns
from meshintercept.node import STATE_ROOT

pytest.importorskip("yaml", reason="PyYAML (Debian python3-yaml) is needed to read deploy/daemonset.yaml")
from meshintercept.lab import image as agent_image  # the DaemonSet's container, read with PyYAML

pytestmark = [pytest.mark.root, pytest.mark.timeout(agent_image.BUILD_TIMEOUT + 600)]
REASON = agent_image.unavailable()
if REASON:
    pytestmark.append(pytest.mark.skip(reason=REASON))
NO_CNI_BACKEND = None if REASON else agent_image.cni_backend_missing()
BATCH = 50
PORT = 8080


def ebpf_unavailable():
    try:
        return registry.load("ebpf").unavailable_reason()
    except MeshInterceptError as exc:
        return exc.message


MODES = ["iptables", "nftables", pytest.param("ebpf", marks=[pytest.mark.ebpf, pytest.mark.skipif(
    bool(ebpf_unavailable()), reason=f"eBPF backend not usable here: {ebpf_unavailable()}")])]
# Run by the pod's own processes (podman exec): one connection, what each end saw.
CLIENT = ("import json, socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); "
          "local = '%s:%d' % s.getsockname()[:2]; print(json.dumps({'local': local, "
          "'greeting': json.loads(s.makefile().readline())}))")


@pytest.fixture(scope="module")
def image(tmp_path_factory, test_prefix):
    work = tmp_path_factory.mktemp("image")
    podman = agent_image.Podman(agent_image.write_containers_conf(str(work / "containers.conf")))
    podman.sweep(test_prefix)
    existed = agent_image.default_parents()
    try:
        built = agent_image.ensure_image(podman, str(work / "build.log"))
        print(f"\nimage {built['image']}: {'built' if built['built'] else 'cached'} in {built['seconds']:.0f} s")
        yield built["image"]
    finally:
        agent_image.remove_default_parents(existed)


class AgentNode:
    """A lab node with a bridge CNI config, the agent container and the pods podman starts."""

    def __init__(self, cluster, image: str, mode: str):
        self.cluster, self.image, self.mode = cluster, image, mode
        self.bed = CniTestbed(cluster, mode=mode, install_plugin=False)
        self.node = self.bed.node
        work = cluster.workdir
        self.plugin_dir = os.path.join(work, "configmap")
        os.makedirs(self.plugin_dir)
        # The ConfigMap's block, selecting every pod: there is no API server to read annotations from.
        configmap = agent_image.daemonset_plugin_block()
        with open(os.path.join(self.plugin_dir, "plugin.json"), "w") as f:
            json.dump({**configmap, "mode": mode, "pod_selection": "all"}, f)
        open(self.bed.log_file, "a").close()  # the DaemonSet's FileOrCreate
        self.pidfile = os.path.join(STATE_ROOT, f"{cluster.id}-agent.pid")
        self.agent_name = f"{cluster.id}-agent"
        self.pods = []
        self.cgroup_parent = agent_image.cgroup_parent(self.node.node.cgroup)
        self.podman = agent_image.Podman(agent_image.write_containers_conf(
            os.path.join(work, "containers.conf"), self.bed.conf_dir, [self.bed.bin_dir, "/usr/lib/cni"]))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.metrics_port = s.getsockname()[1]

    def agent_args(self):
        host_paths = {"cni-conf": self.bed.conf_dir, "cni-bin": self.bed.bin_dir, "cni-log": self.bed.log_file,
                      "plugin-conf": self.plugin_dir}
        env = {k: v for k, v in self.node.cli_env().items() if k in (
            "MESHINTERCEPT_CGROUP", "MESHINTERCEPT_PIN_DIR", "MESHINTERCEPT_STATE_DIR")}
        env.update(NODE_NAME=self.node.name, MESHINTERCEPT_AGENT_PIDFILE=self.pidfile,
                   MESHINTERCEPT_KUBECONFIG_FROM_SA="false",  # no service account outside Kubernetes
                   MESHINTERCEPT_METRICS_ADDRESS=f"127.0.0.1:{self.metrics_port}")
        return agent_image.daemonset_run_args(host_paths, env) + ["--label", f"{agent_image.OWNER_LABEL}={os.getpid()}"]

    def run_in_agent_image(self, *argv: str, timeout: float = 300):
        return self.podman("run", "--rm", *self.agent_args(), "--entrypoint", argv[0], self.image, *argv[1:],
                           check=False, timeout=timeout)

    def start_agent(self) -> None:
        self.podman("run", "--detach", "--name", self.agent_name, *self.agent_args(), self.image)
        deadline = time.monotonic() + 180
        while "meshintercept-agent: ready" not in self.agent_logs():
            state = self.podman("inspect", "--format", "{{.State.Status}}", self.agent_name).stdout.strip()
            assert state == "running", f"the agent container is {state}: {self.agent_logs()}"
            assert time.monotonic() < deadline, f"the agent did not get ready: {self.agent_logs()}"
            time.sleep(0.5)

    def agent_logs(self) -> str:
        proc = self.podman("logs", self.agent_name, check=False)
        return proc.stdout + proc.stderr

    def stop_agent(self) -> int:
        self.podman("stop", "--time", "30", self.agent_name, timeout=90)
        return int(self.podman("inspect", "--format", "{{.State.ExitCode}}", self.agent_name).stdout)

    def run_pod(self, name: str) -> subprocess.CompletedProcess:
        """``podman run`` of a container on the CNI network, from the node's namespace (the
        bridge plugin puts the bridge there, never on the host), in the node's cgroup (where
        the eBPF programs attach)."""
        full = f"{self.cluster.id}-{name}"
        self.pods.append(full)
        return self.podman("run", "--detach", "--name", full, "--network", NETWORK, "--entrypoint", "sleep",
                           "--cgroup-parent", self.cgroup_parent, "--label", f"{agent_image.OWNER_LABEL}={os.getpid()}",
                           self.image, "infinity", netns=self.node.netns.path, check=False)

    def start_pod(self, name: str) -> Pod:
        """A started `run_pod` as a lab Pod (for its sidecar and lab clients) named ``.container``."""
        proc = self.run_pod(name)
        assert proc.returncode == 0, f"podman run failed: {proc.stderr}"
        full = self.pods[-1]
        info = json.loads(self.podman("inspect", full).stdout)[0]["NetworkSettings"]
        netns = Netns.parse(info["SandboxKey"])
        pod = Pod(self.cluster, self.node, name, netns, info["Networks"][NETWORK]["IPAddress"], "")
        pod.container = full
        self.node.pods.append(pod)
        self.cluster.pods[name] = pod
        return pod

    def exec_client(self, pod, ip: str, port: int) -> dict:
        proc = self.podman("exec", pod.container, "python3", "-c", CLIENT, ip, str(port), timeout=60)
        return json.loads(proc.stdout)

    def status(self, pod) -> dict:
        argv = [sys.executable, "-m", "meshintercept", "status", "--netns", pod.netns.path, "--json"]
        proc = subprocess.run(argv, env=self.node.cli_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        (ns,) = json.loads(proc.stdout)["namespaces"]
        return ns

    def close(self) -> None:
        # Pods first, from the node's namespace (their DEL runs the chain there), then the agent.
        self.podman.remove_containers(self.pods, netns=self.node.netns.path)
        agent_image.remove_parent_cgroups(self.cgroup_parent, self.node.node.cgroup)
        self.podman.remove_containers([self.agent_name])
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)


@pytest.fixture
def agent_node(make_cluster, image):
    made = []

    def make(mode: str = "iptables") -> AgentNode:
        made.append(AgentNode(make_cluster(nodes=1), image, mode))
        return made[-1]

    yield make
    for a in made:
        a.close()


def failed_checks(doctor: dict) -> set:
    return {(s["name"], c["name"]) for s in doctor["sections"] for c in s["checks"] if not c["ok"] and not c["warning"]}


def test_doctor_passes_inside_the_image(agent_node):
    node = agent_node()
    proc = node.run_in_agent_image("meshintercept", "doctor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    inside = json.loads(proc.stdout)
    host = subprocess.run([sys.executable, "-m", "meshintercept", "doctor", "--json"], env=node.node.cli_env(),
                          capture_output=True, text=True, timeout=300)
    host = json.loads(host.stdout)
    # The image lacks nothing the host has: no check fails inside that passes outside.
    assert failed_checks(inside) <= failed_checks(host), inside
    assert set(host["usable_modes"]) <= set(inside["usable_modes"]), inside


def test_the_agent_installs_the_plugin_and_leaves_it_on_stop(agent_node):
    node = agent_node()
    node.start_agent()
    with open(node.bed.conflist_path) as f:
        block = json.load(f)["plugins"][-1]
    assert block["type"] == "meshintercept-cni" and block["mode"] == "iptables"
    assert block["state_dir"] == node.node.node.state_dir  # the node the agent was pointed at
    with open(os.path.join(node.bed.bin_dir, "meshintercept-cni")) as f:
        shim = f.read()
    assert "(agent)" in shim and node.pidfile in shim
    host_pid = node.podman("inspect", "--format", "{{.State.Pid}}", node.agent_name).stdout.strip()
    with open(node.pidfile) as f:
        assert f.read().strip() == host_pid
    _, container = agent_image.daemonset_agent()
    probe = node.podman("exec", node.agent_name, *container["readinessProbe"]["exec"]["command"], check=False)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200  # empty: nothing is intercepted on the node yet

    assert node.stop_agent() == 0
    assert "every pod stays intercepted" in node.agent_logs()
    with open(node.bed.conflist_path) as f:
        assert json.load(f)["plugins"][-1]["type"] == "meshintercept-cni"
    assert not os.path.exists(node.pidfile)


@pytest.mark.skipif(bool(NO_CNI_BACKEND), reason=str(NO_CNI_BACKEND))
@pytest.mark.parametrize("mode", MODES)
def test_a_podman_pod_stays_intercepted_when_the_agent_stops(agent_node, mode):
    node = agent_node(mode)
    node.start_agent()
    pod = node.start_pod("app")
    (add,) = [e for e in node.bed.log() if e["command"] == "ADD"]
    assert (add["result"], add["action"], add["mode"], add["netns"]) == ("ok", "enabled", mode, pod.netns.path), add
    node.bed.start_node_server(PORT)
    sidecar = pod.start_sidecar("project")
    target = f"{node.bed.gateway}:{PORT}"

    def through_sidecar(what: str) -> None:
        mark = sidecar.mark()
        seen = node.exec_client(pod, node.bed.gateway, PORT)
        assert seen["greeting"]["peer"] != seen["local"], f"{what}: the server saw the pod's own socket"
        logged = sidecar.wait_for(lambda e: e["original_dst"] == target, since=mark)
        assert [e["upstream_local"] for e in logged] == [seen["greeting"]["peer"]], f"{what}: {logged}"

    through_sidecar("with the agent running")
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert f'meshintercept_namespaces{{mode="{mode}"}} 1.0' in metrics, metrics
    # Connections in batches from before the stop until one batch after it has completed.
    mark, stopped, batches = sidecar.mark(), threading.Event(), []

    def load():
        while True:
            last = stopped.is_set()
            batches.append(pod.connect_many(node.bed.gateway, PORT, count=BATCH, parallel=2, timeout=10))
            if last:
                return

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(0.3)
    try:
        assert node.stop_agent() == 0  # podman stop: SIGTERM, as an upgrade
    finally:
        stopped.set()
        loader.join(120)
    total = BATCH * len(batches)
    assert len(batches) >= 2 and sum(b.get("ok", 0) for b in batches) == total, batches
    logged = sidecar.wait_for(lambda e: e["original_dst"] == target, since=mark, count=total)
    assert len(logged) == total, f"{total - len(logged)} of {total} connections went around the sidecar"

    ns = node.status(pod)
    assert ns["mode"] == mode and ns["live"]["in_place"] is True, ns
    through_sidecar("after the agent stopped")
    # With no agent the shim refuses ADD (try again later): no pod starts unintercepted.
    late = node.run_pod("late")
    assert late.returncode != 0 and "node agent is not running" in late.stderr, late.stderr
    assert [e["command"] for e in node.bed.log()].count("ADD") == 1
