"""`meshintercept-cni`: a chained CNI plugin (spec 1.0.0 and 1.1.0) that turns interception on
and off for pods as the container runtime creates and deletes them.

Run by the runtime, never by hand: the command and the pod come from CNI_* environment
variables, the network configuration (our block plus ``prevResult``) from stdin.

* ADD enables interception in CNI_NETNS (mode and spec from the block, see `config`) when the
  pod is selected (`kube.decide`), then prints the ``prevResult`` it received, unchanged.
* DEL disables it; idempotent, and fine when the namespace is already gone.
* CHECK fails unless interception is in place exactly as configured.
* STATUS says whether ADD could work; GC drops state of attachments the runtime no longer
  knows and of namespaces that no longer exist; VERSION lists the spec versions.

Failures are CNI error JSON on stdout and a non-zero exit, never a traceback; every
invocation is one JSON line in the log file (`invocation_log`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, Optional

from meshintercept import errors as core_errors
from meshintercept import registry
from meshintercept.cni import config as cfgmod
from meshintercept.cni import annotations, invocation_log, kube, protocol
from meshintercept.cni.attachments import Attachment, AttachmentIndex
from meshintercept.cni.namespaces import compare, open_netns
from meshintercept.cni.protocol import CniError
from meshintercept.manager import Manager
from meshintercept.netns import Netns

POD_NAMESPACE_ARG = "K8S_POD_NAMESPACE"
POD_NAME_ARG = "K8S_POD_NAME"
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
}


@dataclass
class Invocation:
    command: str
    env: Dict[str, str]
    conf: dict = field(default_factory=dict)
    version: str = protocol.CURRENT_VERSION
    #: Filled by handlers for the log line.
    log: dict = field(default_factory=dict)

    @property
    def container_id(self) -> str:
        return self.env.get("CNI_CONTAINERID", "")

    @property
    def netns(self) -> str:
        return self.env.get("CNI_NETNS", "")

    @property
    def ifname(self) -> str:
        return self.env.get("CNI_IFNAME", "")

    @property
    def network(self) -> str:
        name = self.conf.get("name")
        return name if isinstance(name, str) else ""

    @property
    def args(self) -> Dict[str, str]:
        return protocol.parse_cni_args(self.env.get("CNI_ARGS"))

    def require_env(self) -> None:
        missing = [k for k in REQUIRED_ENV.get(self.command, ()) if not self.env.get(k)]
        if missing:
            raise CniError(protocol.INVALID_ENV, f"{self.command} needs {', '.join(missing)} in the environment.")


def from_core(exc: core_errors.MeshInterceptError) -> CniError:
    """Map the core's errors to the spec's codes (100+ where the spec has none)."""
    if isinstance(exc, core_errors.ModeUnavailable):
        code = protocol.PLUGIN_NOT_AVAILABLE
    elif isinstance(exc, core_errors.UsageError):
        code = protocol.INVALID_CONFIG
    elif isinstance(exc, core_errors.NamespaceNotFound):
        code = protocol.UNKNOWN_CONTAINER
    elif isinstance(exc, core_errors.NotPermitted):
        code = protocol.NOT_PERMITTED
    elif isinstance(exc, core_errors.Conflict):
        code = protocol.CONFLICT
    else:
        code = protocol.INTERCEPTION_FAILED
    return CniError(code, exc.message)


def _select(inv: Invocation, cfg: cfgmod.PluginConfig):
    args = inv.args
    pod_ns, pod_name = args.get(POD_NAMESPACE_ARG, ""), args.get(POD_NAME_ARG, "")
    if pod_name:
        inv.log["pod"] = f"{pod_ns}/{pod_name}"
    try:
        yes, why, _pod = kube.decide(cfg.selection, pod_ns, pod_name)
    except kube.KubeError as exc:
        code = protocol.TRY_AGAIN_LATER if exc.transient else protocol.KUBERNETES_ERROR
        raise CniError(code, f"cannot tell whether to intercept pod {pod_ns}/{pod_name}: {exc.message}") from None
    inv.log["selected"], inv.log["why"] = yes, why
    return yes, pod_ns, pod_name, _pod


# --- commands ---------------------------------------------------------------------------
def cmd_add(inv: Invocation) -> dict:
    cfg = cfgmod.parse(inv.conf)
    inv.log["mode"] = cfg.mode
    selected, pod_ns, pod_name, pod = _select(inv, cfg)
    if selected:
        try:
            spec, mode, sources = annotations.apply(pod, cfg.spec, cfg.mode)
        except annotations.AnnotationError as exc:
            raise CniError(protocol.BAD_ANNOTATION, exc.message) from None
        inv.log["mode"] = mode
        manager = Manager(cfg.node)
        index = AttachmentIndex(cfg.node.state_dir)
        with index.locked():
            result = manager.enable(inv.netns, mode, spec, sources=sources)
            netns = Netns.parse(inv.netns)
            index.put(Attachment(
                network=inv.network, container_id=inv.container_id, ifname=inv.ifname, netns_path=netns.path,
                netns_key=netns.key, mode=mode, pod_namespace=pod_ns, pod_name=pod_name,
            ))
        inv.log["action"] = "enabled" if result.get("changed") else "unchanged"
    else:
        inv.log["action"] = "skipped"
    return protocol.passthrough_result(inv.conf, inv.version)


def cmd_del(inv: Invocation) -> None:
    # DEL must not fail on a config that ADD would reject (the config may have changed since
    # ADD, and a DEL that keeps failing leaves the pod stuck terminating): only the node matters.
    node = cfgmod.node_of(inv.conf)
    manager = Manager(node)
    index = AttachmentIndex(node.state_dir)
    netns = open_netns(inv.netns)
    with index.locked():
        att = index.get(inv.network, inv.container_id, inv.ifname)
        key = att.netns_key if att else (netns.key if netns else None)
        if att:
            index.delete(att)
            inv.log["pod"] = att.pod
        others = index.for_namespace(key) if key else []
        if key is None:
            inv.log["action"] = "nothing"
        elif others:
            inv.log["action"] = f"kept ({len(others)} other attachment(s) of the namespace)"
        else:
            record = manager.forget(key, netns)
            inv.log["action"] = "disabled" if record else "nothing"
            if record:
                inv.log["mode"] = record.mode
    return None


def cmd_check(inv: Invocation) -> None:
    cfg = cfgmod.parse(inv.conf)
    inv.log["mode"] = cfg.mode
    netns = Netns.parse(inv.netns)
    selected, _, _, pod = _select(inv, cfg)
    if not selected:
        inv.log["action"] = "not selected"
        return None
    try:
        spec, mode, _sources = annotations.apply(pod, cfg.spec, cfg.mode)
    except annotations.AnnotationError as exc:
        raise CniError(protocol.BAD_ANNOTATION, exc.message) from None
    problems, live = compare(Manager(cfg.node), netns, mode, spec)
    if problems:
        raise CniError(protocol.NOT_IN_PLACE, "; ".join(problems) + ".", json.dumps(live, default=str)[:2000])
    inv.log["action"] = "in place"
    return None


def cmd_status(inv: Invocation) -> None:
    cfg = cfgmod.parse(inv.conf)
    inv.log["mode"] = cfg.mode
    reason = registry.load(cfg.mode).unavailable_reason()
    if reason:
        raise CniError(protocol.PLUGIN_NOT_AVAILABLE, f"mode {cfg.mode} cannot run here: {reason}")
    if cfg.selection.kubeconfig:
        try:
            kube.load_kubeconfig(cfg.selection.kubeconfig)
        except kube.KubeError as exc:
            raise CniError(protocol.PLUGIN_NOT_AVAILABLE, exc.message) from None
    return None


def _valid_attachments(conf: dict) -> set:
    items = conf.get("cni.dev/valid-attachments")
    if not isinstance(items, list):
        raise CniError(protocol.INVALID_CONFIG, "GC needs cni.dev/valid-attachments (a list) in the configuration.")
    out = set()
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str):
            raise CniError(protocol.INVALID_CONFIG, f"cni.dev/valid-attachments item {item!r} has no containerID.")
        out.add((item["containerID"], item.get("ifname", "")))
    return out


def cmd_gc(inv: Invocation) -> None:
    valid = _valid_attachments(inv.conf)
    node = cfgmod.node_of(inv.conf)
    manager = Manager(node)
    index = AttachmentIndex(node.state_dir)
    removed, failed = [], []
    with index.locked():
        stale = [
            a for a in index.all()
            if a.network == inv.network and (a.container_id, a.ifname) not in valid
            and (a.container_id, "") not in valid
        ]
        for att in stale:
            index.delete(att)
        gone_keys = {r.key for r in manager.records() if manager.live_netns(r) is None}
        for att in index.all():  # attachments of any network whose namespace is gone
            if att.netns_key in gone_keys:
                index.delete(att)
                stale.append(att)
        for key in sorted({a.netns_key for a in stale} | gone_keys):
            if index.for_namespace(key):
                continue
            try:
                record = manager.forget(key)
            except core_errors.MeshInterceptError as exc:
                failed.append(f"{key}: {exc.message}")
                continue
            if record:
                removed.append(record.name)
    inv.log["action"] = f"removed {len(removed)} namespace(s), {len(stale)} attachment(s)"
    inv.log["removed"] = removed
    if failed:
        raise CniError(protocol.INTERCEPTION_FAILED, f"GC could not clean {len(failed)} namespace(s).", "; ".join(failed))
    return None


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}


# --- entry point ------------------------------------------------------------------------
def _requested_version(raw: bytes) -> Optional[str]:
    try:
        conf = json.loads(raw.decode("utf-8") or "{}")
    except (UnicodeDecodeError, ValueError):
        return None
    value = conf.get("cniVersion") if isinstance(conf, dict) else None
    return value if isinstance(value, str) else None


def run(env: Dict[str, str], stdin: bytes) -> tuple:
    """One invocation: returns (exit code, stdout text, log entry). Never raises."""
    started = time.monotonic()
    command = env.get("CNI_COMMAND", "")
    inv = Invocation(command=command, env=env)
    log_file = cfgmod.default_log_file()
    output: Optional[dict] = None
    code = 0
    try:
        if command not in protocol.COMMANDS:
            raise CniError(
                protocol.INVALID_ENV,
                f"CNI_COMMAND {command!r} is not one of {', '.join(protocol.COMMANDS)}; "
                "meshintercept-cni is run by a container runtime (see docs/cni.md).",
            )
        if command == "VERSION":
            output = protocol.version_info(_requested_version(stdin))
        else:
            inv.conf = protocol.decode_config(stdin)
            log_file = cfgmod.log_file_of(inv.conf)
            requested = inv.conf.get("cniVersion")
            if isinstance(requested, str) and requested:
                inv.version = requested
            protocol.check_version(inv.conf, command)
            inv.require_env()
            output = HANDLERS[command](inv)
        result = "ok"
    except CniError as exc:
        result, code, output = "error", exc.code, exc.to_dict(inv.version)
    except core_errors.MeshInterceptError as exc:
        err = from_core(exc)
        result, code, output = "error", err.code, err.to_dict(inv.version)
    except Exception as exc:  # noqa: BLE001 - the runtime must get CNI JSON, not a traceback
        inv.log["traceback"] = traceback.format_exc()
        err = CniError(protocol.INTERCEPTION_FAILED, f"internal error: {type(exc).__name__}: {exc}",
                       f"see {log_file} for the traceback")
        result, code, output = "error", err.code, err.to_dict(inv.version)
    entry = {
        "command": command, "container_id": inv.container_id, "netns": inv.netns, "ifname": inv.ifname,
        "network": inv.network, "result": result, **inv.log,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }
    if code:
        entry["code"], entry["msg"] = output["code"], output["msg"]
    invocation_log.write(log_file, entry)
    text = json.dumps(output) if output is not None else ""
    return (1 if code else 0), text, entry


def main() -> None:
    stdin = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    real_stdout = sys.stdout
    # Anything a library prints must not corrupt the result the runtime parses.
    sys.stdout = sys.stderr
    try:
        status, text, _ = run(dict(os.environ), stdin)
    finally:
        sys.stdout = real_stdout
    if text:
        real_stdout.write(text + "\n")
        real_stdout.flush()
    sys.exit(status)


if __name__ == "__main__":
    main()
