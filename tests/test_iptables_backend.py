"""The iptables backend against real namespaces, the real legacy nat table and real sockets.

Each test gets a fresh one-node lab cluster and makes its namespaces there as pods; the traffic
tests use two pods on the node's bridge. Test servers stand in for the sidecar's ports: they
answer every connection with their name and what SO_ORIGINAL_DST says.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from meshintercept.backends.iptables import iptc_compat as compat
from meshintercept.backends.iptables import probe
from meshintercept.backends.iptables import rules as model
from meshintercept.backends.iptables import table
from meshintercept.backends.iptables import IptablesInterceptor
from meshintercept.errors import BackendFailure, Conflict, UsageError
from meshintercept.manager import Manager
from meshintercept.netns import Netns
from meshintercept.node import Node
from meshintercept.spec import InterceptSpec
from meshintercept.state import NamespaceRecord

pytestmark = pytest.mark.root

APP_UID, PROXY_UID = 1000, 1500


# --- fixtures and helpers ----------------------------------------------------------------------
@pytest.fixture
def make_ns(node):
    """Namespaces of the lab (swept and removed like every lab object), for table-only tests."""
    count = iter(range(100))

    def make() -> Netns:
        return node.add_pod(f"ns{next(count)}").netns

    return make


@pytest.fixture
def ns(make_ns) -> Netns:
    return make_ns()


@pytest.fixture
def backend(tmp_path) -> IptablesInterceptor:
    return IptablesInterceptor(Node(cgroup="/nonexistent", pin_dir=str(tmp_path / "pins"), state_dir=str(tmp_path / "state")))


def record(netns: Netns, spec: InterceptSpec, extra: dict = None) -> NamespaceRecord:
    extra = extra if extra is not None else {"families": ["ipv4", "ipv6"]}
    return NamespaceRecord(netns.key, netns.ref, netns.path, netns.name, "iptables", spec, extra=extra)


def sh(netns: Netns, *argv: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", "netns", "exec", netns.name, *argv], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed: {proc.stderr}")
    return proc.stdout


def legacy_tables(netns: Netns) -> list:
    return sh(netns, "cat", "/proc/net/ip_tables_names").split()


def save(netns: Netns, family: int = 4) -> list:
    """iptables-legacy-save -t nat (ip6tables- for 6), without its timestamp comments and counters."""
    tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    # A stray packet (neighbour discovery on the node's bridge) moves a policy counter.
    return [re.sub(r"\[\d+:\d+\]$", "[0:0]", l) for l in sh(netns, tool, "-t", "nat").splitlines()
            if not l.startswith("#")]


def ours(lines: list) -> list:
    out = []
    for line in lines:
        chain = line.split()[1] if line.startswith("-A ") else line[1:].split()[0] if line.startswith(":") else ""
        if chain in model.OWN_CHAINS or "meshintercept:" in line:
            out.append(line)
    return out


def plan_documents(text: str) -> dict:
    """The dry run's documents by family: {4: text, 6: text}, each one restore input."""
    docs, current = {}, []
    for line in text.splitlines(keepends=True):
        current.append(line)
        if line.strip() == "COMMIT":
            body = "".join(current)
            docs[6 if "ip6tables" in body.split("*nat", 1)[0] else 4] = body
            current = []
    return docs


def plan_lines(text: str, family: int = 4) -> list:
    body = [l for l in plan_documents(text)[family].splitlines() if not l.startswith("#")]
    assert body[0] == "*nat" and body[-1] == "COMMIT"
    return body[1:-1]


def legacy(netns: Netns, *args: str) -> None:
    sh(netns, "iptables-legacy", "-w", "-t", "nat", *args)


def add_foreign_rules(netns: Netns) -> None:
    """What another tool might have put there: its own chain and rules in both built-ins."""
    legacy(netns, "-N", "OTHER_CHAIN")
    legacy(netns, "-A", "OTHER_CHAIN", "-p", "udp", "--dport", "53", "-j", "RETURN")
    legacy(netns, "-A", "PREROUTING", "-p", "udp", "-j", "OTHER_CHAIN")
    legacy(netns, "-A", "OUTPUT", "-d", "192.0.2.7/32", "-j", "RETURN")
    legacy(netns, "-A", "POSTROUTING", "-o", "lo", "-j", "ACCEPT")


