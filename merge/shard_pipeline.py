"""The threads that write a run of output shards as one pipeline (merge/shard_writer.py's body).

    reader:   jobs of every shard in order -> job buffers (inputs read into their front)
    compute:  a few threads, each buffer's output bytes after its inputs
    writer:   output bytes into the shard files in order, past the page cache where the
              filesystem allows (core/direct_file.py; else each stretch is handed to the disk
              as it is written, merge/writeback.py); a file is published (renamed) once its
              bytes are all in it, and the next one opened at once
    hasher:   each file's sha256 over the same bytes; gives the buffers back; reports each shard

The stages overlap (preadv, numba or numpy, torch, file writes and hashlib all release the
GIL), and so do the shards: the next shard's reads and arithmetic run while the last one's
tail is still being written and hashed, so the stages never drain between shards. Memory stays
at a few job buffers whatever the shard size.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from chatvec.core.errors import ChatvecError, InputError
from chatvec.core.storage import Store
from chatvec.merge.buffer_pool import Stopped
from chatvec.merge.compute import compute_job
from chatvec.merge.jobs import task_jobs
from chatvec.merge.ties_threshold import attach_thresholds
from chatvec.merge.writeback import Writeback

logger = logging.getLogger(__name__)

_END = object()


def run_shards(
    writer, indexes: list[int], store: Store, on_bytes: Callable[[int], None] | None
) -> Iterator[tuple[int, str]]:
    """Yield (index, sha256 hex digest) for each of the shards `indexes` of writer.plan, in order,
    once its file is published and hashed; raises the first stage's error, leaving no partial file."""
    plan, pool = writer.plan, writer.pool
    shards = [(index, plan.shards[index]) for index in indexes]
    to_compute: queue.Queue = queue.Queue()
    to_hash: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    done: dict[int, tuple] = {}  # seq -> (job, buf), computed and waiting for the writer
    done_cv = threading.Condition()
    errors: list[BaseException] = []
    stop = threading.Event()
    cpu: dict[str, float] = {}  # CPU seconds of each stage's threads, for the log
    jobs_per_shard: list[int] = []
    writing = [shards[0][1].filename if shards else ""]  # for the error message

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        stop.set()
        pool.close()
        with done_cv:
            done_cv.notify_all()

    def clocked(stage: str, loop: Callable[..., None]) -> Callable[..., None]:
        def run(*args) -> None:
            t0 = time.thread_time()
            try:
                loop(*args)
            except Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported by the calling thread
                fail(exc)
            finally:
                with done_cv:
                    cpu[stage] = cpu.get(stage, 0.0) + time.thread_time() - t0

        return run

    # the job lists first: the writer needs each shard's count before the reader gets there
    shard_jobs = [[j for t in plan.shard_tasks(index) for j in task_jobs(t)] for index, _ in shards]
    jobs_per_shard[:] = [len(jobs) for jobs in shard_jobs]

    def read_loop() -> None:
        seq = 0
        try:
            for jobs in shard_jobs:
                for job in attach_thresholds(jobs, writer.threshold_readers.read_inputs):
                    buf = pool.take(job.in_bytes + job.out_bytes)
                    if stop.is_set():
                        return
                    writer.readers.read_inputs(job, buf)
                    to_compute.put((seq, job, buf))
                    seq += 1
        finally:
            for _ in writer.scratch:
                to_compute.put(None)

    def compute_loop(scratch) -> None:
        while not stop.is_set():
            item = to_compute.get()
            if item is None:
                return
            seq, job, buf = item
            # output bytes go after the inputs in the same buffer: one take, one give
            compute_job(writer.backend, job, buf, buf[job.in_bytes : job.in_bytes + job.out_bytes], scratch)
            with done_cv:
                done[seq] = (job, buf)
                done_cv.notify_all()

    def write_loop() -> None:
        seq = 0
        try:
            for (index, shard), count in zip(shards, jobs_per_shard):
                written, writing[0] = 0, shard.filename
                with store.open_writer(shard.filename, direct=True) as fh:
                    writeback = Writeback(fh)
                    fh.write(shard.header)
                    to_hash.put((index, None, shard.header))
                    written += len(shard.header)
                    for _ in range(count):
                        with done_cv:
                            while seq not in done and not stop.is_set():
                                done_cv.wait()
                            if stop.is_set():
                                raise Stopped()
                            job, buf = done.pop(seq)
                        seq += 1
                        fh.write(memoryview(buf)[job.in_bytes : job.in_bytes + job.out_bytes])
                        writeback.wrote(job.out_bytes)
                        to_hash.put((index, job, buf))
                        written += job.out_bytes
                    if written != shard.nbytes:
                        raise RuntimeError(f"{shard.filename}: wrote {written} bytes, planned {shard.nbytes}")
                to_hash.put((index, _END, None))  # published: its hash may be reported
        finally:
            to_hash.put(None)

    def hash_loop() -> None:
        try:
            sha = hashlib.sha256()
            while True:
                item = to_hash.get()
                if item is None:
                    return
                index, job, buf = item
                if job is _END:
                    results.put((index, sha.hexdigest()))
                    sha = hashlib.sha256()
                elif job is None:
                    sha.update(buf)
                    if on_bytes:
                        on_bytes(len(buf))
                else:
                    sha.update(memoryview(buf)[job.in_bytes : job.in_bytes + job.out_bytes])
                    pool.give(buf)
                    if on_bytes:
                        on_bytes(job.out_bytes)
        finally:
            results.put(None)

    threads = [threading.Thread(target=clocked("read", read_loop), name="chatvec-read", daemon=True)]
    threads += [
        threading.Thread(target=clocked("compute", compute_loop), args=(s,), name=f"chatvec-compute-{k}", daemon=True)
        for k, s in enumerate(writer.scratch)
    ]
    threads.append(threading.Thread(target=clocked("write", write_loop), name="chatvec-write", daemon=True))
    threads.append(threading.Thread(target=clocked("hash", hash_loop), name="chatvec-hash", daemon=True))
    started = time.perf_counter()
    for t in threads:
        t.start()
    try:
        while True:
            item = results.get()
            if item is None:
                break
            yield item
    except BaseException as exc:  # Ctrl-C, or the caller stopped early: stop the stages
        fail(exc)
        raise
    finally:
        for t in threads:
            t.join()
        logger.info(
            "%d shard(s) in %.2f s; stages: %s; %d MB of new buffers",
            len(shards),
            time.perf_counter() - started,
            ", ".join(f"{k} {v:.3f} CPU-s" for k, v in cpu.items()),
            pool.allocated >> 20,
        )
        pool.allocated = 0
    if errors:
        err = errors[0]
        if isinstance(err, OSError) and not isinstance(err, ChatvecError):
            raise InputError(f"writing {store.describe(writing[0])} failed: {err}") from err
        raise err
