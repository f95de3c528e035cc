"""--capture-dns in the ebpf mode, beyond the contract suite (tests/test_contract.py, DnsContract):
v4-mapped servers from AF_INET6 sockets, what stays bounded under thousands of queries, what the
DNS sidecar is told and when not, and what maps dump, trace, status and --dry-run show.

node1: client (the project sidecar with its DNS forwarder, as the proxy UID)
node2: server (dnsmasq on port 53, knowing SERVER_NAME)
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from meshintercept.backends.ebpf import maps as ebpf_maps
from meshintercept.backends.ebpf import trace as ebpf_trace
from meshintercept.backends.ebpf.pins import MAPS, NodePins
from meshintercept.lab.cluster import APP_UID, BASE_PYTHON, TestCluster
from meshintercept.spec import InterceptSpec

pytestmark = [pytest.mark.ebpf, pytest.mark.root]

SIDECAR_NAME, SIDECAR_ADDR = "only-the-sidecar.test", "10.231.88.8"
SERVER_NAME, SERVER_ADDR = "only-the-server.test", "10.231.99.9"

#: Runs in the client pod as the app, next to the lab's apps.py (stdlib only): queries of every
#: kind, each from a fresh socket (apps.dns_query), counted by answer and by the reply's source.
#: With "hold": N it instead opens N TCP connections to the server's port 53, says so on stdout,
#: and keeps them until stdin closes.
QUERIES = r'''
import json, os, socket, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin"))
import apps

args = json.loads(sys.argv[1])
if args.get("hold"):
    held = [socket.create_connection((args["server"], 53), timeout=5) for _ in range(args["hold"])]
    print("held", flush=True)
    sys.stdin.read()
    sys.exit(0)
results = {"answers": {}, "peers": {}, "errors": []}
for i in range(args["count"]):
    kind = args["kinds"][i % len(args["kinds"])]
    name = args["names"][i % len(args["names"])]
    got = apps.dns_query(args["server"], 53, name, transport=kind.split("-")[0], connected=kind != "udp-unconnected")
    if not got["ok"]:
        results["errors"].append("%s %s: %s" % (kind, name, got))
        continue
    answers = results["answers"].setdefault("%s %s" % (kind, name), {})
    answers[",".join(got["addresses"])] = answers.get(",".join(got["addresses"]), 0) + 1
    results["peers"][got["from"]] = results["peers"].get(got["from"], 0) + 1
print(json.dumps(results))
'''

#: Runs in the client pod as the app: one unconnected socket asks the server (captured), then
#: the sidecar's DNS port itself; prints the source of each reply.
REUSE = r'''
import json, socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
peers = []
for to in ((server, 53), ("127.0.0.1", 15053)):
    s.sendto(query, to)
    peers.append(list(s.recvfrom(65535)[1]))
print(json.dumps(peers))
'''

#: Runs in the client pod as the proxy UID: the DNS sidecar's question for a client address
#: that sent no captured query; prints what getsockopt said.
ASK = r'''
import json, socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
v6 = ":" in host
sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((host, port))
try:
    raw = sock.getsockopt(41 if v6 else socket.SOL_IP, 80, 28 if v6 else 16)
    print(json.dumps({"answer": raw.hex()}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno}))
'''

KINDS = ("udp", "udp-unconnected", "tcp")


@pytest.fixture(scope="module")
def world(test_prefix):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with TestCluster(nodes=2, prefix=test_prefix) as cluster:
        client, server = cluster.add_pod(0, "client"), cluster.add_pod(1, "server")
        server.start_dns_server({SERVER_NAME: SERVER_ADDR})
        sidecar = client.start_sidecar("project", spec=InterceptSpec(), dns_hosts={SIDECAR_NAME: SIDECAR_ADDR})
        scripts = {}
        for name, text in (("queries", QUERIES), ("ask", ASK), ("reuse", REUSE)):
            scripts[name] = os.path.join(cluster.workdir, f"dns-{name}.py")
            with open(scripts[name], "w") as f:
                f.write(text)
            os.chmod(scripts[name], 0o644)
        yield cluster, client, server, sidecar, scripts
        for node in cluster.nodes:
            node.manager().disable_all()


@pytest.fixture(autouse=True)
def _clean(world):
    yield
    cluster = world[0]
    for node in cluster.nodes:
        manager = node.manager()
        for record in manager.records():
            manager.disable(record.path)
    assert world[3].running(), f"the client's sidecar died: {world[3].stderr()[-2000:]}"


def enable(pod, **spec):
    return pod.node.manager().enable(pod.netns.name, "ebpf", InterceptSpec.build(capture_dns=True, **spec))


def run_queries(world, server_addr, count, kinds=KINDS, names=(SIDECAR_NAME,), timeout=300):
    _cluster, client, _server, _sidecar, scripts = world
    args = json.dumps({"server": server_addr, "count": count, "kinds": list(kinds), "names": list(names)})
    proc = client.run([BASE_PYTHON, "-S", "-E", scripts["queries"], args], uid=APP_UID, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def counters(pod):
    return pod.node.manager().status(pod.netns.name)["namespaces"][0]["live"]["counters"]


def map_sizes(pod) -> dict:
    """Entries of every map that can be listed (socket storage cannot: it lives in the sockets)."""
    with NodePins(pod.node.node.pin_dir) as pins:
        return {name: ebpf_maps.count_entries(pins, name) for name in MAPS if name not in ("sock", "events")}


def settled_sizes(pod, want: dict, timeout: float = 10.0) -> dict:
    """Map sizes once they equal ``want`` (closing sockets delete their entries a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        sizes = map_sizes(pod)
        if sizes == want or time.monotonic() > deadline:
            return sizes
        time.sleep(0.1)


# --- v4-mapped --------------------------------------------------------------------------------
def test_v4_mapped_servers_from_af_inet6_sockets_are_captured_and_answered_from_the_mapped_address(world):
    _cluster, client, server, _sidecar, _scripts = world
    enable(client)
    mapped = f"::ffff:{server.ip}"
    out = run_queries(world, mapped, 6)
    assert out["errors"] == [], out
    assert out["answers"] == {f"{k} {SIDECAR_NAME}": {SIDECAR_ADDR: 2} for k in KINDS}, out
    # recvfrom/getpeername on the AF_INET6 sockets: the server asked (the lab writes v4-mapped as IPv4)
    assert out["peers"] == {server.endpoint(53, "v4mapped"): 6}, out


def test_v4_mapped_forwarded_queries_reach_the_server_asked(world):
    _cluster, client, server, sidecar, _scripts = world
    enable(client)
    mark = sidecar.mark()
    out = run_queries(world, f"::ffff:{server.ip}", 3, names=(SERVER_NAME,))
    assert out["errors"] == [] and out["answers"] == {f"{k} {SERVER_NAME}": {SERVER_ADDR: 1} for k in KINDS}, out
    logged = sidecar.wait_for(lambda e: e["direction"] == "dns", since=mark, count=3)
    assert sorted((e["transport"], e["answered"], e["original_dst"]) for e in logged) == sorted(
        [("udp", "forwarded", f"{server.ip}:53")] * 2 + [("tcp", "forwarded", f"{server.ip}:53")])


# --- bounded --------------------------------------------------------------------------------
@pytest.mark.parametrize("via", ["ipv4", "ipv6"])
def test_thousands_of_queries_from_fresh_sockets_leave_every_map_as_it_was(world, via):
    """3,000 queries (connected UDP, sendto, TCP; half answered by the sidecar, half forwarded
    to the server, which asks the programs where each query was going): every map ends with the
    entries it started with, while the counters prove each query went through the programs."""
    _cluster, client, server, _sidecar, _scripts = world
    enable(client)
    before, start = map_sizes(client), counters(client)
    n = 3000
    out = run_queries(world, server.address(via), n, names=(SIDECAR_NAME, SERVER_NAME))
    assert out["errors"] == [], out["errors"][:5]
    assert out["peers"] == {server.endpoint(53, via): n}, out["peers"]
    per = n // 6
    assert out["answers"] == {**{f"{k} {SIDECAR_NAME}": {SIDECAR_ADDR: per} for k in KINDS},
                              **{f"{k} {SERVER_NAME}": {SERVER_ADDR: per} for k in KINDS}}, out["answers"]
    after = settled_sizes(client, before)
    end = counters(client)
    print(f"{via}: maps before {before}, after {after}; counters "
          f"{ {k: end[k] - start[k] for k in ('dns_redirected', 'dns_restored', 'origdst_answers', 'origdst_misses')} }")
    assert after == before
    assert end["dns_redirected"] - start["dns_redirected"] == n
    assert end["dns_restored"] - start["dns_restored"] == n  # every recvfrom and getpeername
    # the forwarder asked once per forwarded UDP query, by getsockopt on a UDP socket connected to
    # the client (answered from socket storage), and once per TCP connection, by SO_ORIGINAL_DST
    # (the 4-tuple map; the entry goes when the connection closes)
    assert end["origdst_answers"] - start["origdst_answers"] == 2 * per + n // 3
    assert end["origdst_misses"] == start["origdst_misses"]


def test_the_map_count_sees_open_dns_connections(world):
    """The measurement above can fail: open TCP DNS connections do hold entries (one each in
    the 4-tuple map), and closing them gives them back."""
    _cluster, client, server, _sidecar, scripts = world
    enable(client)
    before = map_sizes(client)
    hold = 40
    proc = client.spawn([BASE_PYTHON, "-S", "-E", scripts["queries"], json.dumps({"server": server.ip, "hold": hold})],
                        uid=APP_UID, stdin=-1, stdout=-1, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        deadline = time.monotonic() + 10
        while map_sizes(client)["origdst"] < before["origdst"] + hold and time.monotonic() < deadline:
            time.sleep(0.1)
        during = map_sizes(client)
        rows = [r for r in ebpf_maps.dump(client.node.node, client.node.manager().records(), "origdst")["origdst"]
                if r["original_dst"] == f"{server.ip}:53"]
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)
    assert during["origdst"] == before["origdst"] + hold, (before, during)
    assert len(rows) == hold and {r["kind"] for r in rows} == {"outbound,accepted,dns"}, rows[:3]
    assert rows[0]["accepted_on"] == "127.0.0.1:15053"
    assert settled_sizes(client, before) == before


# --- what the DNS sidecar is told, and when not ------------------------------------------------
def ask(world, host, port, uid):
    _cluster, client, _server, _sidecar, scripts = world
    proc = client.run([BASE_PYTHON, "-S", "-E", scripts["ask"], host, str(port)], uid=uid, timeout=20)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_sidecar_gets_no_answer_for_a_client_that_sent_no_captured_query(world):
    _cluster, client, server, _sidecar, _scripts = world
    spec = enable(client)["spec"]
    # no socket there at all, and one that exists but asked nobody (the sidecar's own DNS listener)
    assert ask(world, "127.0.0.1", 40999, spec["proxy_uid"]) == {"errno": 92}  # ENOPROTOOPT, the kernel's
    assert ask(world, "127.0.0.1", spec["dns_port"], spec["proxy_uid"]) == {"errno": 92}
    assert ask(world, "::1", 40999, spec["proxy_uid"]) == {"errno": 92}


def test_a_socket_that_asks_the_sidecar_itself_is_not_shown_another_source(world):
    """An app that talks to 127.0.0.1:15053 on purpose gets replies from there, as they are,
    even from a socket that had a query captured before."""
    _cluster, client, server, _sidecar, scripts = world
    enable(client)
    direct = client.dns("127.0.0.1", SIDECAR_NAME, port=15053)
    assert direct["addresses"] == [SIDECAR_ADDR] and direct["from"] == "127.0.0.1:15053", direct
    proc = client.run([BASE_PYTHON, "-S", "-E", scripts["reuse"], server.ip, SIDECAR_NAME], uid=APP_UID, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[server.ip, 53], ["127.0.0.1", 15053]]


def test_family_ipv4_leaves_ipv6_dns_alone(world):
    _cluster, client, server, _sidecar, _scripts = world
    enable(client, families=["ipv4"])
    assert client.dns(server.ip, SIDECAR_NAME)["addresses"] == [SIDECAR_ADDR]
    direct = client.dns(server.ip6, SIDECAR_NAME)
    assert direct["ok"] and direct["addresses"] == [] and direct["from"] == server.endpoint(53, "ipv6"), direct


def test_after_disable_and_without_the_flag_nothing_is_restored_or_redirected(world):
    _cluster, client, server, _sidecar, _scripts = world
    enable(client)
    assert client.dns(server.ip, SIDECAR_NAME, connected=False)["addresses"] == [SIDECAR_ADDR]
    client.node.manager().enable(client.netns.name, "ebpf", InterceptSpec())  # DNS capture off
    start = counters(client)
    for kind, connected in (("udp", True), ("udp", False)):
        got = client.dns(server.ip, SIDECAR_NAME, transport=kind, connected=connected)
        assert got["ok"] and got["addresses"] == [] and got["from"] == f"{server.ip}:53", got
    # TCP to port 53 is plain outbound TCP then: through the outbound port, whose peer the ebpf
    # mode does not disguise (only DNS peers are shown as the server asked)
    got = client.dns(server.ip, SIDECAR_NAME, transport="tcp")
    assert got["ok"] and got["addresses"] == [] and got["from"] == "127.0.0.1:15001", got
    end = counters(client)
    assert (end["dns_redirected"], end["dns_restored"]) == (start["dns_redirected"], start["dns_restored"])
    assert end["redirected_out"] == start["redirected_out"] + 1  # TCP to 53 is plain outbound TCP then


# --- what the tools show ----------------------------------------------------------------------
def cli(pod, *args):
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "meshintercept"), *args],
                          capture_output=True, text=True, env=pod.node.cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_maps_dump_status_and_dry_run_show_dns_capture(world):
    _cluster, client, server, _sidecar, _scripts = world
    manager = client.node.manager()
    plan = cli(client, "enable", "--mode", "ebpf", "--netns", client.netns.name, "--capture-dns", "--dry-run")
    assert "'capture_dns': True, 'dns_port': 15053" in plan, plan
    assert "dns: UDP and TCP to port 53" in plan and "sendmsg4/6" in plan and "recvmsg4/6" in plan, plan
    assert manager.records() == [], "--dry-run changed something"
    enable(client)
    rows = json.loads(cli(client, "maps", "dump", "--map", "config", "--json"))["config"]
    row = [r for r in rows if r["namespace"] == client.netns.name][0]
    assert row["capture_dns"] is True and row["dns_port"] == 15053, row
    assert client.dns(server.ip, SIDECAR_NAME)["addresses"] == [SIDECAR_ADDR]
    live = manager.status(client.netns.name)["namespaces"][0]["live"]
    assert live["config"]["capture_dns"] and live["counters"]["dns_redirected"] >= 1
    assert live["counters"]["dns_restored"] >= 1
    text = cli(client, "status", "--netns", client.netns.name)
    assert "capture DNS to :15053" in text and "dns_redirected=" in text, text


