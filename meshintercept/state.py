"""The node's record of managed namespaces: one JSON file per namespace, under a lock.

The kernel holds the truth of what is applied (rules, map entries); this record holds what
the kernel cannot tell us: which namespace path and name a cookie belongs to, which mode
enabled it, and the spec that was asked for. CNI invocations run in parallel, so every
read-modify-write happens under an flock on the state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

from meshintercept.spec import InterceptSpec

RECORD_VERSION = 1


@contextlib.contextmanager
def dir_lock(directory: str, *make: str) -> Iterator[None]:
    """Hold an exclusive flock on ``directory``/lock (creating it and the ``make`` dirs first).

    CNI invocations and CLI commands run in parallel; every read-modify-write of a state
    directory happens under its lock."""
    for d in (directory, *make):
        os.makedirs(d, exist_ok=True)
    fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_text(path: str, error: type, what: str) -> str:
    """A whole file, or ``error`` saying in one sentence that ``what`` at ``path`` cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}.") from None


def write_json_atomic(path: str, data: dict) -> None:
    """Write a JSON file so a reader never sees half of it (temp file + rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def load_json_dir(directory: str, build) -> list:
    """``build(data)`` for every ``*.json`` in a directory, sorted by name.

    A torn or foreign file is skipped: one bad file must not break status, DEL or GC.
    """
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                out.append(build(json.load(f)))
        except (OSError, ValueError, TypeError):
            continue
    return out


@dataclass
class NamespaceRecord:
    key: str  # "dev:inode" of the namespace file
    ref: str  # what the user gave (name, path, pid:N)
    path: str  # resolved nsfs path
    name: str
    mode: str
    spec: InterceptSpec
    enabled_at: float = field(default_factory=time.time)
    #: Backend-owned facts (netns cookie, pod IPs, tc ifindexes, ...).
    extra: dict = field(default_factory=dict)
    #: Where settings came from, by spec field ("CNI config", "annotation <name>"); empty for
    #: the command line.
    sources: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        data["version"] = RECORD_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "NamespaceRecord":
        data = dict(data)
        data.pop("version", None)
        data["spec"] = InterceptSpec.from_dict(data["spec"])
        return cls(**data)


class StateStore:
    def __init__(self, state_dir: str):
        self.dir = state_dir
        self.ns_dir = os.path.join(state_dir, "namespaces")

    @contextlib.contextmanager
    def locked(self) -> Iterator["StateStore"]:
        with dir_lock(self.dir, self.ns_dir):
            yield self

    def _file(self, key: str) -> str:
        return os.path.join(self.ns_dir, key.replace(":", "_") + ".json")

    def get(self, key: str) -> Optional[NamespaceRecord]:
        try:
            with open(self._file(key)) as f:
                return NamespaceRecord.from_dict(json.load(f))
        except FileNotFoundError:
            return None

    def find(self, ref_or_path: str) -> Optional[NamespaceRecord]:
        """Find a record by what the user typed, for namespaces that no longer exist."""
        for rec in self.all():
            if ref_or_path in (rec.ref, rec.path, rec.name):
                return rec
        return None

    def put(self, record: NamespaceRecord) -> None:
        os.makedirs(self.ns_dir, exist_ok=True)
        write_json_atomic(self._file(record.key), record.to_dict())

    def delete(self, key: str) -> bool:
        try:
            os.unlink(self._file(key))
            return True
        except FileNotFoundError:
            return False

    def all(self) -> list:
        return load_json_dir(self.ns_dir, NamespaceRecord.from_dict)

    def remove_all(self) -> None:
        for rec in self.all():
            self.delete(rec.key)
        for leftover in ("lock",):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dir, leftover))
        for d in (self.ns_dir, self.dir):
            with contextlib.suppress(OSError):
                os.rmdir(d)
