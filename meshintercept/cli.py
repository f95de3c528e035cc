"""The `meshintercept` command line: parse options, call `Manager`, print the result.

Nothing here decides anything about interception. Commands contributed by backends and
the CNI plugin (``maps``, ``trace``, ``cni``) come from the ``meshintercept.commands``
entry-point group and are imported only when invoked, so ``enable`` stays fast.
"""

from __future__ import annotations

import os
import sys

import click

from meshintercept import __version__
from meshintercept.errors import MeshInterceptError, UsageError
from meshintercept.status import EXIT_CODE_HELP, ExitStatus

COMMANDS_GROUP = "meshintercept.commands"
ENV = "MESHINTERCEPT_"


def _env(name: str) -> str:
    return ENV + name.upper().replace("-", "_")


class LazyGroup(click.Group):
    """A click group that adds entry-point commands on demand."""

    def _plugin_eps(self):
        from importlib.metadata import entry_points

        eps = entry_points()
        return list(eps.select(group=COMMANDS_GROUP)) if hasattr(eps, "select") else list(eps.get(COMMANDS_GROUP, []))

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | {ep.name for ep in self._plugin_eps()})

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        for ep in self._plugin_eps():
            if ep.name == name:
                try:
                    return ep.load()
                except Exception as exc:  # a broken plugin must not take the CLI down
                    raise click.ClickException(f"command {name!r} failed to load: {exc}") from exc
        return None


class Session:
    """What the group hands to every command: the node and a lazily built Manager."""

    def __init__(self, cgroup, pin_dir, state_dir, tc_attach, traceback):
        self.cgroup, self.pin_dir, self.state_dir, self.tc_attach = cgroup, pin_dir, state_dir, tc_attach
        self.traceback = traceback
        self._manager = None

    @property
    def manager(self):
        if self._manager is None:
            from meshintercept.manager import Manager
            from meshintercept.node import Node

            self._manager = Manager(Node.from_options(self.cgroup, self.pin_dir, self.state_dir, self.tc_attach))
        return self._manager


pass_session = click.make_pass_decorator(Session)


def emit(data, as_json: bool, render) -> None:
    if as_json:
        from meshintercept.render import to_json

        click.echo(to_json(data))
    else:
        render(data)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODE_HELP.replace("\n", "\n\n\b\n", 1),
)
@click.option("--cgroup", envvar=_env("cgroup"), metavar="PATH",
              help="cgroup-v2 directory the eBPF programs attach to (default: the cgroup-v2 root).")
@click.option("--pin-dir", envvar=_env("pin_dir"), metavar="PATH",
              help="bpffs directory holding this node's pinned programs and maps (default /sys/fs/bpf/meshintercept).")
@click.option("--state-dir", envvar=_env("state_dir"), metavar="PATH", hidden=True,
              help="Directory of the node's namespace records (default derived from --pin-dir under /run/meshintercept).")
@click.option("--tc-attach", envvar=_env("tc_attach"), type=click.Choice(["clsact", "tcx"]), default=None,
              help="ebpf mode, tc path: attach the tc programs as clsact filters (default, every kernel) or as "
                   "tcx links (kernel 6.6+; each attach waits for an RCU grace period).")
