"""tc (clsact) attachment of the cross-node inbound programs on a pod's interfaces.

Runs in the calling thread switched into the pod's namespace (no fork: enabling one more
namespace stays in milliseconds). Our filters are recognised by their priority and name;
the clsact qdisc is removed on detach only when we created it and nothing else uses it.
"""

from __future__ import annotations

import errno
import socket
from typing import Dict, List, Optional

from meshintercept.errors import BackendFailure
from meshintercept.netns import Netns

INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3
#: Our filters' priority ("MI"); others' filters at other priorities are left alone.
PRIO = 0x4D49
HANDLE = 1
NAMES = {INGRESS_PARENT: "mi_tc_ingress", EGRESS_PARENT: "mi_tc_egress"}
ETH_P_ALL = 0x0003


def _ipr():
    from pyroute2 import IPRoute

    return IPRoute()


def _addresses(ipr) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for addr in ipr.get_addr(family=socket.AF_INET):
        ip = addr.get_attr("IFA_ADDRESS")
        if ip and not ip.startswith("127."):
            out.setdefault(addr["index"], []).append(ip)
    return out


def _has_clsact(ipr, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index))


def _our_filters(ipr, index: int, parent: int) -> list:
    found = []
    try:
        filters = ipr.get_filters(index=index, parent=parent)
    except Exception:
        return found
    for flt in filters:
        prio = (flt["info"] >> 16) & 0xFFFF
        if prio == PRIO and flt.get_attr("TCA_KIND") == "bpf":
            found.append(flt)
    return found


def _other_filters(ipr, index: int) -> int:
    count = 0
    for parent in (INGRESS_PARENT, EGRESS_PARENT):
        try:
            for flt in ipr.get_filters(index=index, parent=parent):
                if ((flt["info"] >> 16) & 0xFFFF) != PRIO and flt.get_attr("TCA_KIND"):
                    count += 1
        except Exception:
            pass
    return count


def _del_ours(ipr, index: int) -> None:
    for parent in (INGRESS_PARENT, EGRESS_PARENT):
        if _our_filters(ipr, index, parent):
            try:
                ipr.tc("del-filter", "bpf", index, HANDLE, parent=parent, prio=PRIO, protocol=ETH_P_ALL)
            except Exception as exc:
                if getattr(exc, "code", None) not in (errno.ENOENT, errno.EINVAL):
                    raise


def attach(netns: Netns, ingress_fd: int, egress_fd: int, previous: Optional[List[dict]] = None) -> dict:
    """Attach to every interface holding an IPv4 address; return interfaces and pod IPs.

    ``previous`` is the earlier record's interface list: whether we created a qdisc is
    remembered across spec changes.
    """
    created_before = {e["ifindex"]: e.get("qdisc_created", False) for e in (previous or [])}
    done: List[dict] = []
    with netns.entered(), _ipr() as ipr:
        addrs = _addresses(ipr)
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        try:
            for index in sorted(addrs):
                created = False
                if not _has_clsact(ipr, index):
                    ipr.tc("add", "clsact", index)
                    created = True
                entry = {"ifname": names.get(index, "?"), "ifindex": index,
                         "qdisc_created": created or created_before.get(index, False)}
                done.append(entry)
                _del_ours(ipr, index)
                for parent, fd in ((INGRESS_PARENT, ingress_fd), (EGRESS_PARENT, egress_fd)):
                    ipr.tc("add-filter", "bpf", index, HANDLE, fd=fd, name=NAMES[parent], parent=parent,
                           prio=PRIO, protocol=ETH_P_ALL, classid=1, direct_action=True)
        except Exception as exc:
            for entry in done:
                _detach_one(ipr, entry)
            raise BackendFailure(f"cannot attach the tc programs in namespace {netns.name} ({exc}).") from exc
    pod_ips = [{"ip": ip, "ifindex": index} for index in sorted(addrs) for ip in addrs[index]]
    return {"interfaces": done, "pod_ips": pod_ips}


def _detach_one(ipr, entry: dict) -> None:
    index = entry["ifindex"]
    try:
        _del_ours(ipr, index)
        if entry.get("qdisc_created") and _has_clsact(ipr, index) and _other_filters(ipr, index) == 0:
            ipr.tc("del", "clsact", index)
    except Exception as exc:
        if getattr(exc, "code", None) not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise


def detach(netns: Netns, interfaces: List[dict]) -> None:
    with netns.entered(), _ipr() as ipr:
        present = {link["index"] for link in ipr.get_links()}
        for entry in interfaces:
            if entry["ifindex"] in present:
                _detach_one(ipr, entry)


def status(netns: Netns) -> Dict[str, dict]:
    """Per interface: our ingress/egress filters present, clsact present."""
    out = {}
    with netns.entered(), _ipr() as ipr:
        for link in ipr.get_links():
            index = link["index"]
            ingress = bool(_our_filters(ipr, index, INGRESS_PARENT))
            egress = bool(_our_filters(ipr, index, EGRESS_PARENT))
            clsact = _has_clsact(ipr, index)
            if ingress or egress or clsact:
                out[link.get_attr("IFLA_IFNAME")] = {"ifindex": index, "ingress": ingress, "egress": egress,
                                                     "clsact": clsact}
    return out
