"""The CNI wire contract of the meshintercept-cni executable: versions, error JSON and codes,
STATUS and GC (spec 1.1.0), the invocation log. Each case runs the installed console script
as a runtime would (environment + stdin) and reads stdout, exit status and the log file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from meshintercept.cni import protocol
from meshintercept.cni.attachments import AttachmentIndex
from meshintercept.manager import Manager
from meshintercept.node import Node
from meshintercept.lab.cluster import TestCluster

PLUGIN = os.path.join(os.path.dirname(sys.executable), "meshintercept-cni")


@pytest.fixture
def run(tmp_path):
    log = tmp_path / "cni.log"

    def invoke(command, conf=None, raw=None, **env):
        full = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "MESHINTERCEPT_CNI_LOG_FILE": str(log),
                "CNI_PATH": os.path.dirname(PLUGIN)}
        full.update({k: v for k, v in env.items() if v is not None})
        data = raw if raw is not None else (json.dumps(conf).encode() if conf is not None else b"")
        proc = subprocess.run([PLUGIN], input=data, env=full, capture_output=True, timeout=60)
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out, proc.stderr.decode()

    invoke.log = log
    return invoke


def conf(**fields):
    return {"cniVersion": "1.0.0", "name": "net", "type": "meshintercept-cni", **fields}


POD_ENV = {"CNI_CONTAINERID": "c1", "CNI_NETNS": "/nonexistent/netns", "CNI_IFNAME": "eth0"}


def test_version_lists_supported_versions(run):
    rc, out, _ = run("VERSION", {"cniVersion": "1.1.0"})
    assert rc == 0
    assert out == {"cniVersion": "1.1.0", "supportedVersions": list(protocol.SUPPORTED_VERSIONS)}
    assert {"1.0.0", "1.1.0"} <= set(out["supportedVersions"])
    rc, out, _ = run("VERSION", raw=b"")
    assert rc == 0 and out["cniVersion"] == protocol.CURRENT_VERSION


@pytest.mark.parametrize("case, command, stdin, env, code, words", [
    ("unsupported version", "ADD", conf(cniVersion="2.0.0"), POD_ENV, 1, "2.0.0 is not supported"),
    ("CHECK before 0.4.0", "CHECK", conf(cniVersion="0.3.1"), POD_ENV, 1, "CHECK is not defined"),
    ("no cniVersion", "ADD", {"name": "net", "type": "meshintercept-cni"}, POD_ENV, 7, "no cniVersion"),
    ("misspelt field", "ADD", conf(**{"proxy-uid": 5}), POD_ENV, 2, "did you mean proxy_uid"),
    ("unknown field", "ADD", conf(outbound=1), POD_ENV, 2, "outbound"),
    ("bad port", "ADD", conf(outbound_port="abc"), POD_ENV, 7, "'abc' is not a number"),
    ("same ports", "ADD", conf(outbound_port=15003), POD_ENV, 7, "both 15003"),
    ("bad cidr", "ADD", conf(exclude_outbound_cidrs=["10.0.0.0/33"]), POD_ENV, 7, "not a valid CIDR"),
    ("unknown mode", "ADD", conf(mode="tproxy"), POD_ENV, 7, "available modes"),
    ("opt-in without API", "ADD", conf(pod_selection="opt-in"), POD_ENV, 7, "needs a kubeconfig"),
    ("debug not bool", "ADD", conf(debug="yes"), POD_ENV, 7, "true or false"),
    ("missing env", "ADD", conf(), {"CNI_CONTAINERID": "c1"}, 4, "CNI_NETNS, CNI_IFNAME"),
    ("bad CNI_ARGS", "ADD", conf(), {**POD_ENV, "CNI_ARGS": "K8S_POD_NAME"}, 4, "not KEY=VALUE"),
    ("namespace missing", "ADD", conf(), POD_ENV, 3, "does not exist"),
    ("unknown command", "FROB", conf(), POD_ENV, 4, "not one of"),
    ("GC without list", "GC", conf(cniVersion="1.1.0"), {}, 7, "valid-attachments"),
])
def test_errors_are_cni_json_with_the_spec_codes(run, tmp_path, case, command, stdin, env, code, words):
    stdin = {**stdin, "state_dir": str(tmp_path / "state")} if isinstance(stdin, dict) and stdin.get("type") else stdin
    rc, out, err = run(command, stdin, **env)
    assert rc != 0, case
    assert out["code"] == code, (case, out)
    assert words in out["msg"], (case, out)
    assert set(out) <= {"cniVersion", "code", "msg", "details"} and out["cniVersion"]
    assert "Traceback" not in err
    assert not (tmp_path / "state" / "cni" / "attachments").exists() or not os.listdir(tmp_path / "state" / "cni" / "attachments")


def test_undecodable_config(run):
    rc, out, err = run("ADD", raw=b"{not json", **POD_ENV)
    assert rc != 0 and out["code"] == 6 and "Traceback" not in err
    rc, out, _ = run("ADD", raw=b"[1, 2]", **POD_ENV)
    assert out["code"] == 6


def test_unexpected_failure_is_still_cni_json(run, tmp_path):
    """A state dir that is a regular file makes the attachment index fail deep inside; the
    runtime must still get error JSON, and the traceback goes to the log only."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    rc, out, err = run("DEL", conf(state_dir=str(blocker)), **POD_ENV)
    assert rc != 0 and out["code"] == 100 and "internal error" in out["msg"]
    assert "Traceback" not in err and "Traceback" not in json.dumps(out)
    entry = [json.loads(line) for line in run.log.read_text().splitlines()][-1]
    assert entry["result"] == "error" and "Traceback" in entry["traceback"]


