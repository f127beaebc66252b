"""Start writing an output file's pages to disk while the merge goes on.

Linux keeps written pages in memory until dirty memory passes a threshold (a tenth of the RAM
by default), so without this a merge's output reaches the disk only after the command: all of
it at once, in the user's `sync`, the next fsync, or whenever the kernel gets to it.
sync_file_range(SYNC_FILE_RANGE_WRITE) queues each finished stretch for writing and returns at
once, so the disk works while the merge computes. Linux only; elsewhere this does nothing.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)

STRETCH = 32 << 20  # bytes handed to the disk at a time
_SYNC_FILE_RANGE_WRITE = 2
_call: list = []  # [] not looked up yet; [None] unavailable; [fn]


def _sync_file_range():
    if not _call:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _call.append(fn)
    return _call[0]


class Writeback:
    """Counts the bytes written to a file and queues every STRETCH of them for the disk."""

    def __init__(self, fh) -> None:
        try:
            self.fd = fh.fileno()
        except (AttributeError, OSError, ValueError):  # an object store's stream: nothing to do
            self.fd = -1
        self.fn = _sync_file_range() if self.fd >= 0 else None
        self.written = 0
        self.queued = 0

    def wrote(self, nbytes: int) -> None:
        self.written += nbytes
        if self.fn is not None and self.written - self.queued >= STRETCH:
            # bytes still in the writer's own buffer are not in the range yet: the next call
            # or the final flush takes them
            if self.fn(self.fd, self.queued, self.written - self.queued, _SYNC_FILE_RANGE_WRITE) != 0:
                self.fn = None  # e.g. a filesystem that refuses it: the pages go the usual way
            self.queued = self.written
