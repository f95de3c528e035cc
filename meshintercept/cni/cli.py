"""`meshintercept cni ...`: install, uninstall, repair and inspect the CNI plugin on a node.

Registered through the ``meshintercept.commands`` entry point; parses and prints only, the
work is in `install` and `repair`.
"""

from __future__ import annotations

import json
import os
import sys

import click

from meshintercept.cni import config as cfgmod
from meshintercept.cni import install as inst
from meshintercept.cni import protocol
from meshintercept.errors import MeshInterceptError, UsageError
from meshintercept.state import read_text
from meshintercept.status import ExitStatus

CONF_DIR_HELP = "Directory of the node's CNI network configs (k3s: /var/lib/rancher/k3s/agent/etc/cni/net.d)."
BIN_DIR_HELP = "Directory the runtime finds CNI plugins in (k3s: /var/lib/rancher/k3s/data/cni, older k3s: .../data/current/bin)."


def _session(ctx):
    from meshintercept.cli import Session

    return ctx.find_object(Session)


def _emit(data, as_json: bool, render) -> None:
    if as_json:
        from meshintercept.render import to_json

        click.echo(to_json(data))
    else:
        render(data)


def _load_block(plugin_conf) -> dict:
    if not plugin_conf:
        return {}
    text = plugin_conf
    if not plugin_conf.lstrip().startswith("{"):
        text = read_text(plugin_conf, UsageError, "plugin config")
    try:
        block = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"plugin config is not valid JSON: {exc}.") from None
    if not isinstance(block, dict):
        raise UsageError("plugin config must be a JSON object.")
    return block


def _with_node_options(ctx, block: dict) -> dict:
    """Global --cgroup/--pin-dir/--state-dir given on the command line go into the block."""
    session = _session(ctx)
    if session is not None:
        for key in cfgmod.NODE_FIELDS:
            value = getattr(session, key, None)
            if value and key not in block:
                block[key] = os.path.abspath(value)
    return block


@click.group()
def cni():
    """The chained CNI plugin meshintercept-cni: intercept pods as the runtime creates them.

    \b
    Examples:
      meshintercept cni install --plugin-conf '{"mode": "ebpf", "exclude_outbound_ports": [22]}'
      meshintercept cni repair            # list running pods that should be intercepted and are not
      meshintercept cni repair --apply    # and fix them
      meshintercept cni uninstall

    See docs/cni.md for the plugin config fields and the Kubernetes DaemonSet.
    """


@cni.command()
@click.option("--conf-dir", default=inst.default_conf_dir, show_default=inst.DEFAULT_CONF_DIR, metavar="DIR", help=CONF_DIR_HELP)
@click.option("--bin-dir", default=inst.default_bin_dir, show_default=inst.DEFAULT_BIN_DIR, metavar="DIR", help=BIN_DIR_HELP)
@click.option("--plugin-conf", metavar="JSON|FILE",
              help="The plugin's block: inline JSON or a file (fields as in 'meshintercept enable', see docs/cni.md).")
@click.option("--mode", metavar="MODE", help="Interception mode for the block (overrides --plugin-conf).")
@click.option("--shim", type=click.Choice(inst.SHIMS), default="local", show_default=True,
              help="local: the executable runs this Python environment; agent: it enters the node agent "
                   "container (DaemonSet) with nsenter.")
@click.option("--python", metavar="PATH", help="Interpreter the shim runs (default: this one).")
@click.option("--kubeconfig-from-serviceaccount", is_flag=True,
              help="Write this pod's service-account token as a kubeconfig next to the CNI config and use it.")
