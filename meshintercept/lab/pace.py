"""How much slower than native this test machine runs, for the timeouts that bound work.

Timeouts that say how long a batch of work may take (4,000 connections, a transfer) were set
on a native 2-core machine. Under CPU emulation (.ci/kernels boots kernels in qemu without
KVM, where the eBPF suite runs about 10x slower) the same work takes that much longer; the
runner that knows it says so with MESHINTERCEPT_TEST_SLOWDOWN and such timeouts are multiplied
by it. Timeouts that say how late one answer may be (a connect, a log line) are not scaled.
The factor is capped, so a wrong value cannot turn a hang into an hour.
"""

from __future__ import annotations

import os

ENV = "MESHINTERCEPT_TEST_SLOWDOWN"
MAX_SLOWDOWN = 20.0


def slowdown() -> float:
    try:
        value = float(os.environ.get(ENV, "1"))
    except ValueError:
        return 1.0
    return min(max(value, 1.0), MAX_SLOWDOWN)


def scaled(seconds: float) -> float:
    return seconds * slowdown()
