"""`doctor` for the ebpf mode: try each thing for real, name the fix of each failure."""

from __future__ import annotations

from typing import List

from meshintercept.interceptor import Check
from meshintercept.node import Node


def run(node: Node) -> List[Check]:
    return []
