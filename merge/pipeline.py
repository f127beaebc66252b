"""The merge, as one sequence whoever runs the shards: check, lock, resume, write shards, commit.

    1. check:  the output already holds this plan (same fingerprint): a cache hit, nothing is
               written, not even the lock; something else: refused unless `overwrite`
    2. lock:   .chatvec/lock.json (core/lock.py), with the TTL merge.lock_ttl_s; the check is
               made again under the lock, and `overwrite` removes the old commit only there
    3. resume: shards an interrupted run wrote and recorded, verified by size and sha256
    4. write:  the remaining shards, by a ShardExecutor (in this process, or on Ray actors)
    5. clean:  temporary files of writes that were killed half-way
    6. commit: side files, index, manifest (merge/output.py), if the lock is still ours

The validation and the plan come before (merge/plan.py): a plan is valid by construction.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Protocol

from chatvec.core.lock import DEFAULT_TTL_S, OutputLock
from chatvec.core.storage import Store
from chatvec.merge.output import MergeSummary, check_output, commit
from chatvec.merge.plan import MergePlan
from chatvec.merge.shard_writer import ShardResult, ShardWriter, completed_shards

logger = logging.getLogger(__name__)

_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}$")


class ShardExecutor(Protocol):
    """Writes output shards of a plan into the output store, wherever it runs them."""

    def write_shards(self, pending: list[int], on_bytes: Callable[[int], None]) -> Iterator[tuple[int, ShardResult]]:
        """Write the shards `pending` (indexes into plan.shards); yield each as it is done, in
        any order. `on_bytes(n)` reports n more bytes written, for the progress bar."""
        ...

    def devices(self) -> list[str]:
        """The devices the shards were computed on (for the summary)."""
        ...

    def close(self) -> None:
        """Free what write_shards started (threads, actors); called even after an error."""
        ...


class LocalShardExecutor:
    """Shards one after the other in this process, as one pipeline of threads
    (merge/shard_pipeline.py)."""

    def __init__(self, plan: MergePlan, out: Store, device: str = "cpu") -> None:
        self.plan, self.out, self.device = plan, out, device
        self.writer: ShardWriter | None = None

    def write_shards(self, pending: list[int], on_bytes: Callable[[int], None]) -> Iterator[tuple[int, ShardResult]]:
        self.writer = ShardWriter(self.plan, self.device)
        yield from self.writer.write_many(pending, self.out, on_bytes)

    def devices(self) -> list[str]:
        return [self.writer.device] if self.writer is not None else []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def drop_temporary_files(store: Store) -> None:
    """Delete temporary shard files left by writes killed half-way. Only local stores have
    them (an object store never shows an upload that did not finish), and nothing else writes
    here while the lock is held."""
    if not store.local:
        return
    for rel in store.list():
        if _TEMPORARY.search(rel):
            logger.info("removing %s, left by an interrupted write", store.describe(rel))
            store.delete(rel)


def run_merge(
    plan: MergePlan,
    out: Store,
    make_executor: Callable[[], ShardExecutor],
    *,
    overwrite: bool = False,
    lock_ttl_s: float = DEFAULT_TTL_S,
    progress: bool = True,
) -> MergeSummary:
    """Merge `plan` into `out` (see the module docstring). `make_executor` is called only when
    there are shards to write, so a cache hit or a full resume starts no worker."""
    started = time.perf_counter()
    out_uri = out.describe()

    def cached() -> MergeSummary:
        logger.info("%s already holds this merge (same recipe and inputs); nothing to do", out_uri)
        return MergeSummary(out_uri, plan.total_bytes, time.perf_counter() - started, 0, 0, True, "none")

    # A cached merge is answered before anything is written, the lock included.
    if not overwrite and check_output(plan, out, overwrite=False) is not None:
        return cached()
    with OutputLock(out, ttl_s=lock_ttl_s, purpose="merge") as lock:
        if check_output(plan, out, overwrite=overwrite) is not None:
            return cached()
        results = completed_shards(plan, out)
        resumed = len(results)
        if resumed:
            logger.warning(
                "resuming %s: %d of %d shard(s) already written and verified", out_uri, resumed, len(plan.shards)
            )
        pending = [i for i in range(len(plan.shards)) if i not in results]
        written: dict[int, ShardResult] = {}
        devices: list[str] = []
        if pending:
            bar = _bar(plan.total_bytes, sum(r.nbytes for r in results.values()), progress)
            executor = make_executor()
            try:
                for index, result in executor.write_shards(pending, bar.update):
                    written[index] = result
                devices = executor.devices()
            finally:
                executor.close()
                bar.close()
        results.update(written)
        lock.check()
        drop_temporary_files(out)
        commit(plan, [results[i] for i in range(len(plan.shards))], out)
    by_worker: Counter[str] = Counter()
    for r in written.values():
        by_worker[r.written_by] += r.nbytes
    return MergeSummary(
        out_uri,
        plan.total_bytes,
        time.perf_counter() - started,
        len(written),
        resumed,
        False,
        ",".join(devices) or "none",
        dict(by_worker),
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, initial: int, progress: bool):
    # no bar (and no tqdm import) when stderr is not a terminal: logs, CI, tests
    if not progress or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="merge",
        file=sys.stderr,
        dynamic_ncols=True,
    )
