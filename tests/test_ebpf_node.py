"""Node-level behaviour of the ebpf mode: pins, open-without-compile, layout guard, debug and
trace, maps dump, getsockopt pass-through, disable of a vanished namespace, headers for bcc.

Each test gets a fresh one-node lab cluster (fixture ``node``: own child cgroup, pin dir, state dir).
"""

import ctypes
import dataclasses
import errno
import json
import os
import subprocess
import sys
import time

import pytest

from meshintercept.backends.ebpf import types as T
from meshintercept.backends.ebpf import bpfsys, kheaders
from meshintercept.errors import Conflict, EnvironmentMissing, UsageError
from meshintercept.manager import Manager
from meshintercept.spec import InterceptSpec
from meshintercept.lab.cluster import APP_UID, BASE_PYTHON

from meshintercept.backends.ebpf import maps as ebpf_maps
from meshintercept.backends.ebpf import trace as ebpf_trace
from meshintercept.backends.ebpf.pins import MAPS, PROGRAMS, NodePins

pytestmark = [pytest.mark.ebpf, pytest.mark.root]


def cli(node, *args, check=True):
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "meshintercept"), *args],
                          capture_output=True, text=True, env=node.cli_env(), timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_loaded_maps_have_the_sizes_of_the_ctypes_mirror(node):
    pod = node.add_pod("a")
    Manager(node.node).enable(pod.netns.name, "ebpf", InterceptSpec())
    with NodePins(node.node.pin_dir) as pins:
        for name, (kernel_name, key, value, _percpu) in MAPS.items():
            info = bpfsys.map_info(pins.map(name))
            assert info["name"] == kernel_name
            if key is not None:
                assert info["key_size"] == ctypes.sizeof(key), name
            if value is not None and name != "events":
                assert info["value_size"] == ctypes.sizeof(value), name