def test_trace_shows_every_dns_decision(world):
    _cluster, client, server, _sidecar, _scripts = world
    enable(client, debug=True)
    record = [r for r in client.node.manager().records() if r.name == client.netns.name][0]
    cookie = int(record.extra["netns_cookie"])
    events = []
    collector = threading.Thread(target=lambda: events.extend(
        ebpf_trace.stream(client.node.node, {cookie: client.netns.name}, cookie, duration=8)))
    collector.start()
    time.sleep(0.5)
    for kind, connected in (("udp", True), ("udp", False), ("tcp", True)):
        assert client.dns(server.ip, SERVER_NAME, transport=kind, connected=connected)["addresses"] == [SERVER_ADDR]
    client.dns("127.0.0.1", SIDECAR_NAME)  # a loopback resolver (none listens): left alone, said so
    collector.join()
    seen = {(e["event"], e["proto"], e["to"]) for e in events}
    server53 = f"{server.ip}:53"
    assert ("dns", "udp", "127.0.0.1:15053") in seen, events
    assert ("dns", "tcp", "127.0.0.1:15053") in seen, events
    assert ("dns-restored", "udp", server53) in seen and ("dns-restored", "tcp", server53) in seen, events
    assert ("dns-asked", None, server53) in seen or ("dns-asked", "udp", server53) in seen, events
    assert any(e["event"] == "dns-skip" and e["reason"] == "loopback destination" for e in events), events
    assert any(e["event"] == "dns-skip" and e["reason"] == "proxy's own traffic" for e in events), events
    line = ebpf_trace.format_line([e for e in events if e["event"] == "dns"][0])
    assert line.startswith(f"{client.netns.name} dns ") and "-> 127.0.0.1:15053" in line, line