@click.option("--traceback", is_flag=True, envvar=_env("traceback"), help="Show the Python traceback on errors.")
@click.version_option(__version__, "-V", "--version", prog_name="meshintercept")
@click.pass_context
def cli(ctx, cgroup, pin_dir, state_dir, tc_attach, traceback):
    """Turn service-mesh sidecar traffic interception on and off per network namespace.

    One network namespace is one pod. Interception sends the pod's outbound TCP to the
    sidecar's outbound port and inbound TCP to its inbound port; the sidecar learns the
    original destination with getsockopt(SO_ORIGINAL_DST), whichever mode is in use:

    \b
      iptables  nat REDIRECT rules inside the pod's namespace (like Istio, Linkerd, osm)
      nftables  native nf_tables rules in one inet table of the pod's namespace
      ebpf      cgroup connect4/connect6/sockops/getsockopt; inbound by sk_lookup (or tc)

    \b
    Sidecar contract: IPv4 outbound lands on 127.0.0.1:OUT, IPv6 on [::1]:OUT, inbound
    on IN with the pod address; ask getsockopt(SOL_IP, SO_ORIGINAL_DST) on an IPv4
    connection (also an AF_INET6 socket of a ::ffff:a.b.c.d peer: Java, .NET) and
    getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) (optname 80) on an IPv6 one.

    \b
    Quick start:
      meshintercept doctor
      meshintercept enable --mode ebpf --netns mypod
      meshintercept status
      meshintercept disable --netns mypod

    Every option can also be set in the environment as MESHINTERCEPT_<OPTION>,
    e.g. MESHINTERCEPT_PIN_DIR or MESHINTERCEPT_EXCLUDE_OUTBOUND_PORT="22,53".
    """
    ctx.obj = Session(cgroup, pin_dir, state_dir, tc_attach, traceback)


# --- enable ---------------------------------------------------------------------------------
NETNS_HELP = "Target network namespace: a name under /var/run/netns, a path (/proc/PID/ns/net, a CNI netns) or pid:N."


def _spec_options(fn):
    options = [
        click.option("--accelerate", is_flag=True, envvar=_env("accelerate"),
                     help="ebpf: redirect payload socket to socket with sockmap (opt-in, falls back to the normal path on any miss)."),
        click.option("--capture-dns", is_flag=True, envvar=_env("capture_dns"),
                     help="Send the app's DNS queries (UDP and TCP to port 53 of any address but loopback) to the "
                          "sidecar's DNS port; replies reach the app from the server it asked."),
        click.option("--dns-port", envvar=_env("dns_port"), metavar="PORT", show_default=True, default="15053",
                     help="Sidecar port receiving captured DNS (UDP and TCP), with --capture-dns."),
        click.option("--inbound-path", "inbound_path", envvar=_env("inbound_path"), metavar="sk_lookup|tc",
                     default=None, help="ebpf: how inbound reaches the sidecar. sk_lookup (default): new connections "
                     "to a redirected port are handed to the sidecar's inbound listener, IPv4 and IPv6, nothing "
                     "rewritten, refused while no sidecar listens. tc: the seed's port rewrite on the pod's "
                     "interfaces, IPv4 only."),
        click.option("--debug", is_flag=True, envvar=_env("debug"),
                     help="ebpf: programs log each decision to trace_pipe and to 'meshintercept trace'."),
        click.option("--include-inbound-port", "include_inbound_ports", multiple=True, envvar=_env("include_inbound_port"),
                     metavar="P[,P]", help="Redirect only these inbound ports (default: all). Repeatable, comma lists."),
        click.option("--exclude-outbound-cidr", "exclude_outbound_cidrs", multiple=True, envvar=_env("exclude_outbound_cidr"),
                     metavar="CIDR[,CIDR]", help="Outbound destinations that bypass the sidecar, IPv4 or IPv6 "
                     "(an IPv4 CIDR also covers IPv4 reached from IPv6 sockets, ::ffff:a.b.c.d). Repeatable, comma lists."),
        click.option("--family", "families", multiple=True, envvar=_env("family"), metavar="ipv4|ipv6",
                     help="IP families to intercept (default: every family the namespace has; a namespace with "
                     "IPv6 disabled is intercepted for IPv4). Repeatable, comma lists."),
        click.option("--exclude-inbound-port", "exclude_inbound_ports", multiple=True, envvar=_env("exclude_inbound_port"),
                     metavar="P[,P]", help="Inbound ports that bypass the sidecar. Repeatable, comma lists."),
        click.option("--exclude-outbound-port", "exclude_outbound_ports", multiple=True, envvar=_env("exclude_outbound_port"),
                     metavar="P[,P]", help="Outbound destination ports that bypass the sidecar. Repeatable, comma lists."),
        click.option("--inbound-port", envvar=_env("inbound_port"), metavar="PORT", show_default=True, default="15003",
                     help="Sidecar port receiving redirected inbound connections."),
        click.option("--outbound-port", envvar=_env("outbound_port"), metavar="PORT", show_default=True, default="15001",
                     help="Sidecar port receiving redirected outbound connections."),
        click.option("--proxy-uid", envvar=_env("proxy_uid"), metavar="UID", show_default=True, default="1500",
                     help="UID the sidecar runs as; its own traffic is never redirected."),
    ]
    for option in options:
        fn = option(fn)
    return fn


