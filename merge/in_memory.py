"""A merge computed in memory, tensor by tensor, for a caller that loads the weights itself
(an inference engine swapping a sweep point's weights in place) instead of reading files.

The bytes are the very ones `chatvec merge` writes for the same plan: the same jobs
(merge/jobs.py), the same arithmetic (merge/compute.py) and the same backend; only the
destination differs (one array per tensor instead of a shard file).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from chatvec.merge import fused
from chatvec.merge.compute import Scratch, compute_job
from chatvec.merge.jobs import task_jobs
from chatvec.merge.kernels import make_backend
from chatvec.merge.plan import MergePlan
from chatvec.merge.safetensors_format import ITEMSIZE
from chatvec.merge.shard_writer import Readers
from chatvec.merge.ties_threshold import attach_thresholds


def merged_tensors(plan: MergePlan, *, device: str = "cpu") -> Iterator[tuple[str, str, tuple[int, ...], np.ndarray]]:
    """(tensor name, safetensors dtype e.g. "BF16", shape, the tensor's bytes as a 1-D np.uint8 array)
    for every tensor of the plan, in the checkpoint's order (shard by shard, tensor by tensor),
    exactly the bytes `chatvec merge` of the same plan writes.

    Each yielded array is new and belongs to the caller. Input files stay open until the
    iterator is exhausted or closed.
    """
    backend = make_backend(device)
    scratch = Scratch(backend, backend.step)
    if scratch.fused:
        fused.start(worth_it=True)  # an in-engine sweep merges many points in one process
    readers, threshold_readers = Readers(plan), Readers(plan)
    buf = np.empty(0, np.uint8)
    try:
        for index in range(len(plan.shards)):
            for task in plan.shard_tasks(index):
                isz = ITEMSIZE[task.dtype]
                out = np.empty(task.nbytes, np.uint8)
                for job in attach_thresholds(task_jobs(task), threshold_readers.read_inputs):
                    if buf.size < job.in_bytes:
                        buf = np.empty(job.in_bytes, np.uint8)
                    readers.read_inputs(job, buf)
                    start = job.start * isz
                    compute_job(backend, job, buf, out[start : start + job.out_bytes], scratch)
                yield task.name, task.dtype, tuple(task.shape), out
    finally:
        readers.close()
        threshold_readers.close()