def test_second_namespace_opens_pins_without_bcc_and_a_changed_spec_is_a_map_update(node):
    a, b = node.add_pod("a"), node.add_pod("b")
    Manager(node.node).enable(a.netns.name, "ebpf", InterceptSpec())
    program_ids = ebpf_maps.node_status(node.node)["programs"]
    code = (
        "import sys, json\n"
        "from meshintercept.manager import Manager\nfrom meshintercept.node import Node\n"
        "from meshintercept.spec import InterceptSpec\n"
        f"node = Node(cgroup={node.node.cgroup!r}, pin_dir={node.node.pin_dir!r}, state_dir={node.node.state_dir!r})\n"
        f"r1 = Manager(node).enable({b.netns.name!r}, 'ebpf', InterceptSpec())\n"
        f"r2 = Manager(node).enable({b.netns.name!r}, 'ebpf', InterceptSpec.build(exclude_outbound_ports=[22]))\n"
        "print(json.dumps({'bcc': 'bcc' in sys.modules, 'ms': [r1['elapsed_ms'], r2['elapsed_ms']]}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["bcc"] is False, "a later enable must not import bcc or compile"
    print("enable of one more namespace / spec change (ms):", out["ms"])
    assert ebpf_maps.node_status(node.node)["programs"] == program_ids  # same programs, not reloaded
    rows = {r["namespace"]: r for r in ebpf_maps.dump(node.node, Manager(node.node).records(), "config")["config"]}
    assert rows[b.netns.name]["exclude_outbound_ports"] == [22]
    assert rows[a.netns.name]["exclude_outbound_ports"] == []


def test_outbound_counters_and_the_sidecars_view_agree(node):
    client, server = node.add_pod("a"), node.add_pod("b")
    server.start_server(8080)
    sidecar = client.start_sidecar()
    manager = Manager(node.node)
    manager.enable(client.netns.name, "ebpf", InterceptSpec())
    assert client.connect(server.ip, 8080).greeting()["pod"] == "b"
    log = sidecar.wait_for(count=1)
    assert [e["original_dst"] for e in log] == [f"{server.ip}:8080"]
    assert log[0]["direction"] == "outbound"
    live = manager.status(client.netns.name)["namespaces"][0]["live"]
    assert live["in_place"] and live["counters"]["redirected_out"] == 1
    assert live["counters"]["origdst_answers"] == 1


def test_a_layout_dir_that_is_not_a_node_is_refused_not_misread(node):
    pod = node.add_pod("a")
    from meshintercept.backends.ebpf.loader import ensure_bpffs

    ensure_bpffs(node.node.pin_dir)
    os.makedirs(os.path.join(node.node.pin_dir, "v0"))
    with pytest.raises(Conflict, match="not a meshintercept node layout"):
        Manager(node.node).enable(pod.netns.name, "ebpf", InterceptSpec())
    os.rmdir(os.path.join(node.node.pin_dir, "v0"))


def test_too_many_ports_is_refused_never_truncated(node):
    pod = node.add_pod("a")
    spec = InterceptSpec.build(exclude_outbound_ports=list(range(1000, 1000 + T.MAX_PORTS + 1)))
    with pytest.raises(UsageError, match="at most 64"):
        Manager(node.node).enable(pod.netns.name, "ebpf", spec)


def test_getsockopt_passes_other_options_and_unknown_connections_untouched(node):
    a, b = node.add_pod("a"), node.add_pod("b")
    b.start_server(8080)
    Manager(node.node).enable(a.netns.name, "ebpf", InterceptSpec())
    code = (
        "import socket, json\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)\n"
        "r = {'rcvbuf': s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}\n"
        f"s.connect(('{b.ip}', 8080))\n"  # excluded below: goes direct, nothing known about it
        "try:\n    s.getsockopt(socket.SOL_IP, 80, 16); r['origdst'] = 'answered'\n"
        "except OSError as e:\n    r['origdst'] = e.errno\n"
        "print(json.dumps(r))\n"
    )
    Manager(node.node).enable(a.netns.name, "ebpf", InterceptSpec.build(exclude_outbound_ports=[8080]))
    inside = json.loads(a.run([BASE_PYTHON, "-c", code], uid=APP_UID, check=True).stdout)
    plain = json.loads(b.run([BASE_PYTHON, "-c", code.replace(b.ip, "127.0.0.1")], uid=APP_UID, check=True).stdout)
    assert inside["rcvbuf"] == plain["rcvbuf"] > 0
    # the kernel's own answer (no conntrack entry) stands, exactly as without us
    assert inside["origdst"] in (errno.ENOENT, errno.ENOPROTOOPT) and inside["origdst"] == plain["origdst"]


def test_debug_writes_trace_pipe_lines_and_ring_buffer_events_and_switches_off(node):
    a, b = node.add_pod("a"), node.add_pod("b")
    b.start_server(8080)
    a.start_sidecar()
    manager = Manager(node.node)
    manager.enable(a.netns.name, "ebpf", InterceptSpec.build(debug=True))
    cookie = manager.record(a.netns).extra["netns_cookie"]
    tracefs = ebpf_trace.tracefs()
    pipe = subprocess.Popen(["cat", os.path.join(tracefs, "trace_pipe")], stdout=subprocess.PIPE)
    try:
        names = {cookie: a.netns.name}
        events = []
        import threading

        reader = threading.Thread(target=lambda: events.extend(
            ebpf_trace.stream(node.node, names, cookie, duration=8, limit=4)))
        reader.start()
        time.sleep(0.3)
        a.connect(b.ip, 8080)
        reader.join()
        kinds = [e["event"] for e in events]
        assert kinds[:4] == ["connect-out", "established", "claimed", "origdst"], events
        assert events[0]["dst"] == f"{b.ip}:8080" and events[0]["to"] == "127.0.0.1:15001"
        assert events[0]["namespace"] == a.netns.name and events[0]["uid"] == APP_UID
        assert events[3]["to"] == f"{b.ip}:8080"
    finally:
        pipe.terminate()
        text = pipe.communicate(timeout=5)[0].decode(errors="replace")
    lines = [l for l in text.splitlines() if "bpf_trace_printk" in l and " mi " in l]
    assert any(" mi connect dport=8080" in l for l in lines) and any("SO_ORIGINAL_DST" in l for l in lines), text[-2000:]
    # switch debug off at runtime: the same enable without --debug is one map update
    manager.enable(a.netns.name, "ebpf", InterceptSpec())
    switched = time.monotonic_ns()  # bpf_ktime_get_ns() is CLOCK_MONOTONIC too
    quiet = []
    reader = __import__("threading").Thread(target=lambda: quiet.extend(
        ebpf_trace.stream(node.node, {}, cookie, duration=1.5)))
    reader.start()
    time.sleep(0.2)
    a.connect(b.ip, 8080)
    reader.join()
    assert [e for e in quiet if e["ts_ns"] > switched] == []


def test_maps_dump_and_status_through_the_cli(node):
    a, b = node.add_pod("a"), node.add_pod("b")
    b.start_server(8080)
    a.start_sidecar()
    cli(node, "enable", "--mode", "ebpf", "--netns", a.netns.name, "--exclude-outbound-cidr", "10.231.250.0/24")
    a.connect(b.ip, 8080)
    data = json.loads(cli(node, "maps", "dump", "--json").stdout)
    assert {"config", "podip", "origdst", "counters", "sockhash", "meta", "sock", "events"} <= set(data)
    cfg = data["config"][0]
    assert cfg["namespace"] == a.netns.name and cfg["exclude_outbound_cidrs"] == ["10.231.250.0/24"]
    assert data["podip"] == [{"ip": a.ip, "namespace": a.netns.name, "netns_cookie": cfg["netns_cookie"], "ifindex": 2}] or \
        data["podip"][0]["ip"] == a.ip
    counters = data["counters"][0]
    assert counters["namespace"] == a.netns.name and counters["redirected_out"] == 1
    text = cli(node, "maps", "dump", "--map", "config").stdout
    assert a.netns.name in text and "exclude_outbound_cidrs=['10.231.250.0/24']" in text
    assert cli(node, "maps", "dump", "--map", "nope", check=False).returncode != 0
    status = json.loads(cli(node, "status", "--json").stdout)
    assert "ebpf" in json.dumps(status)


def test_disable_of_a_vanished_namespace_removes_its_map_entries(node):
    a = node.add_pod("a")
    manager = Manager(node.node)
    manager.enable(a.netns.name, "ebpf", InterceptSpec())
    node.cluster.remove_pod(a)
    manager.disable(a.netns.name)
    with NodePins(node.node.pin_dir) as pins:
        assert ebpf_maps.count_entries(pins, "config") == 0
        assert ebpf_maps.count_entries(pins, "podip") == 0
        assert ebpf_maps.count_entries(pins, "counters") == 0
        assert not [n for n in os.listdir(pins.dir) if n.startswith(("link_tcx_", "link_lookup_"))]


def _kernel_has_tcx() -> bool:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 6)


