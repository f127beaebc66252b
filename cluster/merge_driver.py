"""The merge on Ray actors: cluster/'s part is only scheduling shards onto actors.

The sequence itself (check, lock, resume, write, clean, commit) is merge/pipeline.py's, the
same as a `--workers 0` merge; this module gives it a ShardExecutor whose shards run on N Ray
actors. The driver moves no tensor: an actor reads its byte ranges from the inputs, computes on
its own device, writes its shard straight to the output location and returns only (file,
bytes, sha256, who wrote it).

Scheduling: shards largest first, each to the least-loaded actor (fewest bytes given so far)
that has room, and at most one shard queued ahead per actor (one running, one waiting, so an
actor never idles for a round trip while the others still have work to take).

Faults: an actor that dies is restarted by Ray (``max_restarts``) and its unfinished calls are
retried (``max_task_retries``); a shard is written to a temporary name and published whole, so a
retry rewrites the same bytes. An actor that cannot be restarted any more has its shards handed to
the others. A driver that dies leaves no index or manifest; rerunning the command resumes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatvec.core.errors import ChatvecError, ConfigError

if TYPE_CHECKING:
    from chatvec.core.config import ChatvecConfig
    from chatvec.merge.output import MergeSummary
    from chatvec.merge.plan import MergePlan
    from chatvec.merge.shard_writer import ShardResult

logger = logging.getLogger(__name__)

STATUS_POLL_S = 0.5
# Calls queued per actor: one running, one waiting.
QUEUE_DEPTH = 2
# Storage settings the driver forwards to its actors, so they write where the driver looks.
# Credentials are not forwarded: they come from each node's environment or the runtime_env.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class MergeWorkersFailed(ChatvecError):
    """Merge actors kept dying; the shards written so far are kept for the next run."""


def pick_device(requested: str) -> tuple[str, str]:
    """The device a merge actor computes on, and why. Ray sets CUDA_VISIBLE_DEVICES to the GPUs
    it gave the actor, so "cuda" is always the actor's own GPU; without one the actor falls back
    to the CPU rather than fail (a CPU-only node, or Ray's logical GPUs in tests)."""
    from chatvec.merge.kernels import resolve_compute_device

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if requested in ("cpu", "torch-cpu"):
        return requested, f"{requested} was asked for"
    if resolve_compute_device("auto") == "cuda":
        import torch

        return "cuda", f"GPU {torch.cuda.get_device_name(0)}, CUDA_VISIBLE_DEVICES={visible}"
    return "cpu", f"torch sees no GPU (CUDA_VISIBLE_DEVICES={visible}), so the CPU it is"


class MergeWorker:
    """Body of a merge actor: a ShardWriter that keeps its input files open across the shards
    it is given, writing each shard to the output location.

    The plan reaches the actor as an object reference inside each call (fetched once, then
    cached), not as a constructor argument: a restarted actor then needs nothing but the
    retried call, which carries the reference the driver still holds."""

    def __init__(self, out_uri: str, device: str, number: int = 0) -> None:
        from chatvec.core.storage import Store
        from chatvec.merge.shard_writer import worker_name

        self.out = Store(out_uri)
        self.device, why = pick_device(device)
        self.name = worker_name(f"merge actor {number}")
        self.writer = None
        self.current: int | None = None
        self.current_bytes = 0
        self.written = 0
        self.busy_s = 0.0
        # an explicit --device cpu is no news; a GPU, or falling back from one, is worth a line
        level = logging.INFO if device in ("cpu", "torch-cpu") else logging.WARNING
        logger.log(level, "%s computes on %s: %s", self.name, self.device, why)

    def write(self, plan_box: list, index: int) -> ShardResult:
        if self.writer is None:
            import ray

            from chatvec.merge.shard_writer import ShardWriter

            self.writer = ShardWriter(ray.get(plan_box[0]), self.device, worker=self.name)
        self.current, self.current_bytes = index, 0

        def on_bytes(n: int) -> None:
            self.current_bytes += n

        t0 = time.perf_counter()
        try:
            result = self.writer.write(index, self.out, on_bytes)
        finally:
            self.current = None
            self.busy_s += time.perf_counter() - t0
        self.written += 1
        return result

    def info(self) -> dict[str, Any]:
        """Where this actor runs: pid, host, Ray's GPU ids and the device it computes on."""
        import ray

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "name": self.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": self.device,
            "shards_written": self.written,
            "busy_s": self.busy_s,
        }

    def progress(self) -> tuple[int | None, int]:
        """(shard index being written, bytes of it written so far)."""
        return self.current, self.current_bytes


@dataclass
class _ActorSlot:
    """One actor as the driver sees it."""

    handle: Any
    inflight: int = 0
    assigned_bytes: int = 0  # bytes of every shard given to it, done or not
    alive: bool = True
    status_ref: Any = None
    current: tuple[int | None, int] = (None, 0)


def next_actor(slots: list[_ActorSlot]) -> int | None:
    """The actor that gets the next (largest remaining) shard: among the live ones with room,
    the least loaded; None when all are full."""
    open_slots = [k for k, s in enumerate(slots) if s.alive and s.inflight < QUEUE_DEPTH]
    if not open_slots:
        return None
    return min(open_slots, key=lambda k: (slots[k].assigned_bytes, slots[k].inflight, k))


