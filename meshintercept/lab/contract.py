"""The behaviour every interception backend must show, written once, run for each backend.

Subclass `BackendContract` in a test module with a name pytest collects, and set the mode
and the sidecar kind::

    class TestIptablesWithHaproxy(BackendContract):
        mode = "iptables"
        sidecar_kind = "haproxy"

Each class builds one 2-node `TestCluster` (class scope)::

    node1: client, server, bystander      node2: remote

Every pod is dual-stack and runs a test server on 8080 and 9090 (as UID 1000, one
dual-stack socket per port) and a sidecar of ``sidecar_kind`` as the proxy UID. Every
behaviour test runs once per way an app may reach a peer (``vias``, a subset of
`meshintercept.lab.cluster.VIAS`): an AF_INET socket to the IPv4 address, an AF_INET6
socket to the v4-mapped IPv4 address (Java, .NET), an AF_INET6 socket to the IPv6 address. Tests enable interception through
`meshintercept.manager.Manager` of the pod's node, exactly as the CLI does, and everything
enabled is disabled again after each test. The class is skipped, with the backend's own
reason, when the mode cannot load or run here.

How a test tells "through the sidecar" from "direct" without trusting the backend: the
test client reports its own address, the server reports the peer it saw. Equal means
nothing sat in between. Through a sidecar, the server instead sees the sidecar's upstream
socket (logged by the sidecar), and the sidecar logs the original destination it read
with SO_ORIGINAL_DST.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest

from meshintercept import registry
from meshintercept.errors import MeshInterceptError
from meshintercept.spec import InterceptSpec
from meshintercept.lab.cluster import VIAS, Pod, Received, TestCluster

APP_PORT = 8080
OTHER_PORT = 9090
MB = 1 << 20


def unavailable_reason(mode: str) -> Optional[str]:
    """Why `mode` cannot be tested here (it does not load, or says it cannot run), else None."""
    try:
        cls = registry.load(mode)
    except MeshInterceptError as exc:
        return exc.message
    try:
        return cls.unavailable_reason()
    except Exception as exc:  # noqa: BLE001 - a crashing check is a reason too
        return f"{type(exc).__name__}: {exc}"


@dataclass
class World:
    cluster: TestCluster
    pods: Dict[str, Pod]
    sidecars: Dict[str, object]

    def __getattr__(self, name):
        try:
            return self.__dict__["pods"][name]
        except KeyError:
            raise AttributeError(name) from None


class ContractBase:
    """The world and helpers every contract class shares; subclasses hold the tests."""

    #: Interception mode under test (an entry point name of meshintercept.backends).
    mode: str = ""
    #: "project" (meshintercept.sidecar), "haproxy" or "squid" (`meshintercept.lab.sidecars`).
    sidecar_kind: str = "project"
    #: What the pods' test servers speak (``hello``: the lab's TCP protocol; ``http``).
    server_mode: str = "hello"
    server_reply: Optional[str] = None
    #: Spec fields every enable in this class starts from (the sidecar listens on its ports).
    base_spec: dict = {}
    #: How test clients reach their peers; every behaviour test runs for each.
    vias: tuple = VIAS

    def pytest_generate_tests(self, metafunc):
        if "via" in metafunc.fixturenames:
            metafunc.parametrize("via", self.vias)

    # --- fixtures ---------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def world(cls):
        if os.geteuid() != 0:
            pytest.skip("the contract suite needs root (namespaces, cgroups, interception)")
        reason = unavailable_reason(cls.mode)
        if reason:
            pytest.skip(f"mode {cls.mode} is not available here: {reason}")
        spec = cls.spec()
        with TestCluster(nodes=2) as cluster:
            layout = (("client", 0), ("server", 0), ("bystander", 0), ("remote", 1))
            pods = {name: cluster.add_pod(node, name) for name, node in layout}
            sidecars = {}
            for name, pod in pods.items():
                pod.start_server([APP_PORT, OTHER_PORT], mode=cls.server_mode, reply=cls.server_reply)
                sidecars[name] = pod.start_sidecar(cls.sidecar_kind, spec=spec)
            yield World(cluster, pods, sidecars)
            for node in cluster.nodes:
                manager = node.manager()
                for record in manager.records():
                    manager.disable(record.path)
                manager.backend(cls.mode).teardown()

    @pytest.fixture(autouse=True)
    def _disable_after_each_test(self, world):
        yield
        for node in world.cluster.nodes:
            manager = node.manager()
            for record in manager.records():
                manager.disable(record.path)
        for name, sidecar in world.sidecars.items():
            assert sidecar.running(), f"the {self.sidecar_kind} sidecar of {name} died: {sidecar.stderr()[-2000:]}"

    # --- helpers ----------------------------------------------------------------------------
    @classmethod
    def spec(cls, **changes) -> InterceptSpec:
        return InterceptSpec.build(**{**cls.base_spec, **changes})

    def enable(self, pod: Pod, **spec_changes) -> dict:
        return pod.node.manager().enable(pod.netns.name, self.mode, self.spec(**spec_changes))

    def disable(self, pod: Pod) -> dict:
        return pod.node.manager().disable(pod.netns.name)

    def status(self, pod: Pod) -> List[dict]:
        return pod.node.manager().status(pod.netns.name)["namespaces"]

    def outbound_entry(self, world: World, pod: Pod, reply: Received, since: int = 0) -> dict:
        """The pod's sidecar entry for the client connection that got `reply`; fails if none."""
        sidecar = world.sidecars[pod.name]
        found = sidecar.wait_for(lambda e: e["direction"] == "outbound" and e["peer"] == reply.local, since=since)
        # A client port can be reused within one test class; the newest entry is this connection.
        assert found, (f"expected an outbound entry for {reply.local} in {pod.name}'s sidecar, "
                       f"got {sidecar.connections(since)}")
        return found[-1]

    def inbound_entry(self, world: World, pod: Pod, peer: str, since: int = 0) -> dict:
        sidecar = world.sidecars[pod.name]
        found = sidecar.wait_for(lambda e: e["direction"] == "inbound" and e["peer"] == peer, since=since)
        assert found, (f"expected an inbound entry from {peer} in {pod.name}'s sidecar, "
                       f"got {sidecar.connections(since)}")
        return found[-1]

    @staticmethod
    def loopback(via: str) -> str:
        """Where a sidecar hands inbound connections of this kind to the app."""
        return "[::1]:" if via == "ipv6" else "127.0.0.1:"

    @staticmethod
    def cidr(pod_or_node, via: str) -> str:
        """A pod's own address as a CIDR, or a node's pod network, in the family of ``via``."""
        if hasattr(pod_or_node, "pod_cidr"):
            return str(pod_or_node.pod_cidr6 if via == "ipv6" else pod_or_node.pod_cidr)
        return f"{pod_or_node.ip6}/128" if via == "ipv6" else f"{pod_or_node.ip}/32"

    def assert_untouched_sidecar(self, world: World, pod: Pod, since: int, settle: float = 0.3) -> None:
        extra = world.sidecars[pod.name].wait_for(since=since, timeout=settle)
        assert extra == [], f"{pod.name}'s sidecar saw connections it should not have: {extra}"

    def leftovers(self, world: World, pod: Pod) -> List[str]:
        """What of ours is still in the pod's namespace after disable; backends may extend this."""
        found = []
        for family in (4, 6):
            for legacy in (True, False):
                for line in pod.iptables_save("nat", legacy=legacy, family=family).splitlines():
                    if re.search(r"\bMI_|meshintercept|REDIRECT --to-ports (15001|15003)\b", line):
                        found.append(f"{'legacy' if legacy else 'nft'} {'ip6' if family == 6 else 'ip'}tables: {line}")
        # Native nftables (the nftables mode's inet table, anyone's redirect to the sidecar's ports).
        for line in pod.run(["nft", "list", "ruleset"]).stdout.splitlines():
            if re.search(r"meshintercept|redirect to :(15001|15003)\b", line):
                found.append(f"nft: {line.strip()}")
        qdiscs = pod.run(["tc", "qdisc", "show", "dev", pod.ifname]).stdout
        if "clsact" in qdiscs:
            found.append(f"tc qdisc: {qdiscs.strip()}")
        for hook in ("ingress", "egress"):
            filters = pod.run(["tc", "filter", "show", "dev", pod.ifname, hook]).stdout.strip()
            if filters:
                found.append(f"tc {hook} filter: {filters}")
        return found

