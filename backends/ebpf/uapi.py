"""The kernel's bpf(2) ABI as named ctypes structures (include/uapi/linux/bpf.h).

``union bpf_attr`` is a union of one anonymous struct per command; each is a class here,
passed to the kernel with its own size (the kernel treats missing tail bytes as zero).
The info structs are cut after the last field we read; the kernel fills only the
``info_len`` bytes it is given. tests/test_ebpf_layout.py compiles every offset below
against the kernel headers bcc uses, so a wrong one fails there, not in the kernel.

``C_LAYOUT`` names, per class, the C type and the C member path of each field.
"""

from __future__ import annotations

import ctypes as ct

u32, s32, u64 = ct.c_uint32, ct.c_int32, ct.c_uint64
OBJ_NAME_LEN = 16

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_BATCH = 24
BPF_LINK_CREATE = 28
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_DETACH = 34

# enum bpf_attach_type
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_MSG_VERDICT = 7
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_UDP6_RECVMSG = 20
BPF_CGROUP_GETSOCKOPT = 21
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_GETPEERNAME = 30
BPF_SK_LOOKUP = 36
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47

# enum bpf_link_type
BPF_LINK_TYPE_CGROUP = 3
BPF_LINK_TYPE_NETNS = 5
BPF_LINK_TYPE_TCX = 11

# enum bpf_prog_type
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_SK_MSG = 16
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25
BPF_PROG_TYPE_SK_LOOKUP = 30

# enum bpf_map_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_SOCKHASH = 18
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_MAP_TYPE_RINGBUF = 27

# map update flags, file flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_ALLOW_MULTI = 2
BPF_F_QUERY_EFFECTIVE = 1
BPF_F_RDONLY = 1 << 3


class MapCreateAttr(ct.Structure):
    """BPF_MAP_CREATE."""
    _fields_ = [("map_type", u32), ("key_size", u32), ("value_size", u32), ("max_entries", u32),
                ("map_flags", u32), ("inner_map_fd", u32), ("numa_node", u32), ("map_name", ct.c_char * OBJ_NAME_LEN)]


class MapElemAttr(ct.Structure):
    """BPF_MAP_LOOKUP_ELEM, _UPDATE_ELEM, _DELETE_ELEM, _GET_NEXT_KEY (``value`` is ``next_key``)."""
    _fields_ = [("map_fd", u32), ("pad", u32), ("key", u64), ("value", u64), ("flags", u64)]


class MapBatchAttr(ct.Structure):
    """BPF_MAP_LOOKUP_BATCH."""
    _fields_ = [("in_batch", u64), ("out_batch", u64), ("keys", u64), ("values", u64), ("count", u32),
                ("map_fd", u32), ("elem_flags", u64), ("flags", u64)]


class ObjAttr(ct.Structure):
    """BPF_OBJ_PIN, BPF_OBJ_GET."""
    _fields_ = [("pathname", u64), ("bpf_fd", u32), ("file_flags", u32)]


class ProgAttachAttr(ct.Structure):
    """BPF_PROG_ATTACH, BPF_PROG_DETACH."""
    _fields_ = [("target_fd", u32), ("attach_bpf_fd", u32), ("attach_type", u32), ("attach_flags", u32)]


class GetIdAttr(ct.Structure):
    """BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID, BPF_LINK_GET_FD_BY_ID (``id`` is the union)."""
    _fields_ = [("id", u32), ("next_id", u32), ("open_flags", u32)]


class InfoAttr(ct.Structure):
    """BPF_OBJ_GET_INFO_BY_FD."""
    _fields_ = [("bpf_fd", u32), ("info_len", u32), ("info", u64)]


class QueryAttr(ct.Structure):
    """BPF_PROG_QUERY."""
    _fields_ = [("target_fd", u32), ("attach_type", u32), ("query_flags", u32), ("attach_flags", u32),
                ("prog_ids", u64), ("prog_cnt", u32)]


class LinkCreateAttr(ct.Structure):
    """BPF_LINK_CREATE: ``target`` is a cgroup or netns fd, or an ifindex for tcx."""
    _fields_ = [("prog_fd", u32), ("target", u32), ("attach_type", u32), ("flags", u32)]


class ProgLoadAttr(ct.Structure):
    """BPF_PROG_LOAD, up to expected_attach_type (the verifier's probes)."""
    _fields_ = [("prog_type", u32), ("insn_cnt", u32), ("insns", u64), ("license", u64), ("log_level", u32),
                ("log_size", u32), ("log_buf", u64), ("kern_version", u32), ("prog_flags", u32),
                ("prog_name", ct.c_char * OBJ_NAME_LEN), ("prog_ifindex", u32), ("expected_attach_type", u32)]