# --- the model and the dry run ------------------------------------------------------------------
def test_rules_are_a_pure_function_of_the_spec():
    spec = InterceptSpec.build(exclude_inbound_ports=["22"], exclude_outbound_cidrs=["10.96.0.0/12"])
    assert model.build(spec) == model.build(spec)
    lines = model.build(spec).lines()
    assert all(l.startswith(":MI_") or "meshintercept:" in l for l in lines)
    # Every rule names what it does; the only rules outside our chains are the two jumps.
    assert [r.chain for r in model.build(spec).jumps] == ["PREROUTING", "OUTPUT"]


def test_multiport_rules_hold_at_most_15_ports():
    spec = InterceptSpec.build(exclude_outbound_ports=[str(p) for p in range(2000, 2040)])
    chunks = [m for r in model.build(spec).rules for m in r.matches if r.chain == model.OUTPUT and m.name == "multiport"]
    assert [len(m.value.split(",")) for m in chunks] == [15, 15, 10]


def test_proxy_ports_never_redirected_even_when_included():
    spec = InterceptSpec.build(include_inbound_ports=["15001", "15003"])
    inbound = model.build(spec).chain_rules(model.INBOUND)
    assert not [r for r in inbound if r.target == model.IN_REDIRECT]


def test_accelerate_is_rejected_and_debug_ignored(backend, ns):
    spec = InterceptSpec(accelerate=True)
    with pytest.raises(UsageError, match="--accelerate needs --mode ebpf"):
        backend.enable(ns, spec)
    with pytest.raises(UsageError, match="--accelerate needs --mode ebpf"):
        backend.plan(ns, spec)
    assert "nat" not in legacy_tables(ns)
    assert backend.plan(ns, InterceptSpec(debug=True)) == backend.plan(ns, InterceptSpec())


def test_plan_changes_nothing(backend, ns):
    backend.plan(ns, InterceptSpec())
    backend.inspect(record(ns, InterceptSpec()), ns)
    # Even the nat table itself must not be created by looking.
    assert "nat" not in legacy_tables(ns)


@pytest.mark.parametrize("spec", [
    InterceptSpec(),
    InterceptSpec.build(proxy_uid=1337, outbound_port=16001, inbound_port=16006,
                        exclude_inbound_ports=["22", "8081"], include_inbound_ports=["80", "443", "8080"],
                        exclude_outbound_ports=[str(p) for p in range(3000, 3020)],
                        exclude_outbound_cidrs=["10.96.0.0/12", "192.168.1.5", "0.0.0.0/0"]),
], ids=["defaults", "everything"])
def test_applied_rules_equal_the_plan(backend, ns, spec):
    text = backend.plan(ns, spec)
    extra = backend.enable(ns, spec)
    assert extra["families"] == ["ipv4", "ipv6"]
    for family in (4, 6):
        assert ours(save(ns, family)) == plan_lines(text, family), family
    # Our reader renders the tables as iptables-legacy-save does, so status shows the truth.
    live = backend.inspect(record(ns, spec, extra), ns)
    assert live["rules"] == plan_lines(text, 4) + [f"ip6tables: {l}" for l in plan_lines(text, 6)]
    assert live["in_place"] is True and live["families"] == {"ipv4": "captured", "ipv6": "captured"}


def test_plan_is_valid_restore_input(backend, make_ns):
    """iptables-legacy-restore --noflush given the dry run builds the same table as enable."""
    spec = InterceptSpec.build(exclude_inbound_ports=["22"], exclude_outbound_cidrs=["10.0.0.0/8"])
    by_tool, by_us = make_ns(), make_ns()
    docs = plan_documents(backend.plan(by_tool, spec))
    for family, tool in ((4, "iptables-legacy-restore"), (6, "ip6tables-legacy-restore")):
        proc = subprocess.run(["ip", "netns", "exec", by_tool.name, tool, "--noflush"],
                              input=docs[family], text=True, capture_output=True)
        assert proc.returncode == 0, proc.stderr
    backend.enable(by_us, spec)
    assert save(by_tool) == save(by_us) and save(by_tool, 6) == save(by_us, 6)
    assert backend.inspect(record(by_tool, spec), by_tool)["in_place"] is True


