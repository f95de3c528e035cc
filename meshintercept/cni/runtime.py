"""A minimal CNI runtime: runs a conflist's plugin chain the way libcni (containerd, CRI-O) does.

Each plugin is exec'd from CNI_PATH by its ``type`` with CNI_COMMAND, CNI_CONTAINERID,
CNI_NETNS, CNI_IFNAME, CNI_ARGS and CNI_PATH in its environment and its config on stdin:
the plugin's object with the list's ``name`` and ``cniVersion`` injected, plus
``prevResult`` (ADD: the previous plugin's output; CHECK and DEL: the cached result of the
whole ADD). DEL runs the chain in reverse. GC passes ``cni.dev/valid-attachments``.

Used by the tests to drive Debian's reference plugins with meshintercept-cni chained after
them, and handy for trying a conflist on a node by hand. ``node_netns`` runs the chain from
inside another network namespace (a simulated node), by setns in the child, so the
bridge the reference plugin creates never appears in the caller's namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from meshintercept.netns import setns_path


class PluginFailed(Exception):
    def __init__(self, plugin: str, command: str, returncode: int, error: dict, stderr: str):
        self.plugin, self.command, self.returncode, self.error, self.stderr = plugin, command, returncode, error, stderr
        super().__init__(f"{plugin} {command} failed ({returncode}): {error or stderr.strip()}")


@dataclass
class Exec:
    """One plugin execution, kept for assertions."""

    plugin: str
    command: str
    env: Dict[str, str]
    stdin: dict
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> Optional[dict]:
        try:
            return json.loads(self.stdout) if self.stdout.strip() else None
        except ValueError:
            return None


@dataclass
class ChainRuntime:
    conflist: dict
    cni_path: Sequence[str]
    node_netns: Optional[str] = None
    extra_env: Dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0
    #: Cached final ADD results by (container id, ifname), as libcni keeps in /var/lib/cni.
    cache: Dict[Tuple[str, str], dict] = field(default_factory=dict)
    history: List[Exec] = field(default_factory=list)

    @property
    def version(self) -> str:
        return self.conflist["cniVersion"]

    def _find(self, plugin_type: str) -> str:
        for directory in self.cni_path:
            path = os.path.join(directory, plugin_type)
            if os.access(path, os.X_OK):
                return path
        raise FileNotFoundError(f"failed to find plugin {plugin_type!r} in path {list(self.cni_path)}")

    def _preexec(self):
        netns = self.node_netns
        if netns is None:
            return None

        def enter():
            setns_path(netns)
        return enter

    def exec_plugin(self, plugin: dict, command: str, env: Dict[str, str], stdin: dict) -> Exec:
        path = self._find(plugin["type"])
        full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **self.extra_env, **env,
                    "CNI_COMMAND": command, "CNI_PATH": ":".join(self.cni_path)}
        proc = subprocess.run([path], input=json.dumps(stdin).encode(), env=full_env, capture_output=True,
                              timeout=self.timeout, preexec_fn=self._preexec())
        done = Exec(plugin["type"], command, full_env, stdin, proc.returncode,
                    proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
        self.history.append(done)
        if proc.returncode != 0:
            raise PluginFailed(plugin["type"], command, proc.returncode, done.output or {}, done.stderr)
        return done

    def plugin_config(self, plugin: dict, prev_result: Optional[dict] = None, **extra) -> dict:
        conf = dict(plugin)
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = self.version
        if prev_result is not None:
            conf["prevResult"] = prev_result
        conf.update(extra)
        return conf

    @staticmethod
    def _env(container_id: str, netns: str, ifname: str, args: str) -> Dict[str, str]:
        return {"CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_ARGS": args}

    def add(self, container_id: str, netns: str, ifname: str = "eth0", args: str = "") -> dict:
        prev = None
        for plugin in self.conflist["plugins"]:
            done = self.exec_plugin(plugin, "ADD", self._env(container_id, netns, ifname, args),
                                    self.plugin_config(plugin, prev))
            prev = done.output
        self.cache[(container_id, ifname)] = prev
        return prev

    def check(self, container_id: str, netns: str, ifname: str = "eth0", args: str = "") -> None:
        cached = self.cache.get((container_id, ifname))
        for plugin in self.conflist["plugins"]:
            self.exec_plugin(plugin, "CHECK", self._env(container_id, netns, ifname, args),
                             self.plugin_config(plugin, cached))

    def delete(self, container_id: str, netns: str, ifname: str = "eth0", args: str = "") -> None:
        for _ in self.delete_steps(container_id, netns, ifname, args):
            pass

    def delete_steps(self, container_id: str, netns: str, ifname: str = "eth0", args: str = ""):
        """DEL one plugin at a time, last plugin first; yields each plugin's type after its DEL,
        so a test can look at the pod between steps (e.g. after the chained plugin's DEL and
        before the bridge plugin takes the interface away)."""
        cached = self.cache.get((container_id, ifname))
        for plugin in reversed(self.conflist["plugins"]):
            self.exec_plugin(plugin, "DEL", self._env(container_id, netns, ifname, args),
                             self.plugin_config(plugin, cached))
            yield plugin["type"]
        self.cache.pop((container_id, ifname), None)

    def gc(self, valid: Sequence[Tuple[str, str]]) -> None:
        attachments = [{"containerID": c, "ifname": i} for c, i in valid]
        for plugin in self.conflist["plugins"]:
            self.exec_plugin(plugin, "GC", {}, self.plugin_config(plugin, None, **{"cni.dev/valid-attachments": attachments}))

    def status(self) -> None:
        for plugin in self.conflist["plugins"]:
            self.exec_plugin(plugin, "STATUS", {}, self.plugin_config(plugin))
