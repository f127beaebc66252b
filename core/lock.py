"""A lock on an output location, so two merges never write into the same place at once.

The lock is a small JSON file, ``.chatvec/lock.json``, inside the output location. It names its
holder (a random owner id, the host, the process id and that process's start time) and carries a
heartbeat time that the holder refreshes while it works.

Expiry: a lock whose heartbeat is older than its TTL (``merge.lock_ttl_s`` in ray_config.yaml,
600 s by default) is abandoned and the next merge takes it over. A lock held by a process on
*this* host that no longer runs is abandoned at once, so rerunning a crashed command on the same
machine needs no wait. Hosts are assumed to have clocks that agree to well within the TTL.

Atomicity: on a local or shared POSIX filesystem the lock is created with a hard link, which
fails when the file exists, so exactly one of two racing merges wins. Object stores reached
through ``pyarrow.fs`` have no create-if-absent write, so there the lock is best effort: check it
is absent, write it, wait ``settle_s`` and read it back; the merge whose owner id is not the one
read back gives up. Two merges can still both proceed only if the second one's check-then-write
gap spans the first one's whole write-settle-read (more than ``settle_s``, 1 s by default).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from chatvec.core.errors import ChatvecError
from chatvec.core.storage import Store

logger = logging.getLogger(__name__)

LOCK_FILE = ".chatvec/lock.json"
DEFAULT_TTL_S = 600.0


class OutputLockedError(ChatvecError):
    """Another merge holds the output location."""


@dataclass
class LockInfo:
    owner: str
    host: str
    pid: int
    pid_start: str
    purpose: str
    created: float
    heartbeat: float
    ttl_s: float

    @classmethod
    def parse(cls, data: bytes) -> LockInfo | None:
        try:
            raw = json.loads(data.decode("utf-8"))
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode("utf-8")


def _process_start(pid: int) -> str:
    """An id of process `pid`'s incarnation (boot id + start tick), so a reused pid is not mistaken
    for the holder. Empty where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
        start = stat.rsplit(")", 1)[1].split()[19]
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        return f"{boot}:{start}"
    except (OSError, IndexError):
        return ""


def _holder_is_gone(info: LockInfo) -> bool:
    """True when the holder ran on this host and its process is no longer there."""
    if info.host != socket.gethostname():
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by another user
    return bool(info.pid_start) and _process_start(info.pid) != info.pid_start