@cli.command(epilog=EXIT_CODE_HELP.replace("\n", "\n\n\b\n", 1))
@click.option("--mode", envvar=_env("mode"), metavar="MODE", required=True,
              help="Interception backend: iptables, nftables or ebpf (see 'meshintercept doctor').")
@click.option("--netns", envvar=_env("netns"), metavar="NS", required=True, help=NETNS_HELP)
@_spec_options
@click.option("--dry-run", is_flag=True, help="Print what would be applied (iptables-save form for iptables, "
              "'nft list table' form for nftables) and change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_session
def enable(session, mode, netns, dry_run, as_json, **spec_options):
    """Intercept a network namespace's TCP traffic through its sidecar, IPv4 and IPv6.

    Idempotent: enabling again with the same options changes nothing; with different
    options the namespace's interception is replaced atomically. A failed enable leaves
    the namespace as it was.

    \b
    Sidecar contract (the same in every mode):
      outbound IPv4 lands on 127.0.0.1:OUT, IPv6 on [::1]:OUT; inbound on the IN port of
      the pod address it was sent to. Listen on [::] (dual-stack) or on both families.
      Original destination: getsockopt(SOL_IP, SO_ORIGINAL_DST) for an IPv4 connection,
      also on an AF_INET6 socket holding it v4-mapped (an app's AF_INET6 socket to
      ::ffff:a.b.c.d is IPv4 and is intercepted as IPv4); getsockopt(SOL_IPV6,
      IP6T_SO_ORIGINAL_DST) (optname 80, level 41) for an IPv6 one.

    \b
    Examples:
      meshintercept enable --mode iptables --netns pod1
      meshintercept enable --mode ebpf --netns /proc/4242/ns/net --exclude-outbound-port 22,53
      meshintercept enable --mode iptables --netns pod1 --dry-run
      meshintercept enable --mode nftables --netns pod1 --family ipv4
    """
    from meshintercept.spec import InterceptSpec

    spec = InterceptSpec.build(**spec_options)
    manager = session.manager
    if dry_run:
        text = manager.plan(netns, mode, spec)
        emit({"mode": mode, "namespace": netns, "plan": text}, as_json, lambda d: click.echo(d["plan"].rstrip("\n")))
        return
    result = manager.enable(netns, mode, spec)
    emit(result, as_json, _render_enable)


def _render_enable(result):
    verb = "enabled" if result["changed"] else "already enabled (unchanged)"
    spec = result["spec"]
    click.echo(
        f"{result['namespace']}: {result['mode']} interception {verb} "
        f"(outbound :{spec['outbound_port']}, inbound :{spec['inbound_port']}, proxy uid {spec['proxy_uid']}) "
        f"in {result['elapsed_ms']:.1f} ms"
    )
    for warning in result.get("warnings", []):
        click.echo(f"meshintercept: warning: {warning}", err=True)


# --- disable --------------------------------------------------------------------------------
@cli.command(epilog=EXIT_CODE_HELP.replace("\n", "\n\n\b\n", 1))
@click.option("--netns", envvar=_env("netns"), metavar="NS", help=NETNS_HELP + " It may already be gone.")
@click.option("--all", "all_", is_flag=True, help="Disable every managed namespace and remove everything of ours from the node (programs, pins, attachments).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_session
def disable(session, netns, all_, as_json):
    """Stop intercepting a namespace, or everything on the node with --all.

    Removes exactly what enable added; idempotent (disabling twice is fine).
    """
    if bool(netns) == bool(all_):
        raise UsageError("give exactly one of --netns NS or --all.")
    if all_:
        result = session.manager.disable_all()
        emit(result, as_json, _render_disable_all)
    else:
        result = session.manager.disable(netns)
        emit(result, as_json, lambda r: click.echo(
            f"{r['namespace']}: {r['mode']} interception disabled" if r["changed"] else f"{r['namespace']}: not intercepted (nothing to do)"))


def _render_disable_all(result):
    names = ", ".join(result["namespaces"]) or "none"
    click.echo(f"disabled namespaces: {names}")
    for mode, removed in result["teardown"].items():
        if removed:
            click.echo(f"{mode}: removed {len(removed)} node-wide object(s)")
    if not result["changed"]:
        click.echo("nothing was enabled on this node")


# --- upgrade --------------------------------------------------------------------------------
@cli.command(epilog=EXIT_CODE_HELP.replace("\n", "\n\n\b\n", 1))
@click.option("--grace", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="How long the old programs keep answering the original destination of connections they "
                   "redirected before they are removed (default 2).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_session
def upgrade(session, grace, as_json):
    """Take the node over from what an earlier meshintercept build left, with no gap.

    The node agent runs this when it starts. Pinned eBPF programs of the same layout are simply
    reused. Programs of another layout are replaced without a moment where a pod goes direct:
    this build's set is loaded beside the old one, every managed namespace is moved over, then
    the old set is removed. Namespaces in the old maps that this node has no record of keep the
    old set in place (exit 6) rather than be dropped. Nothing to do is success.
    """
    report = session.manager.upgrade(grace)
    emit(report, as_json, _render_upgrade)
    if any(r["unknown"] or r["failed"] for r in report["modes"].values()):
        sys.exit(int(ExitStatus.CONFLICT))


def _render_upgrade(report):
    if not report["modes"]:
        click.echo("nothing to take over: no mode has objects of an earlier build on this node")
    for mode, r in report["modes"].items():
        old = ", ".join(r["superseded"])
        click.echo(f"{mode}: layout {old} -> {r.get('to', '?')}: {len(r['moved'])} namespaces moved, "
                   f"{len(r['gone'])} records of vanished namespaces dropped")
        for name, cookies in r["unknown"].items():
            click.echo(f"  {name} kept: netns cookies {', '.join(map(str, cookies))} have no record on this node; "
                       "disable them with the build that enabled them, then run 'meshintercept upgrade' again")
        for key, why in r["failed"].items():
            click.echo(f"  {key} not moved: {why}")
        if r["removed"]:
            click.echo(f"  removed layout {old} ({len(r['removed'])} pinned objects)")


# --- status ---------------------------------------------------------------------------------
@cli.command()
@click.option("--netns", envvar=_env("netns"), metavar="NS", help="Show one namespace only. " + NETNS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (for scripts).")
@click.option("--live", is_flag=True, default=None,
              help="Look inside every namespace (slow with hundreds); without it, all-namespace status "
                   "shows what the node's maps (ebpf) or the records (iptables) say. --netns is always live.")
@pass_session
def status(session, netns, as_json, live):
    """Show managed namespaces: mode, ports, exclusions and what is live in the kernel."""
    data = session.manager.status(netns, live=live)
    from meshintercept.render import render_status

    emit(data, as_json, render_status)


# --- doctor ---------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@pass_session
def doctor(session, as_json):
    """Check, by trying for real, whether each mode can work on this machine and why not.

    Exits 0 when at least one mode is fully usable, 4 otherwise.
    """
    from meshintercept.doctor import summarize
    from meshintercept.render import render_doctor

    report = summarize(session.manager.doctor())
    emit(report, as_json, render_doctor)
    if not report["usable_modes"]:
        sys.exit(int(ExitStatus.ENVIRONMENT))


# --- demo -----------------------------------------------------------------------------------
@cli.command()
@click.option("--mode", envvar=_env("mode"), default="iptables", show_default=True, metavar="MODE",
              help="Interception backend to demonstrate: iptables, nftables or ebpf.")
@click.option("--keep", is_flag=True, help="Leave the cluster up until Enter is pressed (to look around).")
@click.option("--capture-dns", is_flag=True,
              help="Also send pod curl's DNS to its sidecar, the only one that knows the service's name: "
                   "getent resolves it and curl calls the service by name.")
def demo(mode, keep, capture_dns):
    """Run the seed's walk-through on this machine, then tear it all down.

    Builds a two-node cluster out of network namespaces (10.231.0.0/16, child cgroups,
    never the machine's root cgroup), starts pipy-ok v1 (same node) and v2 (other node),
    a client pod with a sidecar routing a service address to both, enables interception
    with MODE, calls the service and shows both answers and the path they took.
    """
    from meshintercept.demo import run_demo

    run_demo(mode, keep=keep, echo=click.echo, capture_dns=capture_dns)


@cli.command()
@click.option("--serve", "address", envvar=_env("metrics_address"), metavar="[HOST]:PORT",
              help="Serve /metrics on this address until stopped, instead of printing once (the node agent "
                   "does this; e.g. :9464).")
@click.option("--cni-log", envvar=_env("cni_log_file"), metavar="PATH",
              help="The CNI plugin's invocation log, for ADD/DEL counts and durations (default: the plugin's).")
@pass_session
def metrics(session, address, cni_log):
    """Print the node's metrics in Prometheus text format (or serve them with --serve).

    Per namespace: each backend's interception counters (redirected connections, original
    destination answers and misses, map errors, rule packet counts, ...) and captured
    families; per mode: intercepted namespaces; CNI ADD/DEL/CHECK counts by result and their
    durations; for ebpf: when the programs were loaded and how many connections are tracked.
    """
    from meshintercept import metrics as metrics_mod
    from meshintercept.cni.config import default_log_file

    cni_log = cni_log or default_log_file()
    if address:
        metrics_mod.serve(lambda: session.manager, address, cni_log)
        return
    click.echo(metrics_mod.exposition(session.manager, cni_log).decode(), nl=False)


def permission_advice(exc: PermissionError) -> str:
    """One sentence for a refused file operation; "run as root" only helps when we are not root."""
    what = f"{exc.strerror or exc} ({exc.filename})" if exc.filename else f"{exc.strerror or exc}"
    if os.geteuid() != 0:
        return f"{what}; run meshintercept as root."
    return (f"{what} although meshintercept runs as root; a process it started as another user cannot "
            "reach that path (check the permissions of its parent directories), or a security module or "
            "read-only mount refuses it.")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    traceback = "--traceback" in argv or os.environ.get(_env("traceback"), "") not in ("", "0", "false")
    try:
        rv = cli.main(args=argv, prog_name="meshintercept", standalone_mode=False, auto_envvar_prefix="MESHINTERCEPT")
        sys.exit(int(rv) if isinstance(rv, int) else 0)
    except MeshInterceptError as exc:
        if traceback:
            raise
        click.echo(f"meshintercept: error: {exc.message}", err=True)
        sys.exit(int(exc.status))
    except click.exceptions.Abort:
        click.echo("meshintercept: interrupted", err=True)
        sys.exit(int(ExitStatus.INTERRUPTED))
    except KeyboardInterrupt:
        click.echo("meshintercept: interrupted", err=True)
        sys.exit(int(ExitStatus.INTERRUPTED))
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except PermissionError as exc:
        if traceback:
            raise
        click.echo(f"meshintercept: error: {permission_advice(exc)}", err=True)
        sys.exit(int(ExitStatus.NOT_PERMITTED))
    except Exception as exc:  # a bug: say so in one line, keep the traceback one flag away
        if traceback:
            raise
        click.echo(f"meshintercept: internal error: {type(exc).__name__}: {exc} (rerun with --traceback and report it)", err=True)
        sys.exit(int(ExitStatus.FAILURE))