# --- apply: atomic, idempotent, replacing, polite to others ----------------------------------
def test_enable_twice_changes_nothing(backend, ns):
    spec = InterceptSpec.build(exclude_outbound_ports=["5432"])
    backend.enable(ns, spec)
    before = save(ns)
    backend.enable(ns, spec)
    assert save(ns) == before
    # Not even an identical commit: the table code finds nothing to do.
    assert ns.run(table.apply, model.build(spec), "test")["changed"] is False


def test_changed_spec_replaces_ours_and_keeps_others_in_place(backend, ns):
    add_foreign_rules(ns)
    old = InterceptSpec.build(exclude_inbound_ports=["22"])
    backend.enable(ns, old)
    legacy(ns, "-A", "PREROUTING", "-p", "tcp", "--dport", "7", "-j", "RETURN")  # after our jump
    before = save(ns)
    new = InterceptSpec.build(outbound_port=15011, include_inbound_ports=["80"], exclude_outbound_cidrs=["10.9.0.0/16"])
    backend.enable(ns, new)
    after = save(ns)
    assert ours(after) == plan_lines(backend.plan(ns, new))
    # Everything not ours is unchanged, and our jumps kept their place among the others.
    assert [l for l in after if l not in ours(after)] == [l for l in before if l not in ours(before)]
    assert [l for l in after if l.startswith("-A PREROUTING")] == [l for l in before if l.startswith("-A PREROUTING")]


def test_disable_removes_exactly_what_enable_added(backend, ns):
    add_foreign_rules(ns)
    pristine = save(ns)
    spec = InterceptSpec.build(exclude_inbound_ports=["22"])
    backend.enable(ns, spec)
    assert ours(save(ns))
    backend.disable(record(ns, spec), ns)
    assert save(ns) == pristine
    backend.disable(record(ns, spec), ns)  # idempotent
    assert save(ns) == pristine


def test_disable_when_the_namespace_is_gone(backend, node):
    pod = node.add_pod("gone")
    ns, spec = pod.netns, InterceptSpec()
    backend.enable(ns, spec)
    node.cluster.remove_pod(pod)
    backend.disable(record(ns, spec), ns)  # the Netns object still names the dead namespace
    backend.disable(record(ns, spec), None)
    assert backend.inspect(record(ns, spec), None)["in_place"] is False


def test_disable_refuses_while_another_rule_uses_our_chain(backend, ns):
    spec = InterceptSpec()
    backend.enable(ns, spec)
    legacy(ns, "-I", "OUTPUT", "1", "-p", "tcp", "--dport", "9", "-j", "MI_OUT_REDIRECT")
    before = save(ns)
    with pytest.raises(Conflict, match="MI_OUT_REDIRECT is still used by a rule meshintercept did not add"):
        backend.disable(record(ns, spec), ns)
    assert save(ns) == before


def test_kernel_refusal_changes_nothing(backend, ns):
    """A foreign POSTROUTING jump into our chain makes REDIRECT illegal there: the kernel
    rejects the one commit, and the table stays exactly as it was."""
    legacy(ns, "-N", "MI_OUT_REDIRECT")
    legacy(ns, "-A", "POSTROUTING", "-j", "MI_OUT_REDIRECT")
    add_foreign_rules(ns)
    before = save(ns)
    with pytest.raises(BackendFailure, match="kernel refused the nat table update.*nothing was changed.*POSTROUTING"):
        backend.enable(ns, InterceptSpec())
    assert save(ns) == before


def test_failure_while_building_changes_nothing(backend, ns, monkeypatch):
    """Fail half-way through an update that replaces an old spec: flushes and appends
    already happened on the handle, none reach the kernel."""
    add_foreign_rules(ns)
    backend.enable(ns, InterceptSpec())
    before = save(ns)
    real, calls = table.to_iptc, []

    def flaky(iptc, rule, family=4):
        calls.append(rule)
        if len(calls) == 6:
            raise RuntimeError("simulated failure in the middle of the update")
        return real(iptc, rule, family)

    monkeypatch.setattr(table, "to_iptc", flaky)  # copied into the forked child
    with pytest.raises(Exception, match="simulated failure"):
        backend.enable(ns, InterceptSpec.build(outbound_port=15021, exclude_outbound_ports=["80"]))
    assert save(ns) == before


