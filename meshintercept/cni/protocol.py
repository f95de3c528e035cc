"""The CNI wire protocol as this plugin speaks it: versions, error codes, CNI_ARGS, results.

Errors are `CniError`s carrying one of the spec's codes; `plugin.main` prints them as the
spec's error JSON on stdout and exits non-zero. Nothing here touches the kernel.
"""

from __future__ import annotations

import json
from typing import Dict, Optional

#: Versions this plugin accepts. It targets 1.0.0 and 1.1.0; the 0.3/0.4 versions are accepted
#: too because ADD passes the result through untouched and many nodes (flannel's default
#: conflist among them) still declare 0.3.1.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
#: CHECK appeared in 0.4.0; a plugin must refuse it for older configs.
CHECK_SINCE = ("0.4.0", "1.0.0", "1.1.0")
#: Version used where the runtime did not say (VERSION without input, early errors).
CURRENT_VERSION = "1.1.0"
#: Commands that first appeared in 1.1.0.
COMMANDS_1_1 = ("STATUS", "GC")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

# Error codes from SPEC.md ("Error" section). 100+ are ours.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_ERROR = 5
DECODE_ERROR = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
# Plugin-specific codes.
INTERCEPTION_FAILED = 100  # the backend refused or failed (message says why)
NOT_IN_PLACE = 101  # CHECK: interception missing or different from the config
KUBERNETES_ERROR = 102  # the API said no (auth, bad kubeconfig) - not worth retrying
CONFLICT = 103  # namespace intercepted by another mode / another mesh
NOT_PERMITTED = 104  # not root
BAD_ANNOTATION = 105  # a pod annotation that cannot be honoured (the message names it)


class CniError(Exception):
    """A failure the runtime must see as CNI error JSON."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict:
        out = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def parse_cni_args(text: Optional[str]) -> Dict[str, str]:
    """CNI_ARGS is "K=V;K=V"; kubelet sends IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=.."""
    out: Dict[str, str] = {}
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS item {part!r} is not KEY=VALUE.", f"CNI_ARGS={text}")
        out[key] = value
    return out


def decode_config(raw: bytes) -> dict:
    try:
        conf = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(DECODE_ERROR, "the network configuration on stdin is not valid JSON.", str(exc)) from None
    if not isinstance(conf, dict):
        raise CniError(DECODE_ERROR, "the network configuration on stdin must be a JSON object.")
    return conf


def check_version(conf: dict, command: str) -> str:
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "the network configuration has no cniVersion.")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported; meshintercept-cni speaks {', '.join(SUPPORTED_VERSIONS)}.",
        )
    if command == "CHECK" and version not in CHECK_SINCE:
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK is not defined for cniVersion {version}; it needs 0.4.0 or later.")
    return version


def passthrough_result(conf: dict, version: str) -> dict:
    """What ADD prints: the previous plugin's result unchanged, or a minimal valid result."""
    prev = conf.get("prevResult")
    if isinstance(prev, dict):
        return prev
    # What istio-cni and linkerd-cni print when they run first in a chain.
    return {"cniVersion": version}


def version_info(requested: Optional[str]) -> dict:
    version = requested if requested in SUPPORTED_VERSIONS else CURRENT_VERSION
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
