"""The nftables backend against real namespaces of the lab, the real nf_tables and real sockets.

Each test gets a fresh one-node lab cluster and makes its namespaces there as pods. What the
kernel holds is read with the ``nft`` command inside the namespace, independently of the
backend's own reader; transactions are counted with ``nft monitor`` (one "new generation"
per committed transaction).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading

import pytest

from meshintercept.backends.nftables import NftablesInterceptor, probe, table
from meshintercept.backends.nftables import ruleset as model
from meshintercept.errors import BackendFailure, Conflict, UsageError
from meshintercept.manager import Manager
from meshintercept.netns import Netns
from meshintercept.node import Node
from meshintercept.spec import InterceptSpec
from meshintercept.state import NamespaceRecord

EXE = os.path.join(os.path.dirname(sys.executable), "meshintercept")
APP_UID, PROXY_UID = 1000, 1500
EVERYTHING = InterceptSpec.build(
    proxy_uid=1337, outbound_port=16001, inbound_port=16006, exclude_inbound_ports=["22", "8081", "16001"],
    include_inbound_ports=["80", "443", "8080"], exclude_outbound_ports=[str(p) for p in range(3000, 3020)],
    exclude_outbound_cidrs=["10.96.0.0/12", "192.168.1.5", "0.0.0.0/0", "fd00:dead::/32", "fd00:231::7",
                            "::ffff:172.16.0.0/108", "::1.2.3.4/128"])


# --- helpers ---------------------------------------------------------------------------------------
@pytest.fixture
def backend(tmp_path) -> NftablesInterceptor:
    return NftablesInterceptor(Node(cgroup="/nonexistent", pin_dir=str(tmp_path / "pins"),
                                    state_dir=str(tmp_path / "state")))


@pytest.fixture
def pod(node):
    return node.add_pod("p")


def record(netns: Netns, spec: InterceptSpec, extra: dict = None) -> NamespaceRecord:
    extra = extra if extra is not None else {"families": ["ipv4", "ipv6"]}
    return NamespaceRecord(netns.key, netns.ref, netns.path, netns.name, "nftables", spec, extra=extra)


def nft(place, *args: str, check: bool = True, stdin: str = None) -> str:
    proc = place.run(["nft", *args], input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"nft {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def our_listing(place) -> str:
    """``nft list table inet meshintercept``, or "" when there is none."""
    return nft(place, "list", "table", "inet", "meshintercept", check=False)


def ruleset_items(place, ours: bool) -> list:
    """The namespace's ruleset as JSON items (ours or everyone else's), counter values dropped
    and handles kept: a table that was recreated does not compare equal."""
    out = []
    for item in json.loads(nft(place, "-j", "list", "ruleset"))["nftables"]:
        kind, body = next(iter(item.items()))
        if kind == "metainfo":
            continue
        mine = (body.get("family"), body["name"] if kind == "table" else body.get("table")) == ("inet", "meshintercept")
        if mine == ours:
            body = dict(body, expr=model.normalized_expr(body["expr"])) if kind == "rule" else body
            out.append({kind: body})
    return out


def plan_body(text: str) -> str:
    return "".join(l for l in text.splitlines(keepends=True) if not l.startswith("#"))


class Transactions:
    """Counts the transactions the kernel commits in a namespace, from ``nft monitor``."""

    def __init__(self, place):
        self.place = place
        self.proc = place.spawn(["nft", "monitor"], stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.marks = 0
        self._mark()  # the monitor is subscribed once it reports this

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def _mark(self) -> list:
        """Commit a marker transaction and return the monitor lines before it."""
        self.marks += 1
        name = f"mark{self.marks}"
        seen = []
        for _ in range(50):
            nft(self.place, "add", "table", "inet", name)
            try:
                while True:
                    line = self.lines.get(timeout=0.2)
                    if line == f"add table inet {name}":
                        return seen
                    seen.append(line)
            except queue.Empty:
                continue
        raise AssertionError("nft monitor reported nothing")

    def count(self, action) -> int:
        self._mark()
        action()
        seen = self._mark()
        # the first marker's own generation line comes after its "add table" line
        return sum(1 for line in seen if line.startswith("# new generation")) - 1

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def transactions(pod):
    watcher = Transactions(pod)
    yield watcher
    watcher.close()


# --- the model ----------------------------------------------------------------------------------------
def test_the_ruleset_is_a_pure_function_of_the_spec_and_every_rule_says_why():
    assert model.build(EVERYTHING) == model.build(EVERYTHING)
    ruleset = model.build(EVERYTHING)
    assert all(r.full_comment.startswith("meshintercept: ") for r in ruleset.rules)
    assert [r.chain for r in ruleset.rules if r.verdict.startswith("jump")] == ["prerouting", "output"]
    text = "\n".join(ruleset.lines())
    # v4-mapped CIDRs are their IPv4 range; IPv6 as inet_ntop writes it (as nft prints it)
    assert "ip daddr 172.16.0.0/12 " in text and "ip6 daddr ::1.2.3.4 " in text
    assert "ip daddr 192.168.1.5 " in text and "ip daddr 0.0.0.0/0 " in text


def test_proxy_ports_are_never_redirected_even_when_included():
    ruleset = model.build(InterceptSpec.build(include_inbound_ports=["15001", "15003"]))
    assert not [r for r in ruleset.chain_rules(model.INBOUND) if r.redirect is not None]
    assert ruleset.chain_rules(model.INBOUND)[0].matches[0].values == (15001, 15003)


def test_dns_rules_only_when_captured_and_port_53_is_not_excluded():
    def chains(**options):
        return [c.name for c in model.build(InterceptSpec.build(**options)).chains]

    assert "dns" not in chains() and "dns" in chains(capture_dns=True)
    assert "dns" not in chains(capture_dns=True, exclude_outbound_ports=["53"])
    output = model.build(InterceptSpec.build(capture_dns=True)).chain_rules(model.OUTPUT)
    # the DNS jumps come before the TCP jump, or TCP to port 53 would reach the outbound port
    assert [r.verdict for r in output] == ["jump dns", "jump dns", "jump outbound"]


def test_one_family_is_matched_on_the_two_jumps():
    ruleset = model.build(InterceptSpec(), ["ipv4"])
    jumps = [r for r in ruleset.rules if r.verdict.startswith("jump")]
    assert all(r.matches[0] == model.Match("meta nfproto", ("ipv4",)) for r in jumps)
    assert not [r for r in ruleset.rules if any(m.left == "ip6 daddr" for m in r.matches)]
    assert all(len(r.matches) == 1 for r in model.build(InterceptSpec()).rules if r.verdict.startswith("jump"))


def test_recommendation_follows_what_works_and_what_iptables_is():
    assert probe.recommend(True, True, "nf_tables")[0] == "nftables"
    assert probe.recommend(True, True, "legacy")[0] == "iptables"
    assert probe.recommend(True, False, "legacy")[0] == "nftables"
    assert probe.recommend(True, True, None)[0] == "nftables"
    assert probe.recommend(False, True, "nf_tables")[0] == "iptables"
    assert probe.recommend(False, False, "nf_tables")[0] is None


# --- dry run = what nft shows -------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("spec, families", [
    (InterceptSpec(), ["ipv4", "ipv6"]),
    (EVERYTHING, ["ipv4", "ipv6"]),
    (InterceptSpec.build(families=["ipv4"], exclude_outbound_ports=["22"]), ["ipv4"]),
    (InterceptSpec.build(families=["ipv6"], exclude_outbound_cidrs=["fd00::/8", "10.0.0.0/8"]), ["ipv6"]),
    (InterceptSpec.build(capture_dns=True, dns_port=15054, exclude_outbound_cidrs=["10.96.0.0/12", "fd00::/8"]),
     ["ipv4", "ipv6"]),
    (InterceptSpec.build(capture_dns=True, families=["ipv4"]), ["ipv4"]),
], ids=["defaults", "everything", "ipv4-only", "ipv6-only", "dns", "dns-ipv4-only"])
def test_dry_run_is_what_nft_list_table_shows_after_enable(backend, pod, spec, families):
    text = backend.plan(pod.netns, spec)
    assert "current: no meshintercept table" in text
    extra = backend.enable(pod.netns, spec)
    assert extra["families"] == families
    assert our_listing(pod) == plan_body(text)
    live = backend.inspect(record(pod.netns, spec, extra), pod.netns)
    assert live["in_place"] is True, live
    assert "\n".join(live["listing"]) + "\n" == plan_body(text)
    assert "already in place; enable would change nothing" in backend.plan(pod.netns, spec)


@pytest.mark.root
def test_dry_run_is_valid_nft_input_and_builds_the_same_table(backend, node):
    spec = InterceptSpec.build(exclude_inbound_ports=["22"], exclude_outbound_cidrs=["10.0.0.0/8", "fd00::/8"])
    by_nft, by_us = node.add_pod("by-nft"), node.add_pod("by-us")
    nft(by_nft, "-f", "-", stdin=backend.plan(by_nft.netns, spec))
    backend.enable(by_us.netns, spec)
    assert our_listing(by_nft) == our_listing(by_us)
    # our reader recognises the table nft -f made as exactly the plan
    assert backend.inspect(record(by_nft.netns, spec), by_nft.netns)["in_place"] is True


@pytest.mark.root
def test_plan_and_status_change_nothing(backend, pod):
    backend.plan(pod.netns, InterceptSpec())
    backend.inspect(record(pod.netns, InterceptSpec()), pod.netns)
    assert nft(pod, "list", "ruleset") == ""


@pytest.mark.root
def test_accelerate_is_refused_and_debug_ignored(backend, pod):
    with pytest.raises(UsageError, match="--accelerate needs --mode ebpf"):
        backend.enable(pod.netns, InterceptSpec(accelerate=True))
    with pytest.raises(UsageError, match="--accelerate needs --mode ebpf"):
        backend.plan(pod.netns, InterceptSpec(accelerate=True))
    assert nft(pod, "list", "ruleset") == ""
    assert backend.plan(pod.netns, InterceptSpec(debug=True)) == backend.plan(pod.netns, InterceptSpec())


# --- one transaction, idempotent, others left alone ---------------------------------------------------
@pytest.mark.root
def test_enable_is_one_transaction_and_the_same_spec_again_sends_none(backend, pod, transactions):
    old, new = InterceptSpec.build(exclude_outbound_ports=["5432"]), InterceptSpec.build(outbound_port=15011)
    assert transactions.count(lambda: backend.enable(pod.netns, old)) == 1
    before = ruleset_items(pod, ours=True)
    assert transactions.count(lambda: backend.enable(pod.netns, old)) == 0
    assert ruleset_items(pod, ours=True) == before  # same handles: the table was not even rewritten
    # a changed spec replaces the whole table in one transaction, a chain it no longer needs included
    dns = InterceptSpec.build(capture_dns=True)
    assert transactions.count(lambda: backend.enable(pod.netns, dns)) == 1
    assert "chain dns {" in our_listing(pod)
    assert transactions.count(lambda: backend.enable(pod.netns, new)) == 1
    assert our_listing(pod) == plan_body(backend.plan(pod.netns, new)) and "chain dns" not in our_listing(pod)
    assert transactions.count(lambda: backend.disable(record(pod.netns, new), pod.netns)) == 1
    assert our_listing(pod) == ""


def add_others(pod) -> None:
    """What other tools might hold in a pod: a native table with a base chain, iptables-nft rules."""
    nft(pod, "-f", "-", stdin="""table inet other {
        chain out { type filter hook output priority 0; policy accept; tcp dport 7 counter accept; }
        chain spare { udp dport 53 counter return; }
    }
    table ip6 meshintercept { chain c { tcp dport 9 counter; }; }
    """)
    pod.run(["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-d", "192.0.2.7/32", "-j", "RETURN"], check=True)
    pod.run(["iptables-nft", "-t", "filter", "-N", "SOMEONES_CHAIN"], check=True)


@pytest.mark.root
def test_other_tables_and_chains_survive_enable_replace_and_disable(backend, pod):
    add_others(pod)
    pristine = ruleset_items(pod, ours=False)
    backend.enable(pod.netns, InterceptSpec())
    assert ruleset_items(pod, ours=False) == pristine
    backend.enable(pod.netns, EVERYTHING)
    assert ruleset_items(pod, ours=False) == pristine
    backend.disable(record(pod.netns, EVERYTHING), pod.netns)
    assert ruleset_items(pod, ours=False) == pristine and ruleset_items(pod, ours=True) == []
    backend.disable(record(pod.netns, EVERYTHING), pod.netns)  # idempotent
    assert ruleset_items(pod, ours=False) == pristine


@pytest.mark.root
def test_disable_when_the_namespace_is_gone(backend, node):
    gone = node.add_pod("gone")
    ns = gone.netns
    backend.enable(ns, InterceptSpec())
    node.cluster.remove_pod(gone)
    backend.disable(record(ns, InterceptSpec()), ns)  # the Netns object still names the dead namespace
    backend.disable(record(ns, InterceptSpec()), None)
    assert backend.inspect(record(ns, InterceptSpec()), None)["in_place"] is False


@pytest.mark.root
def test_kernel_refusal_changes_nothing(backend, pod, monkeypatch):
    """A batch the kernel rejects at its very end (a jump loop, found at commit) leaves the old
    table exactly as it was: same rules, same handles."""
    backend.enable(pod.netns, InterceptSpec.build(exclude_outbound_ports=["80"]))
    add_others(pod)
    before = (ruleset_items(pod, ours=True), ruleset_items(pod, ours=False))
    real = model.Ruleset.commands

    def with_a_loop(self, live_chains):
        loop = {"family": "inet", "table": "meshintercept", "chain": "outbound", "expr": [{"jump": {"target": "outbound"}}]}
        return real(self, live_chains) + [{"add": {"rule": loop}}]

    monkeypatch.setattr(model.Ruleset, "commands", with_a_loop)  # copied into the forked child
    with pytest.raises(BackendFailure, match="kernel refused the nftables transaction.*Too many links.*nothing was changed"):
        backend.enable(pod.netns, InterceptSpec.build(outbound_port=15021))
    assert (ruleset_items(pod, ours=True), ruleset_items(pod, ours=False)) == before


def someone_between_our_look_and_our_batch(monkeypatch, *nft_argv: str) -> None:
    """Run ``nft ARGV`` in the namespace right after enable's first read (in its forked child)."""
    real, done = table.read, []

    def read_then_someone_acts(nft, listing=False):
        live = real(nft, listing)
        if not done:
            done.append(subprocess.run(["nft", *nft_argv], check=True))
        return live

    monkeypatch.setattr(table, "read", read_then_someone_acts)


