"""Just enough Kubernetes API for pod selection: read a kubeconfig, GET pods, decide.

The plugin runs on the host, exec'd by the container runtime, so it cannot use a pod's
service-account mount; like istio-cni and linkerd-cni it reads a kubeconfig file that the
node agent wrote next to the CNI config. Only the standard library is used (urllib, ssl);
a YAML kubeconfig needs PyYAML (Debian: python3-yaml), a JSON one (what `cni install`
writes) does not.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import List, Optional, Tuple

from meshintercept.cni.config import FALSE_WORDS, TRUE_WORDS, Selection
from meshintercept.state import read_text


class KubeError(Exception):
    """The API could not answer. ``transient`` says whether retrying later may help."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class Endpoint:
    server: str
    token: Optional[str] = None
    ca_file: Optional[str] = None
    ca_data: Optional[bytes] = None
    insecure: bool = False
    client_cert: Optional[str] = None
    client_key: Optional[str] = None
    client_cert_data: Optional[bytes] = None
    client_key_data: Optional[bytes] = None


def _load_document(path: str) -> dict:
    text = read_text(path, KubeError, "kubeconfig")
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            import yaml
        except ImportError:
            raise KubeError(
                f"kubeconfig {path} is YAML and PyYAML is not installed; install python3-yaml or write it as JSON."
            ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise KubeError(f"kubeconfig {path} is neither JSON nor valid YAML: {exc}.") from None
    if not isinstance(doc, dict):
        raise KubeError(f"kubeconfig {path} is not a kubeconfig document.")
    return doc


def _named(doc: dict, kind: str, name: Optional[str]) -> dict:
    items = doc.get(kind) or []
    if name is None and len(items) == 1:
        return items[0].get(kind[:-1]) or {}
    for item in items:
        if item.get("name") == name:
            return item.get(kind[:-1]) or {}
    raise KubeError(f"kubeconfig has no {kind[:-1]} named {name!r}.")


def _path(base: str, value: Optional[str]) -> Optional[str]:
    if not value:
        return None
    return value if os.path.isabs(value) else os.path.join(base, value)


def load_kubeconfig(path: str) -> Endpoint:
    doc = _load_document(path)
    base = os.path.dirname(os.path.abspath(path))
    ctx_name = doc.get("current-context")
    context = _named(doc, "contexts", ctx_name or None)
    cluster = _named(doc, "clusters", context.get("cluster"))
    user = _named(doc, "users", context.get("user")) if (doc.get("users") or context.get("user")) else {}
    server = cluster.get("server")
    if not server:
        raise KubeError(f"kubeconfig {path} names no API server.")
    token = user.get("token")
    token_file = _path(base, user.get("tokenFile"))
    if not token and token_file:
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            raise KubeError(f"cannot read token file {token_file}: {exc.strerror}.") from None
    ca_data = cluster.get("certificate-authority-data")
    return Endpoint(
        server=server.rstrip("/"),
        token=token or None,
        ca_file=_path(base, cluster.get("certificate-authority")),
        ca_data=base64.b64decode(ca_data) if ca_data else None,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        client_cert=_path(base, user.get("client-certificate")),
        client_key=_path(base, user.get("client-key")),
        client_cert_data=_b64(user.get("client-certificate-data")),
        client_key_data=_b64(user.get("client-key-data")),
    )


def _b64(data: Optional[str]) -> Optional[bytes]:
    return base64.b64decode(data) if data else None


def _load_inline_chain(ctx: ssl.SSLContext, cert: bytes, key: Optional[bytes]) -> None:
    """ssl only loads client certificates from files: write inline -data to private temp files."""
    paths = []
    try:
        for blob in (cert, key):
            if blob is None:
                paths.append(None)
                continue
            fd, tmp = tempfile.mkstemp(prefix="meshintercept-kube-")
            paths.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
        ctx.load_cert_chain(paths[0], paths[1])
    finally:
        for tmp in paths:
            if tmp:
                os.unlink(tmp)


class Client:
    def __init__(self, endpoint: Endpoint, timeout: float = 5.0):
        self.endpoint = endpoint
        self.timeout = timeout

    @classmethod
    def from_kubeconfig(cls, path: str, timeout: float = 5.0) -> "Client":
        return cls(load_kubeconfig(path), timeout)

    def _context(self) -> Optional[ssl.SSLContext]:
        ep = self.endpoint
        if not ep.server.startswith("https:"):
            return None
        ctx = ssl.create_default_context(cafile=ep.ca_file, cadata=ep.ca_data.decode() if ep.ca_data else None)
        if ep.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if ep.client_cert:
            ctx.load_cert_chain(ep.client_cert, ep.client_key)
        elif ep.client_cert_data:
            _load_inline_chain(ctx, ep.client_cert_data, ep.client_key_data)
        return ctx

    def get(self, path: str) -> dict:
        req = urllib.request.Request(self.endpoint.server + path, headers={"Accept": "application/json"})
        if self.endpoint.token:
            req.add_header("Authorization", f"Bearer {self.endpoint.token}")
        try:
            context = self._context()
        except (OSError, ValueError) as exc:
            raise KubeError(f"cannot set up TLS to {self.endpoint.server} from the kubeconfig: {exc}.") from None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=context) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            transient = exc.code in (429,) or exc.code >= 500
            hint = " (give the node agent's service account get/list on pods)" if exc.code in (401, 403) else ""
            raise KubeError(f"Kubernetes API answered {exc.code} for GET {path}{hint}.", transient) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KubeError(f"Kubernetes API {self.endpoint.server} unreachable: {reason}.", transient=True) from None
        except ValueError:
            raise KubeError(f"Kubernetes API sent a non-JSON answer for GET {path}.", transient=True) from None

    def pod(self, namespace: str, name: str) -> dict:
        q = urllib.parse.quote
        return self.get(f"/api/v1/namespaces/{q(namespace, safe='')}/pods/{q(name, safe='')}")

    def pods_on_node(self, node_name: Optional[str]) -> List[dict]:
        path = "/api/v1/pods"
        if node_name:
            path += "?" + urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={node_name}"})
        return list(self.get(path).get("items") or [])


