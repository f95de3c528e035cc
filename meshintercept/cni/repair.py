"""Find running pod namespaces that should be intercepted and are not, and fix them.

Pods that started before the plugin was in the node's conflist (a new or rebooted node, the
agent down during an upgrade, the primary CNI rewriting its config) never saw our ADD and
run unintercepted: the top complaint about every mesh CNI (istio#11037, kuma#4560,
linkerd#11073). `plan` lists every candidate with what should happen; `apply` does it.

Candidates are the named namespaces under /var/run/netns (containerd and CRI-O pin pod
namespaces there) and the namespaces of running processes (/proc/*/ns/net, for runtimes that
do not pin, e.g. cri-dockerd), one per namespace inode, never the host's own. Which of them
are pods that want interception:

* with a kubeconfig: the pods the API lists on this node are matched to namespaces by pod
  IP, and the plugin config's pod selection (annotation/label, excluded namespaces) decides;
* without: namespaces whose name matches one of the ``match`` globs (default ``cni-*``, what
  containerd names pod namespaces), all intercepted (pod_selection "all").

Records of namespaces that no longer exist are forgotten too (what GC would do).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from meshintercept.cni import kube
from meshintercept.cni.config import PluginConfig
from meshintercept.cni import annotations
from meshintercept.cni.namespaces import compare
from meshintercept.errors import MeshInterceptError
from meshintercept.manager import Manager
from meshintercept.netns import NETNS_RUN_DIR, Netns, list_named, pod_addresses
from meshintercept.spec import InterceptSpec

DEFAULT_MATCH = ("cni-*",)

NONE, ENABLE, REAPPLY, FORGET, CONFLICT, REFUSED = "none", "enable", "re-enable", "forget", "conflict", "refused"


@dataclass
class Candidate:
    namespace: str
    path: str
    ref: str
    key: str
    source: str  # "named", "process" or "record"
    pod: str = ""
    want: bool = False
    why: str = ""
    problems: List[str] = field(default_factory=list)
    action: str = NONE
    result: str = ""
    #: The mode and spec this namespace should have: the config's, with the pod's annotations.
    mode: str = ""
    spec: Optional[dict] = None
    sources: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _netns_of_processes(skip_keys: set) -> List[Netns]:
    """One Netns per network namespace of a running process, lowest PID first (the pod's
    infra/pause process usually), excluding ``skip_keys``."""
    out, seen = [], set(skip_keys)
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for pid in pids:
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        key = f"{st.st_dev}:{st.st_ino}"
        if key in seen:
            continue
        seen.add(key)
        try:
            out.append(Netns.parse(f"pid:{pid}"))
        except MeshInterceptError:
            continue
    return out


def _host_keys() -> set:
    keys = set()
    for path in ("/proc/1/ns/net", "/proc/self/ns/net"):
        try:
            st = os.stat(path)
            keys.add(f"{st.st_dev}:{st.st_ino}")
        except OSError:
            pass
    return keys


def discover(include_processes: bool = True) -> List[Netns]:
    host = _host_keys()
    named = [n for n in list_named() if n.key not in host]
    if not include_processes:
        return named
    return named + _netns_of_processes(host | {n.key for n in named})


def _pods_by_ip(selection, node_name: Optional[str]) -> Dict[str, dict]:
    client = kube.Client.from_kubeconfig(selection.kubeconfig, selection.api_timeout)
    out = {}
    for pod in client.pods_on_node(node_name):
        if (pod.get("spec") or {}).get("hostNetwork"):
            continue  # shares the node's namespace; never ours to intercept
        for ip in kube.pod_ips(pod):
            out[ip] = pod
    return out


def _pod_name(pod: dict) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def plan(manager: Manager, cfg: PluginConfig, match: Optional[Sequence[str]] = None,
         node_name: Optional[str] = None, include_processes: bool = True) -> List[Candidate]:
    """What repair would do, changing nothing. Raises kube.KubeError when the API cannot answer.

    ``match`` (globs on the namespace name) narrows the candidates; without a kubeconfig it
    is what makes a namespace a pod, and defaults to DEFAULT_MATCH.
    """
    selection = cfg.selection
    pods = _pods_by_ip(selection, node_name) if selection.kubeconfig else None
    if pods is None and not match:
        match = DEFAULT_MATCH
    out: List[Candidate] = []
    for netns in discover(include_processes):
        if match and not any(fnmatch.fnmatchcase(netns.name, m) for m in match):
            continue
        source = "named" if netns.path.startswith(NETNS_RUN_DIR + "/") else "process"
        cand = Candidate(netns.name, netns.path, netns.ref, netns.key, source)
        if pods is not None:
            pod = next((pods[a[2]] for a in pod_addresses(netns) if a[2] in pods), None)
            if pod is None:
                continue  # not a pod of this node (or not one the API knows)
            cand.pod = _pod_name(pod)
            cand.want, cand.why = kube.decide_for_pod(selection, pod)
        else:
            cand.want, cand.why = True, f"name matches {', '.join(match)}"
        if cand.want:
            try:
                spec, cand.mode, cand.sources = annotations.apply(pod if pods is not None else None, cfg.spec,
                                                                  cfg.mode)
            except annotations.AnnotationError as exc:
                cand.problems, cand.action = [exc.message], REFUSED
                out.append(cand)
                continue
            cand.spec = spec.to_dict()
            problems, _live = compare(manager, netns, cand.mode, spec)
            record = manager.record(netns)
            cand.problems = problems
            if not problems:
                cand.action = NONE
            elif record is None:
                cand.action = ENABLE
            elif record.mode != cand.mode:
                cand.action = CONFLICT
            else:
                cand.action = REAPPLY
        out.append(cand)
    for record in manager.records():
        if manager.live_netns(record) is None:
            out.append(Candidate(record.name, record.path, record.ref, record.key, "record",
                                 why="namespace no longer exists", action=FORGET))
    return out


def apply(manager: Manager, cfg: PluginConfig, candidates: List[Candidate]) -> List[Candidate]:
    """Carry out each candidate's action; a failure is noted on the candidate, never raised."""
    for cand in candidates:
        try:
            if cand.action in (ENABLE, REAPPLY):
                # Enable is atomic and replaces a drifted or different setup of the same mode.
                manager.enable(cand.ref, cand.mode, InterceptSpec.from_dict(cand.spec), sources=cand.sources)
                cand.result = "fixed"
            elif cand.action == REFUSED:
                cand.result = "left alone (a pod annotation cannot be honoured)"
            elif cand.action == FORGET:
                manager.forget(cand.key)
                cand.result = "forgotten"
            elif cand.action == CONFLICT:
                cand.result = "left alone (another mode; disable it first)"
        except MeshInterceptError as exc:
            cand.result = f"failed: {exc.message}"
    return candidates
