"""`EbpfInterceptor`: the osm-edge/merbridge data path behind the Interceptor interface.

Node-wide: programs loaded once (loader.load) and pinned. Per namespace: one entry in the
config map keyed by the namespace's netns cookie, its pod IPs in the pod IP map, a
counters slot, and tc programs on its interfaces (pinned tcx links, or clsact filters). Enable writes the config entry last (that
is what turns interception on) and disable deletes it first.
"""

from __future__ import annotations

import ctypes
import os
from typing import List, Optional

from meshintercept import bpf_types as T
from meshintercept import bpfsys
from meshintercept.errors import BackendFailure, Conflict, MeshInterceptError, UsageError
from meshintercept.interceptor import Check, Interceptor
from meshintercept.netns import Netns
from meshintercept.spec import InterceptSpec
from meshintercept.state import NamespaceRecord

from . import maps as nsmaps
from .pins import NodePins


class EbpfInterceptor(Interceptor):
    name = "ebpf"
    description = "cgroup connect4/sockops/getsockopt + tc programs (osm-edge/merbridge design)"

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
        pins.check_layout()
        if not pins.loaded():
            from . import loader

            warnings.extend(loader.load(self.node))
        return pins

    # --- enable -----------------------------------------------------------------------
    def enable(self, netns: Netns, spec: InterceptSpec, previous: Optional[NamespaceRecord] = None) -> dict:
        problems = T.limit_problems(spec)
        if problems:
            raise UsageError("; ".join(problems) + "; merge ports or CIDRs into fewer entries.")
        warnings: List[str] = []
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
            from . import tc

            prev_tc = (previous.extra.get("tc") if previous else None) or []
            prev_ips = (previous.extra.get("pod_ips") if previous else None) or []
            attached = None
            if os.environ.get("MESHINTERCEPT_TC_ATTACH") == "tcx":  # opt-in: see tc.py on its cost
                attached = tc.attach_tcx(netns, pins.prog("tc_ingress"), pins.prog("tc_egress"), pins.dir, cookie,
                                         prev_tc)
                if attached is None:
                    warnings.append(f"MESHINTERCEPT_TC_ATTACH=tcx: this kernel ({os.uname().release}) has no tcx "
                                    f"links (first in Linux 6.6); the tc programs are attached as clsact filters.")
            if attached is None:
                attached = tc.attach(netns, pins.prog("tc_ingress"), pins.prog("tc_egress"), prev_tc)
            added_ips: List[str] = []
            try:
                added_ips = nsmaps.set_pod_ips(pins, cookie, attached["pod_ips"], prev_ips)
                nsmaps.ensure_counters(pins, cookie)
                cfg = T.config_from_spec(spec, accelerate=accelerate)
                bpfsys.map_update(pins.map("config"), T.u64(cookie), T.to_bytes(cfg))
            except BaseException:
                if previous is None:
                    nsmaps.forget_namespace(pins, cookie, [p["ip"] for p in attached["pod_ips"]])
                    tc.detach_tcx(pins.dir, cookie, attached["interfaces"])
                    tc.detach(netns, attached["interfaces"])
                raise
        return {
            "netns_cookie": cookie,
            "pod_ips": [p["ip"] for p in attached["pod_ips"]],
            "tc": attached["interfaces"],
            "accelerate": accelerate,
            "warnings": warnings,
            "pin_dir": self.node.pin_dir,
            "cgroup": self.node.cgroup,
        }

    def plan(self, netns: Netns, spec: InterceptSpec) -> str:
        problems = T.limit_problems(spec)
        if problems:
            raise UsageError("; ".join(problems) + "; merge ports or CIDRs into fewer entries.")
        pins = self.pins()
        cookie = netns.cookie()
        lines = []
        if not pins.loaded():
            lines.append(f"load: compile bpf/*.c with bcc, pin programs and maps under {pins.dir}, "
                         f"attach connect4/sockops/getsockopt to cgroup {self.node.cgroup} with bpf links")
        cfg = T.config_to_dict(T.config_from_spec(spec))
        lines.append(f"config map: set netns cookie {cookie} ({netns.name}) = {cfg}")
        lines.append(f"pod IP map: every IPv4 address in {netns.name} -> cookie {cookie}")
        lines.append(f"tc: clsact ingress/egress filters (prio {0x4D49}; tcx links pinned under {pins.dir} with "
                     f"MESHINTERCEPT_TC_ATTACH=tcx) on each interface of {netns.name} with an IPv4 address")
        return "\n".join(lines)

    # --- disable ----------------------------------------------------------------------
    def disable(self, record: NamespaceRecord, netns: Optional[Netns]) -> None:
        cookie = record.extra.get("netns_cookie")
        if cookie is None and netns is not None:
            cookie = netns.cookie()
        interfaces = record.extra.get("tc")
        pins = self.pins()
        try:
            if cookie is not None and pins.loaded():
                nsmaps.forget_namespace(pins, cookie, record.extra.get("pod_ips"))
            from . import tc

            # by pin name: works when the namespace is gone (its devices took the attachment along)
            tc.detach_tcx(pins.dir, cookie, interfaces)
        finally:
            pins.close()
        if netns is not None:
            from . import tc

            if interfaces is None:  # no record of ours (failed enable): remove by recognition
                interfaces = [{"ifindex": v["ifindex"], "qdisc_created": False}
                              for v in tc.status(netns).values() if not v.get("tcx")]
            tc.detach(netns, interfaces)

    # --- status -----------------------------------------------------------------------
    def inspect(self, record: NamespaceRecord, netns: Optional[Netns]) -> dict:
        cookie = record.extra.get("netns_cookie")
        out = {"in_place": False, "netns_cookie": cookie, "pod_ips": record.extra.get("pod_ips", []),
               "tc": None, "accelerate": False, "debug": False, "counters": None}
        live_cookie = netns.cookie() if netns is not None else None
        with self.pins() as pins:
            if not pins.loaded() or cookie is None:
                out["problem"] = "the node's programs are not loaded" if not pins.loaded() else "no netns cookie recorded"
                return out
            raw = bpfsys.map_lookup(pins.map("config"), T.u64(cookie), ctypes.sizeof(T.Config))
            if raw:
                cfg = T.from_bytes(T.Config, raw)
                out["accelerate"] = bool(cfg.flags & T.CFG_ACCELERATE)
                out["debug"] = bool(cfg.flags & T.CFG_DEBUG)
                out["config"] = T.config_to_dict(cfg)
            out["counters"] = nsmaps.counters(pins, cookie)
        tc_ok = True
        if netns is not None:
            from . import tc

            recorded = record.extra.get("tc", [])
            if recorded and all(e.get("tcx") for e in recorded):
                state = tc.tcx_state(recorded)  # the pinned links say it all (no netlink, no pyroute2)
            elif recorded:
                state = tc.clsact_state(netns, recorded)  # raw rtnetlink, no pyroute2
            else:
                state = tc.status(netns)
            out["tc"] = state
            expected = [e["ifname"] for e in recorded]
            tc_ok = all(state.get(name, {}).get("ingress") and state.get(name, {}).get("egress") for name in expected)
        out["in_place"] = bool(raw) and netns is not None and live_cookie == cookie and tc_ok
        if live_cookie is not None and live_cookie != cookie:
            out["problem"] = "the namespace's netns cookie changed (recreated); enable it again"
        return out

    def inspect_many(self, records: List[NamespaceRecord], namespaces: dict) -> dict:
        """``inspect`` for many namespaces with one batched pass over the config and counters
        maps instead of lookups per namespace; the tc attachment is checked per namespace the
        cheap way (pinned tcx links, or one raw rtnetlink filter dump per direction). Same
        fields and ``in_place`` meaning as ``inspect``. ``namespaces`` maps a record key to
        its Netns or None (gone)."""
        from . import tc

        out = {}
        with self.pins() as pins:
            if not pins.loaded():
                return {r.key: self.inspect(r, namespaces.get(r.key)) for r in records}
            configs, totals = nsmaps.all_configs_and_counters(pins)
        for record in records:
            netns = namespaces.get(record.key)
            recorded = record.extra.get("tc", [])
            cookie = record.extra.get("netns_cookie")
            if cookie is None or not recorded:
                out[record.key] = dict(self.inspect(record, netns), checked="live")
                continue
            live = {"in_place": False, "netns_cookie": cookie, "pod_ips": record.extra.get("pod_ips", []),
                    "tc": None, "accelerate": False, "debug": False, "counters": totals.get(cookie)}
            cfg = configs.get(cookie)
            if cfg is not None:
                live["accelerate"] = bool(cfg.flags & T.CFG_ACCELERATE)
                live["debug"] = bool(cfg.flags & T.CFG_DEBUG)
                live["config"] = T.config_to_dict(cfg)
            live_cookie = netns.cookie() if netns is not None else None
            tc_ok = True
            if netns is not None:
                state = (tc.tcx_state(recorded) if all(e.get("tcx") for e in recorded)
                         else tc.clsact_state(netns, recorded))
                live["tc"] = state
                tc_ok = all(v.get("ingress") and v.get("egress") for v in state.values())
            live["in_place"] = cfg is not None and netns is not None and live_cookie == cookie and tc_ok
            if live_cookie is not None and live_cookie != cookie:
                live["problem"] = "the namespace's netns cookie changed (recreated); enable it again"
            out[record.key] = live
        return out

    # --- node -------------------------------------------------------------------------
    def teardown(self) -> List[str]:
        from . import loader

        return loader.unload(self.node)

    def node_status(self) -> dict:
        from . import maps

        return maps.node_status(self.node)

    def doctor(self) -> List[Check]:
        from . import doctor

        return doctor.run(self.node)
