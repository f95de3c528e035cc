"""The node, tried for real: does native nftables redirect here, which iptables flavours work,
and which netfilter mode to recommend.

Everything is tried in a network namespace that exists only while a forked child lives
(unshare); it holds one veth pair with addresses from the lab ranges (10.231.0.0/16,
fd00:231::/48) and no route anywhere else, and vanishes with the child. The machine's own
ruleset is never read or written.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
from typing import Dict, Optional, Tuple

from meshintercept.backends.nftables import lib, table
from meshintercept.backends.nftables import ruleset as model
from meshintercept.errors import MeshInterceptError
from meshintercept.netns import ipv6_unavailable, run_forked, unshare_net
from meshintercept.sidecar import fmt, original_dst
from meshintercept.spec import InterceptSpec

#: Where the self-test connects, per way an app reaches a peer: nothing answers there unless
#: the rules redirect the connection to the proxy's outbound port.
TARGETS = {"ipv4": (socket.AF_INET, "10.231.255.2"), "v4mapped": (socket.AF_INET6, "::ffff:10.231.255.2"),
           "ipv6": (socket.AF_INET6, "fd00:231:ffff::2")}
TARGET_PORT = 1404
LINK = ["link set lo up", "link add mi-nft0 type veth peer name mi-nft1", "addr add 10.231.255.1/30 dev mi-nft0",
        "link set mi-nft0 up", "link set mi-nft1 up"]
LINK6 = ["addr add fd00:231:ffff::1/64 dev mi-nft0 nodad"]
#: The iptables flavours, and the command that proves each one works in a namespace.
FLAVOURS = {"iptables-legacy": ["iptables-legacy", "-w", "-t", "nat", "-n", "-L"],
            "iptables-nft": ["iptables-nft", "-w", "-t", "nat", "-n", "-L"]}


def self_test(spec: InterceptSpec) -> dict:
    """``{"error"?, "version", "matches_plan", "families", "connections": {way: {...}}, "flavours": {...}}``."""
    return run_forked(_in_throwaway_namespace, spec)


def _in_throwaway_namespace(spec: InterceptSpec) -> dict:
    unshare_net()
    no_ipv6 = ipv6_unavailable()
    commands = LINK + ([] if no_ipv6 else LINK6)
    subprocess.run(["ip", "-batch", "-"], input="\n".join(commands) + "\n", text=True, check=True,
                   capture_output=True)
    result: dict = {"ipv6_unavailable": no_ipv6, "connections": {}, "flavours": {}}
    # The iptables flavours are tried even without libnftables: the advice needs them most then.
    missing = lib.missing_reason()
    if missing:
        result["error"] = missing
    else:
        _native(spec, no_ipv6, result)
    result["flavours"] = {name: _try(argv) for name, argv in FLAVOURS.items()}
    return result


def _native(spec: InterceptSpec, no_ipv6: Optional[str], result: dict) -> None:
    try:
        summary = table.apply(spec, "a throwaway namespace")
        with lib.session() as nft:
            live = table.read(nft)
        result.update(version=summary["version"], families=summary["families"],
                      matches_plan=live.holds(model.build(spec, summary["families"])))
        with _listener(spec.outbound_port, dual_stack=not no_ipv6) as listener:
            for way in TARGETS:
                result["connections"][way] = ({"skipped": no_ipv6} if no_ipv6 and way != "ipv4"
                                              else _connect(listener, way))
    except MeshInterceptError as exc:
        result["error"] = exc.message


@contextlib.contextmanager
def _listener(port: int, dual_stack: bool):
    """The proxy's outbound port: one socket on [::] takes IPv4 (127.0.0.1) and IPv6 (::1) alike."""
    listener = socket.socket(socket.AF_INET6 if dual_stack else socket.AF_INET)
    try:
        if dual_stack:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::" if dual_stack else "0.0.0.0", port))
        listener.listen(4)
        listener.settimeout(3)
        yield listener
    finally:
        listener.close()


def _connect(listener: socket.socket, way: str) -> dict:
    """One connection that only arrives if redirected: where it landed, what the proxy would read."""
    family, host = TARGETS[way]
    client = socket.socket(family)
    client.settimeout(3)
    try:
        client.connect((host, TARGET_PORT))
        conn, _ = listener.accept()
        with conn:
            return {"landed": fmt(conn.getsockname()[:2]), "original_dst": fmt(original_dst(conn))}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        client.close()


def _try(argv) -> dict:
    if not shutil.which(argv[0]):
        return {"works": False, "detail": f"{argv[0]} is not installed"}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"works": False, "detail": f"{argv[0]}: {exc}"}
    if proc.returncode == 0:
        return {"works": True, "detail": "works"}
    return {"works": False, "detail": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[0]}


def iptables_default() -> Dict[str, Optional[str]]:
    """What plain ``iptables`` is on this node: ``{"variant": "nf_tables"|"legacy"|None, "text": ...}``."""
    path = shutil.which("iptables")
    if not path:
        return {"variant": None, "text": "no 'iptables' command"}
    try:
        text = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"variant": None, "text": f"'iptables -V' failed: {exc}"}
    found = re.search(r"\((nf_tables|legacy)\)", text)
    return {"variant": found.group(1) if found else ("legacy" if text else None), "text": text or "?"}


def recommend(nft_works: bool, legacy_works: bool, default_variant: Optional[str]) -> Tuple[Optional[str], str]:
    """The netfilter mode for this node, and why (the eBPF mode is judged in its own section)."""
    if nft_works and default_variant == "legacy" and legacy_works:
        return "iptables", ("this node's 'iptables' is iptables-legacy, so tools that write pod rules with plain "
                            "iptables (init containers, CNI plugins) use the legacy tables; keeping ours there puts "
                            "a pod's NAT rules in one place (native nftables works too)")
    if nft_works and default_variant == "nf_tables":
        return "nftables", ("this node's 'iptables' is iptables-nft, so the pods' other rules already live in "
                            "nf_tables, where ours appear beside them in 'nft list ruleset'; the legacy tables are "
                            "deprecated (RHEL 9) and absent on RHEL 10 and on kernels without "
                            "CONFIG_IP_NF_IPTABLES_LEGACY")
    if nft_works and not legacy_works:
        return "nftables", "the legacy iptables tables do not work here and native nftables does"
    if nft_works:
        return "nftables", "there is no 'iptables' command on this node, and native nftables needs none"
    if legacy_works:
        return "iptables", "native nftables does not work here and the legacy iptables tables do"
    return None, "neither native nftables nor the legacy iptables tables work here"
