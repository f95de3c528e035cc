"""Bad input gets one clear sentence, its documented exit code, and changes nothing.

These run the installed console script as a user would, in a subprocess.
"""

import os
import shutil
import subprocess
import sys

import pytest

from meshintercept.status import ExitStatus

EXE = os.path.join(os.path.dirname(sys.executable), "meshintercept")


@pytest.fixture
def node_env(node):
    """A lab node's environment, so nothing here touches a real node's state."""
    return node.cli_env()


@pytest.fixture
def netns_name(node):
    return node.add_pod("u").netns.name


def run(args, env, **kw):
    return subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=60, **kw)


def assert_one_sentence(proc, code, *words):
    assert proc.returncode == int(code), (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def assert_nothing_changed(env, ns):
    state = env["MESHINTERCEPT_STATE_DIR"]
    assert not os.path.exists(os.path.join(state, "namespaces")) or not os.listdir(os.path.join(state, "namespaces"))
    pins = env["MESHINTERCEPT_PIN_DIR"]
    assert not os.path.exists(pins) or os.listdir(pins) == []
    if ns:
        rules = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy-save", "-t", "nat"], capture_output=True, text=True).stdout
        assert "MI_" not in rules and "REDIRECT" not in rules


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--inbound-port", "0"], ["inbound port 0", "between 1 and 65535"]),
        (["--outbound-port", "70000"], ["outbound port 70000", "between 1 and 65535"]),
        (["--inbound-port", "abc"], ["'abc' is not a number"]),
        (["--exclude-outbound-port", "22,x"], ["'x' is not a number"]),
        (["--exclude-outbound-cidr", "10.0.0.0/33"], ["not a valid CIDR"]),
        (["--exclude-outbound-cidr", "nonsense"], ["not a valid CIDR"]),
        (["--exclude-outbound-cidr", "fd00:231::zz/64"], ["not a valid CIDR"]),
        (["--exclude-outbound-cidr", "10.0.0.0/8,::/0"], ["every IPv6 connection", "--family ipv4"]),
        (["--family", "ipv5"], ["family 'ipv5'"]),
        (["--inbound-port", "15001"], ["both 15001"]),
        (["--proxy-uid", "-5"], ["proxy UID"]),
    ],
)
def test_bad_values_are_usage_errors(node_env, netns_name, extra, words):
    proc = run(["enable", "--mode", "iptables", "--netns", netns_name, *extra], node_env)
    assert_one_sentence(proc, ExitStatus.USAGE, *words)
    assert_nothing_changed(node_env, netns_name)


def test_unknown_mode_names_the_available_ones(node_env, netns_name):
    proc = run(["enable", "--mode", "tproxy", "--netns", netns_name], node_env)
    assert_one_sentence(proc, ExitStatus.USAGE, "unknown mode 'tproxy'", "ebpf", "iptables", "nftables")
    assert_nothing_changed(node_env, netns_name)


def test_missing_namespace(node_env):
    proc = run(["enable", "--mode", "iptables", "--netns", "mi-u-does-not-exist"], node_env)
    assert_one_sentence(proc, ExitStatus.NOT_FOUND, "does not exist")
    assert_nothing_changed(node_env, None)


def test_missing_namespace_path(node_env):
    proc = run(["enable", "--mode", "iptables", "--netns", "pid:999999999"], node_env)
    assert_one_sentence(proc, ExitStatus.NOT_FOUND, "does not exist")


def test_env_values_are_validated_like_options(node_env, netns_name):
    env = dict(node_env, MESHINTERCEPT_OUTBOUND_PORT="abc")
    proc = run(["enable", "--mode", "iptables", "--netns", netns_name], env)
    assert_one_sentence(proc, ExitStatus.USAGE, "'abc' is not a number")


def test_disable_needs_exactly_one_target(node_env):
    proc = run(["disable"], node_env)
    assert_one_sentence(proc, ExitStatus.USAGE, "--netns", "--all")
    proc = run(["disable", "--netns", "x", "--all"], node_env)
    assert_one_sentence(proc, ExitStatus.USAGE, "--netns", "--all")


def test_not_root_is_refused(node_env, netns_name):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to drop root for this test")
    env = dict(node_env)
    # CAP_DAC_READ_SEARCH only lets nobody reach the env wherever the clone is (/root is 0700);
    # it grants nothing the tool checks for, and euid stays 65534.
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=+dac_read_search",
         "--ambient-caps=+dac_read_search", EXE,
         "enable", "--mode", "iptables", "--netns", netns_name],
        env=env, capture_output=True, text=True, timeout=60)
    assert_one_sentence(proc, ExitStatus.NOT_PERMITTED, "needs root")
    assert_nothing_changed(node_env, netns_name)


def test_a_family_the_namespace_lacks_is_refused_and_nothing_applied(node, node_env):
    pod = node.add_pod("v4only", families=("ipv4",))
    proc = run(["enable", "--mode", "iptables", "--netns", pod.netns.name, "--family", "ipv6"], node_env)
    assert_one_sentence(proc, ExitStatus.USAGE, "--family ipv6", "IPv6 is disabled in the namespace")
    assert_nothing_changed(node_env, pod.netns.name)