@pytest.mark.skipif(not _kernel_has_tcx(), reason="tcx links need kernel >= 6.6 (clsact fallback covered elsewhere)")
def test_tc_programs_as_pinned_tcx_links_opt_in_and_disable_removes_them(node):
    from meshintercept.backends.ebpf import tc

    a = node.add_pod("a")
    tc_path = InterceptSpec.build(inbound_path="tc", families=["ipv4"])
    manager = Manager(dataclasses.replace(node.node, tc_attach="tcx"))
    manager.enable(a.netns.name, "ebpf", tc_path)
    entry = manager.record(a.netns).extra["tc"][0]
    assert entry["tcx"] and entry["ifname"] == "eth0" and set(entry["pins"]) == {"in", "eg"}
    assert tc.status(a.netns)["eth0"] == {"ifindex": entry["ifindex"], "ingress": True, "egress": True,
                                         "clsact": False, "tcx": True}
    # a changed spec keeps the same links (no detach window)
    ids = {d: bpfsys.link_info(bpfsys.obj_get(p))["id"] for d, p in entry["pins"].items()}
    manager.enable(a.netns.name, "ebpf", InterceptSpec.build(inbound_path="tc", families=["ipv4"], exclude_outbound_ports=[22]))
    assert {d: bpfsys.link_info(bpfsys.obj_get(p))["id"] for d, p in entry["pins"].items()} == ids
    assert manager.status(a.netns.name)["namespaces"][0]["live"]["in_place"]
    # back to the default (clsact filters): the tcx links go, the filters come
    manager = Manager(node.node)
    manager.enable(a.netns.name, "ebpf", tc_path)
    assert not any(os.path.exists(p) for p in entry["pins"].values())
    assert tc.status(a.netns)["eth0"] == {"ifindex": entry["ifindex"], "ingress": True, "egress": True, "clsact": True}
    manager.disable(a.netns.name)
    assert tc.status(a.netns) == {}
    # and tcx again, then disable after the namespace is gone: the pins go by name
    manager = Manager(dataclasses.replace(node.node, tc_attach="tcx"))
    manager.enable(a.netns.name, "ebpf", tc_path)
    pins = manager.record(a.netns).extra["tc"][0]["pins"]
    assert all(os.path.exists(p) for p in pins.values())
    node.cluster.remove_pod(a)
    manager.disable(a.netns.name)
    assert not any(os.path.exists(p) for p in pins.values())


