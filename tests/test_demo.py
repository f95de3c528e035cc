"""The built-in demo runs end to end and leaves nothing behind."""

import os
import re
import subprocess
import sys

import pytest

from meshintercept import registry
from meshintercept.errors import MeshInterceptError

EXE = os.path.join(os.path.dirname(sys.executable), "meshintercept")


def _leftovers(cluster_id):
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out = [l for l in names.splitlines() if cluster_id in l]
    out += [d for d in os.listdir("/sys/fs/cgroup/unified") if cluster_id in d]
    for top in ("/sys/fs/bpf", "/run/meshintercept"):
        if os.path.isdir(top):
            out += [d for d in os.listdir(top) if cluster_id in d]
    return out


def _mode_usable(mode):
    try:
        return registry.load(mode).unavailable_reason() is None
    except MeshInterceptError:
        return False


@pytest.mark.parametrize("mode", ["iptables", "nftables", "ebpf"])
def test_demo_shows_both_answers_and_cleans_up(mode):
    if not _mode_usable(mode):
        pytest.skip(f"mode {mode} is not usable here yet")
    proc = subprocess.run([EXE, "demo", "--mode", mode], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "Hi, I am pipy ok v1 !" in proc.stdout
    assert "Hi, I am pipy ok v2 !" in proc.stdout
    # The path section proves the answers went through the sidecars, not around them.
    assert "original dst 10.231.200.1:8080" in proc.stdout
    assert "original dst [fd00:231:200::1]:8080" in proc.stdout
    assert proc.stdout.count("Hi, I am pipy ok v") == 4
    assert "inbound" in proc.stdout
    # Only this run's cluster is checked: another demo may run on the machine at the same time.
    cluster_id = re.search(r"pin dir /sys/fs/bpf/(mi-demo-[0-9a-f]+)-node1", proc.stdout).group(1)
    assert _leftovers(cluster_id) == []


@pytest.mark.parametrize("mode", ["iptables", "nftables", "ebpf"])
def test_demo_with_capture_dns_resolves_the_service_name_in_the_sidecar(mode):
    if not _mode_usable(mode):
        pytest.skip(f"mode {mode} is not usable here yet")
    proc = subprocess.run([EXE, "demo", "--mode", mode, "--capture-dns"], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    # nothing listens on the pod's nameserver: only the sidecar knows the name
    assert re.search(r"^10\.231\.200\.1\s+pipy-ok\.mesh$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^  curl +dns +(udp|tcp) from .* pipy-ok\.mesh: answered local$", proc.stdout, re.M)
    assert proc.stdout.count("Hi, I am pipy ok v") == 5  # four by address, one by name
    cluster_id = re.search(r"pin dir /sys/fs/bpf/(mi-demo-[0-9a-f]+)-node1", proc.stdout).group(1)
    assert _leftovers(cluster_id) == []