@pytest.mark.root
def test_a_table_deleted_while_we_replace_it_is_created_again(backend, pod, monkeypatch):
    backend.enable(pod.netns, InterceptSpec())
    someone_between_our_look_and_our_batch(monkeypatch, "delete", "table", "inet", "meshintercept")
    new = InterceptSpec.build(exclude_outbound_ports=["22"])
    backend.enable(pod.netns, new)
    assert our_listing(pod) == plan_body(backend.plan(pod.netns, new))


@pytest.mark.root
def test_a_foreign_table_made_while_we_create_ours_is_refused_and_left_alone(backend, pod, monkeypatch):
    someone_between_our_look_and_our_batch(monkeypatch, "add", "table", "inet", "meshintercept")
    with pytest.raises(Conflict, match="that meshintercept did not create .it is empty"):
        backend.enable(pod.netns, InterceptSpec())
    assert nft(pod, "list", "ruleset") == "table inet meshintercept {\n}\n"


@pytest.mark.root
@pytest.mark.parametrize("foreign", [
    "table inet meshintercept {\n chain input { type filter hook input priority 0; policy accept; }\n}",
    "table inet meshintercept {\n}",
    "table inet meshintercept {\n chain output { type filter hook output priority 0; policy accept; }\n}",
    'table inet meshintercept {\n chain outbound { tcp dport 80 counter return comment "someone else"; }\n}',
    "table inet meshintercept {\n set allowed { type ipv4_addr; }\n}",
], ids=["foreign-chain", "empty", "our-chain-name-another-kind", "uncommented-rule", "a-set"])
def test_a_table_of_our_name_we_did_not_create_is_refused(backend, pod, foreign):
    nft(pod, "-f", "-", stdin=foreign)
    before = ruleset_items(pod, ours=True)
    with pytest.raises(Conflict, match="already has an nftables table 'inet meshintercept' that meshintercept did "
                                       "not create .*nft delete table inet meshintercept"):
        backend.enable(pod.netns, InterceptSpec())
    assert ruleset_items(pod, ours=True) == before
    assert "enable would refuse" in backend.plan(pod.netns, InterceptSpec())
    backend.disable(record(pod.netns, InterceptSpec()), pod.netns)  # not ours: left alone
    assert ruleset_items(pod, ours=True) == before