def test_tcx_opt_in_uses_tcx_links_or_says_the_kernel_has_none_and_uses_clsact(node):
    a = node.add_pod("a")
    manager = Manager(dataclasses.replace(node.node, tc_attach="tcx"))
    result = manager.enable(a.netns.name, "ebpf", InterceptSpec.build(inbound_path="tc", families=["ipv4"]))
    entry = manager.record(a.netns).extra["tc"][0]
    warnings = [w for w in result["warnings"] if "tcx" in w]
    if _kernel_has_tcx():
        assert entry.get("tcx") and not warnings, (entry, warnings)
    else:  # below 6.6 the feature degrades: clsact filters, and enable says why
        assert not entry.get("tcx") and entry["qdisc_created"], entry
        assert len(warnings) == 1 and "has no tcx links (first in Linux 6.6)" in warnings[0], warnings
    assert manager.status(a.netns.name)["namespaces"][0]["live"]["in_place"]
    manager.disable(a.netns.name)


@pytest.mark.parametrize("attach", ["clsact", "tcx", "sk_lookup"])
def test_status_of_all_namespaces_reads_the_node_maps_once_and_agrees_with_a_live_look(node, attach):
    if attach == "tcx":
        if not _kernel_has_tcx():
            pytest.skip("tcx needs kernel >= 6.6")
    a, b = node.add_pod("a"), node.add_pod("b")
    path = "sk_lookup" if attach == "sk_lookup" else "tc"
    manager = Manager(dataclasses.replace(node.node, tc_attach="clsact" if path == "sk_lookup" else attach))
    families = ["ipv4"] if path == "tc" else []
    manager.enable(a.netns.name, "ebpf", InterceptSpec.build(inbound_path=path, families=families))
    manager.enable(b.netns.name, "ebpf", InterceptSpec.build(debug=True, inbound_path=path, families=families))
    quick = {i["namespace"]: i["live"] for i in manager.status()["namespaces"]}
    full = {i["namespace"]: i["live"] for i in manager.status(live=True)["namespaces"]}
    assert {n: v["checked"] for n, v in quick.items()} == {a.netns.name: "node", b.netns.name: "node"}
    for name in (a.netns.name, b.netns.name):
        assert quick[name]["in_place"] is True and full[name]["in_place"] is True
        for key in ("netns_cookie", "config", "debug", "counters", "tc", "lookup", "families"):
            assert quick[name][key] == full[name][key], key
    # a removed attachment shows in the quick status too
    if path == "sk_lookup":
        assert quick[a.netns.name]["lookup"] == {"link": True, "listeners": []}
        assert "fail closed" in quick[a.netns.name]["note"]
        fd = bpfsys.obj_get(manager.record(b.netns).extra["lookup_link"])
        bpfsys.link_detach(fd)
        bpfsys.close(fd)
    elif manager.record(b.netns).extra["tc"][0].get("tcx"):
        entry = manager.record(b.netns).extra["tc"][0]
        fd = bpfsys.obj_get(entry["pins"]["in"])
        bpfsys.link_detach(fd)
        bpfsys.close(fd)
    else:
        subprocess.run(["ip", "netns", "exec", b.netns.name, "tc", "filter", "del", "dev", "eth0", "ingress",
                        "prio", str(0x4D49)], check=True)
    quick = {i["namespace"]: i["live"] for i in manager.status()["namespaces"]}
    assert quick[b.netns.name]["in_place"] is False and quick[a.netns.name]["in_place"] is True


# --- headers for bcc -----------------------------------------------------------------------
def _fake_tree(root, name):
    build = root / name / "build"
    (build / "include" / "generated").mkdir(parents=True)
    (build / "include" / "generated" / "autoconf.h").write_text("")
    return root / name


def test_kheaders_links_the_running_kernel_to_an_installed_tree(tmp_path):
    _fake_tree(tmp_path, "5.10.0-1-amd64")
    newest = _fake_tree(tmp_path, "6.1.0-9-amd64")
    used = kheaders.ensure(str(tmp_path))
    own = tmp_path / os.uname().release
    assert used == str(own) and os.path.realpath(own) == str(newest)
    assert kheaders.ensure(str(tmp_path)) == str(own)  # idempotent