class BackendContract(ContractBase):
    """Every behaviour, over the lab's TCP protocol; for sidecars that relay any TCP."""

    # --- outbound ---------------------------------------------------------------------------
    def test_outbound_goes_through_the_sidecar_with_the_true_original_destination(self, world, via):
        client, remote = world.client, world.remote
        self.enable(client)
        reply = client.connect(remote.address(via), APP_PORT, send=b"hello")
        assert reply.greeting()["pod"] == "remote"
        assert not reply.direct, "the server saw the client itself: nothing intercepted the connection"
        entry = self.outbound_entry(world, client, reply)
        assert entry["original_dst"] == remote.endpoint(APP_PORT, via)
        assert entry["upstream"] == remote.endpoint(APP_PORT, via) and entry["error"] is None
        assert reply.greeting()["peer"] == entry["upstream_local"], "the server must see the sidecar's connection"
        assert reply.trailer()["received"] == 5 and entry["bytes_up"] == 5

    def test_excluded_outbound_ports_go_direct(self, world, via):
        client, remote = world.client, world.remote
        self.enable(client, exclude_outbound_ports=[OTHER_PORT])
        mark = world.sidecars["client"].mark()
        direct = client.connect(remote.address(via), OTHER_PORT)
        assert direct.direct and direct.greeting()["port"] == OTHER_PORT
        proxied = client.connect(remote.address(via), APP_PORT)
        assert not proxied.direct
        entry = self.outbound_entry(world, client, proxied, since=mark)
        assert entry["original_dst"] == remote.endpoint(APP_PORT, via)
        seen = {e["original_dst"] for e in world.sidecars["client"].connections(mark)}
        assert remote.endpoint(OTHER_PORT, via) not in seen

    def test_excluded_outbound_cidrs_go_direct(self, world, via):
        client, server, remote = world.client, world.server, world.remote
        self.enable(client, exclude_outbound_cidrs=[self.cidr(remote.node, via)])
        assert client.connect(remote.address(via), APP_PORT).direct
        proxied = client.connect(server.address(via), APP_PORT)
        assert not proxied.direct
        assert self.outbound_entry(world, client, proxied)["original_dst"] == server.endpoint(APP_PORT, via)
        self.enable(client, exclude_outbound_cidrs=[self.cidr(server, via)])
        assert client.connect(server.address(via), APP_PORT).direct
        assert not client.connect(remote.address(via), APP_PORT).direct

    def test_the_proxy_uid_is_not_intercepted_and_the_sidecar_does_not_loop(self, world, via):
        client, remote = world.client, world.remote
        spec = self.enable(client)["spec"]
        mark = world.sidecars["client"].mark()
        own = client.connect(remote.address(via), APP_PORT, uid=spec["proxy_uid"])
        assert own.direct, "a connection of the proxy UID was redirected"
        self.assert_untouched_sidecar(world, client, mark)
        app = client.connect(remote.address(via), APP_PORT)
        entry = self.outbound_entry(world, client, app, since=mark)
        # The sidecar's own upstream connection must not come back to it as a second entry.
        again = world.sidecars["client"].wait_for(since=mark, count=2, timeout=0.3)
        assert again == [entry], f"the sidecar saw its own connection: {again}"

    # --- inbound ----------------------------------------------------------------------------
    @pytest.mark.parametrize("source", ["bystander", "remote"], ids=["same-node", "cross-node"])
    def test_inbound_goes_through_the_sidecar(self, world, source, via):
        server, src = world.server, world.pods[source]
        self.enable(server)
        reply = src.connect(server.address(via), APP_PORT, send=b"in")
        assert reply.greeting()["pod"] == "server"
        entry = self.inbound_entry(world, server, reply.local)
        assert entry["original_dst"] == server.endpoint(APP_PORT, via) and entry["error"] is None
        seen_by_app = reply.greeting()["peer"]
        assert seen_by_app == entry["upstream_local"], "the app must see the connection coming from the sidecar"
        assert seen_by_app.startswith(self.loopback(via))
        assert reply.greeting()["local"] == f"{self.loopback(via)}{APP_PORT}"
        assert reply.trailer()["received"] == 2

    def test_excluded_inbound_ports_go_direct(self, world, via):
        server, src = world.server, world.bystander
        self.enable(server, exclude_inbound_ports=[OTHER_PORT])
        mark = world.sidecars["server"].mark()
        assert src.connect(server.address(via), OTHER_PORT).direct
        proxied = src.connect(server.address(via), APP_PORT)
        assert not proxied.direct
        self.inbound_entry(world, server, proxied.local, since=mark)
        assert server.endpoint(OTHER_PORT, via) not in {e["original_dst"] for e in world.sidecars["server"].connections(mark)}

    def test_included_inbound_ports_restrict_interception(self, world, via):
        server, src = world.server, world.remote
        self.enable(server, include_inbound_ports=[APP_PORT])
        proxied = src.connect(server.address(via), APP_PORT)
        assert not proxied.direct
        assert self.inbound_entry(world, server, proxied.local)["original_dst"] == server.endpoint(APP_PORT, via)
        assert src.connect(server.address(via), OTHER_PORT).direct

    # --- both ends --------------------------------------------------------------------------
    @pytest.mark.parametrize("dest", ["server", "remote"], ids=["same-node", "cross-node"])
    def test_client_and_server_both_intercepted(self, world, dest, via):
        client, target = world.client, world.pods[dest]
        self.enable(client)
        self.enable(target)
        reply = client.connect(target.address(via), APP_PORT, send=b"both")
        out = self.outbound_entry(world, client, reply)
        assert out["original_dst"] == target.endpoint(APP_PORT, via)
        inbound = self.inbound_entry(world, target, out["upstream_local"])
        assert inbound["original_dst"] == target.endpoint(APP_PORT, via)
        assert reply.greeting()["peer"] == inbound["upstream_local"]
        assert reply.trailer()["received"] == 4

    def test_long_transfer_arrives_intact_through_both_sidecars(self, world, via):
        client, remote = world.client, world.remote
        self.enable(client)
        self.enable(remote)
        result = client.transfer(remote.address(via), OTHER_PORT, up=20 * MB, down=20 * MB)
        assert result.intact, f"sha256 mismatch: {result}"
        assert result.sent == result.received == 20 * MB
        assert result.greeting["pod"] == "remote" and result.greeting["peer"].startswith(self.loopback(via))
        out = world.sidecars["client"].wait_for(lambda e: e["peer"] == result.local)
        assert len(out) == 1 and out[0]["original_dst"] == remote.endpoint(OTHER_PORT, via)
        assert out[0]["bytes_up"] > 20 * MB and out[0]["bytes_down"] > 20 * MB

    def test_many_concurrent_connections_all_arrive(self, world, via):
        client, remote = world.client, world.remote
        self.enable(client)
        self.enable(remote)
        mark = world.sidecars["remote"].mark()
        summary = client.connect_many(remote.address(via), APP_PORT, count=200, parallel=40)
        assert summary == {"ok": 200, "failed": 0, "errors": {}, "greetings": {"remote": 200}}
        logged = world.sidecars["remote"].wait_for(lambda e: e["direction"] == "inbound", since=mark, count=200)
        # HAProxy writes its log without blocking and drops lines in a burst; ours logs every one.
        assert len(logged) >= (200 if self.sidecar_kind == "project" else 180)

    # --- scope ------------------------------------------------------------------------------
    def test_a_namespace_that_is_not_enabled_is_untouched(self, world, via):
        client, bystander, remote = world.client, world.bystander, world.remote
        assert bystander.cgroup_path == client.cgroup_path, "same node, same cgroup: the hard case"
        self.enable(client)
        mark = world.sidecars["bystander"].mark()
        assert bystander.connect(remote.address(via), APP_PORT).direct
        assert remote.connect(bystander.address(via), APP_PORT).direct
        assert client.connect(bystander.address(via), APP_PORT).greeting()["pod"] == "bystander"
        self.assert_untouched_sidecar(world, bystander, mark)
        assert not client.connect(remote.address(via), APP_PORT).direct, "while the enabled neighbour is intercepted"

    # --- lifecycle --------------------------------------------------------------------------
    def test_disable_restores_direct_traffic_and_leaves_nothing(self, world, via):
        client, server = world.client, world.server
        self.enable(client)
        self.enable(server)
        assert not client.connect(server.address(via), APP_PORT).direct
        manager = client.node.manager()
        records = {r.name: r for r in manager.records()}
        assert set(records) == {client.netns.name, server.netns.name}
        assert self.disable(client)["changed"] and self.disable(server)["changed"]
        mark = {name: world.sidecars[name].mark() for name in ("client", "server")}
        assert client.connect(server.address(via), APP_PORT).direct
        assert server.connect(client.address(via), OTHER_PORT).direct
        for name in ("client", "server"):
            self.assert_untouched_sidecar(world, world.pods[name], mark[name])
        assert manager.status()["namespaces"] == []
        backend = manager.backend(self.mode)
        for pod in (client, server):
            live = backend.inspect(records[pod.netns.name], pod.netns)
            assert live["in_place"] is False, f"the backend still reports interception in {pod.name}: {live}"
            assert self.leftovers(world, pod) == []

    def test_enable_twice_and_disable_twice_are_harmless(self, world, via):
        client, remote = world.client, world.remote
        first = self.enable(client)
        second = self.enable(client)
        assert first["changed"] is True and second["changed"] is False
        [item] = self.status(client)
        assert item["mode"] == self.mode and item["spec"] == self.spec().to_dict()
        assert item["live"].get("in_place") is True, item["live"]
        reply = client.connect(remote.address(via), APP_PORT)
        assert not reply.direct
        self.outbound_entry(world, client, reply)
        assert self.disable(client)["changed"] is True
        assert self.disable(client)["changed"] is False
        assert self.status(client) == []
        assert client.connect(remote.address(via), APP_PORT).direct
        assert self.leftovers(world, client) == []

    def test_enabling_with_a_changed_spec_replaces_the_old_one(self, world, via):
        client, remote = world.client, world.remote
        self.enable(client, exclude_outbound_ports=[APP_PORT])
        assert client.connect(remote.address(via), APP_PORT).direct
        assert not client.connect(remote.address(via), OTHER_PORT).direct
        changed = self.enable(client, exclude_outbound_ports=[OTHER_PORT])
        assert changed["changed"] is True
        assert not client.connect(remote.address(via), APP_PORT).direct
        assert client.connect(remote.address(via), OTHER_PORT).direct
        [item] = self.status(client)
        assert item["spec"]["exclude_outbound_ports"] == [OTHER_PORT]


