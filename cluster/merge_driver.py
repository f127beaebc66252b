"""The Ray-distributed merge: one driver, N merge actors, the output location as the meeting point.

The driver plans nothing and moves no tensor: it takes the output lock, skips the work when the
output already holds this merge (same plan fingerprint), keeps the shards an interrupted run
already wrote and verified, and hands the remaining output shards to N actors, largest first,
each actor getting the next shard as soon as it has room (greedy longest-processing-time, so
bytes end up balanced even when actors differ in speed). An actor reads its byte ranges from the
inputs, computes on its own device and writes its shard straight to the output location; it
returns only (file, bytes, sha256). When every shard is in, the driver commits: index and
manifest, written last.

Faults: an actor that dies is restarted by Ray (``max_restarts``) and its unfinished calls are
retried (``max_task_retries``); a shard is written to a temporary name and published whole, so a
retry rewrites the same bytes. An actor that cannot be restarted any more has its shards handed to
the others. A driver that dies leaves no index or manifest; rerunning the command resumes.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from merge.errors import ChatvecError, ConfigError
from merge.lock import OutputLock

if TYPE_CHECKING:
    from cluster.config import ChatvecConfig
    from merge.output import MergeSummary
    from merge.plan import MergePlan

logger = logging.getLogger(__name__)

STATUS_POLL_S = 0.5
# Calls queued per actor: one running, one waiting, so an actor never idles for a round trip.
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
    from merge.kernels import resolve_device

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if requested in ("cpu", "torch-cpu"):
        return requested, f"{requested} was asked for"
    if resolve_device("auto") == "cuda":
        import torch

        return "cuda", f"GPU {torch.cuda.get_device_name(0)}, CUDA_VISIBLE_DEVICES={visible}"
    return "cpu", f"torch sees no GPU (CUDA_VISIBLE_DEVICES={visible}), so the CPU it is"


class MergeWorker:
    """Body of a merge actor: an engine that keeps its input files open across the shards it is
    given, writing each shard to the output location.

    The plan reaches the actor as an object reference inside each call (fetched once, then
    cached), not as a constructor argument: a restarted actor then needs nothing but the
    retried call, which carries the reference the driver still holds."""

    def __init__(self, out_uri: str, device: str) -> None:
        import merge.executor  # noqa: F401 - imported now, so start-up is not billed to the first shard

        self.out_uri = out_uri
        self.device, why = pick_device(device)
        self.engine = None
        self.current: int | None = None
        self.current_bytes = 0
        self.written = 0
        self.busy_s = 0.0
        # an explicit --device cpu is no news; a GPU, or falling back from one, is worth a line
        level = logging.INFO if device in ("cpu", "torch-cpu") else logging.WARNING
        logger.log(level, "merge actor pid %d on %s computes on %s: %s", os.getpid(), socket.gethostname(), self.device, why)

    def write(self, plan_box: list, index: int):
        if self.engine is None:
            import ray

            from merge.executor import Engine

            self.engine = Engine(ray.get(plan_box[0]), self.device)
        self.current, self.current_bytes = index, 0

        def on_bytes(n: int) -> None:
            self.current_bytes += n

        t0 = time.perf_counter()
        try:
            result = self.engine.write_shard(index, self.out_uri, on_bytes)
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
class _Slot:
    """One actor as the driver sees it."""
    handle: Any
    inflight: int = 0
    alive: bool = True
    status_ref: Any = None
    current: tuple[int | None, int] = (None, 0)


@dataclass
class DistributedMerge:
    """One distributed merge. :func:`run_distributed` is the usual entry point; the object form
    lets a caller watch the actors (``actors_ready`` is set once they are created)."""

    plan: "MergePlan"
    out_uri: str
    workers: int
    config: "ChatvecConfig"
    device: str = "auto"
    overwrite: bool = False
    actors: list = field(default_factory=list)
    actor_info: list[dict] = field(default_factory=list)  # as each actor first answered
    final_info: list[dict] = field(default_factory=list)  # as the live actors answered at the end
    actors_ready: threading.Event = field(default_factory=threading.Event)
    # seconds spent starting Ray, until the first actor answered, writing shards, committing
    timings: dict[str, float] = field(default_factory=dict)

    def run(self) -> "MergeSummary":
        from merge.output import MergeSummary, check_output, commit
        from merge.executor import completed_shards

        if self.workers < 1:
            raise ConfigError("a distributed merge needs --workers 1 or more (0 merges without Ray)")
        started = time.perf_counter()
        plan = self.plan
        # A cached merge is answered before anything is written, the lock included.
        if not self.overwrite and check_output(plan, self.out_uri, overwrite=False) is not None:
            return self._cached(started)
        with OutputLock(self.out_uri, ttl_s=self.config.merge.lock_ttl_s) as lock:
            if check_output(plan, self.out_uri, overwrite=self.overwrite) is not None:
                return self._cached(started)
            results = dict(completed_shards(plan, self.out_uri))
            resumed = len(results)
            if resumed:
                logger.warning("resuming %s: %d of %d shards already written and verified",
                               self.out_uri, resumed, len(plan.shards))
            pending = [i for i in range(len(plan.shards)) if i not in results]
            devices: list[str] = []
            if pending:
                results.update(self._run_actors(pending, resumed_bytes=sum(plan.shards[i].nbytes for i in results)))
                devices = sorted({info["device"] for info in self.actor_info})
            lock.check()
            t0 = time.perf_counter()
            _drop_orphans(self.out_uri)
            commit(plan, [results[i] for i in range(len(plan.shards))], self.out_uri)
            self.timings["commit"] = time.perf_counter() - t0
        seconds = time.perf_counter() - started
        summary = MergeSummary(
            out_uri=self.out_uri, total_bytes=plan.total_bytes, seconds=seconds,
            shards_written=len(pending), shards_resumed=resumed, cached=False,
            device=",".join(devices) or "none",
        )
        logger.info("%s (%d actors; %s)", summary.line(), len(self.actor_info),
                    ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        return summary

    def _cached(self, started: float) -> "MergeSummary":
        from merge.output import MergeSummary

        logger.warning("%s already holds this merge (same recipe and inputs); nothing to do", self.out_uri)
        return MergeSummary(out_uri=self.out_uri, total_bytes=self.plan.total_bytes,
                            seconds=time.perf_counter() - started, shards_written=0,
                            shards_resumed=0, cached=True, device="none")

    # -- actors -------------------------------------------------------------------------------
    def _actor_class(self, n: int):
        import ray

        from cluster.runtime import resolve_gpus

        cfg = self.config.merge
        gpus = resolve_gpus(cfg.gpus_per_worker)
        totals = ray.cluster_resources()
        if gpus > 0 and totals.get("GPU", 0.0) < gpus:
            raise ConfigError(
                f"each merge actor asks for {gpus:g} GPU(s) but the Ray cluster has "
                f"{totals.get('GPU', 0.0):g}: set merge.gpus_per_worker in ray_config.yaml "
                "(0 merges on CPUs, auto picks 1 only where GPUs exist)")
        if totals.get("CPU", 0.0) < cfg.cpus_per_worker:
            raise ConfigError(
                f"each merge actor asks for {cfg.cpus_per_worker:g} CPU(s) but the Ray cluster has "
                f"{totals.get('CPU', 0.0):g}: lower merge.cpus_per_worker in ray_config.yaml")
        for name, need in (("GPU", gpus), ("CPU", cfg.cpus_per_worker)):
            if need and totals.get(name, 0.0) < need * n:
                logger.warning("the cluster has %g %s for %d actors asking %g each: some will wait",
                               totals.get(name, 0.0), name, n, need)
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        options: dict[str, Any] = dict(
            num_cpus=cfg.cpus_per_worker, num_gpus=gpus, max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_restarts, concurrency_groups={"status": 1},
            # Spread actors over nodes: each node brings its own network and disk bandwidth.
            scheduling_strategy="SPREAD",
        )
        if env:
            options["runtime_env"] = {"env_vars": env}
        logger.info("starting %d merge actor(s): %g CPU, %g GPU each", n, cfg.cpus_per_worker, gpus)
        return ray.remote(**options)(MergeWorker)

    def _run_actors(self, pending: list[int], *, resumed_bytes: int) -> dict[int, Any]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        from tqdm import tqdm

        from cluster.runtime import ensure_ray

        t0 = time.perf_counter()
        ensure_ray(self.config)
        self.timings["ray start"] = time.perf_counter() - t0
        plan = self.plan
        order = sorted(pending, key=lambda i: (-plan.shards[i].nbytes, i))
        n = min(self.workers, len(order))
        if len(order) < 4 * n and len(order) % n:
            logger.info("%d shards over %d actors: some actors get one shard more; a smaller "
                        "--shard-size balances the bytes better", len(order), n)
        cls = self._actor_class(n)
        plan_box = [ray.put(plan)]  # boxed: the actor gets the reference, not a copy per call
        slots = [_Slot(cls.remote(self.out_uri, self.device)) for _ in range(n)]
        self.actors = [s.handle for s in slots]
        info_refs = {s.handle.info.options(concurrency_group="status").remote(): k for k, s in enumerate(slots)}
        self.actors_ready.set()

        results: dict[int, Any] = {}
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (slot, shard)
        tries = {i: 0 for i in order}
        queue = list(order)
        done_bytes = resumed_bytes
        bar = tqdm(total=plan.total_bytes, initial=resumed_bytes, unit="B", unit_scale=True,
                   unit_divisor=1000, desc="merge", disable=None, dynamic_ncols=True)
        shown = resumed_bytes

        def feed() -> None:
            for k, slot in enumerate(slots):
                while slot.alive and queue and slot.inflight < QUEUE_DEPTH:
                    index = queue.pop(0)
                    tries[index] += 1
                    inflight[slot.handle.write.remote(plan_box, index)] = (k, index)
                    slot.inflight += 1
            if queue and not any(s.alive for s in slots):
                raise MergeWorkersFailed(
                    f"every merge actor died ({len(results)} shard(s) of {len(order)} done this run). "
                    "Shards already written are kept: rerun the same command to resume; check the "
                    "actors' logs (memory, GPU) if it happens again.")

        t0 = time.perf_counter()
        try:
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
                        if tries[index] > self.config.merge.max_restarts:
                            raise MergeWorkersFailed(
                                f"shard {plan.shards[index].filename} failed {tries[index]} time(s), "
                                f"last with: {exc}. Shards already written are kept: rerun the same "
                                "command to resume.") from exc
                        logger.warning("merge actor %d is gone (%s); shard %s goes to another actor",
                                       k, type(exc).__name__, plan.shards[index].filename)
                        queue.insert(0, index)
                        continue
                    results[index] = result
                    done_bytes += plan.shards[index].nbytes
                feed()
                self._collect_info(info_refs)
                if "actors up" not in self.timings and self.actor_info:
                    self.timings["actors up"] = time.perf_counter() - t0
                shown = self._show_progress(bar, slots, results, done_bytes, shown)
            self.timings["shards"] = time.perf_counter() - t0 - self.timings.get("actors up", 0.0)
            bar.update(max(0, done_bytes - shown))
            self._collect_info(info_refs, timeout=10)
            self._final_info(slots)
        finally:
            bar.close()
            for slot in slots:
                try:
                    ray.kill(slot.handle, no_restart=True)
                except Exception as exc:  # noqa: BLE001 - already gone is fine
                    logger.debug("could not kill a merge actor: %s", exc)
        return results

    def _final_info(self, slots: list[_Slot]) -> None:
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
            logger.info("merge actor pid %s on %s wrote %d shard(s) since it (re)started",
                        info["pid"], info["host"], info["shards_written"])

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
            logger.info("merge actor %d: pid %s on %s, CUDA_VISIBLE_DEVICES=%s, device %s", k,
                        info["pid"], info["host"], info["cuda_visible_devices"], info["device"])
            self.actor_info.append(info)

    def _show_progress(self, bar, slots: list[_Slot], results: dict, done_bytes: int, shown: int) -> int:
        """Advance the bar to finished shards plus each actor's bytes of its current shard."""
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
        partial = sum(s.current[1] for s in slots if s.alive and s.current[0] is not None and s.current[0] not in results)
        now = min(done_bytes + partial, bar.total)
        if now > shown:
            bar.update(now - shown)
            return now
        return shown


_ORPHAN = re.compile(r"\.tmp-[0-9a-f]{8}$")


def _drop_orphans(out_uri: str) -> None:
    """Delete temporary shard files left by actors killed mid-write. Only local stores have
    them (an object store never shows an upload that did not finish), and nothing else writes
    here while the lock is held."""
    from merge.storage import Store

    store = Store(out_uri)
    if not store.local:
        return
    for rel in store.list():
        if _ORPHAN.search(rel):
            logger.info("removing %s, left by an interrupted write", store.describe(rel))
            store.delete(rel)


def run_distributed(plan: "MergePlan", out_uri: str, *, workers: int, config: "ChatvecConfig",
                    device: str, overwrite: bool) -> "MergeSummary":
    """Merge `plan` into `out_uri` with `workers` Ray actors; see the module docstring."""
    return DistributedMerge(plan, out_uri, workers=workers, config=config, device=device,
                            overwrite=overwrite).run()
