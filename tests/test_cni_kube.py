"""Pod selection through the Kubernetes API, and `cni repair`.

No Kubernetes API server can run on this machine, so these tests use a stand-in: a local
`http.server` on 127.0.0.1 (random port) that answers the two requests the plugin makes,
GET /api/v1/namespaces/NS/pods/NAME and GET /api/v1/pods?fieldSelector=spec.nodeName=N,
with pod objects the test defines, and checks the bearer token from the kubeconfig. What it
proves is the plugin's side of the conversation (kubeconfig reading, request, decision,
error handling); the real API's behaviour is not under test. When the plugin chain runs in
a node namespace, the stand-in listens on that namespace's loopback.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse

import pytest

from meshintercept.cni import annotations as notes
from meshintercept.cni import kube
from meshintercept.cni.config import Selection
from meshintercept.cni.runtime import PluginFailed
from meshintercept.lab.cni_testbed import CniTestbed
from meshintercept.manager import Manager
from meshintercept.netns import Netns
from meshintercept.spec import InterceptSpec
from meshintercept.lab.cluster import TestCluster

TOKEN = "stand-in-token"
KEY = "meshintercept.io/intercept"


def pod_object(namespace, name, annotations=None, labels=None, node="node-a", ip=None, host_network=False):
    status = {"podIP": ip, "podIPs": [{"ip": ip}]} if ip else {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": namespace, "name": name, "annotations": annotations or {}, "labels": labels or {}},
            "spec": {"nodeName": node, "hostNetwork": host_network}, "status": status}


class StandInApi:
    """Serves pod objects like the Kubernetes API does (the subset the plugin uses)."""

    def __init__(self, netns: Netns = None):
        self.pods = {}
        self.requests = []
        self.fail_with = None  # an HTTP status to answer everything with
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_json(self, code, doc):
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                api.requests.append((self.path, self.headers.get("Authorization")))
                if api.fail_with:
                    return self.send_json(api.fail_with, {"kind": "Status", "code": api.fail_with})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.send_json(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                url = urllib.parse.urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 6 and parts[4] == "pods":
                    pod = api.pods.get((parts[3], parts[5]))
                    if pod is None:
                        return self.send_json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    return self.send_json(200, pod)
                if parts == ["api", "v1", "pods"]:
                    selector = urllib.parse.parse_qs(url.query).get("fieldSelector", [""])[0]
                    node = selector.split("=", 1)[1] if selector.startswith("spec.nodeName=") else None
                    items = [p for p in api.pods.values() if node is None or p["spec"]["nodeName"] == node]
                    return self.send_json(200, {"kind": "PodList", "items": items})
                return self.send_json(404, {"kind": "Status", "code": 404})

        with netns.entered() if netns else contextlib.nullcontext():
            # The listening socket belongs to the namespace it was created in; serving it
            # from this thread afterwards is fine.
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, pod):
        self.pods[(pod["metadata"]["namespace"], pod["metadata"]["name"])] = pod

    def kubeconfig(self, directory, fmt="json") -> str:
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
               "clusters": [{"name": "c", "cluster": {"server": self.url}}],
               "users": [{"name": "u", "user": {"tokenFile": "token"}}],
               "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}]}
        with open(os.path.join(directory, "token"), "w") as f:
            f.write(TOKEN + "\n")
        path = os.path.join(directory, f"kubeconfig.{fmt}")
        with open(path, "w") as f:
            if fmt == "json":
                json.dump(doc, f)
            else:
                import yaml

                yaml.safe_dump(doc, f)
        return path

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    made = []

    def make(netns=None):
        made.append(StandInApi(netns))
        return made[-1]

    yield make
    for a in made:
        a.close()


# --- the decision itself, against the stand-in (no namespaces needed) ----------------------
def test_decide_reads_annotations_then_labels(api, tmp_path):
    server = api()
    server.add(pod_object("default", "meshed", annotations={KEY: "true"}))
    server.add(pod_object("default", "labelled", labels={KEY: "enabled"}))
    server.add(pod_object("default", "refuses", annotations={KEY: "false"}, labels={KEY: "true"}))
    server.add(pod_object("default", "silent"))
    path = server.kubeconfig(str(tmp_path))
    opt_in = Selection(mode="opt-in", kubeconfig=path)
    all_pods = Selection(mode="all", kubeconfig=path, excluded_namespaces=("kube-system",))
    assert kube.decide(opt_in, "default", "meshed")[:2] == (True, f"pod asks for it ({KEY})")
    assert kube.decide(opt_in, "default", "labelled")[0] is True
    assert kube.decide(opt_in, "default", "refuses")[0] is False  # the annotation wins over the label
    assert kube.decide(opt_in, "default", "silent")[0] is False
    assert kube.decide(all_pods, "default", "silent")[0] is True
    assert kube.decide(all_pods, "default", "refuses")[0] is False
    before = len(server.requests)
    assert kube.decide(all_pods, "kube-system", "coredns")[:2] == (False, "namespace kube-system is excluded")
    assert len(server.requests) == before  # excluded without asking the API
    assert all(auth == f"Bearer {TOKEN}" for _, auth in server.requests)
    assert ("/api/v1/namespaces/default/pods/meshed", f"Bearer {TOKEN}") in server.requests


def test_yaml_kubeconfig(api, tmp_path):
    pytest.importorskip("yaml")
    server = api()
    server.add(pod_object("default", "meshed", annotations={KEY: "yes"}))
    sel = Selection(mode="opt-in", kubeconfig=server.kubeconfig(str(tmp_path), fmt="yaml"))
    assert kube.decide(sel, "default", "meshed")[0] is True


def test_api_errors_say_whether_to_retry(api, tmp_path):
    server = api()
    path = server.kubeconfig(str(tmp_path))
    sel = Selection(mode="opt-in", kubeconfig=path, api_timeout=2)
    with pytest.raises(kube.KubeError) as missing:
        kube.decide(sel, "default", "nobody")
    assert "404" in missing.value.message and not missing.value.transient
    server.fail_with = 403
    with pytest.raises(kube.KubeError) as denied:
        kube.decide(sel, "default", "x")
    assert "get/list on pods" in denied.value.message and not denied.value.transient
    server.fail_with = 503
    with pytest.raises(kube.KubeError) as busy:
        kube.decide(sel, "default", "x")
    assert busy.value.transient
    server.close()
    with pytest.raises(kube.KubeError) as down:
        kube.decide(sel, "default", "x")
    assert down.value.transient and "unreachable" in down.value.message


# --- through the plugin chain ---------------------------------------------------------------


@pytest.fixture
def cluster(test_prefix):
    with TestCluster(nodes=1, prefix=test_prefix) as made:
        yield made


def opt_in_bed(cluster, api, selection="opt-in", **extra):
    server = api(cluster.nodes[0].netns)
    path = server.kubeconfig(cluster.workdir)
    bed = CniTestbed(cluster, "iptables", block={"pod_selection": selection, "kubeconfig": path,
                                                 "api_timeout": 2, **extra})
    return bed, server


def intercepted(bed, pod) -> bool:
    manager = Manager(bed.node.node)
    record = manager.record(pod.netns)
    return bool(record) and manager.backend("iptables").inspect(record, pod.netns)["in_place"]


@pytest.mark.root
def test_opt_in_intercepts_only_pods_that_ask(cluster, api):
    bed, server = opt_in_bed(cluster, api)
    server.add(pod_object("default", "meshed", annotations={KEY: "true"}))
    server.add(pod_object("default", "labelled", labels={KEY: "true"}))
    server.add(pod_object("default", "plain"))
    pods = {}
    for name in ("meshed", "labelled", "plain"):
        pods[name], result = bed.add_pod(name)
        assert result["ips"], "the plugin must pass the bridge's result through for every pod"
    assert intercepted(bed, pods["meshed"]) and intercepted(bed, pods["labelled"])
    assert not intercepted(bed, pods["plain"]) and "MI_" not in pods["plain"].iptables_save()
    for pod in pods.values():
        bed.runtime.check(pod.container_id, pod.netns.path)
    log = {e["pod"]: e for e in bed.log() if e["command"] == "ADD"}
    assert log["default/plain"]["action"] == "skipped" and "opt-in" in log["default/plain"]["why"]
    assert log["default/meshed"]["action"] == "enabled"
    paths = [p for p, _ in server.requests]
    assert "/api/v1/namespaces/default/pods/plain" in paths
    for pod in pods.values():
        bed.delete_pod(pod)
    assert Manager(bed.node.node).records() == []


@pytest.mark.root
def test_all_pods_with_opt_out_and_excluded_namespaces(cluster, api):
    bed, server = opt_in_bed(cluster, api, selection="all", excluded_namespaces=["kube-system"])
    server.add(pod_object("default", "refuses", annotations={KEY: "disabled"}))
    server.add(pod_object("default", "silent"))
    refuses, _ = bed.add_pod("refuses")
    silent, _ = bed.add_pod("silent")
    system, _ = bed.add_pod("system", args="IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns")
    assert not intercepted(bed, refuses) and intercepted(bed, silent) and not intercepted(bed, system)
    assert not any("coredns" in p for p, _ in server.requests)


@pytest.mark.root
def test_api_down_is_try_again_later_and_changes_nothing(cluster, api):
    bed, server = opt_in_bed(cluster, api)
    server.close()
    netns = bed.new_netns("waiting")
    with pytest.raises(PluginFailed) as failed:
        bed.runtime.add("cid-w", netns.path, "eth0", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=waiting")
    assert failed.value.plugin == "meshintercept-cni"
    assert failed.value.error["code"] == 11 and "default/waiting" in failed.value.error["msg"]
    assert Manager(bed.node.node).records() == []
    bed.runtime.delete("cid-w", netns.path, "eth0")  # the runtime's cleanup of the failed ADD


@pytest.mark.root
def test_api_refusal_is_a_plugin_error(cluster, api):
    bed, server = opt_in_bed(cluster, api)
    server.fail_with = 403
    netns = bed.new_netns("denied")
    with pytest.raises(PluginFailed) as failed:
        bed.runtime.add("cid-d", netns.path, "eth0", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=denied")
    assert failed.value.error["code"] == 102
    bed.runtime.delete("cid-d", netns.path, "eth0")


# --- repair ---------------------------------------------------------------------------------
def run_repair(*args):
    proc = subprocess.run([sys.executable, "-m", "meshintercept", "cni", "repair", "--json", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {c["namespace"]: c for c in json.loads(proc.stdout)["candidates"]}


@pytest.mark.root
def test_repair_finds_pods_started_before_the_plugin_by_pod_ip(cluster, api, tmp_path):
    """Pods made without the plugin (the cluster harness's own bridge) are matched to the
    stand-in API's pods of this node by IP; only those that ask are fixed, and only with --apply."""
    node = cluster.nodes[0]
    meshed = cluster.add_pod(0, "early-meshed")
    plain = cluster.add_pod(0, "early-plain")
    stranger = cluster.add_pod(0, "stranger")  # a namespace the API knows nothing about
    server = api()  # repair runs in the root namespace: the stand-in listens on its loopback
    server.add(pod_object("shop", "web", annotations={KEY: "true"}, ip=meshed.ip))
    server.add(pod_object("shop", "db", ip=plain.ip))
    server.add(pod_object("shop", "elsewhere", annotations={KEY: "true"}, ip="10.231.9.9", node="node-b"))
    block = json.dumps({"mode": "iptables", "pod_selection": "opt-in", "kubeconfig": server.kubeconfig(str(tmp_path)),
                        "cgroup": node.node.cgroup, "pin_dir": node.node.pin_dir, "state_dir": node.node.state_dir})
    args = ["--plugin-conf", block, "--node-name", "node-a", "--no-processes", "--match", f"{cluster.id}-*"]

    listed = run_repair(*args)
    assert listed[meshed.netns.name]["pod"] == "shop/web" and listed[meshed.netns.name]["action"] == "enable"
    assert listed[plain.netns.name]["pod"] == "shop/db" and listed[plain.netns.name]["want"] is False
    assert listed[plain.netns.name]["action"] == "none"
    assert stranger.netns.name not in listed
    assert ("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a", f"Bearer {TOKEN}") in server.requests
    manager = Manager(node.node)
    assert manager.records() == []  # listing changed nothing

    fixed = run_repair(*args, "--apply")
    assert fixed[meshed.netns.name]["result"] == "fixed"
    assert [r.key for r in manager.records()] == [meshed.netns.key]
    server2 = cluster.add_pod(0, "target")
    server2.start_server(8080)
    sidecar = meshed.start_sidecar("project")
    assert not meshed.connect(server2.ip, 8080).direct
    assert sidecar.wait_for(lambda e: e["original_dst"] == f"{server2.ip}:8080")

    again = run_repair(*args)
    assert again[meshed.netns.name]["action"] == "none"
    manager.disable(meshed.netns.path)


@pytest.mark.root
def test_repair_without_api_by_name_and_process_namespaces(cluster, tmp_path):
    """Without a kubeconfig: named namespaces matching --match, and a namespace held only by a
    process (no name under /var/run/netns, as with cri-dockerd) found through /proc."""
    node = cluster.nodes[0]
    early = cluster.add_pod(0, "early")
    holder = node.spawn(["unshare", "--net", "sleep", "120"])  # cgroup first, then its own netns
    try:
        ns_path = f"/proc/{holder.pid}/ns/net"
        for _ in range(200):
            if os.stat(ns_path).st_ino != os.stat(f"/proc/{os.getpid()}/ns/net").st_ino and \
                    os.stat(ns_path).st_ino != node.netns.inode:
                break
            subprocess.run(["sleep", "0.01"])
        block = json.dumps({"mode": "iptables", "cgroup": node.node.cgroup, "pin_dir": node.node.pin_dir,
                            "state_dir": node.node.state_dir})
        base = ["--plugin-conf", block]
        # Named and process namespaces, found under their own names.
        listed = run_repair(*base, "--match", early.netns.name, "--match", f"pid:{holder.pid}")
        assert listed[early.netns.name]["source"] == "named" and listed[early.netns.name]["action"] == "enable"
        assert listed[f"pid:{holder.pid}"]["source"] == "process"
        # The default match (containerd's cni-*) selects none of them.
        assert early.netns.name not in run_repair(*base, "--no-processes")
        fixed = run_repair(*base, "--match", early.netns.name, "--match", f"pid:{holder.pid}", "--apply")
        assert {c["result"] for c in fixed.values()} == {"fixed"}
        saved = subprocess.run(["nsenter", f"--net={ns_path}", "iptables-legacy-save", "-t", "nat"],
                               capture_output=True, text=True).stdout
        assert "MI_OUTPUT" in saved
        # The process ends: its namespace is gone, and repair forgets the record.
        holder.kill()
        holder.wait()
        forgotten = run_repair(*base, "--match", "none", "--apply")
        assert forgotten[f"pid:{holder.pid}"]["action"] == "forget"
        assert forgotten[f"pid:{holder.pid}"]["result"] == "forgotten"
        assert [r.name for r in Manager(node.node).records()] == [early.netns.name]
        Manager(node.node).disable(early.netns.path)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# --- per-pod settings from annotations ---------------------------------------------------------
def test_annotations_of_every_mesh_family_map_onto_the_spec():
    pod = pod_object("default", "p", annotations={
        "openservicemesh.io/outbound-port-exclusion-list": "5432, 6379",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.10/32,fd00:231:9::/48",
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "*",
        "traffic.kuma.io/exclude-inbound-ports": "9901",
        "meshintercept.io/proxy-uid": "1337",
    })
    spec, mode, sources = notes.apply(pod, InterceptSpec.build(exclude_outbound_ports=["22"]), "iptables")
    assert mode == "iptables"
    assert spec.exclude_outbound_ports == (5432, 6379)  # the annotation replaces the config's list
    assert [str(n) for n in spec.exclude_outbound_cidrs] == ["10.96.0.10/32", "fd00:231:9::/48"]
    assert spec.exclude_inbound_ports == (9901,) and spec.proxy_uid == 1337
    assert sources == {"exclude_outbound_ports": "annotation openservicemesh.io/outbound-port-exclusion-list",
                       "exclude_outbound_cidrs": "annotation traffic.sidecar.istio.io/excludeOutboundIPRanges",
                       "exclude_inbound_ports": "annotation traffic.kuma.io/exclude-inbound-ports",
                       "proxy_uid": "annotation meshintercept.io/proxy-uid"}
    # agreeing spellings are fine; disagreeing ones name both
    pod["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = "6379,5432"
    assert notes.apply(pod, InterceptSpec(), "iptables")[0].exclude_outbound_ports == (5432, 6379)
    pod["metadata"]["annotations"]["traffic.kuma.io/exclude-outbound-ports"] = "80"
    with pytest.raises(notes.AnnotationError, match="openservicemesh.io/outbound-port-exclusion-list and "
                                                    "traffic.kuma.io/exclude-outbound-ports disagree"):
        notes.apply(pod, InterceptSpec(), "iptables")


@pytest.mark.parametrize("key,value,words", [
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "22,x", ["traffic.sidecar.istio.io/excludeOutboundPorts",
                                                              "'x' is not a number"]),
    ("openservicemesh.io/outbound-ip-range-exclusion-list", "10.0.0.0/33", ["outbound-ip-range-exclusion-list",
                                                                            "not a valid CIDR"]),
    ("traffic.sidecar.istio.io/includeOutboundPorts", "80", ["includeOutboundPorts", "exclusion annotation"]),
    ("meshintercept.io/mode", "tproxy", ["meshintercept.io/mode", "'tproxy'"]),
])
def test_a_bad_annotation_is_refused_by_name(key, value, words):
    with pytest.raises(notes.AnnotationError) as failed:
        notes.apply(pod_object("default", "p", annotations={key: value}), InterceptSpec(), "iptables")
    for word in words:
        assert word in failed.value.message


@pytest.mark.root
def test_annotations_change_a_pods_spec_through_a_real_add_and_status_says_where_from(cluster, api):
    bed, server = opt_in_bed(cluster, api)
    server.add(pod_object("default", "annotated", annotations={
        KEY: "true",
        "openservicemesh.io/outbound-port-exclusion-list": "5432",
        "traffic.sidecar.istio.io/includeInboundPorts": "8080,8443",
        "traffic.kuma.io/exclude-outbound-ports": "5432",
    }))
    server.add(pod_object("default", "broken", annotations={KEY: "true",
                                                              "traffic.sidecar.istio.io/excludeInboundPorts": "x"}))
    pod, _ = bed.add_pod("annotated")
    manager = Manager(bed.node.node)
    record = manager.record(pod.netns)
    assert record.spec.exclude_outbound_ports == (5432,) and record.spec.include_inbound_ports == (8080, 8443)
    rules = pod.iptables_save()
    assert "--dport 5432" in rules and "8080,8443" in rules
    item = manager.status(pod.netns.name)["namespaces"][0]
    assert item["sources"]["include_inbound_ports"] == "annotation traffic.sidecar.istio.io/includeInboundPorts"
    assert item["sources"]["exclude_outbound_ports"].startswith("annotation ")
    bed.runtime.check(pod.container_id, pod.netns.path)  # CHECK compares with the annotated spec
    with pytest.raises(PluginFailed) as failed:
        bed.add_pod("broken")
    assert failed.value.error["code"] == 105
    assert "traffic.sidecar.istio.io/excludeInboundPorts" in failed.value.error["msg"]
    assert len(manager.records()) == 1  # nothing applied for the broken pod
