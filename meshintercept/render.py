"""Turn core results into text for people (rich tables) or JSON for scripts.

JSON documents carry a ``version`` field so scripts can detect format changes.
"""

from __future__ import annotations

import json
import time

import click

JSON_VERSION = 1


def to_json(data) -> str:
    if isinstance(data, dict):
        data = {"version": JSON_VERSION, **data}
    return json.dumps(data, indent=2, sort_keys=False, default=str)


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _escape(text: str) -> str:
    """Data printed through rich: an address like [fd00::2]:80 is text, not a markup tag."""
    from rich.markup import escape

    return escape(text)


def _ports(ports) -> str:
    return ",".join(str(p) for p in ports) or "-"


def render_status(data: dict) -> None:
    """One block per namespace: a headline, then only the lines that say something."""
    items = data["namespaces"]
    console = _console()
    if not items:
        console.print(f"no namespaces are intercepted on this node (state {data['node']['state_dir']})")
        return
    for item in items:
        spec, live = item["spec"], item.get("live", {})
        if not item["present"]:
            state = "[yellow]namespace gone[/] (disable it to drop the record)"
        elif live.get("error"):
            state = f"[red]error: {live['error']}[/]"
        elif live.get("checked") == "recorded":
            state = "[cyan]recorded[/] (not checked in the namespace; 'status --live' or '--netns' checks)"
        else:
            state = "[green]in place[/]" if live.get("in_place") else "[red]NOT in place[/] (enable again to repair)"
            if live.get("checked") == "node":
                state += " (from the node's pinned maps and links)"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item["enabled_at"]))
        console.print(f"[bold]{item['namespace']}[/]  {item['mode']}  {state}  "
                      f"out :{spec['outbound_port']} in :{spec['inbound_port']} uid {spec['proxy_uid']}  since {since}")
        sources = [f"{field} from {where}" for field, where in sorted((item.get("sources") or {}).items())]
        for line in _spec_lines(spec) + (["settings: " + "; ".join(sources)] if sources else []) + _live_lines(live):
            console.print(f"  {line}")


def _spec_lines(spec: dict) -> list:
    lines = []
    if spec["exclude_outbound_ports"] or spec["exclude_outbound_cidrs"]:
        lines.append("excluded outbound: " + ", ".join([f"port {_ports(spec['exclude_outbound_ports'])}"]
                                                       * bool(spec["exclude_outbound_ports"]) + spec["exclude_outbound_cidrs"]))
    if spec["exclude_inbound_ports"]:
        lines.append(f"excluded inbound ports: {_ports(spec['exclude_inbound_ports'])}")
    if spec["include_inbound_ports"]:
        lines.append(f"only inbound ports: {_ports(spec['include_inbound_ports'])}")
    if spec.get("families"):
        lines.append("families asked for: " + ", ".join(spec["families"]))
    flags = [name for name in ("debug", "accelerate") if spec.get(name)]
    if spec.get("capture_dns"):
        flags.append(f"capture DNS to :{spec.get('dns_port')}")
    if flags:
        lines.append("flags: " + ", ".join(flags))
    return lines


_SKIP = {"in_place", "error", "rules", "counters", "present", "table", "checked", "listing", "rule_counters"}


def _flat(value) -> str:
    if isinstance(value, dict):
        if value and all(isinstance(v, dict) for v in value.values()):
            return "; ".join(f"{k} {_flat(v)}" for k, v in value.items())
        return " ".join(f"{k}={_flat(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(_flat(v) for v in value) or "-"
    return str(value)


def _live_lines(live: dict) -> list:
    lines = []
    for key, value in live.items():
        if key in _SKIP or value in (None, "", [], {}, False):
            continue
        label = key.replace("_", " ")
        if key in ("nft_rules_present", "foreign_redirects"):
            label = f"[yellow]{label}[/]"
        lines.append(f"{label}: {_escape(_flat(value))}")
    counters = live.get("counters")
    if counters:
        lines.append(f"counters: {_flat(counters)}")
    # A backend's live ruleset as its own tool prints it (nftables: the table with per-rule
    # counters) reads only as a block, one line per line.
    if live.get("listing"):
        lines.append("live ruleset:")
        lines.extend("  " + _escape(line.replace("\t", "  ")) for line in live["listing"])
    return lines


def render_doctor(report: dict) -> None:
    console = _console()
    for section in report["sections"]:
        console.print(f"[bold]{section['name']}[/]")
        for check in section["checks"]:
            if check["warning"]:
                mark = "[yellow]note[/]" if check["ok"] else "[yellow]warn[/]"
            else:
                mark = "[green]ok[/]  " if check["ok"] else "[red]FAIL[/]"
            console.print(f"  {mark} {check['name']}" + (f": {_escape(check['detail'])}" if check["detail"] else ""))
            if not check["ok"] and check["fix"]:
                console.print(f"       fix: {_escape(check['fix'])}")
    usable = ", ".join(report["usable_modes"]) or "none"
    console.print(f"usable modes: [bold]{usable}[/]")


def echo_lines(lines) -> None:
    for line in lines:
        click.echo(line)
