"""An earlier build of meshintercept, taken from the repository's history, to upgrade from.

Upgrade tests need what a node really holds after an older agent ran: its programs, maps and
records. The newest commit whose eBPF layout is the one asked for is exported with
``git archive`` and installed with ``pip --target`` (no network, no build isolation: this
venv's setuptools builds it); it runs as ``python -m meshintercept`` with that directory first
on PYTHONPATH, so its modules and its entry points win over this checkout's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TYPES = "backends/ebpf/types.py"


class NoPreviousBuild(Exception):
    """The history to build from is not here (no git, a shallow clone, an export)."""


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise NoPreviousBuild("git is not installed") from None
    if proc.returncode != 0:
        raise NoPreviousBuild(f"git {' '.join(args[:2])} failed: {proc.stderr.strip()[:200]}")
    return proc.stdout


def commit_with_layout(layout: int) -> str:
    """The newest commit whose eBPF layout version is ``layout``."""
    if not os.path.exists(os.path.join(REPO, ".git")):  # a directory in a clone, a file in a worktree
        raise NoPreviousBuild(f"{REPO} is not a git clone")
    wanted = re.compile(rf"^LAYOUT_VERSION = {layout}$", re.M)
    for commit in _git("log", "--format=%H", "--", TYPES).split():
        try:
            text = _git("show", f"{commit}:{TYPES}")
        except NoPreviousBuild:
            continue  # the file did not exist there
        if wanted.search(text):
            return commit
    raise NoPreviousBuild(f"no commit in the history has eBPF layout {layout}")


class PreviousBuild:
    def __init__(self, commit: str, target: str):
        self.commit = commit
        self.target = target

    @classmethod
    def install(cls, layout: int, workdir: Optional[str] = None) -> "PreviousBuild":
        commit = commit_with_layout(layout)
        workdir = workdir or tempfile.mkdtemp(prefix="mi-previous-")
        src, target = os.path.join(workdir, "src"), os.path.join(workdir, "site")
        os.makedirs(src, exist_ok=True)
        archive = subprocess.run(["git", "-C", REPO, "archive", commit], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                               "--no-build-isolation", "--target", target, src], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip could not install commit {commit[:12]}: {proc.stderr[-800:]}")
        shutil.rmtree(src, ignore_errors=True)
        return cls(commit, target)

    def run(self, args: List[str], env: Dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        """``meshintercept ARGS`` of the earlier build."""
        env = dict(env, PYTHONPATH=self.target + os.pathsep + env.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-m", "meshintercept", *args], env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.target)

    def remove(self) -> None:
        shutil.rmtree(os.path.dirname(self.target), ignore_errors=True)
