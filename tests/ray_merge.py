"""A merge on Ray actors built from the public pieces (``run_merge`` and ``RayShardExecutor``),
keeping the executor so a test can watch or kill its actors while the merge runs."""

from __future__ import annotations

from chatvec.cluster.merge_driver import RayShardExecutor
from chatvec.core.storage import Store
from chatvec.merge.pipeline import run_merge


class WatchedMerge:
    def __init__(self, plan, out_uri: str, *, workers: int, config, device: str = "auto", overwrite: bool = False):
        self.plan, self.out_uri, self.config, self.overwrite = plan, out_uri, config, overwrite
        self.executor = RayShardExecutor(plan, out_uri, workers=workers, config=config, device=device)

    def run(self, progress: bool = False):
        return run_merge(
            self.plan,
            Store(self.out_uri),
            lambda: self.executor,
            overwrite=self.overwrite,
            lock_ttl_s=self.config.merge.lock_ttl_s,
            progress=progress,
        )

    def __getattr__(self, name: str):  # actors, actors_ready, actor_info, final_info, timings
        return getattr(self.executor, name)