def test_kheaders_names_what_to_install_when_nothing_fits(tmp_path):
    with pytest.raises(EnvironmentMissing, match="linux-headers"):
        kheaders.ensure(str(tmp_path))
    assert not os.path.lexists(tmp_path / os.uname().release)


# --- doctor ----------------------------------------------------------------------------------
def test_doctor_tries_everything_and_all_of_it_works_here(node):
    from meshintercept.backends.ebpf import EbpfInterceptor

    checks = {c.name: c for c in EbpfInterceptor(node.node).doctor([])}
    failed = {name: (c.detail, c.fix) for name, c in checks.items() if not c.ok and not c.warning}
    assert not failed, failed
    # A warning is no failure, but only what this kernel lacks may warn: tcx links before 6.6.
    warned = {name: c.detail for name, c in checks.items() if not c.ok and c.warning}
    expected = set() if _kernel_has_tcx() else {"tc programs attach as tcx links"}
    assert set(warned) <= expected, warned
    for name in PROGRAMS:
        assert "the verifier processed" in checks[f"program {name} loads"].detail, checks[f"program {name} loads"]
    for name in ("program connect4 attaches to a cgroup", "program getsockopt loads", "program tc_ingress loads",
                 "sockhash + sk_msg (--accelerate)", "kernel headers for bcc", "connect4 hook free of other programs",
                 "tc programs attach as tcx links"):
        assert name in checks
    # the throwaway cgroups are gone again
    assert not [d for d in os.listdir(node.node.cgroup) if d.startswith("mi-doctor-")]


def test_doctor_names_a_foreign_connect4_program_and_its_fix(node):
    from bcc import BPF

    from meshintercept.backends.ebpf import EbpfInterceptor

    foreign = BPF(text=b"int foreign_lb4(struct bpf_sock_addr *ctx) { return 1; }")
    fn = foreign.load_func(b"foreign_lb4", BPF.CGROUP_SOCK_ADDR, attach_type=bpfsys.BPF_CGROUP_INET4_CONNECT)
    cg = os.open(node.node.cgroup, os.O_RDONLY | os.O_DIRECTORY)
    link = bpfsys.link_create(fn.fd, cg, bpfsys.BPF_CGROUP_INET4_CONNECT)
    try:
        checks = {c.name: c for c in EbpfInterceptor(node.node).doctor([])}
        check = checks["connect4 hook free of other programs"]
        assert not check.ok and check.warning
        assert "foreign_lb4" in check.detail and "hostNamespaceOnly" in check.fix
    finally:
        bpfsys.link_detach(link)
        bpfsys.close(link)
        os.close(cg)
        foreign.cleanup()


def test_trace_command_streams_named_decisions_for_one_namespace(node):
    a, b = node.add_pod("a"), node.add_pod("b")
    b.start_server(8080)
    a.start_sidecar()
    cli(node, "enable", "--mode", "ebpf", "--netns", a.netns.name, "--debug")
    tracer = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "meshintercept"), "trace", "--netns",
                               a.netns.name, "--count", "5", "--duration", "20"], env=node.cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the tracer is reading the ring buffer before the connection starts
    a.connect(b.ip, 8080)
    out, err = tracer.communicate(timeout=30)
    lines = out.splitlines()
    assert lines[0] == f"{a.netns.name} connect-out dst={b.ip}:8080 -> 127.0.0.1:15001" + lines[0].split("15001", 1)[1]
    assert [l.split()[1] for l in lines] == ["connect-out", "established", "claimed", "origdst", "connect-skip"]
    assert lines[-1].endswith("(proxy's own traffic)")


def test_dry_run_describes_and_changes_nothing(node):
    a = node.add_pod("a")
    text = Manager(node.node).plan(a.netns.name, "ebpf", InterceptSpec.build(exclude_outbound_ports=[22]))
    cookie = a.netns.cookie()
    assert f"netns cookie {cookie}" in text and "'exclude_outbound_ports': [22]" in text and "compile" in text
    assert not os.path.exists(node.node.pin_dir) or os.listdir(node.node.pin_dir) == []
    from meshintercept.backends.ebpf import tc

    assert tc.status(a.netns) == {}


