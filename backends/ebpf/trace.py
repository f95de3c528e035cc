"""Structured decision events from the programs (ring buffer), and the trace_pipe helper.

Programs write events only for namespaces whose config has the debug flag (`enable
--debug`, switchable at runtime by enabling again without it), so tracing costs nothing
where it is off.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Dict, Iterator, Optional

from . import types as T
from meshintercept.errors import BackendFailure, EnvironmentMissing
from meshintercept.node import Node

from .pins import NodePins
from .ringbuf import RingBuffer

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def decode(raw: bytes, names: Optional[Dict[int, str]] = None) -> dict:
    ev = T.Event.from_buffer_copy(raw[:ctypes.sizeof(T.Event)])
    names = names or {}
    return {
        "ts_ns": ev.ts_ns,
        "namespace": names.get(ev.netns, f"cookie:{ev.netns}"),
        "netns_cookie": ev.netns,
        "event": T.EVENT_KINDS.get(ev.kind, str(ev.kind)),
        "pid": ev.pid,
        "uid": ev.uid,
        "src": T.endpoint_text(ev.src_ip, ev.src_port) if not T.is_zero(ev.src_ip) else None,
        "dst": T.endpoint_text(ev.dst_ip, ev.dst_port) if not T.is_zero(ev.dst_ip) else None,
        "to": T.endpoint_text(ev.new_ip, ev.new_port) if ev.new_port and not T.is_zero(ev.new_ip) else
        (f":{ev.new_port}" if ev.new_port else None),
        "reason": T.REASONS.get(ev.reason, str(ev.reason)) if ev.reason else "",
        "proto": T.PROTOCOLS.get(ev.proto),
    }


def format_line(event: dict) -> str:
    parts = [event["namespace"], event["event"]]
    if event.get("proto") and event["event"].startswith("dns"):  # DNS goes both ways; the rest is TCP
        parts.append(event["proto"])
    if event["src"]:
        parts.append(f"src={event['src']}")
    if event["dst"]:
        parts.append(f"dst={event['dst']}")
    if event["to"]:
        parts.append(f"-> {event['to']}")
    if event["pid"]:
        parts.append(f"pid={event['pid']} uid={event['uid']}")
    if event["reason"]:
        parts.append(f"({event['reason']})")
    return " ".join(parts)


def stream(node: Node, names: Optional[Dict[int, str]] = None, cookie: Optional[int] = None,
           duration: Optional[float] = None, limit: Optional[int] = None) -> Iterator[dict]:
    """Yield decoded events as they come (optionally for one netns cookie)."""
    pins = NodePins(node.pin_dir)
    if not pins.loaded():
        raise BackendFailure(f"no ebpf programs are loaded on this node ({node.pin_dir}); enable a namespace first.")
    ring = RingBuffer(pins.map("events"))
    deadline = time.monotonic() + duration if duration is not None else None
    pending: list = []
    seen = 0
    try:
        while True:
            timeout = None
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
            ring.poll(pending.append, timeout=min(timeout, 0.5) if timeout is not None else 0.5)
            for raw in pending:
                event = decode(raw, names)
                if cookie is None or event["netns_cookie"] == cookie:
                    yield event
                    seen += 1
                    if limit is not None and seen >= limit:
                        return
            pending.clear()
            if deadline is not None and time.monotonic() >= deadline:
                return
    finally:
        ring.close()
        pins.close()


def tracefs() -> str:
    """Where trace_pipe is; mounts tracefs when nothing is mounted."""
    for path in TRACEFS_CANDIDATES:
        if os.path.exists(os.path.join(path, "trace_pipe")):
            return path
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    for path, fstype in (("/sys/kernel/tracing", b"tracefs"), ("/sys/kernel/debug", b"debugfs")):
        if os.path.isdir(path) and libc.mount(fstype, path.encode(), fstype, 0, None) == 0:
            for candidate in TRACEFS_CANDIDATES:
                if os.path.exists(os.path.join(candidate, "trace_pipe")):
                    return candidate
    raise EnvironmentMissing(
        "tracefs is not mounted and could not be mounted; run 'mount -t tracefs tracefs /sys/kernel/tracing'."
    )