class OutputLock:
    """Holds ``.chatvec/lock.json`` in the output store `out` from :meth:`acquire` to :meth:`release`.

    Use as a context manager. A background thread refreshes the heartbeat every ``ttl_s / 5``
    seconds; :meth:`check` raises if the lock was lost (taken over by another process that judged
    it abandoned), which a merge calls before its commit.
    """

    def __init__(
        self, out: Store | str, *, ttl_s: float = DEFAULT_TTL_S, purpose: str = "merge", settle_s: float = 1.0
    ) -> None:
        self.store = out if isinstance(out, Store) else Store(out)
        self.ttl_s = float(ttl_s)
        self.purpose = purpose
        self.settle_s = settle_s
        self.info: LockInfo | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()

    @property
    def uri(self) -> str:
        return self.store.describe(LOCK_FILE)

    # -- reading --------------------------------------------------------------------------------
    def read(self) -> LockInfo | None:
        """The current lock, or None when there is none. An unreadable lock file counts as held
        since its heartbeat is the file's modification time."""
        try:
            data = self.store.read_bytes(LOCK_FILE)
        except ChatvecError:
            return None
        info = LockInfo.parse(data)
        if info is None:
            mtime = self.store.mtime(LOCK_FILE) or time.time()
            info = LockInfo("?", "?", -1, "", "?", mtime, mtime, self.ttl_s)
        return info

    def _abandoned(self, info: LockInfo, now: float) -> str | None:
        if now - info.heartbeat > info.ttl_s:
            return f"its heartbeat is {now - info.heartbeat:.0f} s old (TTL {info.ttl_s:.0f} s)"
        if _holder_is_gone(info):
            return f"process {info.pid} on {info.host} no longer runs"
        return None

    # -- taking and giving back -----------------------------------------------------------------
    def acquire(self) -> OutputLock:
        now = time.time()
        me = LockInfo(
            owner=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=_process_start(os.getpid()),
            purpose=self.purpose,
            created=now,
            heartbeat=now,
            ttl_s=self.ttl_s,
        )
        for _attempt in range(5):
            current = self.read()
            if current is not None:
                why = self._abandoned(current, time.time())
                if why is None:
                    raise self._refusal(current)
                logger.warning("taking over the abandoned lock %s: %s", self.uri, why)
                if not self._break(current):
                    continue  # someone else broke it first; look again
            if self._create(me):
                self.info = me
                self._start_heartbeat()
                logger.info("locked %s", self.uri)
                return self
        current = self.read()
        raise (
            self._refusal(current)
            if current is not None
            else OutputLockedError(f"could not lock {self.uri}: other processes keep taking it. Try again.")
        )

    def _refusal(self, info: LockInfo) -> OutputLockedError:
        age = time.time() - info.heartbeat
        expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.heartbeat + info.ttl_s))
        return OutputLockedError(
            f"{self.store.describe()} is being written by another {info.purpose} "
            f"(host {info.host}, pid {info.pid}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.created))}, "
            f"last heartbeat {age:.0f} s ago). Wait for it to finish or choose another --out. "
            f"If that process is gone, the lock expires at {expires} (TTL {info.ttl_s:.0f} s), "
            f"or delete {self.uri} by hand."
        )

    def _create(self, me: LockInfo) -> bool:
        """Write the lock if absent; True when this process holds it afterwards."""
        data = me.dump()
        if self.store.local:
            target = self.store.path(LOCK_FILE)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.{me.owner}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            try:
                os.link(tmp, target)  # fails if the lock exists: the atomic create-if-absent
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.store.exists(LOCK_FILE):
            return False
        self.store.write_bytes(LOCK_FILE, data)
        time.sleep(self.settle_s)
        back = self.read()
        return back is not None and back.owner == me.owner

    def _break(self, stale: LockInfo) -> bool:
        """Remove an abandoned lock, unless it changed since it was judged abandoned."""
        if self.store.local:
            target = self.store.path(LOCK_FILE)
            aside = f"{target}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, aside)  # only one breaker can move a given file
            except FileNotFoundError:
                return False
            with open(aside, "rb") as fh:
                moved = LockInfo.parse(fh.read())
            if moved is not None and moved.owner != stale.owner:
                # A live holder re-took it between our read and the rename: put it back.
                try:
                    os.link(aside, target)
                except FileExistsError:
                    pass
                os.unlink(aside)
                return False
            os.unlink(aside)
            return True
        current = self.read()
        if current is None or current.owner != stale.owner:
            return False
        self.store.delete(LOCK_FILE)
        return True

    def refresh(self) -> None:
        """Move the heartbeat forward; note a lost lock instead of overwriting another holder."""
        if self.info is None:
            return
        with self._io:
            current = self.read()
            if current is None or current.owner != self.info.owner:
                who = "removed" if current is None else f"taken by pid {current.pid} on {current.host}"
                self._lost = f"the lock {self.uri} was {who} while this merge ran"
                logger.error("%s", self._lost)
                return
            self.info.heartbeat = time.time()
            # Store writes publish whole files (rename / object put): no reader sees half a lock.
            self.store.write_bytes(LOCK_FILE, self.info.dump())

    def check(self) -> None:
        """Raise if the lock was lost; call before committing."""
        if self._lost:
            raise OutputLockedError(f"{self._lost}; not committing. Rerun the merge once the other one is done.")
        current = self.read()
        if self.info is None or current is None or current.owner != self.info.owner:
            self._lost = f"the lock {self.uri} is no longer held by this merge"
            raise OutputLockedError(f"{self._lost}; not committing. Rerun the merge once the other one is done.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.info is None:
            return
        with self._io:
            current = self.read()
            if current is not None and current.owner == self.info.owner:
                self.store.delete(LOCK_FILE)
                logger.info("unlocked %s", self.uri)
        self.info = None

    def _start_heartbeat(self) -> None:
        interval = max(0.5, self.ttl_s / 5)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except Exception as exc:  # a failed heartbeat is retried at the next tick
                    logger.warning("could not refresh the lock %s: %s", self.uri, exc)

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="chatvec-lock-heartbeat", daemon=True)
        self._thread.start()

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