class HttpSidecarContract(ContractBase):
    """What an HTTP-only transparent proxy (squid) can show: HTTP out and in through it with
    the true original destination, and the proxy's own traffic left alone. It is how IPv6 is
    proven with a sidecar nobody here wrote (HAProxy 2.6 reads no IPv6 original destination)."""

    sidecar_kind = "squid"
    server_mode = "http"
    server_reply = "{pod} {local} {peer}\n"

    def get(self, src: Pod, dst: Pod, via: str, uid: Optional[int] = None) -> Tuple[str, dict]:
        """GET / from ``src`` to ``dst``: the client's own address and what the app saw."""
        host = dst.endpoint(APP_PORT, via)
        kwargs = {} if uid is None else {"uid": uid}
        reply = src.connect(dst.address(via), APP_PORT,
                            send=f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(), **kwargs)
        head, _, body = bytes(reply).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        pod, local, peer = body.decode().split()
        return reply.local, {"pod": pod, "local": local, "peer": peer}

    def test_outbound_http_goes_through_the_sidecar_with_the_true_original_destination(self, world, via):
        client, remote = world.client, world.remote
        self.enable(client)
        local, app = self.get(client, remote, via)
        assert app["pod"] == "remote" and app["peer"] != local, "nothing intercepted the connection"
        [entry] = world.sidecars["client"].wait_for(lambda e: e["peer"] == local)
        assert entry["direction"] == "outbound" and entry["error"] is None
        assert entry["original_dst"] == entry["upstream"] == remote.endpoint(APP_PORT, via)
        assert app["peer"] == entry["upstream_local"], "the app must see the sidecar's connection"

    @pytest.mark.parametrize("source", ["bystander", "remote"], ids=["same-node", "cross-node"])
    def test_inbound_http_goes_through_the_sidecar(self, world, source, via):
        server, src = world.server, world.pods[source]
        self.enable(server)
        local, app = self.get(src, server, via)
        [entry] = world.sidecars["server"].wait_for(lambda e: e["direction"] == "inbound" and e["peer"] == local)
        assert entry["original_dst"] == server.endpoint(APP_PORT, via) and entry["error"] is None
        assert app["peer"] == entry["upstream_local"] != local, "the app must see the sidecar's connection"

    def test_the_proxy_uid_is_not_intercepted(self, world, via):
        client, remote = world.client, world.remote
        spec = self.enable(client)["spec"]
        mark = world.sidecars["client"].mark()
        local, app = self.get(client, remote, via, uid=spec["proxy_uid"])
        assert app["peer"] == local, "a connection of the proxy UID was redirected"
        self.assert_untouched_sidecar(world, client, mark)


