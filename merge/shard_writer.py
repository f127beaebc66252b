"""Write output shards: read byte ranges, compute, stream the files out, hashing as it goes.

A ShardWriter holds what is worth keeping across the shards of a plan (the arithmetic backend,
job buffers, open input files); the stages themselves are threads (merge/shard_pipeline.py).
The shard header is known from the plan, so output streams tensor by tensor and memory stays at
a few job buffers (MAX_IN_FLIGHT bytes) whatever the shard size. A shard is recorded (size,
sha256, who wrote it) once written, so an interrupted merge resumes after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from chatvec.core.errors import InputError
from chatvec.core.storage import RangeReader, Store
from chatvec.merge import fused
from chatvec.merge.buffer_pool import BufferPool
from chatvec.merge.compute import Scratch
from chatvec.merge.jobs import Job, task_jobs
from chatvec.merge.kernels import make_backend
from chatvec.merge.methods import METHODS, drops
from chatvec.merge.plan import MergePlan
from chatvec.merge.shard_pipeline import run_shards

logger = logging.getLogger(__name__)

RECORDS = ".chatvec/shards"
# input + output job bytes allowed in flight between the stages
MAX_IN_FLIGHT = 96 << 20
# Merges this large load the fused kernels (merge/fused.py): measured, numba's start (0.3 to 0.4
# CPU-seconds from a warm disk cache, nearly all of it holding the GIL, so it runs alone) is won
# back in wall time by the add kernel on about 1 GB of bf16 output (at 0.56 GB it breaks even in
# CPU and loses in wall time), by the TIES kernels (counting passes and the merge) or DARE's
# drop on about 16M entries.
FUSED_MIN_BYTES = 1_000_000_000
FUSED_MIN_COSTLY_ELEMS = 1 << 24


@dataclass
class ShardResult:
    filename: str
    nbytes: int
    sha256: str
    written_by: str = ""  # the worker that wrote the file (see worker_name)


def worker_name(role: str = "in-process") -> str:
    """Who writes a shard, as the manifest records it: role, host and process id."""
    return f"{role} pid {os.getpid()} on {socket.gethostname()}"


class Readers:
    """Each input file opened once per process and kept open across shards."""

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self._open: dict[int, RangeReader] = {}
        self._stores: dict[str, Store] = {}

    def get(self, file: int) -> RangeReader:
        r = self._open.get(file)
        if r is None:
            uri, rel = self.plan.files[file]
            store = self._stores.get(uri) or self._stores.setdefault(uri, Store(uri))
            r = self._open[file] = store.open_reader(rel)
        return r

    def read_inputs(self, job: Job, buf: np.ndarray) -> None:
        """The job's input bytes into the front of `buf`, where compute_job expects them."""
        for r in job.reads:
            self.get(r.file).readinto_at(r.offset, memoryview(buf)[r.at : r.at + r.nbytes])

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()


def _costly(term) -> bool:
    """TIES' threshold passes, and DARE's drop (a hash per entry), cost most in numpy."""
    return METHODS[term.method].whole_tensor or drops(term)


def _worth_the_kernels(plan: MergePlan) -> bool:
    if plan.total_bytes >= FUSED_MIN_BYTES:
        return True
    costly = (t for t in plan.tasks.values() if any(_costly(term) for term in t.terms))
    return sum(t.numel for t in costly) >= FUSED_MIN_COSTLY_ELEMS