@pytest.mark.root
def test_inspect_notices_drift_and_enable_repairs_it(backend, pod):
    spec = InterceptSpec()
    backend.enable(pod.netns, spec)
    uid_rule = next(r for r in ruleset_items(pod, ours=True)
                    if "rule" in r and "uid 1500" in r["rule"].get("comment", ""))["rule"]
    nft(pod, "delete", "rule", "inet", "meshintercept", "outbound", "handle", str(uid_rule["handle"]))
    live = backend.inspect(record(pod.netns, spec), pod.netns)
    assert live["in_place"] is False and live["families"]["ipv4"] == "not in place"
    assert live["missing"] == ["meshintercept: connections of the proxy (uid 1500) go direct"]
    backend.enable(pod.netns, spec)
    assert backend.inspect(record(pod.netns, spec), pod.netns)["in_place"] is True
    # a table of ours someone flushed is still ours: drift, not a stranger's table
    nft(pod, "flush", "table", "inet", "meshintercept")
    assert backend.inspect(record(pod.netns, spec), pod.netns)["in_place"] is False
    backend.enable(pod.netns, spec)
    assert our_listing(pod) == plan_body(backend.plan(pod.netns, spec))


# --- families ------------------------------------------------------------------------------------------
@pytest.mark.root
def test_a_namespace_without_ipv6_is_intercepted_for_ipv4_with_a_note(backend, node):
    v4 = node.add_pod("v4only", families=("ipv4",))
    extra = backend.enable(v4.netns, InterceptSpec())
    assert extra["families"] == ["ipv4"]
    assert any("IPv6 is not intercepted: IPv6 is disabled in the namespace" in w for w in extra["warnings"])
    assert "meta nfproto ipv4 meta l4proto tcp" in our_listing(v4)
    live = backend.inspect(record(v4.netns, InterceptSpec(), extra), v4.netns)
    assert live["in_place"] is True and live["families"]["ipv4"] == "captured"
    assert "disable_ipv6=1" in live["families"]["ipv6"]
    assert "note: IPv6 is not intercepted" in backend.plan(v4.netns, InterceptSpec())
    # asked for by name, a family the namespace lacks is refused, and nothing is applied
    backend.disable(record(v4.netns, InterceptSpec(), extra), v4.netns)
    with pytest.raises(UsageError, match="--family ipv6 was asked for but IPv6 is disabled"):
        backend.enable(v4.netns, InterceptSpec.build(families=["ipv6"]))
    assert nft(v4, "list", "ruleset") == ""