def test_waits_for_the_xtables_lock(backend, ns, monkeypatch, tmp_path):
    import fcntl

    lockfile = tmp_path / "xtables.lock"
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lockfile))
    monkeypatch.setattr(table, "LOCK_TIMEOUT", 0.3)
    fd = os.open(lockfile, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(BackendFailure, match="xtables lock"):
            backend.enable(ns, InterceptSpec())
    finally:
        os.close(fd)
    assert "nat" not in legacy_tables(ns)
    backend.enable(ns, InterceptSpec())
    assert ours(save(ns))


# --- what status and doctor report -------------------------------------------------------------
def test_nft_rules_and_foreign_redirects_are_reported(backend, ns):
    spec = InterceptSpec()
    sh(ns, "iptables-nft", "-t", "nat", "-N", "ISTIO_REDIRECT")
    sh(ns, "iptables-nft", "-t", "nat", "-A", "ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001")
    legacy(ns, "-A", "PREROUTING", "-p", "tcp", "--dport", "9999", "-j", "REDIRECT", "--to-ports", "4143")
    extra = backend.enable(ns, spec)
    # enable warns from the table it commits to (no nft subprocess); nft rules are status/doctor's
    assert any("redirect rule(s) meshintercept did not add" in w and "9999" in w for w in extra["warnings"])
    live = backend.inspect(record(ns, spec), ns)
    assert live["in_place"] is True and live["backend"] == "legacy"
    assert live["nft_rules_present"] is True
    assert "-A PREROUTING -p tcp -m tcp --dport 9999 -j REDIRECT --to-ports 4143" in live["foreign_redirects"]
    assert any("ISTIO_REDIRECT" in f and "REDIRECT" in f for f in live["foreign_redirects"])
    conflicts = probe.namespace_conflicts(ns)
    assert conflicts["nft_rules_present"] is True and len(conflicts["warnings"]) == 2


def test_clean_namespace_reports_nothing_foreign(backend, ns):
    backend.enable(ns, InterceptSpec())
    live = backend.inspect(record(ns, InterceptSpec()), ns)
    assert live["nft_rules_present"] is False
    assert live["foreign_redirects"] == []
    assert "warnings" not in live
    assert live["counters"] == {"inbound": {"packets": 0, "bytes": 0}, "outbound": {"packets": 0, "bytes": 0}}


def test_inspect_notices_drift(backend, ns):
    spec = InterceptSpec()
    backend.enable(ns, spec)
    legacy(ns, "-D", "MI_OUTPUT", "1")
    live = backend.inspect(record(ns, spec), ns)
    assert live["in_place"] is False
    assert any("--uid-owner 1500" in l for l in live["missing"])
    backend.enable(ns, spec)  # repairs
    assert backend.inspect(record(ns, spec), ns)["in_place"] is True


def test_doctor_tries_it_for_real_and_warns_about_managed_namespaces(backend, ns):
    backend.enable(ns, InterceptSpec())
    sh(ns, "iptables-nft", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "1", "-j", "ACCEPT")
    checks = {c.name: c for c in backend.doctor([record(ns, InterceptSpec())])}
    assert checks["python-iptables importable"].ok
    selftest = checks["legacy nat table redirects (IPv4)"]
    assert selftest.ok, selftest.detail
    assert "SO_ORIGINAL_DST 10.231.255.2:1404" in selftest.detail
    assert "iptables default variant" in checks
    managed = checks[f"namespace {ns.name}: no nft or foreign redirect rules"]
    assert managed.warning and "nftables rule" in managed.detail


def test_unavailable_reason_names_the_fix(monkeypatch):
    assert IptablesInterceptor.unavailable_reason() is None
    monkeypatch.setattr(compat, "xtables_libdir", lambda: None)
    assert "install the iptables package" in IptablesInterceptor.unavailable_reason()


def test_teardown_has_nothing_node_wide(backend):
    assert backend.teardown() == []


def test_through_the_manager(tmp_path, ns):
    manager = Manager(Node(cgroup="/nonexistent", pin_dir=str(tmp_path / "pins"), state_dir=str(tmp_path / "state")))
    spec = InterceptSpec.build(exclude_inbound_ports=["22"])
    assert manager.enable(ns.name, "iptables", spec)["changed"] is True
    assert manager.enable(ns.name, "iptables", spec)["changed"] is False
    [item] = manager.status(ns.name)["namespaces"]
    assert item["live"]["in_place"] is True
    # all namespaces: the records, clearly marked, unless asked to look inside each one
    [item] = manager.status()["namespaces"]
    assert item["live"] == {"checked": "recorded", "in_place": None} and item["present"] is True
    [item] = manager.status(live=True)["namespaces"]
    assert item["live"]["in_place"] is True and item["live"]["checked"] == "live"
    manager.disable(ns.name)
    assert ours(save(ns)) == []


# --- real traffic ---------------------------------------------------------------------------------
@pytest.fixture
def pod_and_peer(node):
    """Two pods on one lab node; stand-ins for the proxy's ports say which one answered and
    the original destination they learnt (SO_ORIGINAL_DST, else their own address)."""
    pod, peer = node.add_pod("pod"), node.add_pod("peer")
    for where, port, name, bind in (
        (pod, 15001, "outbound-proxy", "0.0.0.0"), (pod, 15003, "inbound-proxy", "0.0.0.0"),
        (pod, 8080, "pod-app", "0.0.0.0"), (pod, 2222, "pod-ssh", "0.0.0.0"), (pod, 9000, "pod-local", "127.0.0.1"),
        (peer, 8080, "peer-app", "0.0.0.0"), (peer, 5432, "peer-db", "0.0.0.0"),
    ):
        where.start_server(port, reply=name + " {origdst}", bind=bind)
    return pod, peer


def _answer(src, host: str, port: int, uid: int = APP_UID) -> str:
    return src.connect(host, port, uid=uid).decode().strip()


def test_traffic_is_redirected_as_the_spec_says(backend, pod_and_peer):
    pod, peer = pod_and_peer
    POD_IP, PEER_IP = pod.ip, peer.ip
    spec = InterceptSpec.build(exclude_inbound_ports=["2222"], exclude_outbound_ports=["5432"])

    def from_pod(host, port, uid=APP_UID):
        return _answer(pod, host, port, uid)

    def from_peer(host, port):
        return _answer(peer, host, port)

    assert from_pod(PEER_IP, 8080) == f"peer-app {PEER_IP}:8080"  # before: direct
    backend.enable(pod.netns, spec)

    # Outbound from the app goes to the outbound port, which learns the true destination.
    assert from_pod(PEER_IP, 8080) == f"outbound-proxy {PEER_IP}:8080"
    # The proxy's own connections, excluded ports and loopback go direct.
    assert from_pod(PEER_IP, 8080, uid=PROXY_UID) == f"peer-app {PEER_IP}:8080"
    assert from_pod(PEER_IP, 5432) == f"peer-db {PEER_IP}:5432"
    assert from_pod("127.0.0.1", 9000) == "pod-local 127.0.0.1:9000"
    # Inbound goes to the inbound port, except excluded ports and the proxy's own ports.
    assert from_peer(POD_IP, 8080) == f"inbound-proxy {POD_IP}:8080"
    assert from_peer(POD_IP, 2222) == f"pod-ssh {POD_IP}:2222"
    assert from_peer(POD_IP, 15001) == f"outbound-proxy {POD_IP}:15001"
    # The app calling its own pod address is outbound traffic (as under the eBPF backend);
    # the proxy forwarding it to the app's address goes straight there (no loop).
    assert from_pod(POD_IP, 8080) == f"outbound-proxy {POD_IP}:8080"
    assert from_pod(POD_IP, 8080, uid=PROXY_UID) == f"pod-app {POD_IP}:8080"

    # NAT sees one packet per new connection; on a loaded machine one more was counted once
    # (most likely a resent SYN whose first copy was dropped before conntrack confirmed it).
    counters = backend.inspect(record(pod.netns, spec), pod.netns)["counters"]
    assert counters["outbound"]["packets"] >= 2 and counters["outbound"]["bytes"] > 0
    assert counters["inbound"]["packets"] >= 1 and counters["inbound"]["bytes"] > 0

    backend.disable(record(pod.netns, spec), pod.netns)
    assert from_pod(PEER_IP, 8080) == f"peer-app {PEER_IP}:8080"
    assert from_peer(POD_IP, 8080) == f"pod-app {POD_IP}:8080"


def test_excluded_cidr_and_include_list(backend, pod_and_peer):
    pod, peer = pod_and_peer
    spec = InterceptSpec.build(exclude_outbound_cidrs=[f"{peer.ip}/32"], include_inbound_ports=["2222"])
    backend.enable(pod.netns, spec)
    assert _answer(pod, peer.ip, 8080) == f"peer-app {peer.ip}:8080"
    assert _answer(peer, pod.ip, 2222) == f"inbound-proxy {pod.ip}:2222"
    assert _answer(peer, pod.ip, 8080) == f"pod-app {pod.ip}:8080"


def test_reader_renders_any_rule_as_iptables_save_does(ns):
    """Status shows other tools' rules too; each must read exactly as iptables-legacy-save prints it."""
    legacy(ns, "-N", "SOME_CHAIN")
    for rule in (
        ["-A", "PREROUTING", "!", "-s", "10.0.0.0/8", "-i", "eth+", "-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", "10.1.2.3:8080"],
        ["-A", "PREROUTING", "-s", "10.0.0.0/255.0.255.0", "!", "-i", "lo", "-j", "SOME_CHAIN"],
        ["-A", "OUTPUT", "!", "-p", "udp", "-f", "-m", "mark", "--mark", "0x1/0xff", "-g", "SOME_CHAIN"],
        ["-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW,RELATED", "-m", "comment", "--comment", "with \"quotes\"", "-j", "RETURN"],
        ["-A", "POSTROUTING", "-o", "eth0", "-p", "tcp", "-j", "MASQUERADE", "--to-ports", "1000-2000", "--random"],
        ["-A", "SOME_CHAIN", "-p", "icmp"],
        ["-A", "SOME_CHAIN", "-p", "47", "-j", "ACCEPT"],
    ):
        legacy(ns, *rule)
    expected = [l for l in save(ns) if l.startswith("-A ")]
    live = ns.run(table.read_table)
    assert [r.line for r in live.rules] == expected
    assert live.chains == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "SOME_CHAIN"]


