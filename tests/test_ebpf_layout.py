"""The ctypes mirrors agree with the C on every size and offset: bpf/common.h with
backends/ebpf/types.py, and <linux/bpf.h> (as the kernel headers bcc uses define it) with
backends/ebpf/uapi.py.

A layout checker generated from the ctypes classes is compiled by bcc's own clang, the
compiler that builds the programs (BPF target), and a mismatch fails its static assertions
naming the field. The loaded maps' key/value sizes are checked too (test_ebpf_node.py).
"""

import ctypes
import importlib
import os
import re

import pytest

from meshintercept.backends.ebpf import types as T
from meshintercept.backends.ebpf import uapi

BPF_DIR = os.path.dirname(importlib.import_module("meshintercept.bpf").__file__)
pytestmark = pytest.mark.ebpf


def _asserts(ctype: str, cls, members: dict, size: bool) -> list:
    lines = []
    if size:
        lines.append(f"_Static_assert(sizeof({ctype}) == {ctypes.sizeof(cls)}, "
                     f"\"sizeof({ctype}) != {ctypes.sizeof(cls)} ({cls.__module__}.{cls.__name__})\");")
    for field, member in members.items():
        offset = getattr(cls, field).offset
        lines.append(f"_Static_assert(__builtin_offsetof({ctype}, {member}) == {offset}, "
                     f"\"offsetof({ctype}, {member}) != {offset} ({cls.__name__}.{field})\");")
    return lines


def checker_source() -> str:
    lines = ["#define MI_LAYOUT_CHECK 1", '#include "common.h"', ""]
    for cname, cls in T.STRUCTS.items():
        lines += _asserts(f"struct {cname}", cls, {f: f for f, _ in cls._fields_}, size=True)
    for cls, (ctype, members) in uapi.C_LAYOUT.items():
        lines += _asserts(ctype, cls, members, size=False)
    # the program and attach types the loader hands the kernel, by their <linux/bpf.h> names
    for name in sorted(_loaded_type_names()):
        lines.append(f"_Static_assert({name} == {getattr(uapi, name)}, \"{name} != {getattr(uapi, name)} (uapi.py)\");")
    return "\n".join(lines) + "\n"


def _loaded_type_names() -> set:
    from meshintercept.backends.ebpf.pins import CGROUP_LINKS, PROGRAMS

    prog_types = {prog_type for _f, prog_type, _a in PROGRAMS.values()}
    attach_types = {attach for _f, _t, attach in PROGRAMS.values()} | {a for _p, a in CGROUP_LINKS.values()}
    names = {n for n in dir(uapi) if n.startswith("BPF_PROG_TYPE_") and getattr(uapi, n) in prog_types}
    names |= {n for n in dir(uapi) if n.startswith(("BPF_CGROUP_", "BPF_SK_LOOKUP")) and getattr(uapi, n) in attach_types}
    return names


def _compile(text: str) -> None:
    bcc = pytest.importorskip("bcc")
    from meshintercept.backends.ebpf import kheaders

    kheaders.ensure()
    bcc.BPF(text=text.encode(), cflags=[f"-I{BPF_DIR}"]).cleanup()


def test_c_and_ctypes_layouts_agree():
    _compile(checker_source())


@pytest.mark.parametrize("drift", [
    ("offsetof(struct mi_origin, port) == 16", "offsetof(struct mi_origin, port) == 18"),
    ("offsetof(union bpf_attr, link_create.attach_type) == 8", "offsetof(union bpf_attr, link_create.attach_type) == 12"),
    ("_Static_assert(BPF_CGROUP_UDP4_RECVMSG == 19", "_Static_assert(BPF_CGROUP_UDP4_RECVMSG == 20"),
], ids=["common.h", "linux/bpf.h", "attach type"])
def test_the_checker_catches_a_drift(drift, capfd):
    """A checker that cannot fail proves nothing: move one field and expect its error."""
    source = checker_source()
    assert drift[0] in source
    with pytest.raises(Exception, match="compile"):
        _compile(source.replace(*drift))
    if drift[0].startswith("_Static_assert("):
        # clang 14 (Debian 12) says "static_assert failed", clang 19 (Debian 13) "static assertion failed"
        assert re.search(r"static(_assert| assertion) failed due to requirement 'BPF_CGROUP_UDP4_RECVMSG == 20'",
                         capfd.readouterr().err)
        return
    member = drift[0].split("(", 1)[1].split(")", 1)[0]
    assert f"offsetof({member}) != " in capfd.readouterr().err  # bcc's clang names the field


