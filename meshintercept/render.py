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


def _ports(ports) -> str:
    return ",".join(str(p) for p in ports) or "-"


def render_status(data: dict) -> None:
    items = data["namespaces"]
    console = _console()
    if not items:
        console.print("no namespaces are intercepted on this node")
        return
    from rich.table import Table

    table = Table(title=f"intercepted namespaces (pin dir {data['node']['pin_dir']})", title_justify="left")
    for col in ("namespace", "mode", "in place", "out/in", "uid", "excluded out", "excluded in", "included in", "details"):
        table.add_column(col)
    for item in items:
        spec, live = item["spec"], item.get("live", {})
        if not item["present"]:
            state = "[yellow]namespace gone[/]"
        elif live.get("error"):
            state = f"[red]error: {live['error']}[/]"
        else:
            state = "[green]yes[/]" if live.get("in_place") else "[red]no[/]"
        excluded_out = ",".join([str(p) for p in spec["exclude_outbound_ports"]] + spec["exclude_outbound_cidrs"]) or "-"
        table.add_row(
            item["namespace"], item["mode"], state, f"{spec['outbound_port']}/{spec['inbound_port']}",
            str(spec["proxy_uid"]), excluded_out, _ports(spec["exclude_inbound_ports"]),
            _ports(spec["include_inbound_ports"]) if spec["include_inbound_ports"] else "all",
            _details(item),
        )
    console.print(table)


def _details(item: dict) -> str:
    live = item.get("live", {})
    parts = []
    for key in ("backend", "pod_ips", "tc", "accelerate", "debug"):
        if key in live and live[key] not in (None, [], ""):
            value = live[key]
            parts.append(f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}")
    if live.get("nft_rules_present"):
        parts.append("[yellow]nft rules present[/]")
    if live.get("foreign_redirects"):
        parts.append(f"[yellow]foreign redirects: {len(live['foreign_redirects'])}[/]")
    counters = live.get("counters")
    if isinstance(counters, dict) and counters:
        parts.append(" ".join(f"{k}={v}" for k, v in counters.items()))
    parts.append("since " + time.strftime("%H:%M:%S", time.localtime(item["enabled_at"])))
    return "; ".join(parts)


def render_doctor(report: dict) -> None:
    console = _console()
    for section in report["sections"]:
        console.print(f"[bold]{section['name']}[/]")
        for check in section["checks"]:
            mark = "[green]ok[/]  " if check["ok"] else ("[yellow]warn[/]" if check["warning"] else "[red]FAIL[/]")
            console.print(f"  {mark} {check['name']}" + (f": {check['detail']}" if check["detail"] else ""))
            if not check["ok"] and check["fix"]:
                console.print(f"       fix: {check['fix']}")
    usable = ", ".join(report["usable_modes"]) or "none"
    console.print(f"usable modes: [bold]{usable}[/]")


def echo_lines(lines) -> None:
    for line in lines:
        click.echo(line)
