"""deploy/Dockerfile built with podman from a local Debian base, and run the way
deploy/daemonset.yaml runs it (the lab side of tests/test_image.py).

* The base is the minbase tarball .ci/fresh-rootfs caches (``$MI_CI_CACHE``), imported once, or
  one made with mmdebstrap: no registry is needed, only Debian's and PyPI's mirrors for the
  build's RUN steps.
* The image is tagged by a hash of everything the Dockerfile copies (read from its COPY lines),
  the Dockerfile, its ignore file and the base, so a rerun with the same sources builds nothing.
* Every podman call reads a containers.conf of the test's own (``CONTAINERS_CONF``): the
  machine's podman configuration is never changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(REPO, "deploy", "Dockerfile")
IGNOREFILE = os.path.join(REPO, "deploy", "Dockerfile.dockerignore")
DAEMONSET = os.path.join(REPO, "deploy", "daemonset.yaml")
IMAGE = "localhost/meshintercept-test"
BASE = "localhost/meshintercept-test-base"
BASE_TARBALL = os.path.join(os.environ.get("MI_CI_CACHE") or "/var/cache/meshintercept-ci", "bookworm-minbase.tar")
OWNER_LABEL = "io.meshintercept.test-owner"
KEEP_IMAGES = 3
BUILD_TIMEOUT = 1800
# crun refuses to run containers on a machine whose cgroup v2 tree sits beside v1 controllers.
HYBRID_CGROUPS = os.path.ismount("/sys/fs/cgroup/unified")


def unavailable() -> Optional[str]:
    if not shutil.which("podman"):
        return "podman is not installed (apt-get install podman): the image test builds and runs deploy/Dockerfile with it"
    if HYBRID_CGROUPS and not shutil.which("runc"):
        return "cgroups are hybrid (v1 and v2) here, where crun cannot run containers: install runc (apt-get install runc)"
    if not os.path.exists(BASE_TARBALL) and not shutil.which("mmdebstrap"):
        return f"no Debian base for the image: neither {BASE_TARBALL} nor mmdebstrap (apt-get install mmdebstrap)"
    return None


def cni_backend_missing() -> Optional[str]:
    """podman 5 (Debian 13) has only netavark, which cannot run a CNI conflist."""
    out = subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout
    version = out.split()[-1] if out.split() else "0"
    if int(version.split(".")[0] or 0) >= 5:
        return f"podman {version} has no CNI network backend (dropped in podman 5) to start a pod through the conflist"
    return None


def write_containers_conf(path: str, cni_conf_dir: Optional[str] = None, cni_bin_dirs: Sequence[str] = ()) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # podman asks for nofile/nproc limits of 1048576 for root's containers; without
    # CAP_SYS_RESOURCE (a sandboxed machine) the runtime fails to set them.
    lines = ["[containers]", f'default_ulimits = ["nofile={soft}:{hard}", "nproc=4096:4096"]']
    if HYBRID_CGROUPS:
        lines += ["[engine]", 'runtime = "runc"']
    if cni_conf_dir:
        # The CNI backend (not netavark) is what runs a conflist, meshintercept-cni included.
        lines += ["[network]", 'network_backend = "cni"', f"cni_plugin_dirs = {json.dumps(list(cni_bin_dirs))}",
                  f"network_config_dir = {json.dumps(cni_conf_dir)}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Podman:
    """``podman ARGS`` with the test's containers.conf, optionally from another network namespace."""

    def __init__(self, conf: str):
        self.conf = conf

    def __call__(self, *args: str, check: bool = True, timeout: float = 180, netns: Optional[str] = None,
                 **kw) -> subprocess.CompletedProcess:
        argv = ["podman", *args]
        if netns:  # only the network namespace: mounts podman makes must be the host's
            argv = ["nsenter", f"--net={netns}", *argv]
        kw.setdefault("capture_output", True)
        proc = subprocess.run(argv, env=dict(os.environ, CONTAINERS_CONF=self.conf), text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args[:2])} failed (exit {proc.returncode}): {proc.stderr or proc.stdout}")
        return proc

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def remove_containers(self, names: Sequence[str], netns: Optional[str] = None) -> None:
        for name in names:
            self("rm", "--force", "--time", "0", name, check=False, netns=netns, timeout=120)

    def sweep(self, prefix: str) -> None:
        """Containers of earlier runs with this prefix whose test process is gone."""
        listed = self("ps", "--all", "--filter", f"label={OWNER_LABEL}", "--format", "json", check=False)
        for c in json.loads(listed.stdout or "[]"):
            name, owner = c["Names"][0], (c.get("Labels") or {}).get(OWNER_LABEL, "")
            if name.startswith(prefix + "-") and owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
                self.remove_containers([name])