def test_del_of_unknown_container_succeeds_and_is_logged(run, tmp_path):
    rc, out, err = run("DEL", conf(state_dir=str(tmp_path / "state")), CNI_CONTAINERID="nope", CNI_IFNAME="eth0",
                       CNI_NETNS="")
    assert (rc, out) == (0, None), err
    entries = [json.loads(line) for line in run.log.read_text().splitlines()]
    assert entries[-1]["command"] == "DEL" and entries[-1]["result"] == "ok" and entries[-1]["action"] == "nothing"
    assert entries[-1]["container_id"] == "nope"


def test_log_file_from_config(run, tmp_path):
    own = tmp_path / "own" / "plugin.log"
    run("DEL", conf(state_dir=str(tmp_path / "s"), log_file=str(own)), CNI_CONTAINERID="x", CNI_IFNAME="eth0")
    assert json.loads(own.read_text())["command"] == "DEL"
    assert not run.log.exists()


def test_status(run, tmp_path):
    rc, out, err = run("STATUS", conf(cniVersion="1.1.0", state_dir=str(tmp_path / "s")))
    assert (rc, out) == (0, None), (out, err)
    rc, out, _ = run("STATUS", conf(cniVersion="1.1.0", kubeconfig=str(tmp_path / "missing")))
    assert rc != 0 and out["code"] == 50 and "cannot read kubeconfig" in out["msg"]


@pytest.mark.root
def test_gc_drops_stale_attachments_and_gone_namespaces(run, test_prefix):
    """GC (1.1.0): attachments the runtime no longer lists are disabled and forgotten, and so
    is the state of namespaces that no longer exist; valid attachments stay intercepted."""
    with TestCluster(nodes=1, prefix=test_prefix) as cluster:
        node: Node = cluster.nodes[0].node
        pods = {name: cluster.add_pod(0, name) for name in ("keep", "stale", "gone")}
        block = conf(cniVersion="1.1.0", name="gcnet", state_dir=node.state_dir, pin_dir=node.pin_dir,
                     cgroup=node.cgroup)
        for name, pod in pods.items():
            rc, out, err = run("ADD", block, CNI_CONTAINERID=f"cid-{name}", CNI_NETNS=pod.netns.path, CNI_IFNAME="eth0")
            assert rc == 0 and out == {"cniVersion": "1.1.0"}, (out, err)
        manager = Manager(node)
        assert len(manager.records()) == 3
        gone_key = pods["gone"].netns.key
        cluster.remove_pod(pods["gone"])

        gc_conf = {**block, "cni.dev/valid-attachments": [{"containerID": "cid-keep", "ifname": "eth0"}]}
        rc, out, err = run("GC", gc_conf)
        assert (rc, out) == (0, None), (out, err)

        index = AttachmentIndex(node.state_dir)
        assert [a.container_id for a in index.all()] == ["cid-keep"]
        assert {r.key for r in manager.records()} == {pods["keep"].netns.key}
        assert gone_key not in {r.key for r in manager.records()}
        stale = pods["stale"]
        assert "MI_" not in stale.iptables_save()
        assert "MI_" in pods["keep"].iptables_save()
        entry = [json.loads(line) for line in run.log.read_text().splitlines()][-1]
        assert entry["command"] == "GC" and sorted(entry["removed"]) == sorted(
            [stale.netns.name, pods["gone"].netns.name])

        rc, _, _ = run("DEL", block, CNI_CONTAINERID="cid-keep", CNI_NETNS=pods["keep"].netns.path, CNI_IFNAME="eth0")
        assert rc == 0 and manager.records() == [] and index.all() == []


@pytest.mark.root
def test_shared_namespace_stays_intercepted_until_its_last_attachment_goes(run, test_prefix):
    """Two attachments (e.g. two networks via Multus) in one pod namespace: DEL of one keeps interception."""
    with TestCluster(nodes=1, prefix=test_prefix) as cluster:
        node = cluster.nodes[0].node
        pod = cluster.add_pod(0, "multi")
        base = conf(state_dir=node.state_dir, pin_dir=node.pin_dir, cgroup=node.cgroup)
        env = {"CNI_CONTAINERID": "c", "CNI_NETNS": pod.netns.path}
        assert run("ADD", {**base, "name": "net-a"}, CNI_IFNAME="eth0", **env)[0] == 0
        assert run("ADD", {**base, "name": "net-b"}, CNI_IFNAME="net1", **env)[0] == 0
        assert run("DEL", {**base, "name": "net-b"}, CNI_IFNAME="net1", **env)[0] == 0
        assert "MI_" in pod.iptables_save()
        assert run("CHECK", {**base, "name": "net-a"}, CNI_IFNAME="eth0", **env)[0] == 0
        assert run("DEL", {**base, "name": "net-a"}, CNI_IFNAME="eth0", **env)[0] == 0
        assert "MI_" not in pod.iptables_save()
        assert Manager(node).records() == []


def test_plugin_needs_no_terminal_and_writes_nothing_else_to_stdout(run, tmp_path):
    """stdout carries exactly one JSON document (runtimes parse it whole)."""
    proc = subprocess.run([PLUGIN], input=json.dumps(conf(state_dir=str(tmp_path / "s"))).encode(),
                          env={"PATH": os.environ["PATH"], "CNI_COMMAND": "DEL", "CNI_CONTAINERID": "x",
                               "CNI_IFNAME": "eth0", "MESHINTERCEPT_CNI_LOG_FILE": str(run.log)},
                          capture_output=True)
    assert proc.returncode == 0 and proc.stdout == b""
    assert shutil.which("meshintercept-cni", path=os.path.dirname(PLUGIN))