class RayShardExecutor:
    """Writes shards on `workers` Ray merge actors (merge/pipeline.py's ShardExecutor)."""

    def __init__(
        self, plan: MergePlan, out_uri: str, *, workers: int, config: ChatvecConfig, device: str = "auto"
    ) -> None:
        if workers < 1:
            raise ConfigError("a distributed merge needs --workers 1 or more (0 merges without Ray)")
        self.plan, self.out_uri, self.workers, self.config, self.device = plan, out_uri, workers, config, device
        self.actors: list = []
        self.actor_info: list[dict] = []  # as each actor first answered
        self.final_info: list[dict] = []  # as the live actors answered at the end
        self.actors_ready = threading.Event()  # set once the actors are created
        # seconds spent starting Ray, until the first actor answered, writing shards
        self.timings: dict[str, float] = {}
        self._slots: list[_ActorSlot] = []

    def devices(self) -> list[str]:
        return sorted({info["device"] for info in self.actor_info})

    def close(self) -> None:
        if not self._slots:
            return
        import ray

        for slot in self._slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - already gone is fine
                logger.debug("could not kill a merge actor: %s", exc)
        self._slots = []

    def _actor_class(self, n: int):
        import ray

        from chatvec.cluster.runtime import resolve_gpus

        cfg = self.config.merge
        gpus = resolve_gpus(cfg.gpus_per_worker)
        totals = ray.cluster_resources()
        if gpus > 0 and totals.get("GPU", 0.0) < gpus:
            raise ConfigError(
                f"each merge actor asks for {gpus:g} GPU(s) but the Ray cluster has "
                f"{totals.get('GPU', 0.0):g}: set merge.gpus_per_worker in ray_config.yaml "
                "(0 merges on CPUs, auto picks 1 only where GPUs exist)"
            )
        if totals.get("CPU", 0.0) < cfg.cpus_per_worker:
            raise ConfigError(
                f"each merge actor asks for {cfg.cpus_per_worker:g} CPU(s) but the Ray cluster has "
                f"{totals.get('CPU', 0.0):g}: lower merge.cpus_per_worker in ray_config.yaml"
            )
        for name, need in (("GPU", gpus), ("CPU", cfg.cpus_per_worker)):
            if need and totals.get(name, 0.0) < need * n:
                logger.warning(
                    "the cluster has %g %s for %d actors asking %g each: some will wait",
                    totals.get(name, 0.0),
                    name,
                    n,
                    need,
                )
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        options: dict[str, Any] = dict(
            num_cpus=cfg.cpus_per_worker,
            num_gpus=gpus,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_restarts,
            concurrency_groups={"status": 1},
            # Spread actors over nodes: each node brings its own network and disk bandwidth.
            scheduling_strategy="SPREAD",
        )
        if env:
            options["runtime_env"] = {"env_vars": env}
        logger.info("starting %d merge actor(s): %g CPU, %g GPU each", n, cfg.cpus_per_worker, gpus)
        return ray.remote(**options)(MergeWorker)

    def write_shards(self, pending: list[int], on_bytes: Callable[[int], None]) -> Iterator[tuple[int, ShardResult]]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from chatvec.cluster.runtime import ensure_ray

        t0 = time.perf_counter()
        ensure_ray(self.config)
        self.timings["ray start"] = time.perf_counter() - t0
        plan = self.plan
        order = sorted(pending, key=lambda i: (-plan.shards[i].nbytes, i))
        n = min(self.workers, len(order))
        if len(order) < 4 * n and len(order) % n:
            logger.info(
                "%d shards over %d actors: some actors get one shard more; a smaller "
                "--shard-size balances the bytes better",
                len(order),
                n,
            )
        cls = self._actor_class(n)
        plan_box = [ray.put(plan)]  # boxed: the actor gets the reference, not a copy per call
        slots = self._slots = [_ActorSlot(cls.remote(self.out_uri, self.device, k)) for k in range(n)]
        self.actors = [s.handle for s in slots]
        info_refs = {s.handle.info.options(concurrency_group="status").remote(): k for k, s in enumerate(slots)}
        self.actors_ready.set()

        finished: set[int] = set()
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (slot, shard)
        tries = {i: 0 for i in order}
        queue = list(order)
        done_bytes = 0
        shown = [0]  # bytes reported to on_bytes so far

        def feed() -> None:
            while queue:
                k = next_actor(slots)
                if k is None:
                    break
                index = queue.pop(0)
                tries[index] += 1
                inflight[slots[k].handle.write.remote(plan_box, index)] = (k, index)
                slots[k].inflight += 1
                slots[k].assigned_bytes += plan.shards[index].nbytes
            if queue and not any(s.alive for s in slots):
                raise MergeWorkersFailed(
                    f"every merge actor died ({len(finished)} shard(s) of {len(order)} done this run). "
                    "Shards already written are kept: rerun the same command to resume; check the "
                    "actors' logs (memory, GPU) if it happens again."
                )

        def report(now: int) -> None:
            if now > shown[0]:
                on_bytes(now - shown[0])
                shown[0] = now

        t0 = time.perf_counter()
        feed()
        while inflight:
            # an actor's first answer wakes the loop too, to time the start-up
            ready, _ = ray.wait([*inflight, *info_refs], num_returns=1, timeout=STATUS_POLL_S)
            for ref in ready:
                if ref not in inflight:
                    continue
                k, index = inflight.pop(ref)
                slots[k].inflight -= 1
                try:
                    result = ray.get(ref)
                except RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, ChatvecError):
                        raise cause from None
                    raise
                except RayActorError as exc:
                    slots[k].alive = False
                    slots[k].assigned_bytes -= plan.shards[index].nbytes
                    if tries[index] > self.config.merge.max_restarts:
                        raise MergeWorkersFailed(
                            f"shard {plan.shards[index].filename} failed {tries[index]} time(s), "
                            f"last with: {exc}. Shards already written are kept: rerun the same "
                            "command to resume."
                        ) from exc
                    logger.warning(
                        "merge actor %d is gone (%s); shard %s goes to another actor",
                        k,
                        type(exc).__name__,
                        plan.shards[index].filename,
                    )
                    queue.insert(0, index)
                    continue
                finished.add(index)
                done_bytes += plan.shards[index].nbytes
                yield index, result
            feed()
            self._collect_info(info_refs)
            if "actors up" not in self.timings and self.actor_info:
                self.timings["actors up"] = time.perf_counter() - t0
            report(min(done_bytes + self._partial_bytes(slots, finished), plan.total_bytes))
        self.timings["shards"] = time.perf_counter() - t0 - self.timings.get("actors up", 0.0)
        report(done_bytes)
        self._collect_info(info_refs, timeout=10)
        self._final_info(slots)
        logger.info(
            "merge actors: %d; %s", len(self.actor_info), ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items())
        )

    def _partial_bytes(self, slots: list[_ActorSlot], finished: set[int]) -> int:
        """Bytes the actors have written of the shards they are on (asked without waiting)."""
        import ray

        for slot in slots:
            if not slot.alive:
                continue
            if slot.status_ref is not None:
                ready, _ = ray.wait([slot.status_ref], timeout=0)
                if not ready:
                    continue
                try:
                    slot.current = ray.get(slot.status_ref)
                except Exception:
                    slot.current = (None, 0)
            slot.status_ref = slot.handle.progress.options(concurrency_group="status").remote()
        # a status answered before its shard's result arrived must not count that shard twice
        return sum(s.current[1] for s in slots if s.alive and s.current[0] is not None and s.current[0] not in finished)

    def _final_info(self, slots: list[_ActorSlot]) -> None:
        import ray

        refs = [s.handle.info.options(concurrency_group="status").remote() for s in slots if s.alive]
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        for ref in ready:
            try:
                self.final_info.append(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - only used for the log
                logger.debug("no final info from a merge actor: %s", exc)
        for info in self.final_info:
            logger.info(
                "merge actor pid %s on %s wrote %d shard(s) in %.2f s since it (re)started",
                info["pid"],
                info["host"],
                info["shards_written"],
                info["busy_s"],
            )

    def _collect_info(self, info_refs: dict, timeout: float = 0) -> None:
        import ray

        if not info_refs:
            return
        ready, _ = ray.wait(list(info_refs), num_returns=len(info_refs), timeout=timeout)
        for ref in ready:
            k = info_refs.pop(ref)
            try:
                info = ray.get(ref)
            except Exception as exc:  # an actor that died before answering
                logger.debug("no info from merge actor %d: %s", k, exc)
                continue
            logger.info(
                "merge actor %d: pid %s on %s, CUDA_VISIBLE_DEVICES=%s, device %s",
                k,
                info["pid"],
                info["host"],
                info["cuda_visible_devices"],
                info["device"],
            )
            self.actor_info.append(info)


def run_merge_job(
    plan: MergePlan,
    out_uri: str,
    *,
    workers: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    config: ChatvecConfig | None = None,
    progress: bool = True,
) -> MergeSummary:
    """The one place that decides where shards run: `workers` 0 in this process (no Ray is
    imported), N on N Ray actors. Either way the same sequence (merge/pipeline.py), the same
    lock TTL (merge.lock_ttl_s), clean-up and `overwrite` handling."""
    from chatvec.core.config import load_config
    from chatvec.core.storage import Store
    from chatvec.merge.pipeline import LocalShardExecutor, run_merge

    config = config if config is not None else load_config(None)
    out = Store(out_uri)
    if workers == 0:
        from chatvec.merge.kernels import resolve_compute_device

        local_device = resolve_compute_device(device)

        def make_executor():
            return LocalShardExecutor(plan, out, local_device)
    else:
        executor = RayShardExecutor(plan, out_uri, workers=workers, config=config, device=device)

        def make_executor():
            return executor

    return run_merge(
        plan, out, make_executor, overwrite=overwrite, lock_ttl_s=config.merge.lock_ttl_s, progress=progress
    )
