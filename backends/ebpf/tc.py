"""tc attachment of the cross-node inbound programs on a pod's interfaces.

Runs in the calling thread switched into the pod's namespace (no fork: enabling one more
namespace stays in milliseconds). No netlink library on enable or disable (pyroute2 costs
the CLI ~100 ms to import; it is used only by ``status``, a diagnostic look).

Default: a clsact qdisc and bpf filters over a raw rtnetlink socket (tcnl). Our filters are
recognised by their priority and name; the clsact qdisc is removed on detach only when we
created it and nothing else uses it.

Opt-in (``--tc-attach tcx`` or MESHINTERCEPT_TC_ATTACH=tcx, kernel >= 6.6): tcx bpf links, pinned in the node's
layout dir as ``link_tcx_<netns cookie>_<ifindex>_<in|eg>`` so they outlive the CLI process
and disable removes them by name (LINK_DETACH + unpin), even after the namespace is gone.
Not the default because each tcx attach and detach waits for an RCU grace period on this
kernel (8-16 ms each, measured; see docs/benchmarks.md), which alone breaks the 10 ms
enable target.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Dict, List, Optional

from . import bpfsys
from .addrs import ipv4_by_interface
from meshintercept.errors import BackendFailure
from meshintercept.netns import Netns

INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3
#: Our filters' priority ("MI"); others' filters at other priorities are left alone.
PRIO = 0x4D49
HANDLE = 1
NAMES = {INGRESS_PARENT: "mi_tc_ingress", EGRESS_PARENT: "mi_tc_egress"}
ETH_P_ALL = 0x0003


TCX = {"in": (bpfsys.BPF_TCX_INGRESS, "mi_tc_ingress"), "eg": (bpfsys.BPF_TCX_EGRESS, "mi_tc_egress")}


def tcx_pin_name(cookie: int, ifindex: int, direction: str) -> str:
    return f"link_tcx_{cookie}_{ifindex}_{direction}"


def _tcx_ours(ifindex: int, direction: str) -> bool:
    attach, prog_name = TCX[direction]
    try:
        ids = bpfsys.prog_query(ifindex, attach)
    except OSError:
        return False
    for prog_id in ids:
        try:
            fd = bpfsys.prog_fd_by_id(prog_id)
        except OSError:
            continue
        try:
            if bpfsys.prog_info(fd)["name"] == prog_name:
                return True
        finally:
            bpfsys.close(fd)
    return False


_unpin_link = bpfsys.unpin_link


def tcx_link_alive(path: str, ifindex: int) -> bool:
    """A pinned tcx link still attached to ``ifindex`` (0 once the device went away)."""
    try:
        fd = bpfsys.obj_get(path)
    except OSError:
        return False
    try:
        return bpfsys.link_info(fd).get("ifindex") == ifindex
    finally:
        bpfsys.close(fd)


def tcx_state(recorded: List[dict]) -> Dict[str, dict]:
    """Per recorded interface, whether its pinned tcx links are still attached."""
    return {e["ifname"]: {"ifindex": e["ifindex"], "tcx": True,
                          **{("ingress" if d == "in" else "egress"): tcx_link_alive(p, e["ifindex"])
                             for d, p in (e.get("pins") or {}).items()}}
            for e in recorded}


def attach_tcx(netns: Netns, ingress_fd: int, egress_fd: int, pin_dir: str, cookie: int,
               previous: Optional[List[dict]] = None) -> Optional[dict]:
    """Attach as pinned tcx links; None when this kernel has no tcx (use ``attach``)."""
    fds = {"in": ingress_fd, "eg": egress_fd}
    done: List[dict] = []
    made: List[str] = []
    with netns.entered():
        addrs = ipv4_by_interface()
        try:
            for index in sorted(addrs):
                pins = {}
                for direction, fd in fds.items():
                    path = os.path.join(pin_dir, tcx_pin_name(cookie, index, direction))
                    if os.path.exists(path):
                        if tcx_link_alive(path, index):
                            pins[direction] = path
                            continue
                        _unpin_link(path)
                    try:
                        link = bpfsys.link_create(fd, index, TCX[direction][0])
                    except OSError as exc:
                        if not done and not made and exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, 524):
                            return None  # no tcx on this kernel
                        raise
                    try:
                        bpfsys.obj_pin(link, path)
                    finally:
                        bpfsys.close(link)
                    made.append(path)
                    pins[direction] = path
                done.append({"ifname": socket.if_indextoname(index), "ifindex": index, "tcx": True,
                             "qdisc_created": False, "pins": pins})
        except Exception as exc:
            for path in made:
                _unpin_link(path)
            raise BackendFailure(f"cannot attach the tc programs in namespace {netns.name} ({exc}).") from exc
    keep = {p for e in done for p in e["pins"].values()}
    for entry in previous or []:
        for path in (entry.get("pins") or {}).values():
            if path not in keep:
                _unpin_link(path)
    if previous and any(not e.get("tcx") for e in previous):
        detach(netns, [e for e in previous if not e.get("tcx")])  # an older clsact attachment
    pod_ips = [{"ip": ip, "ifindex": index} for index in sorted(addrs) for ip in addrs[index]]
    return {"interfaces": done, "pod_ips": pod_ips}


def detach_tcx(pin_dir: str, cookie: Optional[int], interfaces: Optional[List[dict]]) -> int:
    """Remove this namespace's tcx links by their pins; also any pin named for the cookie
    that the record does not list (an enable that failed half way). Works without the netns."""
    paths = {p for e in interfaces or [] for p in (e.get("pins") or {}).values()}
    if cookie is not None:
        prefix = f"link_tcx_{cookie}_"
        try:
            paths.update(os.path.join(pin_dir, n) for n in os.listdir(pin_dir) if n.startswith(prefix))
        except OSError:
            pass
    return sum(_unpin_link(p) for p in sorted(paths))


def _ipr():
    from pyroute2 import IPRoute

    return IPRoute()


def _has_clsact(ipr, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index))


def _our_filters(ipr, index: int, parent: int) -> list:
    from pyroute2.netlink.exceptions import NetlinkError

    found = []
    try:
        filters = ipr.get_filters(index=index, parent=parent)
    except (NetlinkError, OSError):  # no clsact on that device (or the device went away)
        return found
    for flt in filters:
        prio = (flt["info"] >> 16) & 0xFFFF
        if prio == PRIO and flt.get_attr("TCA_KIND") == "bpf":
            found.append(flt)
    return found


def attach(netns: Netns, ingress_fd: int, egress_fd: int, previous: Optional[List[dict]] = None) -> dict:
    """Attach clsact filters to every interface holding an IPv4 address (raw rtnetlink, see
    tcnl); return interfaces and pod IPs.

    ``previous`` is the earlier record's interface list: whether we created a qdisc is
    remembered across spec changes; tcx links of an earlier record are replaced.
    """
    from .tcnl import Rtnl

    created_before = {e["ifindex"]: e.get("qdisc_created", False) for e in (previous or [])}
    done: List[dict] = []
    with netns.entered(), Rtnl() as nl:
        addrs = ipv4_by_interface()
        try:
            for index in sorted(addrs):
                created = nl.add_clsact(index)
                entry = {"ifname": socket.if_indextoname(index), "ifindex": index,
                         "qdisc_created": created or created_before.get(index, False)}
                done.append(entry)
                for parent, fd in ((INGRESS_PARENT, ingress_fd), (EGRESS_PARENT, egress_fd)):
                    nl.del_filters(index, parent, PRIO)
                    nl.add_bpf_filter(index, parent, PRIO, ETH_P_ALL, HANDLE, fd, NAMES[parent])
        except Exception as exc:
            for entry in done:
                _detach_one(nl, entry)
            raise BackendFailure(f"cannot attach the tc programs in namespace {netns.name} ({exc}).") from exc
    old_tcx = [e for e in previous or [] if e.get("tcx")]
    if old_tcx:
        detach_tcx(os.path.dirname(next(iter(old_tcx[0]["pins"].values()))), None, old_tcx)
    pod_ips = [{"ip": ip, "ifindex": index} for index in sorted(addrs) for ip in addrs[index]]
    return {"interfaces": done, "pod_ips": pod_ips}


def _detach_one(nl, entry: dict) -> None:
    index = entry["ifindex"]
    try:
        for parent in (INGRESS_PARENT, EGRESS_PARENT):
            nl.del_filters(index, parent, PRIO)
        if entry.get("qdisc_created"):
            others = [p for parent in (INGRESS_PARENT, EGRESS_PARENT) for p in nl.filter_prios(index, parent)
                      if p != PRIO]
            if not others:
                nl.del_clsact(index)
    except OSError as exc:
        if exc.errno not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise


def detach(netns: Netns, interfaces: List[dict]) -> None:
    """Remove clsact-path filters (tcx entries are removed by ``detach_tcx``)."""
    from .tcnl import Rtnl

    interfaces = [e for e in interfaces if not e.get("tcx")]
    if not interfaces:
        return
    with netns.entered(), Rtnl() as nl:
        present = {index for index, _name in socket.if_nameindex()}
        for entry in interfaces:
            if entry["ifindex"] in present:
                _detach_one(nl, entry)


def clsact_state(netns: Netns, recorded: List[dict]) -> Dict[str, dict]:
    """Per recorded interface, whether our bpf filters are on ingress and egress: one
    filter dump per direction over raw rtnetlink (no pyroute2), for status and enable."""
    from .tcnl import Rtnl

    out = {}
    with netns.entered(), Rtnl() as nl:
        present = {index for index, _name in socket.if_nameindex()}
        for e in recorded:
            state = {"ifindex": e["ifindex"], "ingress": False, "egress": False}
            if e["ifindex"] in present:
                for parent, key in ((INGRESS_PARENT, "ingress"), (EGRESS_PARENT, "egress")):
                    state[key] = (PRIO, "bpf") in nl.filters(e["ifindex"], parent)
            out[e["ifname"]] = state
    return out


def status(netns: Netns) -> Dict[str, dict]:
    """Per interface: our programs present on ingress/egress (as a tcx link or a clsact
    filter), clsact present; ``tcx: True`` when ours are tcx links. A full look (it
    imports pyroute2 for the qdiscs): for diagnostics and tests, not for enable."""
    out = {}
    with netns.entered(), _ipr() as ipr:
        for link in ipr.get_links():
            index = link["index"]
            tcx_in, tcx_eg = _tcx_ours(index, "in"), _tcx_ours(index, "eg")
            ingress = bool(_our_filters(ipr, index, INGRESS_PARENT)) or tcx_in
            egress = bool(_our_filters(ipr, index, EGRESS_PARENT)) or tcx_eg
            clsact = _has_clsact(ipr, index)
            if ingress or egress or clsact:
                state = {"ifindex": index, "ingress": ingress, "egress": egress, "clsact": clsact}
                if tcx_in or tcx_eg:
                    state["tcx"] = True
                out[link.get_attr("IFLA_IFNAME")] = state
    return out
