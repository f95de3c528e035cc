"""Facts around the iptables backend: what else is in a namespace, which iptables the node
uses, and a self-test that proves the legacy nat table really redirects on this kernel.

Reports, never changes: python-iptables writes the *legacy* tables, while Debian 12 and most
current distributions point ``iptables`` at the nft variant. Rules written with
``iptables-nft`` (or native nftables) live beside ours, in hooks we do not see, and another
mesh's REDIRECT rules take connections before or after ours. Neither is an error for us to
fix, but a user staring at ``iptables -t nat -L`` and seeing nothing deserves to be told.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
import subprocess
from typing import List, Optional

from meshintercept.backends.iptables import rules as model
from meshintercept.backends.iptables import table
from meshintercept.errors import MeshInterceptError
from meshintercept.netns import Netns, ipv6_unavailable, run_forked, unshare_net

SOL_IP = 0
SOL_IPV6 = 41
SO_ORIGINAL_DST = 80
CLONE_NEWNET = 0x40000000
NFT_REDIRECT_KEYS = ("redirect", "tproxy")
#: Lower-case chain names native-nftables meshes use (Istio's istio-inbound, ...).
NFT_MESH_PREFIXES = tuple(p.lower() for p in model.FOREIGN_MESH_PREFIXES) + ("istio-", "kuma-", "linkerd-")


def _run(argv: List[str], timeout: float = 10) -> Optional[subprocess.CompletedProcess]:
    if not shutil.which(argv[0]):
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


# --- what is in one namespace (run these inside it) -----------------------------------------
def foreign_redirects(live: table.LiveTable) -> List[str]:
    """Rules we did not add that redirect traffic or belong to another mesh, as save lines."""
    out = []
    for rule in live.rules:
        if rule.ours:
            continue
        if (rule.target in model.REDIRECTING_TARGETS or model.is_foreign_mesh_chain(rule.chain)
                or model.is_foreign_mesh_chain(rule.target)):
            out.append(rule.line)
    return out


def nft_facts() -> dict:
    """Whether the current namespace holds nftables rules (iptables-nft's included).

    ``nft -j list ruleset`` is the authority; without the nft binary, ``iptables-nft-save``
    still sees the tables iptables-nft made. ``None`` means neither tool could tell.
    """
    proc = _run(["nft", "-j", "list", "ruleset"])
    if proc is not None and proc.returncode == 0:
        try:
            items = json.loads(proc.stdout or "{}").get("nftables", [])
        except ValueError:
            items = []
        rules = [i["rule"] for i in items if "rule" in i]
        tables = [f"{i['table']['family']} {i['table']['name']}" for i in items if "table" in i]
        redirects = []
        for rule in rules:
            what = _nft_redirect_kind(rule)
            if what or str(rule.get("chain", "")).lower().startswith(NFT_MESH_PREFIXES):
                redirects.append(f"nft {rule.get('family')} {rule.get('table')} {rule.get('chain')}: "
                                 f"{what or 'rule'} (handle {rule.get('handle')})")
        return {"nft_rules_present": bool(rules), "nft_rules": len(rules), "nft_tables": tables,
                "nft_redirects": redirects, "nft_checked_with": "nft"}
    proc = _run(["iptables-nft-save"])
    if proc is not None and proc.returncode == 0:
        lines = [l for l in proc.stdout.splitlines() if l.startswith("-A ")]
        redirects = [f"nft (iptables-nft) {l}" for l in lines
                     if re.search(r"-j (REDIRECT|TPROXY)\b", l) or re.match(r"-A (%s)" % "|".join(model.FOREIGN_MESH_PREFIXES), l)]
        tables = [l[1:] for l in proc.stdout.splitlines() if l.startswith("*")]
        return {"nft_rules_present": bool(lines), "nft_rules": len(lines), "nft_tables": tables,
                "nft_redirects": redirects, "nft_checked_with": "iptables-nft-save"}
    return {"nft_rules_present": None, "nft_rules": None, "nft_tables": [], "nft_redirects": [],
            "nft_checked_with": None}


def _nft_redirect_kind(rule: dict) -> Optional[str]:
    for expr in rule.get("expr", []):
        for key in NFT_REDIRECT_KEYS:
            if key in expr:
                return key
        xt = expr.get("xt") if isinstance(expr, dict) else None
        if xt and xt.get("type") == "target" and xt.get("name") in model.REDIRECTING_TARGETS:
            return xt["name"]
    return None


def _other_facts() -> dict:
    """In the namespace: nft rules, and why IPv6 cannot be intercepted there (if it cannot)."""
    facts = nft_facts()
    no_ipv6 = ipv6_unavailable()
    facts["family_notes"] = {"ipv6": no_ipv6} if no_ipv6 else {}
    return facts


def namespace_facts(netns: Netns) -> dict:
    """Everything status needs about a namespace, changing nothing: both families' nat tables
    (``live``: {4: LiveTable, 6: LiveTable}; one forked child each, as libxtables needs), why
    a family cannot be intercepted (``family_notes``), other redirecting rules, nft rules."""
    lives = {version: netns.run(table.read_table, model.TABLE, version) for version in (4, 6)}
    facts = netns.run(_other_facts)
    facts.update(nat_table_exists=lives[4].exists, live=lives)
    facts["foreign_redirects"] = (foreign_redirects(lives[4]) + [f"ip6tables: {line}" for line in
                                                                 foreign_redirects(lives[6])] + facts["nft_redirects"])
    return facts


def namespace_conflicts(netns: Netns) -> dict:
    """For doctor/status: does a managed namespace hold nft rules or other redirect rules?

    Returns ``{"nft_rules_present": bool|None, "nft_rules": int|None, "foreign_redirects": [...],
    "warnings": [...]}``; ``warnings`` holds ready-to-print sentences (empty when clean).
    """
    facts = namespace_facts(netns)
    facts.pop("live", None)
    facts["warnings"] = warnings_for(netns.name, facts)
    return facts


def warnings_for(name: str, facts: dict) -> List[str]:
    out = []
    if facts.get("nft_rules_present"):
        out.append(
            f"namespace {name} holds {facts['nft_rules']} nftables rule(s) (tables: {', '.join(facts['nft_tables'])}); "
            "meshintercept's rules are in the legacy iptables tables, so 'iptables'/'nft' show only the others — "
            "use 'iptables-legacy-save -t nat' to see ours, and check the nft rules do not NAT the same traffic."
        )
    if facts.get("foreign_redirects"):
        out.append(
            f"namespace {name} holds {len(facts['foreign_redirects'])} redirect rule(s) meshintercept did not add "
            f"(first: {facts['foreign_redirects'][0]}); another mesh or tool may take the same connections."
        )
    return out


# --- node-wide -----------------------------------------------------------------------------
def iptables_variant() -> dict:
    """Which variant plain ``iptables`` runs: ``{"variant": "nf_tables"|"legacy"|None, ...}``."""
    proc = _run(["iptables", "-V"])
    if proc is None:
        return {"variant": None, "version": None, "text": "iptables not found on PATH"}
    text = (proc.stdout or proc.stderr).strip()
    m = re.search(r"v(\d[\w.]*)(?:\s+\((\w+)\))?", text)
    version = m.group(1) if m else None
    variant = (m.group(2) if m and m.group(2) else "legacy") if m else None
    return {"variant": variant, "version": version, "text": text}


# --- self-test in a throwaway namespace --------------------------------------------------------


def original_dst(sock: socket.socket):
    """The destination a redirected connection had before NAT: (ip, port); IPv6 connections
    are asked at SOL_IPV6 (IP6T_SO_ORIGINAL_DST, the same optname)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, packed), port
    raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