def test_a_clsact_qdisc_and_filters_someone_else_made_survive_enable_and_disable(node):
    from meshintercept.backends.ebpf import tc

    a = node.add_pod("a")
    subprocess.run(["ip", "netns", "exec", a.netns.name, "tc", "qdisc", "add", "dev", "eth0", "clsact"], check=True)
    subprocess.run(["ip", "netns", "exec", a.netns.name, "tc", "filter", "add", "dev", "eth0", "ingress", "prio", "7",
                    "protocol", "ip", "u32", "match", "u32", "0", "0", "classid", "1:1"], check=True)
    manager = Manager(node.node)
    manager.enable(a.netns.name, "ebpf", InterceptSpec.build(inbound_path="tc", families=["ipv4"]))
    assert manager.record(a.netns).extra["tc"][0]["qdisc_created"] is False
    assert tc.status(a.netns)["eth0"]["ingress"]
    manager.disable(a.netns.name)
    state = tc.status(a.netns)["eth0"]
    assert state == {"ifindex": state["ifindex"], "ingress": False, "egress": False, "clsact": True}
    out = subprocess.run(["ip", "netns", "exec", a.netns.name, "tc", "filter", "show", "dev", "eth0", "ingress"],
                         capture_output=True, text=True, check=True).stdout
    assert "u32" in out and "bpf" not in out


def test_ipv6_outbound_in_trace_and_maps_dump(node):
    a, b = node.add_pod("a"), node.add_pod("b")
    b.start_server(8080)
    sidecar = a.start_sidecar()
    manager = Manager(node.node)
    manager.enable(a.netns.name, "ebpf", InterceptSpec.build(debug=True))
    cookie = manager.record(a.netns).extra["netns_cookie"]
    assert set(manager.record(a.netns).extra["pod_ips"]) == {a.ip, a.ip6}
    events = []
    import threading

    reader = threading.Thread(target=lambda: events.extend(
        ebpf_trace.stream(node.node, {cookie: a.netns.name}, cookie, duration=8, limit=4)))
    reader.start()
    time.sleep(0.3)
    assert not a.connect(b.ip6, 8080).direct
    reader.join()
    assert [e["event"] for e in events] == ["connect-out", "established", "claimed", "origdst"], events
    assert events[0]["dst"] == f"[{b.ip6}]:8080" and events[0]["to"] == "[::1]:15001"
    assert events[3]["to"] == f"[{b.ip6}]:8080"
    assert sidecar.wait_for(count=1)[0]["original_dst"] == f"[{b.ip6}]:8080"
    dump = ebpf_maps.dump(node.node, manager.records())
    assert {r["ip"] for r in dump["podip"]} == {a.ip, a.ip6}
    assert dump["config"][0]["families"] == ["ipv4", "ipv6"]
    assert {r["family"] for r in dump["listen"]} == {"ipv6"}  # the sidecar's dual-stack listener
    counters = manager.status(a.netns.name)["namespaces"][0]["live"]["counters"]
    assert counters["redirected_out"] == counters["redirected_out6"] == 1


def test_v4_mapped_destinations_of_ipv6_sockets_follow_the_ipv4_rules(node):
    a, b = node.add_pod("a"), node.add_pod("b")
    b.start_server(8080)
    sidecar = a.start_sidecar()
    manager = Manager(node.node)
    manager.enable(a.netns.name, "ebpf", InterceptSpec.build(exclude_outbound_cidrs=[f"{b.ip}/32"]))
    assert a.connect(f"::ffff:{b.ip}", 8080).direct, "an IPv4 exclusion covers the v4-mapped address"
    assert not a.connect(b.ip6, 8080).direct
    manager.enable(a.netns.name, "ebpf", InterceptSpec.build(families=["ipv6"]))
    assert a.connect(f"::ffff:{b.ip}", 8080).direct, "--family ipv6 leaves v4-mapped (IPv4) alone"
    manager.enable(a.netns.name, "ebpf", InterceptSpec())
    mark = sidecar.mark()
    assert not a.connect(f"::ffff:{b.ip}", 8080).direct
    assert sidecar.wait_for(since=mark)[0]["original_dst"] == f"{b.ip}:8080"
    a.start_server(9090)
    mark = sidecar.mark()
    assert a.connect("::1", 9090).direct and a.connect("::ffff:127.0.0.1", 9090).direct  # loopback never
    assert sidecar.connections(mark) == []
