"""The output lock: one writer per output location, and a crashed writer's lock does not last."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatvec.core.lock import LOCK_FILE, LockInfo, OutputLock, OutputLockedError
from chatvec.core.storage import Store

ROOT = Path(__file__).resolve().parents[1]


def test_second_lock_is_refused_and_released_lock_is_free(tmp_path):
    out = str(tmp_path / "out")
    with OutputLock(out) as first:
        info = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["owner"] == first.info.owner
        with pytest.raises(OutputLockedError) as err:
            OutputLock(out).acquire()
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and "expires at" in msg and LOCK_FILE in msg
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    with OutputLock(out):
        pass
    # nothing but the (removed) lock was ever written there
    assert Store(out).list() == []


def test_racing_acquirers_exactly_one_wins(tmp_path):
    out = str(tmp_path / "out")
    barrier = threading.Barrier(4)
    won, refused = [], []

    def attempt() -> None:
        lock = OutputLock(out)
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except OutputLockedError:
            refused.append(lock)

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3
    won[0].release()


def test_expired_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    (out / ".chatvec").mkdir(parents=True)
    old = time.time() - 3600
    stale = LockInfo(
        owner="x" * 32, host="elsewhere", pid=1, pid_start="", purpose="merge", created=old, heartbeat=old, ttl_s=600
    )
    (out / LOCK_FILE).write_bytes(stale.dump())
    with OutputLock(str(out)) as lock:
        assert Store(str(out)).read_bytes(LOCK_FILE) == lock.info.dump()


def test_fresh_lock_from_another_host_is_respected(tmp_path):
    out = tmp_path / "out"
    (out / ".chatvec").mkdir(parents=True)
    now = time.time()
    other = LockInfo(
        owner="y" * 32, host="elsewhere", pid=1, pid_start="", purpose="merge", created=now, heartbeat=now, ttl_s=600
    )
    (out / LOCK_FILE).write_bytes(other.dump())
    with pytest.raises(OutputLockedError, match="host elsewhere"):
        OutputLock(str(out)).acquire()
    assert LockInfo.parse((out / LOCK_FILE).read_bytes()).owner == "y" * 32


def test_lock_of_a_killed_process_on_this_host_is_taken_at_once(tmp_path):
    out = str(tmp_path / "out")
    code = (
        "import sys, time\n"
        "from chatvec.core.lock import OutputLock\n"
        f"OutputLock({out!r}).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ})
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(OutputLockedError):
            OutputLock(out).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # TTL is 10 minutes, yet the holder is provably gone: no wait needed.
    with OutputLock(out) as lock:
        assert lock.info.pid == os.getpid()


def test_heartbeat_keeps_a_long_merge_locked(tmp_path):
    out = str(tmp_path / "out")
    with OutputLock(out, ttl_s=1.0) as lock:
        first = lock.info.heartbeat
        deadline = time.monotonic() + 10
        while (on_disk := LockInfo.parse(Store(out).read_bytes(LOCK_FILE))).heartbeat == first:
            assert time.monotonic() < deadline, "heartbeat never refreshed"
            time.sleep(0.1)
        assert on_disk.owner == lock.info.owner and on_disk.heartbeat > first
        with pytest.raises(OutputLockedError):
            OutputLock(out, ttl_s=1.0).acquire()
        lock.check()


def test_lost_lock_blocks_the_commit(tmp_path):
    out = tmp_path / "out"
    lock = OutputLock(str(out), ttl_s=600).acquire()
    try:
        now = time.time()
        thief = LockInfo(
            owner="z" * 32,
            host="elsewhere",
            pid=7,
            pid_start="",
            purpose="merge",
            created=now,
            heartbeat=now,
            ttl_s=600,
        )
        (out / LOCK_FILE).write_bytes(thief.dump())
        with pytest.raises(OutputLockedError, match="not committing"):
            lock.check()
    finally:
        lock.release()
    # release leaves another holder's lock alone
    assert LockInfo.parse((out / LOCK_FILE).read_bytes()).owner == "z" * 32


def test_lock_on_object_storage(s3_bucket):
    out = f"{s3_bucket}/models/m1"
    with OutputLock(out, settle_s=0.05) as lock:
        assert LockInfo.parse(Store(out).read_bytes(LOCK_FILE)).owner == lock.info.owner
        with pytest.raises(OutputLockedError, match="being written by another merge"):
            OutputLock(out, settle_s=0.05).acquire()
        lock.refresh()
        lock.check()
    assert not Store(out).exists(LOCK_FILE)