def compute_threads(device: str) -> int:
    """Compute threads next to the reader, writer and hasher: one on small machines.

    CHATVEC_COMPUTE_THREADS sets it; else OMP_NUM_THREADS caps it (Ray sets that to an actor's
    CPUs, so actors sharing a node do not oversubscribe it).
    """
    value = os.environ.get("CHATVEC_COMPUTE_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return min(8, int(value))
    if device != "cpu":
        return 1  # the GPU does the arithmetic; one thread keeps its stream busy
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return min(8, int(value))
    return max(1, min(4, (os.cpu_count() or 1) - 3))


class ShardWriter:
    """Writes output shards of one plan in this process; keeps alive across shards what is
    worth keeping: the arithmetic backend, job buffers and the open input files."""

    def __init__(self, plan: MergePlan, device: str = "cpu", threads: int | None = None, worker: str = "") -> None:
        self.plan = plan
        self.worker = worker or worker_name()
        self.backend = make_backend(device)
        self.device = self.backend.name
        self.readers = Readers(plan)
        self.threshold_readers = Readers(plan)  # for the TIES thresholds' own thread
        self.threads = threads or compute_threads(self.device)
        self.scratch = [Scratch(self.backend, self.backend.step) for _ in range(self.threads)]
        if self.scratch[0].fused:
            fused.start(_worth_the_kernels(plan))
        self.pool = self._new_pool()

    def _new_pool(self) -> BufferPool:
        # an ordinary job: JOB_ELEMS elements of every input and of the output, each read aligned
        slab = max((j.in_bytes + j.out_bytes for t in self.plan.tasks.values() for j in task_jobs(t)[:1]), default=0)
        slab = min(slab, MAX_IN_FLIGHT // 4)
        return BufferPool(MAX_IN_FLIGHT, slab, getattr(self.backend, "host_buffer", None))

    def close(self) -> None:
        self.readers.close()
        self.threshold_readers.close()

    def write(self, index: int, store: Store, on_bytes: Callable[[int], None] | None = None) -> ShardResult:
        """Write output shard `index` into `store` and record it."""
        [(_, result)] = list(self.write_many([index], store, on_bytes))
        return result

    def write_many(
        self, indexes: list[int], store: Store, on_bytes: Callable[[int], None] | None = None
    ) -> Iterator[tuple[int, ShardResult]]:
        """Write the shards `indexes` into `store` in order, as one pipeline
        (merge/shard_pipeline.py), and record each; yield each as it is done."""
        if self.pool.closed:  # an earlier error stopped it
            self.pool = self._new_pool()
        fingerprint = self.plan.fingerprint()
        for index, digest in run_shards(self, indexes, store, on_bytes):
            shard = self.plan.shards[index]
            result = ShardResult(shard.filename, shard.nbytes, digest, self.worker)
            record = {**asdict(result), "fingerprint": fingerprint}
            store.write_text(f"{RECORDS}/{shard.filename}.json", json.dumps(record, indent=1))
            yield index, result


def hash_file(store: Store, rel: str, chunk: int = 8 << 20) -> str:
    sha = hashlib.sha256()
    with store.open_reader(rel) as r:
        buf = bytearray(chunk)
        view = memoryview(buf)
        pos = 0
        while pos < r.size:
            n = min(chunk, r.size - pos)
            r.readinto_at(pos, view[:n])
            sha.update(view[:n])
            pos += n
    return sha.hexdigest()


def completed_shards(plan: MergePlan, store: Store) -> dict[int, ShardResult]:
    """Shards already written for this very plan, verified by size and a fresh sha256."""
    if not store.exists(RECORDS):
        return {}
    fingerprint = plan.fingerprint()
    done: dict[int, ShardResult] = {}
    for i, shard in enumerate(plan.shards):
        rel = f"{RECORDS}/{shard.filename}.json"
        if not store.is_file(rel):
            continue
        try:
            record = json.loads(store.read_text(rel))
        except (ValueError, InputError):
            continue
        if record.get("fingerprint") != fingerprint or record.get("nbytes") != shard.nbytes:
            continue
        if store.size(shard.filename) != shard.nbytes:
            continue
        if hash_file(store, shard.filename) != record.get("sha256"):
            logger.warning("%s does not match its record; it will be written again", store.describe(shard.filename))
            continue
        done[i] = ShardResult(shard.filename, shard.nbytes, record["sha256"], str(record.get("written_by", "")))
    return done
