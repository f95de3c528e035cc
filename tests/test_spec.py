"""InterceptSpec validation and the decisions every backend must agree on."""

import ipaddress

import pytest

from meshintercept.errors import UsageError
from meshintercept.spec import InterceptSpec, split_list


def test_defaults_are_osm_edge():
    spec = InterceptSpec()
    assert (spec.proxy_uid, spec.outbound_port, spec.inbound_port) == (1500, 15001, 15003)


def test_lists_accept_repeats_and_commas_and_dedupe():
    spec = InterceptSpec.build(exclude_outbound_ports=("22,53", "8125", " 53 "),
                               exclude_outbound_cidrs=["10.0.0.0/8,192.168.1.7"])
    assert spec.exclude_outbound_ports == (22, 53, 8125)
    assert spec.exclude_outbound_cidrs == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.7/32"))
    assert split_list(["a,,b", ("c",)]) == ["a", "b", "c"]


@pytest.mark.parametrize("bad", [{"inbound_port": 0}, {"outbound_port": "70000"}, {"inbound_port": "abc"},
                                 {"exclude_inbound_ports": ["1,x"]}, {"exclude_outbound_cidrs": ["fd00::zz/64"]},
                                 {"exclude_outbound_cidrs": ["::/0"]}, {"families": ["ipv5"]},
                                 {"outbound_port": 15003}, {"proxy_uid": "root"},
                                 {"include_inbound_ports": ["80"], "exclude_inbound_ports": ["80"]}])
def test_bad_values(bad):
    with pytest.raises(UsageError):
        InterceptSpec.build(**bad)


def test_proxy_ports_never_redirected_inbound():
    spec = InterceptSpec.build(include_inbound_ports=["15001", "8080"], exclude_inbound_ports=["9090"])
    assert not spec.inbound_redirected(15001)
    assert not spec.inbound_redirected(15003)
    assert spec.inbound_redirected(8080)
    assert not spec.inbound_redirected(9090)
    assert not spec.inbound_redirected(80)


def test_outbound_decisions():
    spec = InterceptSpec.build(exclude_outbound_ports=["22"], exclude_outbound_cidrs=["10.231.9.0/24"])
    assert spec.outbound_redirected("10.231.1.5", 80)
    assert not spec.outbound_redirected("127.0.0.1", 80)
    assert not spec.outbound_redirected("10.231.1.5", 22)
    assert not spec.outbound_redirected("10.231.9.200", 80)


def test_round_trip_through_dict():
    spec = InterceptSpec.build(exclude_outbound_cidrs=["10.0.0.0/8"], include_inbound_ports=["80"], debug=True)
    assert InterceptSpec.from_dict(spec.to_dict()) == spec


def test_unknown_field_is_rejected():
    with pytest.raises(UsageError, match="unknown spec field"):
        InterceptSpec.build(outbound_prot=1)


def test_plain_strings_from_json_or_env_are_lists_too():
    spec = InterceptSpec.build(exclude_inbound_ports="22,8080", exclude_outbound_ports=53)
    assert spec.exclude_inbound_ports == (22, 8080)
    assert spec.exclude_outbound_ports == (53,)


def test_ipv6_cidrs_and_v4_mapped_destinations():
    spec = InterceptSpec.build(exclude_outbound_cidrs=["fd00:231:9::/48", "::ffff:10.9.0.0/112", "10.8.0.0/16"])
    # a v4-mapped range is the IPv4 range it maps: one rule for AF_INET and AF_INET6 sockets
    assert [str(n) for n in spec.exclude_outbound_cidrs] == ["10.8.0.0/16", "10.9.0.0/16", "fd00:231:9::/48"]
    assert [str(n) for n in spec.cidrs(6)] == ["fd00:231:9::/48"]
    assert not spec.outbound_redirected("::ffff:10.9.1.1", 80) and not spec.outbound_redirected("10.9.1.1", 80)
    assert spec.outbound_redirected("::ffff:10.7.1.1", 80) and spec.outbound_redirected("fd00:231:8::1", 80)
    assert not spec.outbound_redirected("fd00:231:9::5", 80)
    for loopback in ("::1", "::ffff:127.0.0.1", "127.0.0.5"):
        assert not spec.outbound_redirected(loopback, 80), loopback


def test_families_default_to_every_family_the_namespace_has():
    assert InterceptSpec().families == () and InterceptSpec().wants("ipv6")
    spec = InterceptSpec.build(families=["inet6,ipv4", "6"])
    assert spec.families == ("ipv4", "ipv6")
    assert InterceptSpec.build(families="ipv4").wants("ipv6") is False
    assert InterceptSpec.from_dict(spec.to_dict()) == spec


def test_inbound_path_defaults_to_sk_lookup_and_is_validated():
    from meshintercept.cni.config import parse

    assert InterceptSpec().inbound_path == "sk_lookup"
    assert InterceptSpec.build(inbound_path="TC").inbound_path == "tc"
    assert InterceptSpec.from_dict(InterceptSpec.build(inbound_path="tc").to_dict()).inbound_path == "tc"
    with pytest.raises(UsageError, match="inbound path 'nat' is not one of sk_lookup, tc"):
        InterceptSpec.build(inbound_path="nat")
    conf = parse({"cniVersion": "1.0.0", "name": "k8s", "type": "meshintercept-cni", "mode": "ebpf", "inbound_path": "tc"})
    assert conf.spec.inbound_path == "tc"
