"""Put the plugin into a node's CNI setup and take it out again (`meshintercept cni install`).

* The plugin block is appended to the node's primary network config: the first file by name
  among ``*.conf``, ``*.conflist`` and ``*.json`` in the conf dir, which is the one libcni-
  based runtimes (containerd, CRI-O) use. A conflist is edited in place, minimally (see
  `conflist`), so uninstall restores it byte for byte. A single-plugin ``.conf`` cannot chain,
  so it becomes ``<stem>.conflist`` and the original is renamed ``<name>.meshintercept-orig``
  (an extension runtimes ignore), which uninstall renames back.
* The executable the runtime runs is a small shell shim in the bin dir: ``local`` execs this
  Python environment (bare-metal installs, tests); ``agent`` enters the mount namespace of the
  node agent container (the DaemonSet) with nsenter, so the host needs no Python at all. With
  no agent running, the agent shim fails ADD with "try again later" (code 11), so pods created
  while the agent is down wait for it instead of starting unintercepted, and lets DEL succeed.
* With ``kubeconfig_from_serviceaccount`` the agent's service-account token is written as a
  kubeconfig next to the CNI config, for pod selection by annotation.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import sys
from typing import List, Optional

from meshintercept.cni import conflist, protocol
from meshintercept.cni import config as cfgmod
from meshintercept.cni.config import PLUGIN_TYPE
from meshintercept.errors import EnvironmentMissing, UsageError
from meshintercept.node import STATE_ROOT

DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIR = "/opt/cni/bin"
#: No config extension, so runtimes never load it as a network (istio-cni does the same).
KUBECONFIG_NAME = "meshintercept-cni-kubeconfig"
BACKUP_SUFFIX = ".meshintercept-orig"
SHIM_MARKER = "# meshintercept-cni shim"
SHIMS = ("local", "agent")
#: Written by the DaemonSet's entrypoint: the host PID of the running node agent.
AGENT_PIDFILE = os.path.join(STATE_ROOT, "agent.pid")
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
K3S_CONTAINERD_CONFIG = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml"


def default_conf_dir() -> str:
    return os.environ.get("MESHINTERCEPT_CNI_CONF_DIR") or DEFAULT_CONF_DIR


def default_bin_dir() -> str:
    return os.environ.get("MESHINTERCEPT_CNI_BIN_DIR") or DEFAULT_BIN_DIR


def default_agent_pidfile() -> str:
    """Where the agent shim looks for the agent: the entrypoint writes the same variable."""
    return os.environ.get("MESHINTERCEPT_AGENT_PIDFILE") or AGENT_PIDFILE


def is_ours(value) -> bool:
    return isinstance(value, dict) and value.get("type") == PLUGIN_TYPE


def primary_config(conf_dir: str) -> str:
    files = conflist.config_files(conf_dir)
    if not files:
        raise EnvironmentMissing(
            f"no network config (*.conf, *.conflist, *.json) in {conf_dir}; install the cluster's network "
            "plugin first, or pass --conf-dir (k3s: /var/lib/rancher/k3s/agent/etc/cni/net.d)."
        )
    return files[0]


def _read(path: str) -> str:
    with open(path, newline="") as f:
        return f.read()


def validate_block(block: dict, cni_version: str, network: str) -> dict:
    """Check the block exactly as the plugin will read it at ADD time; return it with its type."""
    if not isinstance(block, dict):
        raise UsageError("the plugin config must be a JSON object.")
    block = {"type": PLUGIN_TYPE, **{k: v for k, v in block.items() if k != "type"}}
    try:
        cfgmod.parse({**block, "cniVersion": cni_version, "name": network})
        protocol.check_version({"cniVersion": cni_version}, "ADD")
    except protocol.CniError as exc:
        raise UsageError(f"plugin config rejected: {exc.msg}") from None
    return block


# --- the executable -------------------------------------------------------------------------
def shim_text(kind: str, python: Optional[str] = None, pidfile: str = AGENT_PIDFILE) -> str:
    python = python or sys.executable
    run = f"{shlex.quote(python)} -I -m meshintercept.cni.plugin"
    head = (
        "#!/bin/sh\n"
        f"{SHIM_MARKER} ({kind}): written by 'meshintercept cni install', removed by 'meshintercept cni uninstall'.\n"
    )
    if kind == "local":
        return head + f'exec {run} "$@"\n'
    versions = json.dumps(list(protocol.SUPPORTED_VERSIONS), separators=(",", ":"))
    return head + f"""\
