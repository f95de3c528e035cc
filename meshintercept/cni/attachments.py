"""Which CNI attachment (network, container id, interface) intercepts which namespace.

DEL may come with an empty CNI_NETNS (the runtime already removed the namespace), and GC
names attachments, not namespaces; this small index, kept in the node's state directory
next to the namespace records, maps one to the other. One JSON file per attachment; every
read-modify-write happens under an flock of its own (taken before the node's state lock,
never after, so the two cannot deadlock).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Optional

from meshintercept.state import dir_lock, load_json_dir, write_json_atomic


@dataclass
class Attachment:
    network: str
    container_id: str
    ifname: str
    netns_path: str
    #: "dev:inode" of the namespace, the node's record key.
    netns_key: str
    mode: str
    pod_namespace: str = ""
    pod_name: str = ""
    added_at: float = field(default_factory=time.time)

    @property
    def ident(self) -> tuple:
        return (self.network, self.container_id, self.ifname)

    @property
    def pod(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else ""


def _digest(network: str, container_id: str, ifname: str) -> str:
    # Container ids are opaque strings to CNI; hash them into a safe file name.
    return hashlib.sha256(f"{network}\0{container_id}\0{ifname}".encode()).hexdigest()[:32]


class AttachmentIndex:
    def __init__(self, state_dir: str):
        self.dir = os.path.join(state_dir, "cni")
        self.att_dir = os.path.join(self.dir, "attachments")

    @contextlib.contextmanager
    def locked(self) -> Iterator["AttachmentIndex"]:
        with dir_lock(self.dir, self.att_dir):
            yield self

    def _file(self, network: str, container_id: str, ifname: str) -> str:
        return os.path.join(self.att_dir, _digest(network, container_id, ifname) + ".json")

    def get(self, network: str, container_id: str, ifname: str) -> Optional[Attachment]:
        try:
            with open(self._file(network, container_id, ifname)) as f:
                return Attachment(**json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return None

    def put(self, att: Attachment) -> None:
        os.makedirs(self.att_dir, exist_ok=True)
        write_json_atomic(self._file(*att.ident), asdict(att))

    def delete(self, att: Attachment) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(*att.ident))

    def all(self) -> List[Attachment]:
        return load_json_dir(self.att_dir, lambda data: Attachment(**data))

    def for_namespace(self, netns_key: str) -> List[Attachment]:
        return [a for a in self.all() if a.netns_key == netns_key]
