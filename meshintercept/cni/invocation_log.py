"""One JSON line per plugin invocation, appended to the plugin's log file.

Runtimes keep a plugin's stderr only on failure (if at all), so this file is where an
operator sees what the plugin did for each pod: command, container id, namespace, result,
duration. Each line is written with one O_APPEND write, so parallel invocations never
interleave; a log that cannot be written never fails the invocation.
"""

from __future__ import annotations

import json
import os
import sys
import time


def write(path: str, entry: dict) -> None:
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", **entry}
    line = (json.dumps(entry, sort_keys=False, default=str) + "\n").encode()
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        # stderr reaches the runtime's log at best; the CNI result on stdout stays clean.
        print(f"meshintercept-cni: cannot write log {path}: {exc.strerror}", file=sys.stderr)


def read(path: str) -> list:
    """All entries of a log file (for `cni status` and tests); torn lines are skipped."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return out
