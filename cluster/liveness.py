"""Waiting on Ray work without hanging when the cluster dies under the driver.

``ray.wait`` with no timeout waits forever once the driver's own raylet is gone: the actors it
would start to replace dead ones can never be placed, and nothing ever becomes ready. So the
drivers wait in slices; whenever a slice passes with nothing ready they ask the cluster (with a
bound of its own, since a dead GCS may not answer at all) whether it can still run the work,
and stop with a :class:`ClusterLostError` when it cannot. Finished work is already in storage,
so rerunning the same command resumes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from chatvec.core.errors import ChatvecError

logger = logging.getLogger(__name__)


class ClusterLostError(ChatvecError):
    """The Ray cluster (or the driver's node of it) died under a run."""


def _seconds(name: str, default: float) -> float:
    try:
        return max(0.1, float(os.environ.get(name, default)))
    except ValueError:
        return default


def cluster_problem(timeout_s: float | None = None) -> str | None:
    """Why the cluster cannot run this driver's work any more, or None when it still can."""
    import ray

    timeout_s = timeout_s if timeout_s is not None else _seconds("CHATVEC_RAY_HEALTH_TIMEOUT_S", 30.0)
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["nodes"] = ray.nodes()
            answer["me"] = ray.get_runtime_context().get_node_id()
        except Exception as exc:  # noqa: BLE001 - any failure to answer is the finding
            answer["error"] = exc

    asker = threading.Thread(target=ask, name="chatvec-ray-health", daemon=True)
    asker.start()
    asker.join(timeout_s)
    if asker.is_alive():
        return f"its control service (GCS) gave no answer in {timeout_s:.0f} s"
    if "error" in answer:
        return f"its control service (GCS) cannot be reached ({type(answer['error']).__name__}: {answer['error']})"
    alive = [n for n in answer["nodes"] if n.get("Alive")]
    if not alive:
        return "no node of it is alive"
    if not any(n.get("NodeID") == answer["me"] for n in alive):
        return f"this driver's node ({answer['me'][:12]}) died: its raylet exited"
    return None


_last_check = [0.0]


def wait_one(refs: Sequence, *, what: str, poll_s: float | None = None) -> list:
    """``ray.wait(refs, num_returns=1)`` that raises ``ClusterLostError`` instead of hanging.

    The cluster is also checked at most every ``poll_s`` while results do arrive: on a dead
    node they can be a stream of errors from actors that die as soon as they are made."""
    import ray

    poll_s = poll_s if poll_s is not None else _seconds("CHATVEC_RAY_POLL_S", 10.0)
    while True:
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=poll_s)
        now = time.monotonic()
        if ready and now - _last_check[0] < poll_s:
            return ready
        _last_check[0] = now
        problem = cluster_problem()
        if problem:
            raise ClusterLostError(
                f"the Ray cluster died under the {what}: {problem}. Finished work is kept in storage: "
                f"start the cluster again (or check `ray status`) and rerun the same command to resume"
            )
        if ready:
            return ready
        logger.debug("still waiting on %d Ray task(s) of the %s", len(refs), what)