def cgroup_parent(cgroup: str) -> str:
    """``--cgroup-parent`` that puts a container under the cgroup-v2 directory ``cgroup``."""
    root = cgroup
    while not os.path.ismount(root):
        root = os.path.dirname(root)
    return "/" + os.path.relpath(cgroup, root)


#: Where podman (cgroupfs manager) puts what it runs without --cgroup-parent: the image build,
#: one-off runs. It makes the directory in every hierarchy and never removes it.
DEFAULT_PARENT = "/libpod_parent"


def _cgroup_roots() -> List[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")]


def default_parents() -> List[str]:
    """Podman's default parent cgroup in each hierarchy, where it exists now."""
    return [root + DEFAULT_PARENT for root in _cgroup_roots() if os.path.isdir(root + DEFAULT_PARENT)]


def remove_default_parents(existed: Sequence[str]) -> None:
    """Remove the default parents podman made since ``existed`` was taken, once they are empty
    (their conmon cgroups first)."""
    for path in default_parents():
        if path in existed:
            continue
        for leftover in sorted((d for d, _, _ in os.walk(path)), key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(leftover)


def remove_parent_cgroups(parent: str, keep: str) -> None:
    """What podman leaves of a --cgroup-parent once its containers are gone: conmon's cgroup,
    and with cgroup v1 the parent in every v1 hierarchy (``keep``, the v2 one, is the lab's)."""
    for root in _cgroup_roots():
        path = root + parent
        for leftover in (os.path.join(path, "conmon"), path if path != keep else None):
            if leftover and os.path.isdir(leftover):
                with contextlib.suppress(OSError):
                    os.rmdir(leftover)


# --- the image ----------------------------------------------------------------------------
def copied_sources(dockerfile: str) -> List[str]:
    """The build-context paths the Dockerfile's COPY lines take (not --from another stage)."""
    sources = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        words = line.split()
        if words and words[0].upper() == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def content_hash(base_id: str) -> str:
    digest = hashlib.sha256(base_id.encode())
    with open(DOCKERFILE, "rb") as f:
        dockerfile = f.read()
    with open(IGNOREFILE, "rb") as f:
        digest.update(dockerfile + f.read())
    files = []
    for source in copied_sources(dockerfile.decode()):
        top = os.path.join(REPO, source)
        if os.path.isfile(top):
            files.append(source)
        for root, dirs, names in os.walk(top):
            # What the ignore file leaves out: caches a test run writes must not change the hash.
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.endswith(".egg-info"))
            files += [os.path.relpath(os.path.join(root, n), REPO) for n in names if not n.endswith(".pyc")]
    for rel in sorted(files):
        with open(os.path.join(REPO, rel), "rb") as f:
            digest.update(rel.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]


def ensure_base(podman: Podman) -> str:
    if os.path.exists(BASE_TARBALL):
        st = os.stat(BASE_TARBALL)
        tag = f"{BASE}:bookworm-{hashlib.sha256(f'{st.st_size}-{st.st_mtime_ns}'.encode()).hexdigest()[:12]}"
        if not podman.exists(tag):
            podman("import", "--message", f"{BASE_TARBALL} (mmdebstrap minbase)", BASE_TARBALL, tag, timeout=600)
        return tag
    tag = f"{BASE}:bookworm-mmdebstrap"
    if not podman.exists(tag):
        with tempfile.TemporaryDirectory(prefix="mi-image-base-") as tmp:
            tarball = os.path.join(tmp, "base.tar")
            subprocess.run(["mmdebstrap", "--variant=minbase", "--include=ca-certificates", "bookworm", tarball],
                           check=True, capture_output=True, timeout=1200)
            podman("import", "--message", "mmdebstrap --variant=minbase bookworm", tarball, tag, timeout=600)
    return tag


@contextlib.contextmanager
def _build_lock():
    os.makedirs("/run/lock", exist_ok=True)
    with open("/run/lock/meshintercept-test-image.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # parallel runs wait for one build instead of doing two
        yield


def ensure_image(podman: Podman, log_path: str) -> Dict[str, object]:
    """The image for the current sources: {"image", "built" (bool), "seconds"}."""
    started = time.monotonic()
    with _build_lock():
        base = ensure_base(podman)
        base_id = podman("image", "inspect", "--format", "{{.Id}}", base).stdout.strip()
        tag = f"{IMAGE}:{content_hash(base_id)}"
        if podman.exists(tag):
            return {"image": tag, "built": False, "seconds": time.monotonic() - started}
        # Host network: RUN steps reach the mirrors directly, and podman adds no bridge or NAT
        # rules to the machine for them.
        args = ["build", "--file", DOCKERFILE, "--ignorefile", IGNOREFILE, "--network", "host", "--layers",
                "--build-arg", f"BASE={base}", "--tag", tag]
        cert = os.environ.get("PIP_CERT")
        if cert and os.path.isfile(cert):  # a TLS-intercepting proxy's CA, as .ci/fresh-rootfs passes it on
            args += ["--secret", f"id=pip-cert,src={cert}"]
        with open(log_path, "w") as log:
            proc = podman(*args, REPO, check=False, timeout=BUILD_TIMEOUT, capture_output=False,
                          stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            with open(log_path) as f:
                tail = "".join(f.readlines()[-30:])
            raise AssertionError(f"podman build failed (exit {proc.returncode}); the end of {log_path}:\n{tail}")
        _prune(podman, keep=tag)
    return {"image": tag, "built": True, "seconds": time.monotonic() - started}


def _prune(podman: Podman, keep: str) -> None:
    """Only the newest few test images stay; one a container still uses is kept by podman."""
    listed = podman("images", "--filter", f"reference={IMAGE}", "--format", "json", check=False)
    images = sorted(json.loads(listed.stdout or "[]"), key=lambda i: i.get("Created", 0), reverse=True)
    # An image with two tags is listed once per tag, each time with both names.
    tags = list(dict.fromkeys(t for i in images for t in i.get("Names") or [] if t.startswith(IMAGE + ":")
                              and t != keep))
    for tag in tags[KEEP_IMAGES - 1:]:
        podman("rmi", tag, check=False)


# --- the DaemonSet's container -------------------------------------------------------------
def _manifest(kind: str) -> dict:
    with open(DAEMONSET) as f:
        return next(d for d in yaml.safe_load_all(f) if d and d["kind"] == kind)


def daemonset_plugin_block() -> dict:
    """The ConfigMap's plugin.json."""
    return json.loads(_manifest("ConfigMap")["data"]["plugin.json"])


def daemonset_agent() -> tuple:
    """(pod spec, the agent container) of the DaemonSet."""
    spec = _manifest("DaemonSet")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def daemonset_run_args(host_paths: Dict[str, str], env: Dict[str, str]) -> List[str]:
    """``podman run`` options for the DaemonSet's agent container: its privileges, namespaces,
    every volumeMount (``host_paths``: volume name -> the test's stand-in for a hostPath or the
    ConfigMap) and its env, with ``env`` overriding (the downward API's NODE_NAME included)."""
    spec, container = daemonset_agent()
    args = []
    if spec.get("hostNetwork"):
        args += ["--network", "host"]
    if spec.get("hostPID"):
        args += ["--pid", "host"]
    if (container.get("securityContext") or {}).get("privileged"):
        args.append("--privileged")
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container["volumeMounts"]:
        name = mount["name"]
        source = host_paths.get(name) or volumes[name]["hostPath"]["path"]
        options = ["ro"] if mount.get("readOnly") else []
        propagation = {"HostToContainer": "rslave", "Bidirectional": "rshared"}.get(mount.get("mountPropagation"))
        options += [propagation] if propagation else []
        args += ["--volume", f"{source}:{mount['mountPath']}" + (":" + ",".join(options) if options else "")]
    values = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    values.update(env)
    for key, value in values.items():
        args += ["--env", f"{key}={value}"]
    return args
