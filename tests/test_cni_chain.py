"""meshintercept-cni chained after Debian's reference plugins (bridge + host-local).

Every plugin is exec'd the way a container runtime does it (`meshintercept.cni.runtime`:
CNI_* environment, config with prevResult on stdin, DEL in reverse order), from inside a
node namespace of the test cluster, against pod namespaces the test made. The node's CNI
config was written by `cni install` (`meshintercept.lab.cni_testbed`), and the executable the
runtime finds is the shim it installed.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

import pytest

from meshintercept import registry
from meshintercept.cni.attachments import AttachmentIndex
from meshintercept.cni.runtime import PluginFailed
from meshintercept.lab.cni_testbed import CniTestbed, bridge_conflist
from meshintercept.errors import MeshInterceptError
from meshintercept.manager import Manager
from meshintercept.spec import InterceptSpec
from meshintercept.lab.cluster import TestCluster

pytestmark = pytest.mark.root


def unavailable(mode: str):
    try:
        cls = registry.load(mode)
    except MeshInterceptError as exc:
        return exc.message
    return cls.unavailable_reason()


MODES = [
    "iptables",
    pytest.param("nftables", marks=pytest.mark.skipif(
        bool(unavailable("nftables")), reason=f"nftables backend not usable here: {unavailable('nftables')}")),
    pytest.param("ebpf", marks=[pytest.mark.ebpf, pytest.mark.skipif(
        bool(unavailable("ebpf")), reason=f"eBPF backend not usable here: {unavailable('ebpf')}")]),
]


@pytest.fixture
def bed_factory(test_prefix):
    clusters = []

    def make(mode: str, block=None, subnet6=None) -> CniTestbed:
        cluster = TestCluster(nodes=1, prefix=test_prefix)
        clusters.append(cluster)
        return CniTestbed(cluster, mode=mode, block=block, subnet6=subnet6)

    yield make
    for cluster in clusters:
        cluster.close()


def our_exec(bed: CniTestbed, command: str):
    return [e for e in bed.runtime.history if e.plugin == "meshintercept-cni" and e.command == command]


def ours_left(bed: CniTestbed, pod, record) -> list:
    """Everything of ours still visible for this pod: records, attachments, live interception."""
    manager = Manager(bed.node.node)
    left = []
    if manager.record(pod.netns):
        left.append("namespace record")
    if AttachmentIndex(bed.node.node.state_dir).for_namespace(pod.netns.key):
        left.append("attachment")
    if manager.backend(record.mode).inspect(record, pod.netns).get("in_place"):
        left.append(f"{record.mode} interception")
    if record.mode == "iptables":
        saved = pod.iptables_save()
        if "MI_" in saved or "meshintercept" in saved:
            left.append("iptables rules")
    if record.mode == "nftables" and "meshintercept" in pod.run(["nft", "list", "tables"]).stdout:
        left.append("nftables table")
    return left


@pytest.mark.parametrize("mode", MODES)
def test_add_intercepts_check_passes_del_restores(bed_factory, mode):
    bed = bed_factory(mode)
    pod, result = bed.add_pod("app")

    # ADD printed the bridge's result unchanged, and the runtime's view is that result.
    bridge_add, = [e for e in bed.runtime.history if e.plugin == "bridge" and e.command == "ADD"]
    ours_add, = our_exec(bed, "ADD")
    assert ours_add.stdin["prevResult"] == bridge_add.output
    assert ours_add.output == bridge_add.output == result
    assert ours_add.env["CNI_NETNS"] == pod.netns.path and ours_add.env["CNI_IFNAME"] == "eth0"
    assert pod.ip in [str(h) for h in bed.subnet.hosts()]

    record = Manager(bed.node.node).record(pod.netns)
    assert record is not None and record.mode == mode and record.spec == InterceptSpec()

    bed.start_node_server(8080)
    sidecar = pod.start_sidecar("project")
    got = pod.connect(bed.gateway, 8080)
    assert not got.direct, "the server saw the app's own socket: the connection bypassed the sidecar"
    seen = sidecar.wait_for(lambda e: e["direction"] == "outbound")
    assert [e["original_dst"] for e in seen] == [f"{bed.gateway}:8080"]

    bed.runtime.check(pod.container_id, pod.netns.path)  # bridge CHECK, then ours
    assert our_exec(bed, "CHECK")[-1].returncode == 0

    # DEL runs the chain last plugin first: look at the pod after our DEL, before the
    # bridge plugin's DEL takes its interface away.
    steps = bed.runtime.delete_steps(pod.container_id, pod.netns.path, "eth0", pod.cni_args)
    assert next(steps) == "meshintercept-cni"
    mark = sidecar.mark()
    got = pod.connect(bed.gateway, 8080)
    assert got.direct, "after DEL the app still goes through the sidecar"
    assert sidecar.wait_for(since=mark, timeout=0.5) == []
    assert ours_left(bed, pod, record) == []
    assert list(steps) == ["bridge"]

    bed.delete_pod(pod)  # DEL twice: the runtime retries DEL until it succeeds
    assert [e.returncode for e in our_exec(bed, "DEL")] == [0, 0]

    entries = [e for e in bed.log() if e["command"] in ("ADD", "CHECK", "DEL")]
    assert [(e["command"], e["result"], e.get("action")) for e in entries] == [
        ("ADD", "ok", "enabled"), ("CHECK", "ok", "in place"), ("DEL", "ok", "disabled"), ("DEL", "ok", "nothing")]
    assert all(e["container_id"] == pod.container_id and e["netns"] == pod.netns.path for e in entries)
    assert all(isinstance(e["duration_ms"], float) for e in entries)
    assert entries[0]["pod"] == "default/app"


@pytest.mark.parametrize("mode", MODES)
def test_a_dual_stack_pod_is_intercepted_in_both_families_from_its_first_connection(bed_factory, mode):
    bed = bed_factory(mode, subnet6="fd00:231:96::/64")
    pod, result = bed.add_pod("dual")
    assert {ipaddress.ip_interface(i["address"]).version for i in result["ips"]} == {4, 6}
    assert pod.ip and pod.ip6, result
    for family in (4, 6):
        bed.start_node_server(8080 + family, family=family)
    sidecar = pod.start_sidecar("project")
    for family, gateway, endpoint in ((4, bed.gateway, f"{bed.gateway}:8084"),
                                      (6, bed.gateway6, f"[{bed.gateway6}]:8086")):
        mark = sidecar.mark()
        got = pod.connect(gateway, 8080 + family)
        assert not got.direct, f"IPv{family} bypassed the sidecar"
        seen = sidecar.wait_for(lambda e: e["direction"] == "outbound", since=mark)
        assert [e["original_dst"] for e in seen] == [endpoint]
    record = Manager(bed.node.node).record(pod.netns)
    bed.delete_pod(pod)
    assert ours_left(bed, pod, record) == []


@pytest.mark.parametrize("mode", MODES)
def test_check_fails_when_interception_is_gone_and_repair_restores_it(bed_factory, mode):
    bed = bed_factory(mode)
    pod, _ = bed.add_pod("drift")
    # Interception disappears behind the plugin's back while its record stays: CHECK must say
    # so with a CNI error.
    if mode == "iptables":  # someone flushes our chain (an init container, an iptables restore)
        pod.run(["iptables-legacy", "-t", "nat", "-F", "MI_OUTPUT"], check=True)
    elif mode == "nftables":  # the same in our nft table
        pod.run(["nft", "flush", "chain", "inet", "meshintercept", "outbound"], check=True)
    else:  # the namespace's entries vanish from the node's maps
        manager = Manager(bed.node.node)
        manager.backend(mode).disable(manager.record(pod.netns), pod.netns)
    with pytest.raises(PluginFailed) as failed:
        bed.runtime.check(pod.container_id, pod.netns.path)
    err = failed.value
    assert err.plugin == "meshintercept-cni" and err.returncode != 0
    assert set(err.error) >= {"cniVersion", "code", "msg"} and err.error["code"] == 101
    assert "not in place" in err.error["msg"]
    assert "Traceback" not in err.stderr

    # The operator's fix: 'cni repair' finds the drifted pod and, with --apply, re-enables it.
    repair = [sys.executable, "-m", "meshintercept", "cni", "repair", "--conf-dir", bed.conf_dir,
              "--match", pod.netns.name]
    listed = subprocess.run(repair, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert f"{pod.netns.name}: intercept" in listed.stdout and "action: re-enable" in listed.stdout
    with pytest.raises(PluginFailed):  # the listing changed nothing
        bed.runtime.check(pod.container_id, pod.netns.path)
    fixed = subprocess.run(repair + ["--apply"], capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "-> fixed" in fixed.stdout
    bed.runtime.check(pod.container_id, pod.netns.path)
    bed.delete_pod(pod)


def test_check_fails_when_config_asks_for_another_spec(bed_factory):
    bed = bed_factory("iptables")
    pod, _ = bed.add_pod("spec")
    conflist = json.loads(json.dumps(bed.runtime.conflist))
    conflist["plugins"][-1]["exclude_outbound_ports"] = [22]
    other = bed.make_runtime(conflist)
    other.cache = dict(bed.runtime.cache)
    with pytest.raises(PluginFailed) as failed:
        other.check(pod.container_id, pod.netns.path)
    assert failed.value.error["code"] == 101
    assert "exclude_outbound_ports" in failed.value.error["msg"]
    bed.delete_pod(pod)


def test_del_after_the_namespace_is_gone(bed_factory):
    """Runtimes may remove the namespace before DEL and then pass an empty CNI_NETNS."""
    bed = bed_factory("iptables")
    pod, _ = bed.add_pod("gone")
    key = pod.netns.key
    bed.cluster.remove_pod(pod)
    # The bridge plugin's DEL also tolerates a missing namespace; the whole chain must succeed.
    bed.runtime.delete(pod.container_id, "", "eth0", pod.cni_args)
    assert Manager(bed.node.node).record(key) is None
    assert AttachmentIndex(bed.node.node.state_dir).all() == []
    bed.runtime.delete(pod.container_id, "", "eth0", pod.cni_args)


def test_add_with_bad_config_is_a_cni_error_and_changes_nothing(bed_factory):
    bed = bed_factory("iptables")
    conflist = json.loads(json.dumps(bed.runtime.conflist))
    conflist["plugins"][-1]["outbound_port"] = 70000
    bad = bed.make_runtime(conflist)
    netns = bed.new_netns("bad")
    with pytest.raises(PluginFailed) as failed:
        bad.add("bad-cid", netns.path, "eth0", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bad")
    err = failed.value
    assert err.plugin == "meshintercept-cni"
    assert err.error["code"] == 7 and err.error["cniVersion"] == "1.0.0"
    assert "70000" in err.error["msg"]
    assert "Traceback" not in err.stderr
    ours = [e for e in bad.history if e.plugin == "meshintercept-cni"][-1]
    assert json.loads(ours.stdout) == err.error  # the error JSON is on stdout, alone

    saved = subprocess.run(["ip", "netns", "exec", netns.name, "iptables-legacy-save", "-t", "nat"],
                           capture_output=True, text=True, check=True).stdout
    assert "MI_" not in saved
    assert Manager(bed.node.node).records() == []
    assert AttachmentIndex(bed.node.node.state_dir).all() == []
    # The runtime cleans up a failed ADD with DEL; ours must not fail on the config ADD rejected.
    bad.delete("bad-cid", netns.path, "eth0")
    assert bad.history[-2].plugin == "meshintercept-cni" and bad.history[-2].returncode == 0


def test_two_pods_on_one_node_are_independent(bed_factory):
    bed = bed_factory("iptables")
    a, _ = bed.add_pod("pa")
    b, _ = bed.add_pod("pb")
    bed.delete_pod(a)
    manager = Manager(bed.node.node)
    assert manager.record(a.netns) is None
    record = manager.record(b.netns)
    assert record and manager.backend("iptables").inspect(record, b.netns)["in_place"]
    bed.runtime.check(b.container_id, b.netns.path)
    bed.delete_pod(b)


def test_install_then_uninstall_restores_the_conflist(bed_factory):
    from meshintercept.cni import install

    bed = bed_factory("iptables")
    with open(bed.conflist_path, newline="") as f:
        installed = f.read()
    assert installed != bed.original_text and installed.startswith(bed.original_text[:40])
    install.uninstall(bed.conf_dir, bed.bin_dir)
    with open(bed.conflist_path, newline="") as f:
        assert f.read() == bed.original_text
    assert bed.original_text == bridge_conflist(bed.bridge, str(bed.subnet), bed.runtime.conflist["plugins"][0]["ipam"]["dataDir"])
