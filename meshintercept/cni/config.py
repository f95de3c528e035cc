"""The plugin's block in a conflist, validated into a `PluginConfig`.

The block carries the same interception fields and defaults as ``meshintercept enable``
(mode, proxy_uid, outbound_port, ...), the node options (cgroup, pin_dir, state_dir; the
``MESHINTERCEPT_*`` environment fills what the block leaves out), where to log, and which
pods to intercept. Example, chained after the node's own plugins::

    {"type": "meshintercept-cni", "mode": "iptables", "exclude_outbound_ports": [22],
     "pod_selection": "opt-in", "kubeconfig": "/etc/cni/net.d/meshintercept-cni-kubeconfig"}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Optional, Tuple

from meshintercept import registry
from meshintercept.cni.protocol import INVALID_CONFIG, UNSUPPORTED_FIELD, CniError
from meshintercept.errors import MeshInterceptError
from meshintercept.node import Node
from meshintercept.spec import InterceptSpec

PLUGIN_TYPE = "meshintercept-cni"
DEFAULT_MODE = "iptables"
DEFAULT_LOG_FILE = "/var/log/meshintercept-cni.log"
#: Annotation (checked first) and label that ask for, or refuse, interception of a pod.
DEFAULT_SELECTOR_KEY = "meshintercept.io/intercept"
SELECTIONS = ("all", "opt-in")
TRUE_WORDS = ("true", "enabled", "yes", "on", "1")
FALSE_WORDS = ("false", "disabled", "no", "off", "0")

SPEC_FIELDS = tuple(f.name for f in fields(InterceptSpec))
NODE_FIELDS = ("cgroup", "pin_dir", "state_dir", "tc_attach")
OWN_FIELDS = (
    ("mode", "log_file", "kubeconfig", "pod_selection", "selector_key", "excluded_namespaces", "api_timeout")
    + SPEC_FIELDS + NODE_FIELDS
)
#: Keys a runtime puts into every plugin's config (SPEC.md "Plugin configuration objects").
RUNTIME_FIELDS = ("cniVersion", "name", "type", "args", "prevResult", "runtimeConfig", "capabilities")


@dataclass(frozen=True)
class Selection:
    """Which pods to intercept; see `kube.decide`."""

    mode: str = "all"
    kubeconfig: Optional[str] = None
    key: str = DEFAULT_SELECTOR_KEY
    excluded_namespaces: Tuple[str, ...] = ()
    api_timeout: float = 5.0


@dataclass(frozen=True)
class PluginConfig:
    network: str
    mode: str
    spec: InterceptSpec
    node: Node
    log_file: str
    selection: Selection = field(default_factory=Selection)


def default_log_file() -> str:
    return os.environ.get("MESHINTERCEPT_CNI_LOG_FILE") or DEFAULT_LOG_FILE


def log_file_of(conf: dict) -> str:
    value = conf.get("log_file")
    return value if isinstance(value, str) and value else default_log_file()


def check_fields(conf: dict) -> None:
    unknown = sorted(
        k for k in conf if k not in OWN_FIELDS and k not in RUNTIME_FIELDS and not k.startswith("cni.dev/")
    )
    if unknown:
        hints = [f"{k} (did you mean {k.replace('-', '_')}?)" if k.replace("-", "_") in OWN_FIELDS else k for k in unknown]
        raise CniError(
            UNSUPPORTED_FIELD,
            f"unknown field(s) in the meshintercept-cni config: {', '.join(hints)}.",
            "known fields: " + ", ".join(OWN_FIELDS),
        )


def node_of(conf: dict) -> Node:
    for key in NODE_FIELDS:
        if key in conf and not isinstance(conf[key], str):
            raise CniError(INVALID_CONFIG, f"{key} must be a path string, not {conf[key]!r}.")
    return Node.from_options(conf.get("cgroup"), conf.get("pin_dir"), conf.get("state_dir"), conf.get("tc_attach"))


def _selection(conf: dict) -> Selection:
    mode = conf.get("pod_selection", "all")
    if mode not in SELECTIONS:
        raise CniError(INVALID_CONFIG, f"pod_selection {mode!r} is not one of {', '.join(SELECTIONS)}.")
    kubeconfig = conf.get("kubeconfig") or None
    if kubeconfig is not None and not isinstance(kubeconfig, str):
        raise CniError(INVALID_CONFIG, "kubeconfig must be the path of a kubeconfig file.")
    if mode == "opt-in" and not kubeconfig:
        raise CniError(
            INVALID_CONFIG,
            "pod_selection opt-in needs a kubeconfig to read pod annotations; set \"kubeconfig\" in the plugin config.",
        )
    key = conf.get("selector_key", DEFAULT_SELECTOR_KEY)
    if not isinstance(key, str) or not key:
        raise CniError(INVALID_CONFIG, "selector_key must be an annotation/label name.")
    excluded = conf.get("excluded_namespaces", [])
    if isinstance(excluded, str):
        excluded = [s.strip() for s in excluded.split(",") if s.strip()]
    if not isinstance(excluded, list) or not all(isinstance(s, str) for s in excluded):
        raise CniError(INVALID_CONFIG, "excluded_namespaces must be a list of Kubernetes namespace names.")
    timeout = conf.get("api_timeout", 5.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
        raise CniError(INVALID_CONFIG, f"api_timeout {timeout!r} must be a number of seconds between 0 and 60.")
    return Selection(mode, kubeconfig, key, tuple(excluded), float(timeout))


def parse(conf: dict) -> PluginConfig:
    """Validate the whole block; raise CniError (code 2 or 7) naming the first bad field."""
    check_fields(conf)
    mode = conf.get("mode") or os.environ.get("MESHINTERCEPT_MODE") or DEFAULT_MODE
    known = registry.names()
    if mode not in known:
        raise CniError(INVALID_CONFIG, f"unknown mode {mode!r}; available modes: {', '.join(known) or 'none'}.")
    for flag in ("debug", "accelerate"):
        if flag in conf and not isinstance(conf[flag], bool):
            raise CniError(INVALID_CONFIG, f"{flag} must be true or false, not {conf[flag]!r}.")
    try:
        spec = InterceptSpec.build(**{k: conf[k] for k in SPEC_FIELDS if conf.get(k) is not None})
    except MeshInterceptError as exc:
        raise CniError(INVALID_CONFIG, exc.message) from None
    log_file = conf.get("log_file", default_log_file())
    if not isinstance(log_file, str) or not log_file:
        raise CniError(INVALID_CONFIG, "log_file must be a path.")
    name = conf.get("name") if isinstance(conf.get("name"), str) else ""
    return PluginConfig(name, mode, spec, node_of(conf), log_file, _selection(conf))