# --- real traffic -----------------------------------------------------------------------------------------
@pytest.fixture
def pod_and_peer(node):
    """Two dual-stack pods on one lab node. Stand-ins for the proxy's ports say which one answered
    and the original destination they read (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, else their own
    address); loopback-only servers on 9000 (127.0.0.1) and 9006 (::1)."""
    here, peer = node.add_pod("here"), node.add_pod("peer")
    servers = [(here, 15001, "outbound-proxy", None), (here, 15003, "inbound-proxy", None), (here, 8080, "app", None),
               (here, 2222, "ssh", None), (here, 9000, "local4", "127.0.0.1"), (here, 9006, "local6", "::1"),
               (peer, 8080, "peer-app", None), (peer, 5432, "peer-db", None)]
    for where, port, name, bind in servers:
        where.start_server(port, reply=name + " {origdst}", bind=bind)
    return here, peer


@pytest.mark.root
def test_traffic_is_redirected_as_the_spec_says_in_both_families(backend, pod_and_peer):
    here, peer = pod_and_peer
    spec = InterceptSpec.build(exclude_inbound_ports=["2222"], exclude_outbound_ports=["5432"])
    backend.enable(here.netns, spec)

    def answer(src, host, port, uid=APP_UID):
        return src.connect(host, port, uid=uid).decode().strip()

    for via in ("ipv4", "v4mapped", "ipv6"):
        dst, me = peer.address(via), here.address(via)
        # outbound from the app reaches the outbound port, which reads the true destination
        assert answer(here, dst, 8080) == f"outbound-proxy {peer.endpoint(8080, via)}", via
        # the proxy's own connections and excluded ports go direct
        assert answer(here, dst, 8080, uid=PROXY_UID) == f"peer-app {peer.endpoint(8080, via)}", via
        assert answer(here, dst, 5432) == f"peer-db {peer.endpoint(5432, via)}", via
        # inbound reaches the inbound port, except excluded ports and the proxy's own ports
        assert answer(peer, me, 8080) == f"inbound-proxy {here.endpoint(8080, via)}", via
        assert answer(peer, me, 2222) == f"ssh {here.endpoint(2222, via)}", via
        assert answer(peer, me, 15001) == f"outbound-proxy {here.endpoint(15001, via)}", via
        # the app calling its own pod address is outbound; the proxy doing so goes straight there
        assert answer(here, me, 8080) == f"outbound-proxy {here.endpoint(8080, via)}", via
        assert answer(here, me, 8080, uid=PROXY_UID) == f"app {here.endpoint(8080, via)}", via
    assert answer(here, "127.0.0.1", 9000) == "local4 127.0.0.1:9000"
    assert answer(here, "::1", 9006) == "local6 [::1]:9006"

    backend.disable(record(here.netns, spec), here.netns)
    assert answer(here, peer.ip, 8080) == f"peer-app {peer.ip}:8080"
    assert answer(peer, here.ip6, 8080) == f"app [{here.ip6}]:8080"


