"""`EbpfInterceptor`: the eBPF data path behind the Interceptor interface.

Node-wide: programs loaded once (loader.load) and pinned. Per namespace: one entry in the
config map keyed by the namespace's netns cookie, its pod IPs (IPv4 and IPv6) in the pod IP
map, a counters slot, and its inbound path: an sk_lookup link on the namespace (default;
lookup.py) or tc programs on its interfaces (pinned tcx links, or clsact filters; tc.py).
Enable writes the config entry last but one (that is what turns interception on; an
sk_lookup namespace's existing listener is registered right after it, so no listener can
slip between the scan and the sockops callback) and disable deletes it first.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from . import types as T
from meshintercept.errors import UsageError
from meshintercept.interceptor import Check, Interceptor, Metric
from meshintercept.netns import Netns
from meshintercept.spec import DNS_PORT, InterceptSpec
from meshintercept.state import NamespaceRecord

from . import addrs
from . import maps as nsmaps
from .pins import CGROUP_LINKS, NodePins


def _check_limits(spec: InterceptSpec) -> None:
    problems = T.limit_problems(spec)
    if problems:
        raise UsageError("; ".join(problems) + "; merge ports or CIDRs into fewer entries.")


def _dns_plan(spec: InterceptSpec) -> str:
    if DNS_PORT in spec.exclude_outbound_ports:
        return "dns: not captured (port 53 is an excluded outbound port)"
    return (f"dns: UDP and TCP to port 53 of any address but loopback, not from uid {spec.proxy_uid}, "
            f"not to excluded CIDRs -> 127.0.0.1/[::1]:{spec.dns_port} (connect4/6 for TCP and connected UDP, "
            f"sendmsg4/6 for sendto); replies and peers shown as the server asked (recvmsg4/6, getpeername4/6); "
            f"the DNS sidecar learns each UDP query's server by getsockopt(SO_ORIGINAL_DST) on a UDP socket "
            f"connected to the client")


def _family_notes(netns: Netns, families: Dict[str, str]) -> List[str]:
    return [f"{'IPv4' if f == 'ipv4' else 'IPv6'} is not intercepted in {netns.name}: {why}"
            for f, why in families.items() if why != "captured" and not why.startswith("not asked")]


class EbpfInterceptor(Interceptor):
    name = "ebpf"
    description = ("cgroup connect4/connect6/sockops/getsockopt + sk_lookup (or tc) inbound; "
                   "sendmsg/recvmsg/getpeername for --capture-dns")

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        if not os.path.exists("/sys/fs/cgroup"):
            return "no cgroup filesystem at /sys/fs/cgroup; the ebpf mode needs cgroup v2."
        from meshintercept.node import cgroup2_mounts

        if not cgroup2_mounts():
            return "no cgroup-v2 mount found; mount one with 'mount -t cgroup2 none /sys/fs/cgroup/unified'."
        return None

    def pins(self) -> NodePins:
        return NodePins(self.node.pin_dir)

    def _loaded_pins(self, warnings: List[str]) -> NodePins:
        pins = self.pins()
        if not pins.loaded():
            from . import loader

            warnings.extend(loader.load(self.node))
        return pins

    # --- enable -----------------------------------------------------------------------
    def enable(self, netns: Netns, spec: InterceptSpec, previous: Optional[NamespaceRecord] = None) -> dict:
        _check_limits(spec)
        with netns.entered():
            found = addrs.read()
        families = addrs.captured_families(spec, found, netns.name, spec.inbound_path)
        captured = [f for f, why in families.items() if why == "captured"]
        warnings: List[str] = _family_notes(netns, families)
        with self._loaded_pins(warnings) as pins:
            accelerate = spec.accelerate
            if accelerate and not pins.accelerate_available():
                warnings.append("--accelerate ignored: sockhash/sk_msg could not be loaded on this node "
                                "(see 'meshintercept doctor'); traffic takes the normal path.")
                accelerate = False
            elif accelerate:
                warnings.append("--accelerate needs an event-driven sidecar that does not splice(2) from sockets "
                                "(meshintercept-sidecar, HAProxy, Envoy, Pipy); a blocking or splicing proxy can stall (docs/ebpf.md).")
            cookie = netns.cookie()
            cfg = T.config_from_spec(spec, accelerate=accelerate, families=captured)
            pod_ips = [p for p in found.pod_ips() if ("ipv6" if ":" in p["ip"] else "ipv4") in captured]
            if spec.inbound_path == T.INBOUND_TC:
                path = self._enable_tc(pins, netns, cookie, cfg, pod_ips, previous, warnings)
            else:
                path = self._enable_lookup(pins, netns, cookie, cfg, spec, pod_ips, previous)
        return {
            "netns_cookie": cookie,
            "pod_ips": [p["ip"] for p in pod_ips],
            "inbound_path": spec.inbound_path,
            "families": families,
            **path,
            "accelerate": accelerate,
            "warnings": warnings,
            "pin_dir": self.node.pin_dir,
            "cgroup": self.node.cgroup,
        }

    def _enable_tc(self, pins: NodePins, netns: Netns, cookie: int, cfg: T.Config, pod_ips: List[dict],
                   previous: Optional[NamespaceRecord], warnings: List[str]) -> dict:
        from . import lookup, tc

        prev_tc = (previous.extra.get("tc") if previous else None) or []
        prev_ips = (previous.extra.get("pod_ips") if previous else None) or []
        attached = None
        if self.node.tc_attach == "tcx":  # opt-in: see tc.py on its cost
            attached = tc.attach_tcx(netns, pins.prog("tc_ingress"), pins.prog("tc_egress"), pins.dir, cookie,
                                     prev_tc)
            if attached is None:
                warnings.append(f"--tc-attach tcx: this kernel ({os.uname().release}) has no tcx links (first in "
                                "Linux 6.6); the tc programs are attached as clsact filters.")
        if attached is None:
            attached = tc.attach(netns, pins.prog("tc_ingress"), pins.prog("tc_egress"), prev_tc)
        try:
            nsmaps.set_pod_ips(pins, cookie, pod_ips, prev_ips)
            nsmaps.ensure_counters(pins, cookie)
            pins.table("config").put(cookie, cfg)
        except BaseException:
            if previous is None:
                nsmaps.forget_namespace(pins, cookie, [p["ip"] for p in pod_ips])
                tc.detach_tcx(pins.dir, cookie, attached["interfaces"])
                tc.detach(netns, attached["interfaces"])
            raise
        # Coming from the sk_lookup path: its link goes once the tc programs are in charge.
        lookup.unpin(lookup.link_path(pins, cookie))
        lookup.forget_listeners(pins, cookie)
        return {"tc": attached["interfaces"], "lookup_link": None, "listeners": []}

    def _enable_lookup(self, pins: NodePins, netns: Netns, cookie: int, cfg: T.Config, spec: InterceptSpec,
                       pod_ips: List[dict], previous: Optional[NamespaceRecord]) -> dict:
        from . import lookup, tc

        prev_tc = (previous.extra.get("tc") if previous else None) or []
        prev_ips = (previous.extra.get("pod_ips") if previous else None) or []
        made = False
        try:
            nsmaps.set_pod_ips(pins, cookie, pod_ips, prev_ips)
            nsmaps.ensure_counters(pins, cookie)
            link, made = lookup.attach(pins, netns, cookie)
            if previous and previous.spec.inbound_port != spec.inbound_port:
                lookup.forget_listeners(pins, cookie)  # they listen on the old port
            pins.table("config").put(cookie, cfg)
            listeners = lookup.register_listeners(pins, netns, cookie, spec.inbound_port)
        except BaseException:
            if previous is None:
                nsmaps.forget_namespace(pins, cookie, [p["ip"] for p in pod_ips])
            if made:
                lookup.unpin(lookup.link_path(pins, cookie))
            raise
        if prev_tc:  # coming from the tc path: sk_lookup is in charge now
            tc.detach_tcx(pins.dir, cookie, prev_tc)
            tc.detach(netns, prev_tc)
        return {"tc": [], "lookup_link": link, "listeners": listeners}

    def plan(self, netns: Netns, spec: InterceptSpec) -> str:
        _check_limits(spec)
        with netns.entered():
            found = addrs.read()
        families = addrs.captured_families(spec, found, netns.name, spec.inbound_path)
        captured = [f for f, why in families.items() if why == "captured"]
        pins = self.pins()
        cookie = netns.cookie()
        lines = []
        if not pins.loaded():
            lines.append(f"load: compile bpf/*.c with bcc, pin programs and maps under {pins.dir}, "
                         f"attach {'/'.join(CGROUP_LINKS)} to cgroup {self.node.cgroup} with bpf links")
        cfg = T.config_to_dict(T.config_from_spec(spec, families=captured))
        lines.append(f"config map: set netns cookie {cookie} ({netns.name}) = {cfg}")
        ips = [p["ip"] for p in found.pod_ips() if ("ipv6" if ":" in p["ip"] else "ipv4") in captured]
        lines.append(f"pod IP map: {', '.join(ips) or 'none'} -> cookie {cookie}")
        for family, why in families.items():
            lines.append(f"{family}: {why}")
        if spec.capture_dns:
            lines.append(_dns_plan(spec))
        if spec.inbound_path == T.INBOUND_TC:
            lines.append(f"tc: clsact ingress/egress filters (prio {0x4D49}; tcx links pinned under {pins.dir} with "
                         f"--tc-attach tcx) on each interface of {netns.name} with an IPv4 address")
        else:
            lines.append(f"sk_lookup: a bpf link on {netns.name} pinned as {pins.dir}/link_lookup_{cookie}; "
                         f"the sidecar's listener on :{spec.inbound_port} registered (now, or when it listens)")
        return "\n".join(lines)

    # --- disable ----------------------------------------------------------------------
    def disable(self, record: NamespaceRecord, netns: Optional[Netns]) -> None:
        from . import lookup, tc

        cookie = record.extra.get("netns_cookie")
        if cookie is None and netns is not None:
            cookie = netns.cookie()
        interfaces = record.extra.get("tc")
        pins = self.pins()
        try:
            if cookie is not None and pins.loaded():
                nsmaps.forget_namespace(pins, cookie, record.extra.get("pod_ips"))
            if cookie is not None:
                # by pin name: works when the namespace is gone (it took the attachment along)
                lookup.unpin(lookup.link_path(pins, cookie))
            tc.detach_tcx(pins.dir, cookie, interfaces)
        finally:
            pins.close()
        if netns is not None:
            if interfaces is None:  # no record of ours (failed enable): remove by recognition
                interfaces = [{"ifindex": v["ifindex"], "qdisc_created": False}
                              for v in tc.status(netns).values() if not v.get("tcx")]
            tc.detach(netns, interfaces)

    # --- status -----------------------------------------------------------------------
    @staticmethod
    def _path(record: NamespaceRecord) -> str:
        return record.extra.get("inbound_path") or record.spec.inbound_path

    def _live(self, record: NamespaceRecord, netns: Optional[Netns], pins: NodePins, cfg, counters,
              tc_state_of) -> dict:
        """One namespace's live view from its config entry (or None) and counters."""
        from . import lookup

        cookie = record.extra.get("netns_cookie")
        path = self._path(record)
        out = {"in_place": False, "netns_cookie": cookie, "pod_ips": record.extra.get("pod_ips", []),
               "inbound_path": path, "families": None, "tc": None, "lookup": None, "accelerate": False,
               "debug": False, "counters": counters}
        if cfg is not None:
            out["accelerate"] = bool(cfg.flags & T.CFG_ACCELERATE)
            out["debug"] = bool(cfg.flags & T.CFG_DEBUG)
            out["config"] = T.config_to_dict(cfg)
            recorded = record.extra.get("families") or {}
            live_families = T.config_families(cfg)
            out["families"] = {f: "captured" if f in live_families else recorded.get(f, "not captured")
                               for f in ("ipv4", "ipv6")}
        live_cookie = netns.cookie() if netns is not None else None
        attached = True
        if path == T.INBOUND_TC:
            if netns is not None:
                out["tc"] = tc_state_of(netns, record)
                expected = [e["ifname"] for e in record.extra.get("tc", [])]
                attached = all(out["tc"].get(n, {}).get("ingress") and out["tc"].get(n, {}).get("egress")
                               for n in expected)
        elif cookie is not None:
            link = lookup.link_alive(lookup.link_path(pins, cookie), netns)
            listening = [{4: "AF_INET", 6: "AF_INET6"}[f] for f in lookup.listener_families(pins, cookie)]
            out["lookup"] = {"link": link, "listeners": listening}
            attached = link
            if cfg is not None and not listening:
                out["note"] = (f"no inbound listener on :{cfg.inbound_port} yet: connections to redirected ports "
                               "are refused until the sidecar listens (fail closed)")
        out["in_place"] = cfg is not None and netns is not None and live_cookie == cookie and attached
        if live_cookie is not None and live_cookie != cookie:
            out["problem"] = "the namespace's netns cookie changed (recreated); enable it again"
        return out

    @staticmethod
    def _tc_state(netns: Netns, record: NamespaceRecord, cheap: bool = False) -> dict:
        from . import tc

        recorded = record.extra.get("tc", [])
        if recorded and all(e.get("tcx") for e in recorded):
            return tc.tcx_state(recorded)  # the pinned links say it all (no netlink, no pyroute2)
        if recorded or cheap:
            return tc.clsact_state(netns, recorded)  # raw rtnetlink, no pyroute2
        return tc.status(netns)

    def inspect(self, record: NamespaceRecord, netns: Optional[Netns]) -> dict:
        cookie = record.extra.get("netns_cookie")
        with self.pins() as pins:
            if not pins.loaded() or cookie is None:
                return {"in_place": False, "netns_cookie": cookie, "pod_ips": record.extra.get("pod_ips", []),
                        "tc": None, "accelerate": False, "debug": False, "counters": None,
                        "problem": "the node's programs are not loaded" if not pins.loaded()
                        else "no netns cookie recorded"}
            cfg = pins.table("config").get(cookie)
            return self._live(record, netns, pins, cfg, nsmaps.counters(pins, cookie), self._tc_state)

    def inspect_many(self, records: List[NamespaceRecord], namespaces: dict) -> dict:
        """``inspect`` for many namespaces with one batched pass over the config and counters
        maps instead of lookups per namespace; the inbound attachment is checked per namespace
        the cheap way (the pinned sk_lookup or tcx links, or one raw rtnetlink filter dump per
        direction). Same fields and ``in_place`` meaning as ``inspect``. ``namespaces`` maps a
        record key to its Netns or None (gone)."""
        out = {}
        with self.pins() as pins:
            if not pins.loaded():
                return {r.key: self.inspect(r, namespaces.get(r.key)) for r in records}
            configs, totals = nsmaps.all_configs_and_counters(pins)
            for record in records:
                netns = namespaces.get(record.key)
                cookie = record.extra.get("netns_cookie")
                if cookie is None or (self._path(record) == T.INBOUND_TC and not record.extra.get("tc")):
                    out[record.key] = dict(self.inspect(record, netns), checked="live")
                    continue
                out[record.key] = self._live(record, netns, pins, configs.get(cookie), totals.get(cookie),
                                             lambda ns, rec: self._tc_state(ns, rec, cheap=True))
        return out

    # --- another build's layout ----------------------------------------------------------
    def superseded(self) -> List[str]:
        from . import upgrade

        return upgrade.superseded(self.node.pin_dir)

    def take_over(self, namespaces: List[Tuple[NamespaceRecord, Optional[Netns]]],
                  grace: Optional[float] = None) -> dict:
        """Move every namespace from the layouts of other builds into this build's (upgrade.py)."""
        from . import loader, upgrade

        warnings: List[str] = []
        self._loaded_pins(warnings).close()
        live = [(r, ns) for r, ns in namespaces if ns is not None]
        by_key = {r.key: ns for r, ns in live}
        report = upgrade.take_over(self.node.pin_dir, [r for r, _ in live],
                                   lambda r: self.enable(by_key[r.key], r.spec, previous=r),
                                   loader.remove_layout,
                                   upgrade.DEFAULT_GRACE_SECONDS if grace is None else grace)
        report["gone"] = [r.key for r, ns in namespaces if ns is None]
        report["warnings"] = warnings
        return report

    # --- node -------------------------------------------------------------------------
    def teardown(self) -> List[str]:
        from . import loader

        return loader.unload(self.node)

    def metrics(self, records: List[NamespaceRecord]) -> List[Metric]:
        from . import maps

        facts = maps.node_status(self.node)
        if not facts.get("loaded"):
            return []
        out = [Metric("meshintercept_ebpf_programs_loaded_timestamp_seconds", "gauge",
                      "when the node's programs were loaded (CLOCK_REALTIME)", {}, facts["loaded_at_ns"] / 1e9)]
        if "connections" in facts:
            out.append(Metric("meshintercept_ebpf_tracked_connections", "gauge",
                              "entries in the original-destination map", {}, facts["connections"]))
        return out

    def doctor(self, records: List[NamespaceRecord]) -> List[Check]:
        from . import doctor

        return doctor.run(self.node, records)
