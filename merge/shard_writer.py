"""Write one output shard: read byte ranges, compute, stream the file out, hashing as it goes.

The stages overlap in threads (preadv, numpy, torch, file writes and hashlib all release the
GIL): a reader fills job buffers, a small pool of compute threads turns them into output
bytes, a writer puts them in the file in order and a hasher computes the shard's sha256 next to
it. The shard header is known from the plan, so output streams tensor by tensor and memory
stays at a few job buffers (MAX_IN_FLIGHT bytes) whatever the shard size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from chatvec.core.errors import ChatvecError, InputError
from chatvec.core.storage import RangeReader, Store
from chatvec.merge.compute import Scratch, compute_job
from chatvec.merge.fused import warm_up
from chatvec.merge.jobs import Job, task_jobs
from chatvec.merge.kernels import make_backend
from chatvec.merge.methods import METHODS, drops
from chatvec.merge.plan import MergePlan
from chatvec.merge.ties_threshold import attach_thresholds

logger = logging.getLogger(__name__)

RECORDS = ".chatvec/shards"
# input + output job bytes allowed in flight between the stages
MAX_IN_FLIGHT = 96 << 20
# Merges this large load the fused kernels (merge/fused.py): measured, numba's import and code
# load cost about 0.4 CPU-seconds, what the add kernel saves on roughly 1 GB of bf16 output, and
# what the TIES kernels (counting passes and the merge) or DARE's drop save on about 16M entries.
FUSED_MIN_BYTES = 1_000_000_000
FUSED_MIN_COSTLY_ELEMS = 1 << 24
_DONE = object()


@dataclass
class ShardResult:
    filename: str
    nbytes: int
    sha256: str
    written_by: str = ""  # the worker that wrote the file (see worker_name)


def worker_name(role: str = "in-process") -> str:
    """Who writes a shard, as the manifest records it: role, host and process id."""
    return f"{role} pid {os.getpid()} on {socket.gethostname()}"


class _Pool:
    """Reusable byte buffers under a budget of bytes in flight."""

    def __init__(self, budget: int, alloc: Callable[[int], np.ndarray] | None = None) -> None:
        self.budget = budget
        self.alloc = alloc or (lambda n: np.empty(n, np.uint8))
        self.used = 0
        self.free: list[np.ndarray] = []
        self.cond = threading.Condition()
        self.closed = False

    def take(self, nbytes: int) -> np.ndarray:
        with self.cond:
            # one oversized job (a whole TIES tensor) may run alone
            while self.used and self.used + nbytes > self.budget and not self.closed:
                self.cond.wait()
            if self.closed:
                raise _Stopped()
            self.used += nbytes
            best = None
            for i, b in enumerate(self.free):
                if b.size >= nbytes and (best is None or b.size < self.free[best].size):
                    best = i
            if best is not None:
                return self.free.pop(best)
        return self.alloc(max(nbytes, 1))

    def give(self, buf: np.ndarray, nbytes: int) -> None:
        with self.cond:
            self.used -= nbytes
            # keep at most a budget's worth of idle buffers
            if buf.size + sum(b.size for b in self.free) <= self.budget:
                self.free.append(buf)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class _Stopped(Exception):
    pass


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
        self.pool = self._new_pool()
        self.threads = threads or compute_threads(self.device)
        self.scratch = [Scratch(self.backend, self.backend.step) for _ in range(self.threads)]
        if self.scratch[0].fused and _worth_the_kernels(plan):
            warm_up()

    def _new_pool(self) -> _Pool:
        return _Pool(MAX_IN_FLIGHT, getattr(self.backend, "host_buffer", None))

    def close(self) -> None:
        self.readers.close()
        self.threshold_readers.close()

    def write(self, index: int, store: Store, on_bytes: Callable[[int], None] | None = None) -> ShardResult:
        """Write output shard `index` into `store` and record it (see the module docstring)."""
        plan = self.plan
        shard = plan.shards[index]
        jobs = [j for t in plan.shard_tasks(index) for j in task_jobs(t)]
        if self.pool.closed:
            self.pool = self._new_pool()
        pool = self.pool
        to_compute: queue.Queue = queue.Queue()
        to_hash: queue.Queue = queue.Queue()
        done: dict[int, tuple] = {}
        done_cv = threading.Condition()
        errors: list[BaseException] = []
        stop = threading.Event()
        sha = hashlib.sha256()
        written = [0]

        def fail(exc: BaseException) -> None:
            errors.append(exc)
            stop.set()
            pool.close()
            with done_cv:
                done_cv.notify_all()

        def read_loop() -> None:
            try:
                for seq, job in enumerate(attach_thresholds(jobs, self.threshold_readers.read_inputs)):
                    buf = pool.take(job.in_bytes + job.out_bytes)
                    if stop.is_set():
                        break
                    self.readers.read_inputs(job, buf)
                    to_compute.put((seq, job, buf))
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported by the calling thread
                fail(exc)
            finally:
                for _ in range(self.threads):
                    to_compute.put(None)

        def compute_loop(scratch: Scratch) -> None:
            try:
                while not stop.is_set():
                    item = to_compute.get()
                    if item is None:
                        break
                    seq, job, buf = item
                    # output bytes go after the inputs in the same buffer: one take, one give
                    compute_job(self.backend, job, buf, buf[job.in_bytes : job.in_bytes + job.out_bytes], scratch)
                    with done_cv:
                        done[seq] = (job, buf)
                        done_cv.notify_all()
            except BaseException as exc:  # noqa: BLE001
                fail(exc)

        def write_loop() -> None:
            try:
                with store.open_writer(shard.filename) as fh:
                    fh.write(shard.header)
                    to_hash.put((None, shard.header))
                    for seq in range(len(jobs)):
                        with done_cv:
                            while seq not in done and not stop.is_set():
                                done_cv.wait()
                            if stop.is_set():
                                raise _Stopped()
                            job, buf = done.pop(seq)
                        view = memoryview(buf)[job.in_bytes : job.in_bytes + job.out_bytes]
                        fh.write(view)
                        to_hash.put((job, buf))
                    to_hash.put(_DONE)
                    hasher.join()
                    if stop.is_set():
                        raise _Stopped()
                    if written[0] != shard.nbytes:
                        raise RuntimeError(f"{shard.filename}: wrote {written[0]} bytes, planned {shard.nbytes}")
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001
                fail(exc)
            finally:
                to_hash.put(_DONE)

        def hash_loop() -> None:
            while True:
                item = to_hash.get()
                if item is _DONE:
                    return
                job, buf = item
                if job is None:
                    data, n = buf, len(buf)
                else:
                    data, n = memoryview(buf)[job.in_bytes : job.in_bytes + job.out_bytes], job.out_bytes
                sha.update(data)
                written[0] += n
                if job is not None:
                    pool.give(buf, job.in_bytes + job.out_bytes)
                if on_bytes and n:
                    on_bytes(n)

        hasher = threading.Thread(target=hash_loop, name="chatvec-hash", daemon=True)
        threads = [threading.Thread(target=read_loop, name="chatvec-read", daemon=True)]
        threads += [
            threading.Thread(target=compute_loop, args=(scratch,), name=f"chatvec-compute-{k}", daemon=True)
            for k, scratch in enumerate(self.scratch)
        ]
        threads.append(threading.Thread(target=write_loop, name="chatvec-write", daemon=True))
        hasher.start()
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException as exc:  # Ctrl-C: stop the stages, leave no partial file
            fail(exc)
            for t in threads:
                t.join()
        hasher.join()
        if errors:
            self.pool = self._new_pool()
            err = errors[0]
            if isinstance(err, ChatvecError):
                raise err
            if isinstance(err, OSError):
                raise InputError(f"writing {store.describe(shard.filename)} failed: {err}") from err
            raise err
        result = ShardResult(shard.filename, shard.nbytes, sha.hexdigest(), self.worker)
        record = {**asdict(result), "fingerprint": plan.fingerprint()}
        store.write_text(f"{RECORDS}/{shard.filename}.json", json.dumps(record, indent=1))
        return result


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
