"""Who else redirects connections in a namespace: rules in other nft tables (another mesh,
kube-proxy's nftables mode, iptables-nft) and in the legacy iptables nat tables.

Reports, never changes. Every NAT hook of a namespace sees a new connection, in priority
order; the first chain that sets up a NAT binding for it wins, so another tool's
redirect at the same or an earlier priority may take connections meant for the sidecar.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import List, Optional

from meshintercept.backends.nftables import ruleset as model

#: Statements that change where a connection goes (kube-proxy's service rules are ``dnat``).
NAT_STATEMENTS = ("redirect", "tproxy", "dnat")
#: iptables-nft keeps these as xtables targets inside nf_tables rules.
XT_TARGETS = ("REDIRECT", "TPROXY", "DNAT")
#: Names other meshes and kube-proxy give their chains and tables (lower-cased before comparing).
FOREIGN_NAMES = ("istio", "proxy_init", "proxy_", "osm_", "kuma", "mesh_", "linkerd", "kube-proxy", "kube-")


def _redirect_kind(node) -> Optional[str]:
    """The first redirecting statement anywhere in a rule's expressions (also inside maps)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in NAT_STATEMENTS:
                return key
            if key == "xt" and isinstance(value, dict) and value.get("name") in XT_TARGETS:
                return f"xt {value['name']}"
            found = _redirect_kind(value)
            if found:
                return found
    elif isinstance(node, list):
        for value in node:
            found = _redirect_kind(value)
            if found:
                return found
    return None


def _foreign_name(*names: str) -> bool:
    return any(str(n).lower().startswith(FOREIGN_NAMES) for n in names if n)


def nft_redirects(items: List[dict]) -> List[str]:
    """Rules outside our table that redirect, or that sit in another mesh's or kube-proxy's chains."""
    out = []
    for item in items:
        rule = item.get("rule")
        if not rule or (rule.get("family"), rule.get("table")) == (model.FAMILY, model.TABLE):
            continue
        kind = _redirect_kind(rule.get("expr", []))
        if kind or _foreign_name(rule.get("table"), rule.get("chain")):
            out.append(f"nft {rule.get('family')} {rule.get('table')} {rule.get('chain')}: "
                       f"{kind or 'rule'} (handle {rule.get('handle')})")
    return out


def _legacy_nat_exists(names_file: str) -> bool:
    try:
        with open(os.path.join("/proc/net", names_file)) as f:
            return "nat" in f.read().split()
    except OSError:
        return False


def legacy_redirects() -> List[str]:
    """REDIRECT/TPROXY/DNAT rules in the current namespace's legacy nat tables. Looks only when
    the table exists (``*-legacy-save`` never creates one)."""
    out = []
    for names_file, tool in (("ip_tables_names", "iptables-legacy-save"), ("ip6_tables_names", "ip6tables-legacy-save")):
        if not _legacy_nat_exists(names_file) or not shutil.which(tool):
            continue
        try:
            proc = subprocess.run([tool, "-t", "nat"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in proc.stdout.splitlines():
            if line.startswith("-A ") and (re.search(r"-j (REDIRECT|TPROXY|DNAT)\b", line) or _foreign_name(line[3:])):
                out.append(f"{tool.split('-')[0]} (legacy): {line}")
    return out


def warnings_for(name: str, redirects: List[str]) -> List[str]:
    if not redirects:
        return []
    return [f"namespace {name} holds {len(redirects)} redirect rule(s) meshintercept did not add (first: "
            f"{redirects[0]}); another mesh or kube-proxy-style NAT may take the same connections."]