@pytest.mark.root
def test_status_counts_connections_per_rule(backend, pod_and_peer):
    here, peer = pod_and_peer
    spec = InterceptSpec.build(exclude_outbound_ports=["5432"])
    extra = backend.enable(here.netns, spec)
    for _ in range(3):
        here.connect(peer.ip, 8080)
    here.connect(peer.ip6, 8080)
    here.connect(peer.ip, 5432)
    peer.connect(here.ip, 8080)
    live = backend.inspect(record(here.netns, spec, extra), here.netns)
    rules = {r["comment"]: r for r in live["rule_counters"]}
    # NAT sees a connection's first packet only; a resent SYN may be counted once more
    redirected = rules["meshintercept: all other outbound TCP goes to the proxy outbound port"]
    assert redirected["packets"] >= 4 and redirected["bytes"] > 0
    assert rules["meshintercept: excluded outbound ports go direct"]["packets"] >= 1
    assert rules["meshintercept: all other inbound TCP goes to the proxy inbound port"]["packets"] >= 1
    assert rules["meshintercept: IPv6 loopback destinations go direct"]["packets"] == 0
    assert live["counters"]["outbound"]["packets"] == redirected["packets"]
    assert live["counters"]["inbound"]["packets"] >= 1
    # the listing status shows is the kernel's, counters included
    assert f"counter packets {redirected['packets']} bytes {redirected['bytes']} redirect to :15001" in \
        "\n".join(live["listing"])


