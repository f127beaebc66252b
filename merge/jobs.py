"""Cut a tensor task into jobs: element ranges of the output with the byte ranges they read.

A job is at most JOB_ELEMS output elements (a few MB per input), so memory stays bounded
whatever the tensor size. TIES' trim threshold is a statistic of the whole tensor: it is found
first, in a streaming pass (merge/ties_threshold.py), and handed to the tensor's jobs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from chatvec.merge.kernels import dare_key
from chatvec.merge.methods import METHODS
from chatvec.merge.plan import Segment, Source, TensorTask, Term
from chatvec.merge.safetensors_format import ITEMSIZE

JOB_ELEMS = 1 << 21
_ALIGN = 64


@dataclass
class Read:
    file: int
    offset: int
    nbytes: int
    at: int  # position in the job buffer


@dataclass
class Piece:
    """Output elements [out, out+n) of the job; their source bytes at `at` (and `base_at`)."""

    out: int
    n: int
    at: int
    dtype: str
    base_at: int = -1
    base_dtype: str = ""
    index: int = 0  # element index in the source tensor (for DARE)


@dataclass
class TermJob:
    term: Term
    pieces: list[Piece]
    key: int = 0
    index: int = 0  # of the term in task.terms


@dataclass
class Job:
    task: TensorTask
    start: int
    n: int
    cp: Piece | None
    terms: list[TermJob]
    raws: list[Piece]
    reads: list[Read] = field(default_factory=list)
    in_bytes: int = 0
    # has a whole-tensor term (TIES; in mergekit mode with rescale, dare too): needs `thresholds`
    # (with their `scales`) before computing
    whole: bool = False
    elects: bool = False  # has terms combined by sign election (ties, dare_ties)
    # term index -> TIES trim threshold (None: keep all), the same for every job of the tensor
    thresholds: dict[int, float | None] | None = None

    @property
    def scales(self) -> dict[int, float | None]:
        """term index -> mergekit's L1 rescale factor (merge/gta_stats.py), found with the thresholds."""
        return getattr(self.thresholds, "scales", None) or {}

    @property
    def out_bytes(self) -> int:
        return self.n * ITEMSIZE[self.task.dtype]


class _Layout:
    """Where each read lands in the job buffer (one buffer per job: inputs first, output after)."""

    def __init__(self) -> None:
        self.reads: list[Read] = []
        self.size = 0
        self._seen: dict[tuple[int, int, int], int] = {}

    def add(self, src: Source, elem: int, n: int) -> int:
        itemsize = ITEMSIZE[src.dtype]
        key = (src.file, src.offset + elem * itemsize, n * itemsize)
        if key in self._seen:  # e.g. two vectors over the same base model: read it once
            return self._seen[key]
        at = self._seen[key] = self.size
        self.reads.append(Read(*key, at))
        self.size += -(-(n * itemsize) // _ALIGN) * _ALIGN
        return at


def _overlaps(segments: list[Segment], starts: list[int], lo: int, hi: int):
    i = max(0, bisect.bisect_right(starts, lo) - 1)
    while i < len(segments) and segments[i].out < hi:
        s = segments[i]
        a, b = max(lo, s.out), min(hi, s.out + s.n)
        if a < b:
            yield s, a, b
        i += 1


def task_jobs(task: TensorTask) -> list[Job]:
    numel = task.numel
    whole = any(METHODS[t.method].whole_tensor for t in task.terms)
    if task.mergekit is not None and task.mergekit.rescale:
        # mergekit's L1 rescale of dare's kept entries is a whole-tensor statistic too
        whole = whole or any(METHODS[t.method].random_drop and 0.0 < t.density < 1.0 for t in task.terms)
    elects = any(METHODS[t.method].sign_election for t in task.terms)
    step = JOB_ELEMS
    term_starts = [[s.out for s in t.segments] for t in task.terms]
    raw_starts = [[s.out for s in r.segments] for r in task.raw]
    keys = [dare_key(t.seed, task.name, t.vector) if METHODS[t.method].random_drop else 0 for t in task.terms]
    jobs = []
    for lo in range(0, max(numel, 1), max(step, 1)):
        hi = min(numel, lo + step)
        layout = _Layout()
        cp = None
        if task.cp is not None and lo < task.cp.numel:
            n = min(hi, task.cp.numel) - lo
            cp = Piece(0, n, layout.add(task.cp, lo, n), task.cp.dtype)
        terms = []
        for index, (term, starts, key) in enumerate(zip(task.terms, term_starts, keys)):
            pieces = []
            for s, a, b in _overlaps(term.segments, starts, lo, hi):
                chat_elem = s.chat + (a - s.out)
                p = Piece(a - lo, b - a, layout.add(term.chat, chat_elem, b - a), term.chat.dtype, index=chat_elem)
                if term.base is not None:
                    p.base_at = layout.add(term.base, s.base + (a - s.out), b - a)
                    p.base_dtype = term.base.dtype
                pieces.append(p)
            if pieces or elects:
                terms.append(TermJob(term, pieces, key, index))
        raws = []
        for raw, starts in zip(task.raw, raw_starts):
            for s, a, b in _overlaps(raw.segments, starts, lo, hi):
                raws.append(Piece(a - lo, b - a, layout.add(raw.source, s.chat + (a - s.out), b - a), raw.source.dtype))
        jobs.append(Job(task, lo, hi - lo, cp, terms, raws, layout.reads, layout.size, whole, elects))
    return jobs
