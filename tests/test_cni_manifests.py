"""The Kubernetes packaging: deploy/daemonset.yaml parses, has what a node agent needs, and
mounts exactly the paths the code uses (imported from the code, not retyped); the image
definition installs what the code needs; the entrypoint installs on start and uninstalls on
SIGTERM (run for real against a temporary CNI directory).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from meshintercept.cni import config as cfgmod
from meshintercept.cni import install
from meshintercept.cni.cli import cni
from meshintercept.netns import NETNS_RUN_DIR
from meshintercept.node import DEFAULT_PIN_DIR, STATE_ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML (Debian python3-yaml) is needed to read the manifests")

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")


@pytest.fixture(scope="module")
def docs():
    with open(os.path.join(DEPLOY, "daemonset.yaml")) as f:
        return {d["kind"]: d for d in yaml.safe_load_all(f) if d}


@pytest.fixture(scope="module")
def pod_spec(docs):
    return docs["DaemonSet"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def agent(pod_spec):
    (container,) = pod_spec["containers"]
    return container


def mounts(pod_spec, agent) -> dict:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in agent["volumeMounts"]}


def test_all_objects_present_and_consistent(docs):
    assert set(docs) == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"}
    ns = docs["Namespace"]["metadata"]["name"]
    ds = docs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1" and ds["metadata"]["namespace"] == ns
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    sa = docs["ServiceAccount"]["metadata"]
    assert sa["namespace"] == ns and ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["name"]
    binding = docs["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": sa["name"], "namespace": ns} in binding["subjects"]


def test_rbac_allows_exactly_what_the_code_asks(docs):
    """kube.Client.pod is a GET of one pod, pods_on_node a LIST; nothing else is requested."""
    (rule,) = docs["ClusterRole"]["rules"]
    assert rule["apiGroups"] == [""] and rule["resources"] == ["pods"]
    assert sorted(rule["verbs"]) == ["get", "list"]


def test_agent_is_privileged_on_the_host_network_and_pid(pod_spec, agent):
    assert pod_spec["hostNetwork"] is True and pod_spec["hostPID"] is True
    assert agent["securityContext"]["privileged"] is True
    assert {"operator": "Exists"} in pod_spec["tolerations"]  # every node, tainted ones too


def test_mounts_match_the_paths_the_code_uses(pod_spec, agent):
    """Each path the code reads or writes on the node is mounted at the same path it has on the
    host: records, conflist entries and the shim name paths that must mean the same inside the
    agent container and outside it."""
    needed = {
        install.DEFAULT_CONF_DIR, install.DEFAULT_BIN_DIR, NETNS_RUN_DIR, STATE_ROOT,
        os.path.dirname(DEFAULT_PIN_DIR), "/sys/fs/cgroup", cfgmod.DEFAULT_LOG_FILE,
        "/lib/modules", "/usr/src",  # kernel headers for bcc
    }
    assert os.path.dirname(install.AGENT_PIDFILE) == STATE_ROOT
    have = mounts(pod_spec, agent)
    assert needed <= set(have), f"missing mounts: {sorted(needed - set(have))}"
    for path in needed:
        mount, volume = have[path]
        assert volume["hostPath"]["path"] == path, f"{path} is mounted from {volume['hostPath']['path']}"
    # New pod namespaces are bind-mounted under /var/run/netns after the agent started.
    assert have[NETNS_RUN_DIR][0].get("mountPropagation") in ("HostToContainer", "Bidirectional")
    # The tool mounts bpffs itself when the node has none; the host must see that mount.
    assert have[os.path.dirname(DEFAULT_PIN_DIR)][0].get("mountPropagation") == "Bidirectional"
    assert have[cfgmod.DEFAULT_LOG_FILE][1]["hostPath"]["type"] == "FileOrCreate"


def test_plugin_config_is_valid_and_mounted(docs, pod_spec, agent):
    block = json.loads(docs["ConfigMap"]["data"]["plugin.json"])
    install.validate_block({**block, "kubeconfig": "/etc/cni/net.d/" + install.KUBECONFIG_NAME}, "1.0.0", "k8s")
    env = {e["name"]: e.get("value") for e in agent["env"]}
    conf_path = env["MESHINTERCEPT_PLUGIN_CONF"]
    mount, volume = mounts(pod_spec, agent)[os.path.dirname(conf_path)]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert os.path.basename(conf_path) in docs["ConfigMap"]["data"]
    # opt-in selection needs the API: the agent must write the kubeconfig.
    assert block["pod_selection"] != "opt-in" or env["MESHINTERCEPT_KUBECONFIG_FROM_SA"] == "true"
    assert any(e["name"] == "NODE_NAME" and e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
               for e in agent["env"])


def test_readiness_probe_is_a_real_command(agent):
    argv = agent["readinessProbe"]["exec"]["command"]
    assert argv[:2] == ["meshintercept", "cni"] and argv[2] in cni.commands
    assert "--check" in argv


def test_dockerfile_installs_what_the_code_needs():
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = f.read()
    # Debian 12 by default; BASE names a locally imported one where no registry is reachable.
    assert re.search(r"^ARG BASE=debian:12", text, re.M) and re.search(r"^FROM \$\{BASE\}$", text, re.M)
    # util-linux: nsenter for the agent shim; nftables: the nft the iptables backend's probe runs;
    # python3-nftables: the nftables mode's libnftables binding
    for package in ("python3-bpfcc", "python3-iptables", "python3-nftables", "iproute2", "iptables", "nftables",
                    "util-linux", "python3-venv"):
        assert re.search(rf"\b{package}\b", text), package
    venv = re.search(r"python3 -m venv --system-site-packages (\S+)", text).group(1)
    assert f"{venv}/bin/pip install" in text and f"PATH={venv}/bin:" in text
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M).group(1)
    assert re.search(rf"^COPY deploy/entrypoint.sh {re.escape(entry)}$", text, re.M)


def test_entrypoint_uses_existing_commands():
    from meshintercept.cli import cli

    with open(os.path.join(DEPLOY, "entrypoint.sh")) as f:
        text = f.read()
    subprocess.run(["sh", "-n", os.path.join(DEPLOY, "entrypoint.sh")], check=True)
    for sub in set(re.findall(r"meshintercept cni (\w+)", text)):
        assert sub in cni.commands, sub
    for opt in set(re.findall(r"--[a-z][a-z-]+", text)):
        known = {p for c in list(cni.commands.values()) + [cli.commands["disable"], cli.commands["metrics"]]
                 for o in c.params for p in getattr(o, "opts", [])}
        assert opt in known, opt
    assert "meshintercept disable --all" in text and "MESHINTERCEPT_UNINSTALL_ON_STOP" in text
    assert re.search(r"trap stop TERM", text)


def _agent(tmp_path, **extra):
    """The entrypoint against a temporary CNI dir and an empty node of its own."""
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir(exist_ok=True)
    conflist = conf_dir / "10-k8s.conflist"
    if not conflist.exists():
        conflist.write_text(ORIGINAL)
    plugin_conf = tmp_path / "plugin.json"
    plugin_conf.write_text('{"mode": "iptables", "exclude_outbound_ports": [22]}')
    node = tmp_path / "node"  # 'disable --all' has nothing of anyone else's to touch here
    env = {
        "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"],
        "MESHINTERCEPT_CNI_CONF_DIR": str(conf_dir), "MESHINTERCEPT_CNI_BIN_DIR": str(bin_dir),
        "MESHINTERCEPT_PLUGIN_CONF": str(plugin_conf), "MESHINTERCEPT_AGENT_PIDFILE": str(tmp_path / "run" / "agent.pid"),
        "MESHINTERCEPT_RECONCILE_SECONDS": "0.2", "MESHINTERCEPT_REPAIR_ON_START": "false",
        "MESHINTERCEPT_STATE_DIR": str(node / "state"), "MESHINTERCEPT_PIN_DIR": str(node / "pins"),
        "MESHINTERCEPT_CGROUP": str(node / "cgroup"), **extra,
    }
    agent = subprocess.Popen(["sh", os.path.join(DEPLOY, "entrypoint.sh")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return agent, conflist, bin_dir, tmp_path / "run" / "agent.pid"


ORIGINAL = '{\n  "cniVersion": "1.0.0",\n  "name": "k8s",\n  "plugins": [\n    {"type": "ptp"}\n  ]\n}\n'


def _wait_for(agent, predicate, what):
    deadline = time.monotonic() + 20
    while not predicate():
        assert agent.poll() is None, f"agent exited: {agent.stdout.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stop(agent) -> str:
    try:
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, out
    return out


@pytest.mark.root
def test_entrypoint_installs_keeps_on_stop_and_uninstalls_only_when_asked(tmp_path):
    """The agent's life cycle against a temporary CNI dir: install on start (agent shim, pid
    file), re-install after the primary CNI rewrote its config; SIGTERM (an upgrade) leaves the
    plugin in the config; with MESHINTERCEPT_UNINSTALL_ON_STOP=true the conflist comes back byte
    for byte, the executable kept for DELs of existing pods."""
    agent, conflist, bin_dir, pidfile = _agent(tmp_path)

    def installed():
        text = conflist.read_text()
        return text != ORIGINAL and json.loads(text)["plugins"][-1]["type"] == "meshintercept-cni"

    _wait_for(agent, installed, "install")
    assert pidfile.read_text().strip() == str(agent.pid)
    shim = (bin_dir / "meshintercept-cni").read_text()
    assert "(agent)" in shim and str(pidfile) in shim  # the shim looks where the agent writes
    conflist.write_text(ORIGINAL)  # the primary CNI rewrites its config
    _wait_for(agent, installed, "re-install")
    out = _stop(agent)
    assert installed() and not pidfile.exists()
    assert "every pod stays intercepted" in out and "tearing down" not in out

    agent, conflist, bin_dir, pidfile = _agent(tmp_path, MESHINTERCEPT_UNINSTALL_ON_STOP="true")
    _wait_for(agent, lambda: pidfile.exists(), "start")
    out = _stop(agent)
    assert conflist.read_text() == ORIGINAL
    assert not pidfile.exists()
    assert (bin_dir / "meshintercept-cni").exists()
    assert "tearing down interception" in out