@pytest.mark.root
def test_haproxy_is_intercepted_with_no_iptables_rule_of_any_flavour(node):
    """The issue's "done when": HAProxy learns the true original destination in a pod where no
    iptables table of any flavour exists, only our nftables table."""
    client, server = node.add_pod("client"), node.add_pod("server")
    server.start_server([8080])
    sidecar = client.start_sidecar("haproxy", InterceptSpec())
    server.start_sidecar("haproxy", InterceptSpec())
    manager = node.manager()
    for pod in (client, server):
        manager.enable(pod.netns.name, "nftables", InterceptSpec())
    reply = client.connect(server.ip, 8080, send=b"hi")
    assert not reply.direct and reply.greeting()["peer"].startswith("127.0.0.1:")
    [entry] = sidecar.wait_for(lambda e: e["direction"] == "outbound" and e["peer"] == reply.local)
    assert entry["original_dst"] == f"{server.ip}:8080"
    for pod in (client, server):
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save"):
            saved = pod.run([tool], check=True).stdout
            assert [l for l in saved.splitlines() if not l.startswith("#")] == [], (tool, saved)
        assert pod.run(["cat", "/proc/net/ip_tables_names"]).stdout == ""
        assert [i["table"]["name"] for i in json.loads(nft(pod, "-j", "list", "tables"))["nftables"]
                if "table" in i] == ["meshintercept"]


# --- what status and doctor report ----------------------------------------------------------------------
@pytest.mark.root
def test_other_redirects_are_reported(backend, pod):
    nft(pod, "-f", "-", stdin="""table ip istio-ish {
        chain istio-output { type nat hook output priority -110; policy accept; tcp dport 9999 redirect to :4143; }
    }
    table ip kube-proxy-ish {
        chain services { type nat hook prerouting priority dstnat; policy accept;
                         ip daddr 10.96.0.1 tcp dport 443 dnat to 10.231.1.9:6443; }
    }""")
    pod.run(["iptables-legacy", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "7777", "-j", "REDIRECT",
             "--to-ports", "4140"], check=True)
    extra = backend.enable(pod.netns, InterceptSpec())
    # enable warns from the ruleset it read anyway (no subprocess); legacy tables are status's
    assert any("2 redirect rule(s) meshintercept did not add" in w for w in extra["warnings"])
    live = backend.inspect(record(pod.netns, InterceptSpec()), pod.netns)
    assert live["in_place"] is True
    found = "\n".join(live["foreign_redirects"])
    assert "nft ip istio-ish istio-output: redirect" in found
    assert "nft ip kube-proxy-ish services: dnat" in found
    assert "iptables (legacy): -A OUTPUT -p tcp -m tcp --dport 7777 -j REDIRECT --to-ports 4140" in found
    assert set(live["other_tables"]) == {"ip istio-ish", "ip kube-proxy-ish"}
    assert any("3 redirect rule(s)" in w for w in live["warnings"])


