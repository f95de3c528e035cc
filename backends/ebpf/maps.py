"""The node's maps as data: per-namespace writes, counters, node status, and `maps dump`.

Everything here works on pinned maps through bpfsys (no bcc). `dump()` turns every map
into readable rows: addresses, ports, flags by name, and namespace names where the node's
records know the cookie.
"""

from __future__ import annotations

import ctypes
from typing import Dict, Iterable, List, Optional

from . import types as T
from . import bpfsys
from meshintercept.errors import Conflict, UsageError
from meshintercept.node import Node

from .pins import CGROUP_LINKS, MAPS, PROGRAMS, NodePins, layout_dirs

_CFG = ctypes.sizeof(T.Config)
_POD = ctypes.sizeof(T.Pod)
_TUPLE = ctypes.sizeof(T.Tuple)
_ORIGIN = ctypes.sizeof(T.Origin)
_COUNTERS = ctypes.sizeof(T.Counters)


def _percpu_size(cls) -> int:
    return ((ctypes.sizeof(cls) + 7) & ~7) * bpfsys.possible_cpus()


# --- per-namespace writes ----------------------------------------------------------------
def set_pod_ips(pins: NodePins, cookie: int, pod_ips: List[dict], previous_ips: Iterable[str] = ()) -> List[str]:
    """Make the pod IP map hold exactly these IPs for this namespace; return IPs added.

    Only ``previous_ips`` (what the namespace's earlier record wrote) can be stale: entries
    are written only by enable, and a new namespace has a new netns cookie, so it owns
    nothing yet. No walk over the whole map: enable stays flat in the number of namespaces.
    """
    fd = pins.map("podip")
    wanted = {T.ip_to_be32(p["ip"]): p for p in pod_ips}
    cfg_fd = pins.map("config")
    for key_int, pod in wanted.items():
        raw = bpfsys.map_lookup(fd, key_int.to_bytes(4, "little"), _POD)
        if raw:
            owner = T.from_bytes(T.Pod, raw).netns
            if owner != cookie and bpfsys.map_lookup(cfg_fd, T.u64(owner), _CFG):
                raise Conflict(f"address {pod['ip']} already belongs to another managed namespace "
                               f"(netns cookie {owner}) on this node; pod IPs must be unique.")
    added = []
    for key_int, pod in wanted.items():
        value = T.Pod(netns=cookie, ifindex=pod["ifindex"])
        bpfsys.map_update(fd, key_int.to_bytes(4, "little"), T.to_bytes(value))
        added.append(pod["ip"])
    _delete_owned_ips(fd, cookie, [ip for ip in previous_ips if T.ip_to_be32(ip) not in wanted])
    return added


def _delete_owned_ips(fd: int, cookie: int, ips: Iterable[str]) -> int:
    """Delete these pod IP entries where this namespace still owns them (by key, no walk)."""
    removed = 0
    for ip in ips:
        key = T.ip_to_be32(ip).to_bytes(4, "little")
        raw = bpfsys.map_lookup(fd, key, _POD)
        if raw and T.from_bytes(T.Pod, raw).netns == cookie:
            removed += int(bpfsys.map_delete(fd, key))
    return removed


def ensure_counters(pins: NodePins, cookie: int) -> None:
    fd = pins.map("counters")
    if bpfsys.map_lookup(fd, T.u64(cookie), _percpu_size(T.Counters)) is None:
        bpfsys.map_update(fd, T.u64(cookie), bytes(_percpu_size(T.Counters)), bpfsys.BPF_NOEXIST)


