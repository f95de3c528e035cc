"""CLI cold start: how long ``meshintercept --help`` and ``status`` take from exec to exit.

Timed with hyperfine when it is installed (else a plain loop), against an empty node so only
start-up is measured; ``python -c pass`` is the interpreter's own floor. ``-X importtime``
names the modules that cost the most to import, the usual cause of a slow CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from bench.control import cli_argv

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "meshintercept --help": cli_argv("--help"),
    "meshintercept status": cli_argv("status"),
    "meshintercept status --json": cli_argv("status", "--json"),
}


def _loop(argv: List[str], runs: int, env: dict) -> List[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return times


def _hyperfine(cmds: Dict[str, List[str]], runs: int, env: dict) -> Dict[str, List[float]]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = ["hyperfine", "-N", "--warmup", "3", "--runs", str(runs), "--export-json", out.name, "--style", "none"]
        for name, cmd in cmds.items():
            argv += ["-n", name, " ".join(cmd)]
        subprocess.run(argv, env=env, check=True, capture_output=True)
        data = json.load(open(out.name))
    return {r["command"]: r["times"] for r in data["results"]}


ENABLE_PATH = ("import meshintercept.cli, meshintercept.manager; from meshintercept import registry; "
               "registry.load('iptables'); registry.load('nftables'); registry.load('ebpf'); "
               "from meshintercept.backends.iptables import iptc_compat; iptc_compat.load(); "
               "from meshintercept.backends.nftables import lib; lib.preload(); "
               # what ebpf enable imports (pyroute2 no more: tc goes over raw rtnetlink)
               "from meshintercept.backends.ebpf import interceptor, maps, pins, tc, tcnl")


def import_profile(code: str = "import meshintercept.cli", top: int = 12, depth: int = 2) -> List[Dict]:
    """Modules with the largest cumulative import time for ``code`` (python -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append({"module": m.group(4), "self_us": int(m.group(1)), "cumulative_us": int(m.group(2)),
                         "depth": len(m.group(3)) // 2})
    total = sum(r["cumulative_us"] for r in rows if r["depth"] == 0)
    rows = [r for r in rows if r["depth"] <= depth]
    rows.sort(key=lambda r: -r["cumulative_us"])
    return [{"total_us": total}] + rows[:top]


def run(runs: int = 20, log=print) -> Dict:
    state = tempfile.mkdtemp(prefix="mi-b-bench-")
    env = dict(os.environ, MESHINTERCEPT_STATE_DIR=state, MESHINTERCEPT_PIN_DIR=os.path.join(state, "pins"))
    try:
        tool = "hyperfine" if shutil.which("hyperfine") else "loop"
        if tool == "hyperfine":
            times = _hyperfine(COMMANDS, runs, env)
        else:
            times = {name: _loop(cmd, runs, env) for name, cmd in COMMANDS.items()}
    finally:
        shutil.rmtree(state, ignore_errors=True)
    out = {"tool": tool, "runs": runs, "commands": {}}
    for name, ts in times.items():
        out["commands"][name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "times": ts}
        log(f"  {name:32} median {statistics.median(ts) * 1000:7.1f} ms  min {min(ts) * 1000:7.1f} ms")
    out["imports"] = import_profile()
    # What an 'enable' may import on top of the CLI: each backend and its libraries.
    out["imports_enable"] = import_profile(ENABLE_PATH, top=14, depth=1)
    return out