@pytest.mark.root
def test_a_clean_namespace_reports_nothing_foreign(backend, pod):
    backend.enable(pod.netns, InterceptSpec())
    live = backend.inspect(record(pod.netns, InterceptSpec()), pod.netns)
    assert live["foreign_redirects"] == [] and live["other_tables"] == [] and "warnings" not in live
    assert live["counters"] == {"inbound": {"packets": 0, "bytes": 0}, "outbound": {"packets": 0, "bytes": 0}}


@pytest.mark.root
def test_doctor_tries_it_for_real_and_names_the_flavours(backend, pod):
    backend.enable(pod.netns, InterceptSpec())
    nft(pod, "add", "table", "ip", "other")
    nft(pod, "add", "chain", "ip", "other", "o", "{ type nat hook output priority 0; }")
    nft(pod, "add", "rule", "ip", "other", "o", "tcp", "dport", "1", "redirect", "to", ":2")
    checks = {c.name: c for c in backend.doctor([record(pod.netns, InterceptSpec())])}
    assert checks["libnftables (python3-nftables) loads"].ok
    for way, want in (("IPv4", "10.231.255.2:1404"), ("IPv6", "[fd00:231:ffff::2]:1404")):
        check = checks[f"native nftables redirects ({way})"]
        assert check.ok and f"original destination {want}" in check.detail, check.detail
    assert checks["native nftables redirects (IPv4 from an IPv6 socket, v4-mapped)"].ok
    flavours = checks["netfilter on this node (tried in a throwaway namespace)"].detail
    for name in ("iptables-legacy: ", "iptables-nft: ", "native nft (libnftables): works", "plain 'iptables' is"):
        assert name in flavours, flavours
    advice = checks["recommended netfilter mode"]
    assert advice.ok and advice.detail.split(":")[0] in ("nftables", "iptables")
    managed = checks[f"namespace {pod.netns.name}: table in place, no foreign redirect rules"]
    assert managed.warning and "nft ip other o: redirect" in managed.detail


@pytest.mark.root
def test_through_the_manager_and_the_cli(tmp_path, pod):
    manager = Manager(Node(cgroup="/nonexistent", pin_dir=str(tmp_path / "pins"), state_dir=str(tmp_path / "state")))
    spec = InterceptSpec.build(exclude_inbound_ports=["22"])
    assert manager.enable(pod.netns.name, "nftables", spec)["changed"] is True
    assert manager.enable(pod.netns.name, "nftables", spec)["changed"] is False
    [item] = manager.status(pod.netns.name)["namespaces"]
    assert item["live"]["in_place"] is True and item["extra"]["table"] == "inet meshintercept"
    env = pod.node.cli_env(MESHINTERCEPT_PIN_DIR=str(tmp_path / "pins"), MESHINTERCEPT_STATE_DIR=str(tmp_path / "state"))
    shown = subprocess.run([EXE, "status", "--netns", pod.netns.name], env=env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "nftables  in place" in shown.stdout and "live ruleset:" in shown.stdout
    assert "tcp dport 22 counter packets 0 bytes 0 return" in shown.stdout
    manager.disable(pod.netns.name)
    assert our_listing(pod) == ""



# --- bad input: the nft userspace or the kernel's nf_tables missing -----------------------------------
def assert_refused(proc, code, *words) -> None:
    from test_cli_input import assert_one_sentence

    assert_one_sentence(proc, code, *words)


def hidden(paths, argv, env) -> subprocess.CompletedProcess:
    """Run ``argv`` in a private mount namespace where each of ``paths`` is covered: a directory
    by an empty tmpfs, a file by /dev/null. Nothing outside that process sees the change."""
    covers = " && ".join(f"mount -t tmpfs none {p}" if os.path.isdir(p) else f"mount --bind /dev/null {p}"
                         for p in paths)
    script = f'{covers} && exec "$@"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
                          env=env, capture_output=True, text=True, timeout=60)


def libnftables_path() -> str:
    import ctypes

    ctypes.CDLL("libnftables.so.1")
    with open("/proc/self/maps") as maps:
        return next(line.split()[-1] for line in maps if "libnftables.so" in line)