pid=$(cat {shlex.quote(pidfile)} 2>/dev/null)
# -L too: a venv's python is a symlink to an absolute path, which resolves against the host's
# root, not the agent's, and the host may have no Python at all.
if [ -n "$pid" ] && {{ [ -x "/proc/$pid/root{python}" ] || [ -L "/proc/$pid/root{python}" ]; }}; then
    exec nsenter --target "$pid" --mount -- {run} "$@"
fi
# The node agent is not running: nothing of ours is live to remove, and a pod must not start
# without interception, so DEL succeeds and ADD/CHECK ask the runtime to try again later.
case "$CNI_COMMAND" in
    DEL|GC) exit 0 ;;
    VERSION) echo '{{"cniVersion":"{protocol.CURRENT_VERSION}","supportedVersions":{versions}}}'; exit 0 ;;
esac
echo '{{"cniVersion":"1.0.0","code":{protocol.TRY_AGAIN_LATER},"msg":"the meshintercept node agent is not running on this node; check the meshintercept DaemonSet."}}'
exit 1
"""


def _is_our_shim(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return SHIM_MARKER.encode() in f.read(512)
    except OSError:
        return False


def _install_shim(bin_dir: str, text: str, force: bool) -> Optional[str]:
    path = os.path.join(bin_dir, PLUGIN_TYPE)
    if os.path.exists(path):
        if _read(path) == text:
            return None
        if not _is_our_shim(path) and not force:
            raise UsageError(f"{path} exists and was not written by meshintercept; remove it or pass --force.")
    os.makedirs(bin_dir, exist_ok=True)
    conflist.atomic_write(path, text, mode=0o755)
    return f"wrote {path}"


# --- kubeconfig ---------------------------------------------------------------------------
def serviceaccount_kubeconfig(sa_dir: str = SERVICEACCOUNT_DIR, env=None) -> dict:
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise EnvironmentMissing("KUBERNETES_SERVICE_HOST is not set; --kubeconfig-from-serviceaccount works in a pod only.")
    try:
        token = _read(os.path.join(sa_dir, "token")).strip()
        ca = _read(os.path.join(sa_dir, "ca.crt"))
    except OSError as exc:
        raise EnvironmentMissing(f"cannot read the service account in {sa_dir}: {exc.strerror}.") from None
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "meshintercept-cni",
        "clusters": [{"name": "local", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca.encode()).decode()}}],
        "users": [{"name": "meshintercept-cni", "user": {"token": token}}],
        "contexts": [{"name": "meshintercept-cni", "context": {"cluster": "local", "user": "meshintercept-cni"}}],
    }


def _write_kubeconfig(conf_dir: str, doc: dict) -> tuple:
    path = os.path.join(conf_dir, KUBECONFIG_NAME)
    text = json.dumps(doc, indent=2) + "\n"
    if os.path.exists(path) and _read(path) == text:
        return path, None
    conflist.atomic_write(path, text, mode=0o600)
    return path, f"wrote {path}"


# --- the network config -------------------------------------------------------------------
def _original_of(conflist_path: str) -> Optional[str]:
    """The .conf (or .json) this conflist was converted from, if we converted it."""
    stem = conflist_path[: -len(".conflist")] if conflist_path.endswith(".conflist") else None
    if stem is None:
        return None
    for ext in (".conf", ".json"):
        if os.path.exists(stem + ext + BACKUP_SUFFIX):
            return stem + ext
    return None


def _edit_conflist(path: str, text: str, block: dict) -> Optional[str]:
    ours = [e for e in conflist.plugins_array(text).elements if is_ours(e.value)]
    if len(ours) > 1:  # duplicates break some primary plugins (istio#28258): keep one, at the end
        new = conflist.append_plugin(conflist.remove_plugins(text, is_ours), block)
    elif not ours:
        new = conflist.append_plugin(text, block)
    elif ours[0].value != block:
        new = conflist.replace_plugin(text, ours[0], block)
    else:
        new = text
    if new == text:
        return None
    conflist.atomic_write(path, new, like=path)
    return f"updated {path}"


def install(conf_dir: str, bin_dir: str, block: dict, shim: str = "local", python: Optional[str] = None,
            kubeconfig_from_serviceaccount: bool = False, force: bool = False,
            sa_dir: str = SERVICEACCOUNT_DIR, pidfile: Optional[str] = None) -> dict:
    """Idempotent: a second run with the same arguments changes nothing."""
    if shim not in SHIMS:
        raise UsageError(f"shim {shim!r} is not one of {', '.join(SHIMS)}.")
    block = dict(block)
    primary = primary_config(conf_dir)
    text = _read(primary)
    try:
        is_list = conflist.is_conflist_text(text)
        doc = json.loads(text)
    except ValueError:
        raise UsageError(f"{primary} is not valid JSON; fix the primary network config first.") from None
    changes: List[str] = []
    if kubeconfig_from_serviceaccount:
        path, change = _write_kubeconfig(conf_dir, serviceaccount_kubeconfig(sa_dir))
        block.setdefault("kubeconfig", path)
        changes += [change] if change else []
    block = validate_block(block, doc.get("cniVersion", ""), doc.get("name", ""))
    change = _install_shim(bin_dir, shim_text(shim, python, pidfile or default_agent_pidfile()), force)
    changes += [change] if change else []
    if is_list:
        try:
            change = _edit_conflist(primary, text, block)
        except conflist.ConflistError as exc:
            raise UsageError(f"cannot add the plugin to {primary}: {exc}.") from None
        target = primary
    else:
        target = os.path.splitext(primary)[0] + ".conflist"
        if os.path.exists(target):
            raise UsageError(f"{primary} would become {target}, which already exists; merge them by hand first.")
        try:
            new = conflist.conf_to_conflist(text, block)
        except conflist.ConflistError as exc:
            raise UsageError(f"cannot convert {primary}: {exc}.") from None
        conflist.atomic_write(target, new, like=primary)
        os.replace(primary, primary + BACKUP_SUFFIX)
        change = f"converted {primary} to {target} (original kept as {os.path.basename(primary)}{BACKUP_SUFFIX})"
    changes += [change] if change else []
    return {"conflist": target, "plugin": block, "changed": bool(changes), "changes": changes,
            "warnings": _warnings(conf_dir)}


def uninstall(conf_dir: str, bin_dir: str, keep_binary: bool = False) -> dict:
    """Take our plugin out of every network config in conf_dir; idempotent."""
    changes: List[str] = []
    for path in conflist.config_files(conf_dir):
        text = _read(path)
        if not conflist.is_conflist_text(text):
            continue
        if not any(is_ours(e.value) for e in conflist.plugins_array(text).elements):
            continue
        original = _original_of(path)
        if original:
            if os.path.exists(original):  # the primary CNI wrote its .conf again meanwhile: keep that one
                os.unlink(original + BACKUP_SUFFIX)
            else:
                os.replace(original + BACKUP_SUFFIX, original)
            os.unlink(path)
            changes.append(f"restored {original}, removed {path}")
            continue
        conflist.atomic_write(path, conflist.remove_plugins(text, is_ours), like=path)
        changes.append(f"updated {path}")
    kubeconfig = os.path.join(conf_dir, KUBECONFIG_NAME)
    if os.path.exists(kubeconfig):
        os.unlink(kubeconfig)
        changes.append(f"removed {kubeconfig}")
    shim = os.path.join(bin_dir, PLUGIN_TYPE)
    if not keep_binary and _is_our_shim(shim):
        os.unlink(shim)
        changes.append(f"removed {shim}")
    return {"changed": bool(changes), "changes": changes}


def status(conf_dir: str, bin_dir: str) -> dict:
    files = conflist.config_files(conf_dir)
    with_plugin = []
    for path in files:
        with contextlib.suppress(OSError, ValueError, conflist.ConflistError):
            text = _read(path)
            if conflist.is_conflist_text(text):
                with_plugin += [(path, e.value) for e in conflist.plugins_array(text).elements if is_ours(e.value)]
    shim = os.path.join(bin_dir, PLUGIN_TYPE)
    primary = files[0] if files else None
    return {
        "conf_dir": conf_dir, "bin_dir": bin_dir, "primary": primary,
        "installed": any(p == primary for p, _ in with_plugin),
        "plugin": next((v for p, v in with_plugin if p == primary), None),
        "also_in": sorted({p for p, _ in with_plugin if p != primary}),
        "shim": shim if _is_our_shim(shim) else None,
        "kubeconfig": os.path.join(conf_dir, KUBECONFIG_NAME) if os.path.exists(os.path.join(conf_dir, KUBECONFIG_NAME)) else None,
        "warnings": _warnings(conf_dir),
    }


def _warnings(conf_dir: str) -> List[str]:
    # k3s runs its own containerd with its own CNI dirs; /etc/cni/net.d is then never read.
    if os.path.exists(K3S_CONTAINERD_CONFIG) and os.path.abspath(conf_dir) == DEFAULT_CONF_DIR:
        return [f"this looks like a k3s node ({K3S_CONTAINERD_CONFIG} exists): its containerd reads "
                "/var/lib/rancher/k3s/agent/etc/cni/net.d, not /etc/cni/net.d; see docs/cni.md."]
    return []
