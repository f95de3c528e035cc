"""bpf/common.h and backends/ebpf/types.py agree on every size and offset.

A layout checker generated from the ctypes classes is compiled against common.h with
clang for the BPF target (the layout the programs use) and run through the compiler's
static assertions: a mismatch fails compilation and names the field. The loaded maps'
key/value sizes are checked against the ctypes sizes too (test_ebpf_node.py).
"""

import ctypes
import importlib
import os
import shutil
import subprocess

import pytest

from meshintercept.backends.ebpf import types as T

BPF_DIR = os.path.dirname(importlib.import_module("meshintercept.bpf").__file__)


def checker_source() -> str:
    # The kernel's fixed-size types, spelled out: linux/types.h needs the host's asm/ dir,
    # which a -target bpf build does not search.
    lines = ["typedef unsigned char __u8; typedef unsigned short __u16; typedef unsigned int __u32;",
             "typedef unsigned long long __u64; typedef int __s32; typedef __u16 __be16; typedef __u32 __be32;",
             "#define MI_LAYOUT_CHECK 1", '#include "common.h"', ""]
    for cname, cls in T.STRUCTS.items():
        lines.append(f"_Static_assert(sizeof(struct {cname}) == {ctypes.sizeof(cls)}, "
                     f"\"sizeof(struct {cname}) != {ctypes.sizeof(cls)} (bpf_types.py)\");")
        for field, _type in cls._fields_:
            offset = getattr(cls, field).offset
            lines.append(f"_Static_assert(__builtin_offsetof(struct {cname}, {field}) == {offset}, "
                         f"\"offsetof({cname}.{field}) != {offset} (bpf_types.py)\");")
    return "\n".join(lines) + "\n"


def clang() -> str:
    for name in ("clang", "clang-14", "clang-15", "clang-16"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("clang is not installed (apt-get install clang); test_bcc_compiles_the_same_checker covers it")


def test_bcc_compiles_the_same_checker_and_rejects_a_drift():
    """bcc's embedded clang, the compiler that builds the programs, agrees too (no clang needed)."""
    bcc = pytest.importorskip("bcc")
    from meshintercept.backends.ebpf import kheaders

    kheaders.ensure()
    body = checker_source().split("\n", 2)[2]  # bcc's kernel headers already define the __u types
    bcc.BPF(text=body.encode(), cflags=[f"-I{BPF_DIR}"]).cleanup()
    drift = body.replace("offsetof(struct mi_origin, port) == 4", "offsetof(struct mi_origin, port) == 6")
    with pytest.raises(Exception, match="compile"):
        bcc.BPF(text=drift.encode(), cflags=[f"-I{BPF_DIR}"])


@pytest.mark.parametrize("target", ["bpf", "native"])
def test_c_and_ctypes_layouts_agree(tmp_path, target):
    src = tmp_path / "layout.c"
    src.write_text(checker_source())
    args = [clang(), "-fsyntax-only", "-I", BPF_DIR, str(src)]
    if target == "bpf":
        args[1:1] = ["-target", "bpf"]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_checker_catches_a_drift(tmp_path):
    """A checker that cannot fail proves nothing: move one field and expect an error."""
    src = tmp_path / "layout.c"
    src.write_text(checker_source().replace("offsetof(struct mi_origin, port) == 4", "offsetof(struct mi_origin, port) == 6"))
    proc = subprocess.run([clang(), "-target", "bpf", "-fsyntax-only", "-I", BPF_DIR, str(src)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "mi_origin.port" in proc.stderr


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
                        ("MI_FEAT_ACCELERATE", T.FEAT_ACCELERATE)):
        assert define(name) == value, name
    for kind in T.EVENT_KINDS:
        assert kind in {define(n) for n in [l.split()[1] for l in text.splitlines() if l.startswith("#define MI_EV_")]}