def test_a_namespace_without_ipv6_is_intercepted_for_ipv4_with_a_note(backend, node):
    pod = node.add_pod("v4only", families=("ipv4",))
    extra = backend.enable(pod.netns, InterceptSpec())
    assert extra["families"] == ["ipv4"]
    assert any("IPv6 is not intercepted: IPv6 is disabled in the namespace" in w for w in extra["warnings"])
    live = backend.inspect(record(pod.netns, InterceptSpec(), extra), pod.netns)
    assert live["in_place"] is True and live["families"]["ipv4"] == "captured"
    assert "disable_ipv6=1" in live["families"]["ipv6"]
    # asked for by name, a family the namespace lacks is refused, and nothing is applied
    backend.disable(record(pod.netns, InterceptSpec(), extra), pod.netns)
    before = save(pod.netns)
    with pytest.raises(UsageError, match="--family ipv6 was asked for but IPv6 is disabled"):
        backend.enable(pod.netns, InterceptSpec.build(families=["ipv6"]))
    assert save(pod.netns) == before


def test_a_failing_ipv6_commit_puts_ipv4_back(backend, ns, monkeypatch):
    old = InterceptSpec.build(exclude_outbound_ports=["5432"])
    extra = backend.enable(ns, old)
    before = (save(ns), save(ns, 6))
    real = table.apply

    def ipv6_fails(ruleset, *args, **kwargs):
        if ruleset.family == 6:
            raise BackendFailure("simulated: the kernel refused the ip6tables commit")
        return real(ruleset, *args, **kwargs)

    monkeypatch.setattr(table, "apply", ipv6_fails)  # copied into the forked children
    with pytest.raises(BackendFailure, match="simulated"):
        backend.enable(ns, InterceptSpec.build(outbound_port=15021), record(ns, old, extra))
    assert (save(ns), save(ns, 6)) == before
