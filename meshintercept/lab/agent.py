"""The node agent (deploy/entrypoint.sh) run with its defaults against a lab node and a CNI
config dir of its own, as the DaemonSet runs it on a node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "deploy")


def start_agent(node, workdir: str, timeout: float = 60) -> subprocess.Popen:
    """Start the entrypoint; returns once it has written its PID file (it then takes the node
    over from an earlier build, installs the plugin and repairs)."""
    conf_dir = os.path.join(workdir, "net.d")
    os.makedirs(conf_dir, exist_ok=True)
    conflist = os.path.join(conf_dir, "10-k8s.conflist")
    if not os.path.exists(conflist):
        with open(conflist, "w") as f:
            json.dump({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "ptp"}]}, f)
    with open(os.path.join(workdir, "plugin.json"), "w") as f:
        json.dump({"mode": "iptables"}, f)
    pidfile = os.path.join(workdir, "agent.pid")
    env = node.cli_env(
        PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"],
        MESHINTERCEPT_CNI_CONF_DIR=conf_dir, MESHINTERCEPT_CNI_BIN_DIR=os.path.join(workdir, "bin"),
        MESHINTERCEPT_PLUGIN_CONF=os.path.join(workdir, "plugin.json"),
        MESHINTERCEPT_AGENT_PIDFILE=pidfile)
    agent = subprocess.Popen(["sh", os.path.join(DEPLOY, "entrypoint.sh")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(pidfile):
        if agent.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the agent did not start: {agent.stdout.read() if agent.poll() is not None else ''}")
        time.sleep(0.05)
    return agent


def wait_ready(agent: subprocess.Popen, timeout: float = 120) -> str:
    """Read the agent's output until it says it is ready; returns what it said."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = agent.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "meshintercept-agent: ready" in line:
            return "".join(lines)
    raise RuntimeError("the agent never became ready: " + "".join(lines))


def stop_agent(agent: subprocess.Popen, timeout: float = 60) -> str:
    """SIGTERM, as a rolling upgrade does; returns the rest of what it printed."""
    agent.send_signal(signal.SIGTERM)
    out, _ = agent.communicate(timeout=timeout)
    if agent.returncode != 0:
        raise RuntimeError(f"the agent exited {agent.returncode}: {out}")
    return out