class DnsContract(ContractBase):
    """--capture-dns: every DNS query of the app (UDP from connected and unconnected sockets,
    TCP; IPv4 and IPv6 servers) reaches the pod's DNS sidecar and its answer comes back from the
    server the app asked. ``dns_sidecar``: "project" (the forwarder: names from a file, the rest
    forwarded to that server) or "dnsmasq" (Debian's, as the proxy UID on the DNS port, answering
    names only it knows). Every pod also runs a DNS server on port 53 that knows other names."""

    dns_sidecar: str = "project"
    vias = ("ipv4", "ipv6")  # the server's address family; the query socket matches it
    SIDECAR_NAME, SIDECAR_ADDR = "only-the-sidecar.test", "10.231.88.8"
    SERVER_NAME, SERVER_ADDR = "only-the-server.test", "10.231.99.9"

    @pytest.fixture(scope="class")
    @classmethod
    def world(cls):
        if os.geteuid() != 0:
            pytest.skip("the contract suite needs root (namespaces, cgroups, interception)")
        reason = unavailable_reason(cls.mode)
        if reason:
            pytest.skip(f"mode {cls.mode} is not available here: {reason}")
        spec = cls.spec()
        with TestCluster(nodes=2) as cluster:
            pods = {name: cluster.add_pod(node, name) for name, node in (("client", 0), ("server", 1))}
            sidecars = {}
            for name, pod in pods.items():
                pod.start_dns_server({cls.SERVER_NAME: cls.SERVER_ADDR})
                hosts = {cls.SIDECAR_NAME: cls.SIDECAR_ADDR}
                if cls.dns_sidecar == "project":
                    sidecars[name] = pod.start_sidecar("project", spec=spec, dns_hosts=hosts)
                else:
                    pod.start_sidecar("project", spec=spec)
                    sidecars[name] = pod.start_dns_server(hosts, spec.dns_port, uid=spec.proxy_uid, loopback_only=True)
            yield World(cluster, pods, sidecars)
            for node in cluster.nodes:
                node.manager().disable_all()

    def enable(self, pod: Pod, **spec_changes) -> dict:
        return super().enable(pod, **{"capture_dns": True, **spec_changes})

    @pytest.mark.parametrize("kind", ["udp", "udp-unconnected", "tcp"])
    def test_queries_reach_the_dns_sidecar_and_answers_come_from_the_server_asked(self, world, via, kind):
        client, server = world.client, world.server
        asked = server.address(via)
        self.enable(client)
        got = client.dns(asked, self.SIDECAR_NAME, transport=kind.split("-")[0], connected=kind == "udp")
        assert got["ok"] and got["addresses"] == [self.SIDECAR_ADDR], got
        assert got["from"] == server.endpoint(53, via), "the reply must come from the server the app asked"
        self.disable(client)  # and without capture the same query goes to that server, which does not know it
        direct = client.dns(asked, self.SIDECAR_NAME, transport=kind.split("-")[0], connected=kind == "udp")
        assert direct["ok"] and direct["addresses"] == [] and direct["from"] == server.endpoint(53, via)

    def test_the_libc_resolver_and_dig_over_tcp_get_the_sidecars_answer(self, world, via):
        client, server = world.client, world.server
        self.enable(client)
        found = client.resolve(self.SIDECAR_NAME, server.address(via))
        assert found.returncode == 0 and found.stdout.split()[0] == self.SIDECAR_ADDR, found
        dug = client.resolve(self.SIDECAR_NAME, server.address(via), tool=("dig", "+short", "+tcp"))
        assert dug.stdout.split() == [self.SIDECAR_ADDR], dug
        self.disable(client)
        assert client.resolve(self.SIDECAR_NAME, server.address(via)).returncode != 0

    def test_the_proxys_own_queries_excluded_servers_and_loopback_resolvers_go_direct(self, world, via):
        client, server = world.client, world.server
        spec = self.enable(client)["spec"]
        asked = server.address(via)
        own = client.dns(asked, self.SIDECAR_NAME, uid=spec["proxy_uid"])
        assert own["ok"] and own["addresses"] == [], "a query of the proxy UID was captured"
        # the pod's own server on loopback does not know the sidecar's name: asked, it says so
        assert client.dns("::1" if via == "ipv6" else "127.0.0.1", self.SIDECAR_NAME)["addresses"] == []
        self.enable(client, exclude_outbound_cidrs=[self.cidr(server, via)])
        assert client.dns(asked, self.SIDECAR_NAME)["addresses"] == []
        assert client.dns(asked, self.SERVER_NAME)["addresses"] == [self.SERVER_ADDR]

    def test_without_the_flag_nothing_is_captured(self, world, via):
        client, server = world.client, world.server
        super().enable(client)  # TCP interception on, DNS capture off
        got = client.dns(server.address(via), self.SIDECAR_NAME, transport="tcp")
        assert got["ok"] and got["addresses"] == [], "DNS was captured without --capture-dns"


class DnsForwardingContract(DnsContract):
    """DnsContract plus forwarding, for a DNS sidecar that forwards what it does not know to
    the server the app asked (the project's forwarder; dnsmasq here has no upstream at all)."""

    def test_names_the_sidecar_does_not_know_are_forwarded_to_the_server_asked(self, world, via):
        client, server = world.client, world.server
        self.enable(client)
        mark = world.sidecars["client"].mark()
        for transport, connected in (("udp", True), ("udp", False), ("tcp", True)):
            got = client.dns(server.address(via), self.SERVER_NAME, transport=transport, connected=connected)
            assert got["addresses"] == [self.SERVER_ADDR] and got["from"] == server.endpoint(53, via), got
        logged = world.sidecars["client"].wait_for(lambda e: e["direction"] == "dns", since=mark, count=3)
        assert [(e["answered"], e["original_dst"]) for e in logged] == [("forwarded", server.endpoint(53, via))] * 3