@click.option("--force", is_flag=True, help="Overwrite a meshintercept-cni executable we did not write.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def install(ctx, conf_dir, bin_dir, plugin_conf, mode, shim, python, kubeconfig_from_serviceaccount, force, as_json):
    """Add meshintercept-cni to the node's primary network config, and its executable to the bin dir.

    The primary config is the first *.conf/*.conflist/*.json file by name. The plugin is
    appended to its "plugins" list with the file otherwise untouched (uninstall gives back
    the same bytes); a single-plugin .conf becomes <name>.conflist and the original is kept
    as <name>.conf.meshintercept-orig. Idempotent: run it again (e.g. from a loop) to put the
    plugin back after the cluster's network plugin rewrote its config.
    """
    block = _load_block(plugin_conf)
    if mode:
        block["mode"] = mode
    block = _with_node_options(ctx, block)
    result = inst.install(conf_dir, bin_dir, block, shim=shim, python=python,
                          kubeconfig_from_serviceaccount=kubeconfig_from_serviceaccount, force=force)

    def render(r):
        for line in r["changes"] or [f"already installed in {r['conflist']} (nothing changed)"]:
            click.echo(line)
        for w in r["warnings"]:
            click.echo(f"warning: {w}", err=True)

    _emit(result, as_json, render)


@cni.command()
@click.option("--conf-dir", default=inst.default_conf_dir, show_default=inst.DEFAULT_CONF_DIR, metavar="DIR", help=CONF_DIR_HELP)
@click.option("--bin-dir", default=inst.default_bin_dir, show_default=inst.DEFAULT_BIN_DIR, metavar="DIR", help=BIN_DIR_HELP)
@click.option("--keep-binary", is_flag=True,
              help="Leave the executable in the bin dir, so runtimes can still run DEL for pods created "
                   "with the plugin (the node agent's shutdown uses this).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def uninstall(conf_dir, bin_dir, keep_binary, as_json):
    """Take meshintercept-cni out of every network config in the conf dir (and the executable out).

    Restores a conflist byte for byte as it was before install, and a converted .conf
    under its original name. Interception already in place stays; remove it with
    'meshintercept disable --all'.
    """
    result = inst.uninstall(conf_dir, bin_dir, keep_binary=keep_binary)
    _emit(result, as_json, lambda r: [click.echo(line) for line in r["changes"] or ["not installed (nothing changed)"]])


def _repair_config(ctx, conf_dir, plugin_conf, kubeconfig) -> cfgmod.PluginConfig:
    if plugin_conf:
        block, version, network = _load_block(plugin_conf), protocol.CURRENT_VERSION, ""
    else:
        state = inst.status(conf_dir, inst.default_bin_dir())
        if not state["installed"]:
            raise UsageError(
                f"meshintercept-cni is not in the primary network config of {conf_dir}; "
                "install it first or pass --plugin-conf."
            )
        block, version, network = dict(state["plugin"]), protocol.CURRENT_VERSION, ""
    if kubeconfig:
        block["kubeconfig"] = kubeconfig
    block = _with_node_options(ctx, block)
    try:
        return cfgmod.parse({**block, "type": cfgmod.PLUGIN_TYPE, "cniVersion": version, "name": network})
    except protocol.CniError as exc:
        raise UsageError(f"plugin config rejected: {exc.msg}") from None


@cni.command()
@click.option("--conf-dir", default=inst.default_conf_dir, show_default=inst.DEFAULT_CONF_DIR, metavar="DIR",
              help="Read the plugin's block (mode, spec, selection) from this dir's primary config. " + CONF_DIR_HELP)
@click.option("--plugin-conf", metavar="JSON|FILE", help="Use this block instead of the installed one.")
@click.option("--apply", "do_apply", is_flag=True, help="Fix what is found (default: only list it).")
@click.option("--match", multiple=True, metavar="GLOB",
              help="Only namespaces whose name matches (repeatable). Without a kubeconfig this is what "
                   "marks a namespace as a pod; default 'cni-*' (containerd's names).")
@click.option("--kubeconfig", metavar="PATH", help="Match namespaces to this node's pods through the API (default: the block's).")
@click.option("--node-name", envvar="NODE_NAME", metavar="NAME", help="This node's Kubernetes name (env NODE_NAME).")
@click.option("--no-processes", is_flag=True, help="Only look at named namespaces under /var/run/netns.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def repair(ctx, conf_dir, plugin_conf, do_apply, match, kubeconfig, node_name, no_processes, as_json):
    """Find running pods that should be intercepted and are not (they started before the
    plugin was installed, or their setup drifted), and fix them with --apply.

    Without --apply nothing changes: the list shows each candidate namespace, the pod it
    belongs to, whether it should be intercepted and why, and the action --apply would take
    (enable, re-enable, forget a record of a namespace that is gone). With --apply, exits 1
    if any fix failed.
    """
    from meshintercept.cni import kube
    from meshintercept.cni import repair as rep
    from meshintercept.manager import Manager, require_root

    cfg = _repair_config(ctx, conf_dir, plugin_conf, kubeconfig)
    if do_apply:
        require_root("cni repair --apply")
    manager = Manager(cfg.node)
    try:
        candidates = rep.plan(manager, cfg, match or None, node_name, include_processes=not no_processes)
    except kube.KubeError as exc:
        raise MeshInterceptError(f"cannot list this node's pods: {exc.message}") from None
    if do_apply:
        rep.apply(manager, cfg, candidates)
    data = {"applied": do_apply, "mode": cfg.mode, "candidates": [c.to_dict() for c in candidates]}
    _emit(data, as_json, _render_repair)
    if do_apply and any(c.result.startswith("failed") for c in candidates):
        sys.exit(int(ExitStatus.FAILURE))


def _render_repair(data) -> None:
    todo = [c for c in data["candidates"] if c["action"] != "none"]
    for c in data["candidates"]:
        who = f" ({c['pod']})" if c["pod"] else ""
        want = "intercept" if c["want"] else ("gone" if c["source"] == "record" else "leave")
        line = f"{c['namespace']}{who}: {want} - {c['why']}; action: {c['action']}"
        if c["problems"] and c["action"] != "none":
            line += f" [{'; '.join(c['problems'])}]"
        if c["result"]:
            line += f" -> {c['result']}"
        click.echo(line)
    if not data["candidates"]:
        click.echo("no candidate namespaces found")
    elif not todo:
        click.echo("nothing to repair")
    elif not data["applied"]:
        click.echo(f"{len(todo)} to fix; run again with --apply")


@cni.command()
@click.option("--conf-dir", default=inst.default_conf_dir, show_default=inst.DEFAULT_CONF_DIR, metavar="DIR", help=CONF_DIR_HELP)
@click.option("--bin-dir", default=inst.default_bin_dir, show_default=inst.DEFAULT_BIN_DIR, metavar="DIR", help=BIN_DIR_HELP)
@click.option("--check", is_flag=True, help="Exit 1 unless the plugin is in the primary config (a readiness probe).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def status(conf_dir, bin_dir, check, as_json):
    """Show whether the plugin is installed, and the pods it attached on this node."""
    from meshintercept.cni.attachments import AttachmentIndex

    data = inst.status(conf_dir, bin_dir)
    attachments = []
    if data["plugin"]:
        try:
            node = cfgmod.node_of(data["plugin"])
            attachments = [vars(a) for a in AttachmentIndex(node.state_dir).all()]
        except (protocol.CniError, OSError):
            pass
    data["attachments"] = attachments

    def render(d):
        where = d["primary"] or f"(no network config in {d['conf_dir']})"
        click.echo(f"primary config: {where}: {'installed' if d['installed'] else 'NOT installed'}")
        if d["plugin"]:
            click.echo(f"plugin config: {json.dumps(d['plugin'])}")
        for path in d["also_in"]:
            click.echo(f"also in: {path} (not the primary config; 'cni uninstall' removes it)")
        click.echo(f"executable: {d['shim'] or 'not installed in ' + d['bin_dir']}")
        click.echo(f"attachments: {len(d['attachments'])}")
        for a in d["attachments"]:
            pod = f"{a['pod_namespace']}/{a['pod_name']}" if a["pod_name"] else "-"
            click.echo(f"  {a['container_id'][:12]} {a['ifname']} {pod} {a['netns_path']} ({a['mode']})")
        for w in d["warnings"]:
            click.echo(f"warning: {w}", err=True)

    _emit(data, as_json, render)
    if check and not data["installed"]:
        sys.exit(int(ExitStatus.FAILURE))