@pytest.mark.root
@pytest.mark.parametrize("what", ["binding", "library"])
def test_missing_nft_userspace_is_one_sentence_and_nothing_is_applied(node, what):
    import nftables

    pod = node.add_pod("nouser")
    # no python3-nftables at all (Debian's dist-packages gone), or the package without its library
    path = os.path.dirname(os.path.dirname(nftables.__file__)) if what == "binding" else libnftables_path()
    words = {"binding": ["the Python binding of libnftables is not importable", "apt-get install python3-nftables"],
             "library": ["libnftables, the nft userspace library, cannot be loaded", "apt-get install python3-nftables"]}
    proc = hidden([path], [EXE, "enable", "--mode", "nftables", "--netns", pod.netns.name], node.cli_env())
    assert_refused(proc, 4, "mode 'nftables' cannot run here", *words[what])
    assert nft(pod, "list", "ruleset") == ""
    assert node.manager().records() == []


def _deny_nfnetlink() -> None:
    """A seccomp filter for this process and its children: socket(AF_NETLINK, *, NETLINK_NETFILTER)
    fails with EPROTONOSUPPORT, which is what a kernel without nfnetlink/nf_tables answers."""
    import ctypes
    import platform

    arch, nr_socket = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}[platform.machine()]
    ld, jeq, ret = 0x20, 0x15, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 93  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPROTONOSUPPORT
    # offsets in struct seccomp_data: nr 0, arch 4, args[0] 16, args[2] 32 (low half, little-endian)
    program = [(ld, 0, 0, 4), (jeq, 0, 7, arch), (ld, 0, 0, 0), (jeq, 0, 5, nr_socket), (ld, 0, 0, 16),
               (jeq, 0, 3, 16), (ld, 0, 0, 32), (jeq, 0, 1, 12), (ret, 0, 0, deny), (ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*[Filter(*f) for f in program])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(Program(len(program), filters)), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter refused")  # PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP


@pytest.mark.root
def test_a_kernel_without_nf_tables_is_one_sentence_and_nothing_is_applied(node):
    pod = node.add_pod("nokernel")
    argv = [EXE, "enable", "--mode", "nftables", "--netns", pod.netns.name]
    proc = subprocess.run(argv, env=node.cli_env(), capture_output=True, text=True, timeout=60,
                          preexec_fn=_deny_nfnetlink)
    assert_refused(proc, 4, "the kernel offers no nf_tables netlink interface (Protocol not supported)",
                   "modprobe nf_tables")
    assert "Cleaning up" not in proc.stderr, "the undo of the failed enable must not fail as well"
    assert nft(pod, "list", "ruleset") == ""
    assert node.manager().records() == []
    # the same filter really is what makes the difference: without it, the same command works
    assert subprocess.run(argv, env=node.cli_env(), capture_output=True, text=True, timeout=60).returncode == 0


@pytest.mark.root
def test_the_cli_refuses_a_table_of_our_name_with_exit_code_6(node):
    pod = node.add_pod("taken")
    nft(pod, "-f", "-", stdin="table inet meshintercept {\n chain input { type filter hook input priority 0; }\n}")
    before = ruleset_items(pod, ours=True)
    proc = subprocess.run([EXE, "enable", "--mode", "nftables", "--netns", pod.netns.name], env=node.cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert_refused(proc, 6, "that meshintercept did not create", "nft delete table inet meshintercept")
    assert ruleset_items(pod, ours=True) == before and node.manager().records() == []


@pytest.mark.root
def test_doctor_without_the_binding_still_names_the_flavours(node):
    import nftables

    proc = hidden([os.path.dirname(os.path.dirname(nftables.__file__))], [EXE, "doctor", "--json"], node.cli_env())
    report = json.loads(proc.stdout)
    [section] = [s for s in report["sections"] if s["name"] == "mode nftables"]
    checks = {c["name"]: c for c in section["checks"]}
    loads = checks["libnftables (python3-nftables) loads"]
    assert not loads["ok"] and "apt-get install python3-nftables" in loads["fix"]
    flavours = checks["netfilter on this node (tried in a throwaway namespace)"]["detail"]
    assert "iptables-legacy: works" in flavours and "iptables-nft: works" in flavours, flavours
    assert "native nft (libnftables): the Python binding of libnftables is not importable" in flavours
    assert "nftables" not in report["usable_modes"]