class LinkDetachAttr(ct.Structure):
    """BPF_LINK_DETACH."""
    _fields_ = [("link_fd", u32)]


class MapInfo(ct.Structure):
    """struct bpf_map_info, up to the name."""
    _fields_ = [("type", u32), ("id", u32), ("key_size", u32), ("value_size", u32), ("max_entries", u32),
                ("map_flags", u32), ("name", ct.c_char * OBJ_NAME_LEN)]


class ProgInfo(ct.Structure):
    """struct bpf_prog_info, up to the run statistics (kernel.bpf_stats_enabled) and
    the verifier's instruction count."""
    _fields_ = [("type", u32), ("id", u32), ("tag", ct.c_ubyte * 8), ("jited_prog_len", u32),
                ("xlated_prog_len", u32), ("jited_prog_insns", u64), ("xlated_prog_insns", u64),
                ("load_time", u64), ("created_by_uid", u32), ("nr_map_ids", u32), ("map_ids", u64),
                ("name", ct.c_char * OBJ_NAME_LEN), ("ifindex", u32), ("gpl_compatible", u32),
                ("netns_dev", u64), ("netns_ino", u64), ("nr_jited_ksyms", u32), ("nr_jited_func_lens", u32),
                ("jited_ksyms", u64), ("jited_func_lens", u64), ("btf_id", u32), ("func_info_rec_size", u32),
                ("func_info", u64), ("nr_func_info", u32), ("nr_line_info", u32), ("line_info", u64),
                ("jited_line_info", u64), ("nr_jited_line_info", u32), ("line_info_rec_size", u32),
                ("jited_line_info_rec_size", u32), ("nr_prog_tags", u32), ("prog_tags", u64),
                ("run_time_ns", u64), ("run_cnt", u64), ("recursion_misses", u64), ("verified_insns", u32)]


class LinkInfo(ct.Structure):
    """struct bpf_link_info with the union's first two words (cgroup, netns and tcx links keep
    their target there: tcx ``ifindex, attach_type``; netns ``netns_ino, attach_type``)."""
    _fields_ = [("type", u32), ("id", u32), ("prog_id", u32), ("pad", u32), ("target", u32), ("target_attach_type", u32),
                ("more", u64 * 5)]


#: class -> (C type, {field: C member path}); fields left out have no C name of their own
#: (padding, a bitfield, or a union member newer than the oldest headers we build with).
C_LAYOUT = {
    MapCreateAttr: ("union bpf_attr", {f: f for f, _ in MapCreateAttr._fields_}),
    MapElemAttr: ("union bpf_attr", {"map_fd": "map_fd", "key": "key", "value": "value", "flags": "flags"}),
    MapBatchAttr: ("union bpf_attr", {f: f"batch.{f}" for f, _ in MapBatchAttr._fields_}),
    ObjAttr: ("union bpf_attr", {f: f for f, _ in ObjAttr._fields_}),
    ProgAttachAttr: ("union bpf_attr", {f: f for f, _ in ProgAttachAttr._fields_}),
    GetIdAttr: ("union bpf_attr", {"id": "prog_id", "next_id": "next_id", "open_flags": "open_flags"}),
    InfoAttr: ("union bpf_attr", {f: f"info.{f}" for f, _ in InfoAttr._fields_}),
    QueryAttr: ("union bpf_attr", {f: f"query.{f}" for f, _ in QueryAttr._fields_}),
    LinkCreateAttr: ("union bpf_attr", {"prog_fd": "link_create.prog_fd", "target": "link_create.target_fd",
                                        "attach_type": "link_create.attach_type", "flags": "link_create.flags"}),
    LinkDetachAttr: ("union bpf_attr", {"link_fd": "link_detach.link_fd"}),
    ProgLoadAttr: ("union bpf_attr", {f: f for f, _ in ProgLoadAttr._fields_}),
    MapInfo: ("struct bpf_map_info", {f: f for f, _ in MapInfo._fields_}),
    ProgInfo: ("struct bpf_prog_info", {f: f for f, _ in ProgInfo._fields_ if f != "gpl_compatible"}),
    LinkInfo: ("struct bpf_link_info", {"type": "type", "id": "id", "prog_id": "prog_id",
                                        "target": "netns.netns_ino", "target_attach_type": "netns.attach_type"}),
}
