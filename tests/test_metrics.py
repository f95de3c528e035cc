"""`meshintercept metrics`: real counters of real namespaces and real CNI invocations, in the
Prometheus text format (parsed with prometheus_client's own parser), printed once or served."""

import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshintercept.lab.cluster import BASE_PYTHON, TestCluster
from meshintercept.lab.cni_testbed import CniTestbed
from meshintercept.spec import InterceptSpec

pytestmark = pytest.mark.root
EXE = os.path.join(os.path.dirname(sys.executable), "meshintercept")


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


@pytest.fixture
def bed(test_prefix):
    with TestCluster(nodes=1, prefix=test_prefix) as cluster:
        yield CniTestbed(cluster, mode="iptables")


def test_metrics_count_interception_and_cni_invocations(bed):
    pod, _ = bed.add_pod("app")  # a real CNI ADD: enabled through the chain, logged
    bed.start_node_server(8080)
    pod.start_sidecar("project")
    for _ in range(3):
        assert not pod.connect(bed.gateway, 8080).direct
    other = bed.node.add_pod("bpf")
    manager = bed.node.manager()
    manager.enable(other.netns.name, "ebpf", InterceptSpec())
    other.start_sidecar("project")
    assert not other.connect(bed.gateway, 8080).direct
    env = bed.node.cli_env(MESHINTERCEPT_CNI_LOG_FILE=bed.log_file)
    proc = subprocess.run([EXE, "metrics"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = samples(proc.stdout)
    ns_app, ns_bpf = frozenset({("namespace", pod.netns.name)}), frozenset({("namespace", other.netns.name)})
    assert got[("meshintercept_namespaces", frozenset({("mode", "iptables")}))] == 1
    assert got[("meshintercept_namespaces", frozenset({("mode", "ebpf")}))] == 1
    assert got[("meshintercept_iptables_outbound_packets_total", ns_app)] >= 3
    assert got[("meshintercept_ebpf_redirected_out_total", ns_bpf)] == 1
    assert got[("meshintercept_ebpf_origdst_answers_total", ns_bpf)] == 1
    assert got[("meshintercept_cni_invocations_total", frozenset({("command", "ADD"), ("result", "ok")}))] == 1
    assert got[("meshintercept_cni_duration_seconds_count", frozenset({("command", "ADD")}))] == 1
    assert ("meshintercept_ebpf_programs_loaded_timestamp_seconds", frozenset()) in got
    captured = {(dict(labels)["family"], v) for (name, labels), v in got.items()
                if name == "meshintercept_namespace_families" and dict(labels)["namespace"] == pod.netns.name}
    assert captured == {("ipv4", 1.0), ("ipv6", 1.0)}  # IPv6 is on in the namespace, so its rules are too
    manager.disable_all()


def test_metrics_served_over_http_parse_as_prometheus_text(bed):
    """Served inside the node's namespace (nothing listens in the machine's own), scraped from there."""
    pod, _ = bed.add_pod("served")
    env = bed.node.cli_env(MESHINTERCEPT_CNI_LOG_FILE=bed.log_file)
    server = bed.node.spawn([EXE, "metrics", "--serve", f"{bed.node.gateway}:9464"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    scrape = ("import urllib.request, sys, time\n"
              "for _ in range(100):\n"
              "    try:\n"
              f"        print(urllib.request.urlopen('http://{bed.node.gateway}:9464/metrics', timeout=5)"
              ".read().decode()); break\n"
              "    except OSError: time.sleep(0.1)\n")
    try:
        text = bed.node.run([BASE_PYTHON, "-c", scrape], timeout=60).stdout
    finally:
        server.terminate()
        server.wait(10)
    got = samples(text)
    assert got[("meshintercept_namespaces", frozenset({("mode", "iptables")}))] == 1
    assert got[("meshintercept_cni_invocations_total", frozenset({("command", "ADD"), ("result", "ok")}))] == 1