#: Where the self-test connects: addresses of the lab ranges that nothing answers unless redirected.
SELF_TEST = {4: ("10.231.255.1", 30, "10.231.255.2", "127.0.0.1"),
             6: ("fd00:231:ffff::1", 64, "fd00:231:ffff::2", "::1")}


def self_test(spec) -> dict:
    """Apply the real rules (both families) in a new, private namespace and push one connection
    per family through them: ``{4: result, 6: result}``.

    The namespace exists only while a forked child lives (unshare), holds one veth pair with
    addresses from 10.231.0.0/16 and fd00:231::/48 and no route anywhere else, and vanishes
    with the child.
    """
    return {version: run_forked(_self_test_inside, spec, version) for version in (4, 6)}


def _self_test_inside(spec, version: int) -> dict:
    unshare_net()
    from pyroute2 import IPRoute

    no_ipv6 = ipv6_unavailable()
    if no_ipv6 is None:  # static addresses usable at once: no duplicate address detection
        for conf in ("all", "default"):
            with open(f"/proc/sys/net/ipv6/conf/{conf}/accept_dad", "w") as f:
                f.write("0")
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname="mi-st0", kind="veth", peer="mi-st1")
        idx = ipr.link_lookup(ifname="mi-st0")[0]
        addr, plen, _target, _lo = SELF_TEST[version]
        if version == 4 or no_ipv6 is None:
            ipr.addr("add", index=idx, address=addr, prefixlen=plen)
        ipr.link("set", index=idx, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="mi-st1")[0], state="up")
    if version == 6 and no_ipv6 is not None:
        return {"skipped": no_ipv6}
    try:
        return _self_test_family(spec, version)
    except MeshInterceptError as exc:
        return {"error": exc.message, "rules_match_plan": False, "original_dst": None}


def _self_test_family(spec, version: int) -> dict:
    ruleset = model.build(spec, version)
    table.apply(ruleset, "a throwaway namespace")
    live = table.read_table(model.TABLE, version)
    result = {"rules_match_plan": live.our_lines() == ruleset.lines(), "redirected_to": None, "original_dst": None}
    _addr, _plen, target, loopback = SELF_TEST[version]
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    server = socket.socket(family)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((loopback, spec.outbound_port))
    server.listen(1)
    server.settimeout(3)
    client = socket.socket(family)
    client.settimeout(3)
    try:
        client.connect((target, 1404))  # unreachable unless redirected
        conn, _ = server.accept()
        result["redirected_to"] = conn.getsockname()[1]
        ip, port = original_dst(conn)
        result["original_dst"] = f"{ip}:{port}" if version == 4 else f"[{ip}]:{port}"
        conn.close()
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
        server.close()
    return result
