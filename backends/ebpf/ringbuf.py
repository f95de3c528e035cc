"""Read a pinned BPF ring buffer from Python: mmap + epoll, no bcc, no libbpf.

Layout (kernel/bpf/ringbuf.c): page 0 = consumer position (we write it), page 1 = producer
position, then the data area mapped twice so records never wrap. Each record starts with
an 8-byte header: u32 length (bit 31 busy, bit 30 discarded) and u32 page offset; records
are 8-byte aligned.
"""

from __future__ import annotations

import mmap
import select
import struct
from typing import Callable, Optional

from . import bpfsys

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8


class RingBuffer:
    def __init__(self, map_fd: int):
        info = bpfsys.map_info(map_fd)
        if info["type"] != bpfsys.BPF_MAP_TYPE_RINGBUF:
            raise ValueError("not a ring buffer map")
        self.size = info["max_entries"]
        self.mask = self.size - 1
        page = mmap.PAGESIZE
        self.consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.producer = mmap.mmap(map_fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.page = page
        self.epoll = select.epoll()
        self.epoll.register(map_fd, select.EPOLLIN)

    def close(self) -> None:
        self.epoll.close()
        self.consumer.close()
        self.producer.close()

    def _pos(self, m: mmap.mmap) -> int:
        return struct.unpack_from("=Q", m, 0)[0]

    def consume(self, callback: Callable[[bytes], None]) -> int:
        """Hand every complete record to callback; return how many."""
        count = 0
        cons = self._pos(self.consumer)
        while True:
            prod = self._pos(self.producer)
            if cons >= prod:
                return count
            offset = self.page + (cons & self.mask)
            length = struct.unpack_from("=I", self.producer, offset)[0]
            if length & BUSY:
                return count
            data_len = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                start = offset + HDR
                callback(bytes(self.producer[start:start + data_len]))
                count += 1
            cons += (data_len + HDR + 7) & ~7
            struct.pack_into("=Q", self.consumer, 0, cons)

    def poll(self, callback: Callable[[bytes], None], timeout: Optional[float] = None) -> int:
        got = self.consume(callback)
        if got:
            return got
        self.epoll.poll(-1 if timeout is None else timeout)
        return self.consume(callback)
