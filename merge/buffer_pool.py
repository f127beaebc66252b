"""Job buffers reused across jobs and shards, under a budget of bytes in flight.

Every buffer is at least one slab (the plan's largest ordinary job), so any free buffer fits
any ordinary job and the pool settles on a few buffers for the whole merge. Fresh memory is
dear: the kernel zeroes each new page on first touch (on a VM the host may fault it in too),
and a pool that kept buffers of every size it met allocated twice its budget on a 300M merge.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np


class Stopped(Exception):
    """The pool was closed while a stage waited for a buffer."""


class BufferPool:
    def __init__(self, budget: int, slab: int = 0, alloc: Callable[[int], np.ndarray] | None = None) -> None:
        self.budget = budget
        self.slab = slab
        self.alloc = alloc or (lambda n: np.empty(n, np.uint8))
        self.used = 0  # bytes of the buffers handed out
        self.free: list[np.ndarray] = []
        self.cond = threading.Condition()
        self.closed = False
        self.allocated = 0  # bytes ever allocated (for the stage log)

    def take(self, nbytes: int) -> np.ndarray:
        with self.cond:
            best = self._fit(nbytes)
            size = self.free[best].size if best is not None else max(nbytes, self.slab, 1)
            # one oversized job (a whole TIES tensor) may run alone
            while self.used and self.used + size > self.budget and not self.closed:
                self.cond.wait()
                best = self._fit(nbytes)
                size = self.free[best].size if best is not None else max(nbytes, self.slab, 1)
            if self.closed:
                raise Stopped()
            self.used += size
            if best is not None:
                return self.free.pop(best)
            self.allocated += size
        return self.alloc(size)

    def _fit(self, nbytes: int) -> int | None:
        best = None
        for i, b in enumerate(self.free):
            if b.size >= nbytes and (best is None or b.size < self.free[best].size):
                best = i
        return best

    def give(self, buf: np.ndarray) -> None:
        with self.cond:
            self.used -= buf.size
            # keep at most a budget's worth of buffers, in use and idle together
            if self.used + buf.size + sum(b.size for b in self.free) <= self.budget:
                self.free.append(buf)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