def pod_ips(pod: dict) -> List[str]:
    status = pod.get("status") or {}
    ips = [p.get("ip") for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return ips


def pod_asks(pod: dict, key: str) -> Optional[bool]:
    """True/False when the pod's annotation (first) or label says so, None when silent."""
    meta = pod.get("metadata") or {}
    for source in (meta.get("annotations") or {}, meta.get("labels") or {}):
        value = source.get(key)
        if value is None:
            continue
        word = str(value).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    return None


def decide_for_pod(selection: Selection, pod: dict) -> Tuple[bool, str]:
    meta = pod.get("metadata") or {}
    if meta.get("namespace") in selection.excluded_namespaces:
        return False, f"namespace {meta.get('namespace')} is excluded"
    if (pod.get("spec") or {}).get("hostNetwork"):
        return False, "pod uses the host network"
    asks = pod_asks(pod, selection.key)
    if asks is True:
        return True, f"pod asks for it ({selection.key})"
    if asks is False:
        return False, f"pod refuses it ({selection.key})"
    if selection.mode == "all":
        return True, "every pod is intercepted"
    return False, f"pod does not ask for it ({selection.key}) and pod_selection is opt-in"


def decide(selection: Selection, pod_namespace: str, pod_name: str) -> Tuple[bool, str, Optional[dict]]:
    """Should the pod the runtime names be intercepted? Returns (yes, why, pod object or None).

    Raises KubeError when the API is configured but cannot answer: guessing would either
    leave a pod that asked for the mesh unprotected or intercept one that refused it.
    """
    if pod_namespace and pod_namespace in selection.excluded_namespaces:
        return False, f"namespace {pod_namespace} is excluded", None
    if not selection.kubeconfig:
        return True, "every pod is intercepted", None
    if not pod_name or not pod_namespace:
        if selection.mode == "all":
            return True, "no pod name in CNI_ARGS; every pod is intercepted", None
        return False, "no pod name in CNI_ARGS and pod_selection is opt-in", None
    pod = Client.from_kubeconfig(selection.kubeconfig, selection.api_timeout).pod(pod_namespace, pod_name)
    yes, why = decide_for_pod(selection, pod)
    return yes, why, pod
