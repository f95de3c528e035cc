"""The node's maps as data: per-namespace writes, counters, node status, and `maps dump`.

Everything here works on pinned maps through bpfsys (no bcc). `dump()` turns every map
into readable rows: addresses, ports, flags by name, and namespace names where the node's
records know the cookie.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from . import types as T
from . import bpfsys
from meshintercept.errors import Conflict, UsageError
from meshintercept.node import Node

from .pins import CGROUP_LINKS, MAPS, PROGRAMS, NodePins, layout_dirs


# --- per-namespace writes ----------------------------------------------------------------
def set_pod_ips(pins: NodePins, cookie: int, pod_ips: List[dict], previous_ips: Iterable[str] = ()) -> List[str]:
    """Make the pod IP map hold exactly these IPs for this namespace; return IPs added.

    Only ``previous_ips`` (what the namespace's earlier record wrote) can be stale: entries
    are written only by enable, and a new namespace has a new netns cookie, so it owns
    nothing yet. No walk over the whole map: enable stays flat in the number of namespaces.
    """
    podip, config = pins.table("podip"), pins.table("config")
    wanted = {p["ip"]: p for p in pod_ips}
    for ip, pod in wanted.items():
        have = podip.get(T.addr(ip))
        if have is not None and have.netns != cookie and config.get(have.netns) is not None:
            raise Conflict(f"address {pod['ip']} already belongs to another managed namespace "
                           f"(netns cookie {have.netns}) on this node; pod IPs must be unique.")
    added = []
    for ip, pod in wanted.items():
        podip.put(T.addr(ip), T.Pod(netns=cookie, ifindex=pod["ifindex"]))
        added.append(ip)
    _delete_owned_ips(podip, cookie, [ip for ip in previous_ips if ip not in wanted])
    return added


def _delete_owned_ips(podip: bpfsys.TypedMap, cookie: int, ips: Iterable[str]) -> int:
    """Delete these pod IP entries where this namespace still owns them (by key, no walk)."""
    removed = 0
    for ip in ips:
        key = T.addr(ip)
        have = podip.get(key)
        if have is not None and have.netns == cookie:
            removed += int(podip.delete(key))
    return removed


def ensure_counters(pins: NodePins, cookie: int) -> None:
    table = pins.table("counters")
    if table.get(cookie) is None:
        table.put(cookie, T.Counters(), bpfsys.BPF_NOEXIST)


def forget_namespace(pins: NodePins, cookie: int, pod_ips: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """Delete everything keyed by this namespace: config first (stops interception).

    ``pod_ips`` (the record's) are deleted by key. Without them (an enable that failed
    before it was recorded) the pod IP map is walked for the cookie's entries.

    The connection map (LRU) is keyed by the 4-tuple with the cookie inside, so finding a
    namespace's entries needs a pass over it. The pass stays: entries of connections still
    open at disable would otherwise keep answering SO_ORIGINAL_DST and hold LRU slots that
    a busy node's live connections need. It is made cheap: entries come in batches
    (BPF_MAP_LOOKUP_BATCH, one syscall per 1,024 entries), only matches are deleted, and the
    map holds live connections only (closing sockets delete their own entries), not one
    entry per managed namespace.
    """
    removed = {"config": 0, "podip": 0, "counters": 0, "origdst": 0, "listen": 0}
    removed["config"] = int(pins.table("config").delete(cookie))
    listen = pins.table("listen")
    removed["listen"] = sum(int(listen.delete(T.ListenKey(netns=cookie, family=f))) for f in (4, 6))
    podip = pins.table("podip")
    if pod_ips is not None:
        removed["podip"] = _delete_owned_ips(podip, cookie, pod_ips)
    else:
        for key, pod in podip.items():
            if pod.netns == cookie:
                removed["podip"] += int(podip.delete(key))
    removed["counters"] = int(pins.table("counters").delete(cookie))
    origdst = pins.table("origdst")
    for key, _origin in origdst.items():
        if key.netns == cookie:
            removed["origdst"] += int(origdst.delete(key))
    return removed


def _counter_dict(per_cpu: List[T.Counters]) -> dict:
    total = bpfsys.sum_percpu(per_cpu)
    return {name: getattr(total, name) for name in T.COUNTER_FIELDS}


def counters(pins: NodePins, cookie: int) -> Optional[dict]:
    per_cpu = pins.table("counters").get(cookie)
    return None if per_cpu is None else _counter_dict(per_cpu)


def all_configs_and_counters(pins: NodePins):
    """Every namespace's config and summed counters, by cookie, in two batched passes."""
    configs = dict(pins.table("config").items())
    totals = {cookie: _counter_dict(per_cpu) for cookie, per_cpu in pins.table("counters").items()}
    return configs, totals


def count_entries(pins: NodePins, name: str) -> int:
    table = pins.table(name)
    return len(table.items()) if table.value_type is not None else len(table.keys())


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
            out["lookup_available"] = bool(meta.features & T.FEAT_LOOKUP)
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
    return [{"namespace": _ns(cookie, names), "netns_cookie": cookie, **T.config_to_dict(cfg)}
            for cookie, cfg in pins.table("config").items()]


def _dump_podip(pins, names) -> List[dict]:
    rows = [{"ip": T.addr_text(key), "namespace": _ns(pod.netns, names), "netns_cookie": pod.netns,
             "ifindex": pod.ifindex} for key, pod in pins.table("podip").items()]
    return sorted(rows, key=lambda r: (":" in r["ip"], r["ip"]))


def _dump_origdst(pins, names) -> List[dict]:
    return [{
        "namespace": _ns(t.netns, names), "netns_cookie": t.netns,
        "accepted_on": T.endpoint_text(t.local_ip, t.local_port),
        "peer": T.endpoint_text(t.remote_ip, t.remote_port),
        "original_dst": T.endpoint_text(o.ip, o.port),
        "kind": T.origin_flags_text(o.flags), "from_namespace": _ns(o.src_netns, names),
    } for t, o in pins.table("origdst").items()]


def _dump_counters(pins, names) -> List[dict]:
    return [{"namespace": _ns(cookie, names), "netns_cookie": cookie, **_counter_dict(per_cpu)}
            for cookie, per_cpu in pins.table("counters").items()]


def _dump_sockhash(pins, names) -> List[dict]:
    # A sockhash's values are sockets (not readable); its keys say which are accelerated.
    return [{"namespace": _ns(t.netns, names), "netns_cookie": t.netns,
             "local": T.endpoint_text(t.local_ip, t.local_port),
             "remote": T.endpoint_text(t.remote_ip, t.remote_port)} for t in pins.table("sockhash").keys()]


def _dump_listen(pins, names) -> List[dict]:
    # The sidecars' inbound listeners (sk_lookup path); a value reads back as the socket's cookie.
    return [{"namespace": _ns(k.netns, names), "netns_cookie": k.netns, "family": f"ipv{k.family}",
             "socket_cookie": cookie} for k, cookie in pins.table("listen").items()]


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
    "listen": _dump_listen,
    "meta": _dump_meta,
    "sock": _not_enumerable("per-socket storage: entries live and die with their sockets; not listable"),
    "events": _not_enumerable("ring buffer: stream it with 'meshintercept trace'"),
}


def dump(node: Node, records: Iterable = (), only: Optional[str] = None) -> Dict[str, List[dict]]:
    """Decode every pinned map (or one, by pin name or kernel name) into rows."""
    names = _names_by_cookie(records)
    wanted = list(DUMPERS)
    if only:
        by_kernel = {entry[0]: pin for pin, entry in MAPS.items()}
        pin = only if only in DUMPERS else by_kernel.get(only)
        if pin is None:
            raise UsageError(f"unknown map {only!r}; maps: {', '.join(DUMPERS)}.")
        wanted = [pin]
    with NodePins(node.pin_dir) as pins:
        if not pins.loaded():
            return {}
        return {name: DUMPERS[name](pins, names) for name in wanted}
