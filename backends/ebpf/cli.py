"""Commands the ebpf backend adds to the CLI (entry-point group ``meshintercept.commands``).

Parsing and printing only: the work is in maps.py and trace.py.
"""

from __future__ import annotations

import json
import sys

import click


def _manager(ctx: click.Context):
    obj = ctx.find_root().obj
    manager = getattr(obj, "manager", None)
    if manager is not None:
        return manager
    from meshintercept.manager import Manager

    return Manager()


def _fail(exc) -> None:
    from meshintercept.errors import MeshInterceptError

    if isinstance(exc, MeshInterceptError):
        click.echo(f"meshintercept: {exc.message}", err=True)
        sys.exit(int(exc.status))
    raise exc


@click.group()
def maps():
    """Inspect the ebpf mode's maps on this node."""


@maps.command("dump")
@click.option("--map", "map_name", metavar="NAME", help="Only this map (config, podip, origdst, counters, sockhash, meta, ...).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: {map: [rows]}.")
@click.pass_context
def dump(ctx, map_name, as_json):
    """Every map decoded into readable rows: addresses, ports, namespaces, cookies."""
    from . import maps as mapmod

    try:
        manager = _manager(ctx)
        data = mapmod.dump(manager.node, manager.records(), map_name)
    except Exception as exc:  # noqa: BLE001 - _fail re-raises what is not ours
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(data, indent=1, sort_keys=True))
        return
    if not data:
        click.echo(f"no ebpf programs are loaded on this node ({manager.node.pin_dir}).")
        return
    for name, rows in data.items():
        if len(rows) == 1 and set(rows[0]) == {"note"}:
            click.echo(f"{name}: {rows[0]['note']}")
            continue
        click.echo(f"{name} ({len(rows)} entr{'y' if len(rows) == 1 else 'ies'})")
        for row in rows:
            click.echo("  " + "  ".join(f"{k}={v}" for k, v in row.items()))


@click.command()
@click.option("--netns", "ns_ref", metavar="NS", help="Only events of this namespace.")
@click.option("--duration", type=float, metavar="SECONDS", help="Stop after this long (default: until Ctrl-C).")
@click.option("--count", "limit", type=int, metavar="N", help="Stop after N events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def trace(ctx, ns_ref, duration, limit, as_json):
    """Stream the programs' decisions (namespaces enabled with --debug).

    The same decisions go to trace_pipe: cat /sys/kernel/debug/tracing/trace_pipe | grep bpf_trace_printk
    """
    from . import trace as tracemod

    try:
        manager = _manager(ctx)
        names = {int(r.extra["netns_cookie"]): r.name for r in manager.records() if r.extra.get("netns_cookie")}
        cookie = None
        if ns_ref:
            record, netns = manager.lookup(ns_ref)
            if record is None:
                from meshintercept.errors import NamespaceNotFound

                raise NamespaceNotFound(f"namespace {ns_ref!r} is not managed on this node; nothing to trace.")
            cookie = int(record.extra.get("netns_cookie", 0))
        if not any(r.spec.debug for r in manager.records() if r.mode == "ebpf"):
            click.echo("note: no namespace has debug on; run 'meshintercept enable --mode ebpf --debug --netns NS'.",
                       err=True)
        for event in tracemod.stream(manager.node, names, cookie, duration, limit):
            click.echo(json.dumps(event, sort_keys=True) if as_json else tracemod.format_line(event))
    except KeyboardInterrupt:
        return
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