def test_constants_match_the_header():
    text = open(os.path.join(BPF_DIR, "common.h")).read()

    def define(name):
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "#define" and parts[1] == name:
                return int(parts[2], 0)
        raise AssertionError(f"{name} not in common.h")

    assert define("MI_LAYOUT_VERSION") == T.LAYOUT_VERSION
    assert define("MI_MAX_PORTS") == T.MAX_PORTS and T.MAX_PORTS & (T.MAX_PORTS - 1) == 0
    assert define("MI_MAX_CIDRS") == T.MAX_CIDRS and T.MAX_CIDRS & (T.MAX_CIDRS - 1) == 0
    for name, value in (("MI_CFG_DEBUG", T.CFG_DEBUG), ("MI_CFG_ACCELERATE", T.CFG_ACCELERATE),
                        ("MI_ORIG_OUTBOUND", T.ORIG_OUTBOUND), ("MI_ORIG_INBOUND_LOCAL", T.ORIG_INBOUND_LOCAL),
                        ("MI_ORIG_INBOUND_TC", T.ORIG_INBOUND_TC), ("MI_ORIG_CLAIMED", T.ORIG_CLAIMED),
                        ("MI_FEAT_ACCELERATE", T.FEAT_ACCELERATE), ("MI_FEAT_LOOKUP", T.FEAT_LOOKUP),
                        ("MI_CFG_INBOUND_TC", T.CFG_INBOUND_TC), ("MI_CFG_IPV4", T.CFG_IPV4),
                        ("MI_CFG_IPV6", T.CFG_IPV6), ("MI_SOCK_STEERED", T.SOCK_STEERED), ("MI_CFG_DNS", T.CFG_DNS),
                        ("MI_ORIG_DNS", T.ORIG_DNS), ("MI_SOCK_DNS_ASKED", T.SOCK_DNS_ASKED)):
        assert define(name) == value, name
    for kind in T.EVENT_KINDS:
        assert kind in {define(n) for n in [l.split()[1] for l in text.splitlines() if l.startswith("#define MI_EV_")]}


def test_addresses_are_16_bytes_with_ipv4_mapped():
    four, six = T.addr("10.231.1.2"), T.addr("fd00:231:1::2")
    assert bytes(four) == b"\0" * 10 + b"\xff\xff" + bytes([10, 231, 1, 2])
    assert T.addr_text(four) == "10.231.1.2" and T.addr_text(T.addr("::ffff:10.231.1.2")) == "10.231.1.2"
    assert T.endpoint_text(six, 80) == "[fd00:231:1::2]:80" and T.endpoint_text(four, 80) == "10.231.1.2:80"
    assert T.is_zero(T.Addr()) and not T.is_zero(four)


def test_config_packs_both_families_cidrs_and_flags():
    from meshintercept.spec import InterceptSpec

    spec = InterceptSpec.build(exclude_outbound_cidrs=["10.0.0.0/8", "fd00:231:2::/64", "::ffff:192.168.0.0/112"],
                               inbound_path="tc")
    cfg = T.config_from_spec(spec, families=["ipv4", "ipv6"])
    data = T.config_to_dict(cfg)
    assert data["exclude_outbound_cidrs"] == ["10.0.0.0/8", "192.168.0.0/16", "fd00:231:2::/64"]
    assert data["inbound_path"] == "tc" and data["families"] == ["ipv4", "ipv6"]
    assert T.config_to_dict(T.config_from_spec(InterceptSpec(), families=["ipv6"]))["families"] == ["ipv6"]
    # an IPv4 range, stored mapped, must not match an IPv6 address with the same low bits
    c = cfg.exclude_out_cidrs[0]
    six = T.addr("::a00:1")
    assert any((a & m) != n for a, m, n in zip(six.w, c.mask.w, c.addr.w))
    assert T.limit_problems(InterceptSpec.build(exclude_outbound_cidrs=[f"fd00:{i:x}::/32" for i in range(33)]))