def forget_namespace(pins: NodePins, cookie: int, pod_ips: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """Delete everything keyed by this namespace: config first (stops interception).

    ``pod_ips`` (the record's) are deleted by key. Without them (an enable that failed
    before it was recorded) the pod IP map is walked for the cookie's entries.

    The connection map (LRU) is keyed by the 4-tuple with the cookie inside, so finding a
    namespace's entries needs a pass over it. The pass stays: entries of connections still
    open at disable would otherwise keep answering SO_ORIGINAL_DST and hold LRU slots that
    a busy node's live connections need. It is made cheap: keys come in batches
    (BPF_MAP_LOOKUP_BATCH, one syscall per 1,024 entries), only matches are deleted, and the
    map holds live connections only (closing sockets delete their own entries), not one
    entry per managed namespace.
    """
    removed = {"config": 0, "podip": 0, "counters": 0, "origdst": 0}
    key = T.u64(cookie)
    removed["config"] = int(bpfsys.map_delete(pins.map("config"), key))
    fd = pins.map("podip")
    if pod_ips is not None:
        removed["podip"] = _delete_owned_ips(fd, cookie, pod_ips)
    else:
        for k in bpfsys.map_keys(fd, 4):
            raw = bpfsys.map_lookup(fd, k, _POD)
            if raw and T.from_bytes(T.Pod, raw).netns == cookie:
                removed["podip"] += int(bpfsys.map_delete(fd, k))
    removed["counters"] = int(bpfsys.map_delete(pins.map("counters"), key))
    fd = pins.map("origdst")
    for k in bpfsys.map_keys_batch(fd, _TUPLE, _ORIGIN):
        if k[:8] == key:
            removed["origdst"] += int(bpfsys.map_delete(fd, k))
    return removed


def counters(pins: NodePins, cookie: int) -> Optional[dict]:
    raw = bpfsys.map_lookup(pins.map("counters"), T.u64(cookie), _percpu_size(T.Counters))
    if raw is None:
        return None
    total = T.sum_percpu(raw, T.Counters, bpfsys.possible_cpus())
    return {name: getattr(total, name) for name in T.COUNTER_FIELDS}


def all_configs_and_counters(pins: NodePins):
    """Every namespace's config and summed counters, by cookie, in two batched passes."""
    configs = {T.from_u64(k): T.from_bytes(T.Config, v)
               for k, v in bpfsys.map_items_batch(pins.map("config"), 8, _CFG)}
    size, cpus = _percpu_size(T.Counters), bpfsys.possible_cpus()
    totals = {}
    for k, v in bpfsys.map_items_batch(pins.map("counters"), 8, size):
        total = T.sum_percpu(v, T.Counters, cpus)
        totals[T.from_u64(k)] = {name: getattr(total, name) for name in T.COUNTER_FIELDS}
    return configs, totals


def count_entries(pins: NodePins, name: str) -> int:
    if name == "origdst":
        return len(bpfsys.map_keys_batch(pins.map(name), _TUPLE, _ORIGIN))
    key_size = {"config": 8, "podip": 4, "counters": 8, "sockhash": _TUPLE}[name]
    return len(bpfsys.map_keys(pins.map(name), key_size))


# --- node status -------------------------------------------------------------------------
def node_status(node: Node) -> dict:
    out = {"pin_dir": node.pin_dir, "cgroup": node.cgroup, "loaded": False, "layouts": layout_dirs(node.pin_dir)}
    with NodePins(node.pin_dir) as pins:
        if not pins.loaded():
            return out
        out["loaded"] = True
        meta = pins.meta()
        if meta:
            from .loader import build_hash

            out["layout"] = meta.layout_version
            out["accelerate_available"] = bool(meta.features & T.FEAT_ACCELERATE)
            out["loaded_at_ns"] = meta.loaded_at_ns
            out["build_matches"] = meta.build_hash == build_hash()
        progs = {}
        for name in PROGRAMS:
            if pins.has("prog", name):
                info = bpfsys.prog_info(pins.prog(name))
                progs[name] = {"id": info["id"], "name": info["name"], "tag": info["tag"]}
        out["programs"] = progs
        links = {}
        for name in CGROUP_LINKS:
            if pins.has("link", name):
                info = bpfsys.link_info(pins.fd("link", name))
                links[name] = {"id": info["id"], "prog_id": info["prog_id"]}
        out["cgroup_links"] = links
        out["managed_namespaces"] = count_entries(pins, "config")
        out["connections"] = count_entries(pins, "origdst")
    return out


# --- dump --------------------------------------------------------------------------------
def _names_by_cookie(records: Iterable) -> Dict[int, str]:
    out = {}
    for rec in records or ():
        cookie = (rec.extra or {}).get("netns_cookie")
        if cookie is not None:
            out[int(cookie)] = rec.name
    return out


def _ns(cookie: int, names: Dict[int, str]) -> str:
    return names.get(cookie, f"cookie:{cookie}")


def _dump_config(pins, names) -> List[dict]:
    rows = []
    for k, v in bpfsys.map_items(pins.map("config"), 8, _CFG):
        cookie = T.from_u64(k)
        rows.append({"namespace": _ns(cookie, names), "netns_cookie": cookie,
                     **T.config_to_dict(T.from_bytes(T.Config, v))})
    return rows


def _dump_podip(pins, names) -> List[dict]:
    rows = []
    for k, v in bpfsys.map_items(pins.map("podip"), 4, _POD):
        pod = T.from_bytes(T.Pod, v)
        rows.append({"ip": T.be32_to_ip(int.from_bytes(k, "little")), "namespace": _ns(pod.netns, names),
                     "netns_cookie": pod.netns, "ifindex": pod.ifindex})
    return sorted(rows, key=lambda r: r["ip"])


def _dump_origdst(pins, names) -> List[dict]:
    rows = []
    for k, v in bpfsys.map_items(pins.map("origdst"), _TUPLE, _ORIGIN):
        t = T.from_bytes(T.Tuple, k)
        o = T.from_bytes(T.Origin, v)
        rows.append({
            "namespace": _ns(t.netns, names), "netns_cookie": t.netns,
            "accepted_on": f"{T.be32_to_ip(t.local_ip)}:{t.local_port}",
            "peer": f"{T.be32_to_ip(t.remote_ip)}:{t.remote_port}",
            "original_dst": f"{T.be32_to_ip(o.ip)}:{o.port}",
            "kind": T.origin_flags_text(o.flags), "from_namespace": _ns(o.src_netns, names),
        })
    return rows


def _dump_counters(pins, names) -> List[dict]:
    rows = []
    for k in bpfsys.map_keys(pins.map("counters"), 8):
        cookie = T.from_u64(k)
        values = counters(pins, cookie)
        if values is not None:
            rows.append({"namespace": _ns(cookie, names), "netns_cookie": cookie, **values})
    return rows


def _dump_sockhash(pins, names) -> List[dict]:
    # A sockhash's values are sockets (not readable); its keys say which are accelerated.
    rows = []
    for k in bpfsys.map_keys(pins.map("sockhash"), _TUPLE):
        t = T.from_bytes(T.Tuple, k)
        rows.append({"namespace": _ns(t.netns, names), "netns_cookie": t.netns,
                     "local": f"{T.be32_to_ip(t.local_ip)}:{t.local_port}",
                     "remote": f"{T.be32_to_ip(t.remote_ip)}:{t.remote_port}"})
    return rows


def _dump_meta(pins, names) -> List[dict]:
    meta = pins.meta()
    if meta is None:
        return []
    from .loader import build_hash

    return [{"layout_version": meta.layout_version, "accelerate": bool(meta.features & T.FEAT_ACCELERATE),
             "build_hash": f"{meta.build_hash:016x}", "build_matches": meta.build_hash == build_hash(),
             "loaded_at_ns": meta.loaded_at_ns}]


def _not_enumerable(what: str):
    def rows(pins, names):
        return [{"note": what}]

    return rows


DUMPERS = {
    "config": _dump_config,
    "podip": _dump_podip,
    "origdst": _dump_origdst,
    "counters": _dump_counters,
    "sockhash": _dump_sockhash,
    "meta": _dump_meta,
    "sock": _not_enumerable("per-socket storage: entries live and die with their sockets; not listable"),
    "events": _not_enumerable("ring buffer: stream it with 'meshintercept trace'"),
}


def dump(node: Node, records: Iterable = (), only: Optional[str] = None) -> Dict[str, List[dict]]:
    """Decode every pinned map (or one, by pin name or kernel name) into rows."""
    names = _names_by_cookie(records)
    wanted = list(DUMPERS)
    if only:
        by_kernel = {kernel: pin for pin, (kernel, _k, _v) in MAPS.items()}
        pin = only if only in DUMPERS else by_kernel.get(only)
        if pin is None:
            raise UsageError(f"unknown map {only!r}; maps: {', '.join(DUMPERS)}.")
        wanted = [pin]
    with NodePins(node.pin_dir) as pins:
        if not pins.loaded():
            return {}
        return {name: DUMPERS[name](pins, names) for name in wanted}
