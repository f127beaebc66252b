"""One sweep or nightly run at a time per run id.

Two runs with the same id (a cron job that fired twice, a manual rerun while the scheduled one
still works) would compute the same cells into the same folder. The run lock stops the second:
it is the merge output lock (``chatvec.core.lock.OutputLock``: atomic on shared filesystems, best effort
on object stores, a heartbeat and a TTL so that a crashed run's lock expires) taken on the run's
results folder, ``<root>/results/run=<id>/.chatvec/lock.json``. The second run refuses at once
with a message that names the holder; a lock whose holder died on this host is taken over, so a
rerun after a crash needs no wait.
"""

from __future__ import annotations

import functools
import logging
import os

from chatvec.core.errors import ChatvecError
from chatvec.core.lock import DEFAULT_TTL_S, LOCK_FILE, OutputLock, OutputLockedError

logger = logging.getLogger(__name__)


class RunLockedError(ChatvecError):
    """Another process runs the same sweep run."""


class RunLock:
    """``with RunLock(root, run_id, kind="nightly"):`` around everything a run writes."""

    def __init__(self, root: str, run_id: str, *, kind: str = "sweep", ttl_s: float = DEFAULT_TTL_S) -> None:
        from chatvec.eval import history

        self.run_id = history.check_run_id(run_id)
        self.kind = kind
        self._lock = OutputLock(history.run_uri(root, run_id), ttl_s=ttl_s, purpose=f"{kind} run {run_id}")
        self._made: list[str] = []

    @property
    def uri(self) -> str:
        return self._lock.uri

    def _missing_folders(self) -> list[str]:
        """The local folders that taking the lock creates, deepest first (removed again at the
        end when empty, so that a run refused or stopped by bad input leaves nothing behind)."""
        store = self._lock.store
        if not store.local:
            return []
        made, path = [], os.path.dirname(store.path(LOCK_FILE))
        while path and not os.path.exists(path):
            made.append(path)
            path = os.path.dirname(path)
        return made

    def _tidy(self) -> None:
        for path in self._made:
            try:
                os.rmdir(path)
            except OSError:  # not empty: the run wrote there
                break

    def __enter__(self) -> RunLock:
        self._made = self._missing_folders()
        try:
            self._lock.acquire()
        except OutputLockedError as exc:
            self._tidy()
            holder = self._lock.read()
            who = f"pid {holder.pid} on {holder.host}" if holder is not None else "another process"
            raise RunLockedError(
                f"{self.kind} run {self.run_id} is already running ({who}); not starting a second one, which "
                f"would compute the same cells. Wait for it to finish, then rerun to complete anything missing, "
                f"or pass another --run-id. Details: {exc}"
            ) from exc
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
        self._tidy()


def locked_run(run):
    """Decorate ``run_sweep(sweep, *, run_id, config, nightly=False, ...)`` to hold the run lock."""

    @functools.wraps(run)
    def wrapper(sweep, *args, run_id: str, config, nightly: bool = False, **kwargs):
        root = sweep.root or config.storage.root
        with RunLock(root, run_id, kind="nightly" if nightly else "sweep"):
            return run(sweep, *args, run_id=run_id, config=config, nightly=nightly, **kwargs)

    return wrapper
