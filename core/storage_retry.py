"""Retries with backoff around whole storage operations, and the clear error once they run out.

Two layers retry a failed object-store request. The AWS SDK under ``pyarrow.fs`` retries each HTTP
request (``AwsStandardS3RetryStrategy``, ``CHATVEC_S3_REQUEST_ATTEMPTS`` attempts); chatvec retries
the whole operation around it (read an object, a byte range, a listing, a delete, a whole upload;
``CHATVEC_STORAGE_ATTEMPTS`` attempts, exponential backoff from ``CHATVEC_STORAGE_BACKOFF_S``).
The outer layer also covers what the SDK cannot see: a body cut short that still parsed, an
object that vanished mid-read, or a stream reopened after its connection died.

Local files are never retried: a local error (a full disk, a permission) does not go away by
itself.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from chatvec.core.errors import DiskFullError, StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Error texts (from the AWS SDK through pyarrow, or an S3 server) that a retry cannot fix.
_PERMANENT = (
    "ACCESS_DENIED",
    "AccessDenied",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
    "NO_SUCH_BUCKET",
    "NoSuchBucket",
    "InvalidBucketName",
    "NOT_IMPLEMENTED",
    "InvalidRange",
    "Forbidden",
)


class ShortReadError(OSError):
    """Fewer bytes arrived than the object holds: a response cut mid-body. Worth a retry."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # whole-operation attempts by chatvec
    backoff_s: float = 0.5  # first wait; doubles each time
    max_backoff_s: float = 8.0
    request_attempts: int = 4  # per-request attempts inside the AWS SDK

    @classmethod
    def from_env(cls) -> RetryPolicy:
        def num(name: str, default, kind):
            raw = os.environ.get(name)
            if raw in (None, ""):
                return default
            try:
                value = kind(raw)
            except ValueError:
                logger.warning("ignoring %s=%r: not a number", name, raw)
                return default
            return max(value, kind(1)) if kind is int else max(value, 0.0)

        return cls(
            attempts=num("CHATVEC_STORAGE_ATTEMPTS", cls.attempts, int),
            backoff_s=num("CHATVEC_STORAGE_BACKOFF_S", cls.backoff_s, float),
            max_backoff_s=num("CHATVEC_STORAGE_MAX_BACKOFF_S", cls.max_backoff_s, float),
            request_attempts=num("CHATVEC_S3_REQUEST_ATTEMPTS", cls.request_attempts, int),
        )

    def delay(self, attempt: int) -> float:
        """Wait before attempt ``attempt + 1``: exponential, capped, with jitter so that many
        actors throttled at once do not come back at once."""
        base = min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1)))
        return base * (0.5 + random.random() / 2)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(name: str, exc: OSError) -> DiskFullError:
    return DiskFullError(
        f"the disk is full: no space left to write {name}. Free some space (or point the output "
        f"elsewhere) and rerun the same command; finished parts are kept"
    )


def is_transient(exc: BaseException) -> bool:
    """Could the same request succeed if made again?"""
    if isinstance(exc, StorageError):
        return False  # already the final word
    if isinstance(exc, ShortReadError):
        return True
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)):
        return False
    if isinstance(exc, OSError):
        text = str(exc)
        return not any(marker in text for marker in _PERMANENT)
    return False


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def with_retries(name: str, action: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """Run ``fn`` (one whole operation on remote object ``name``) until it succeeds, retrying
    transient errors. ``FileNotFoundError`` passes through untouched (callers give it meaning);
    any other failure ends as a :class:`StorageError` that names the object and what was done."""
    policy = policy or RetryPolicy.from_env()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(name, exc) from exc
            if isinstance(exc, StorageError):
                raise
            if not is_transient(exc):
                raise StorageError(
                    f"cannot {action} {name}: {first_line(exc)}. Check the location, its "
                    f"permissions and the storage credentials"
                ) from exc
            if attempt >= policy.attempts:
                raise StorageError(
                    f"cannot {action} {name}: still failing after {attempt} attempts "
                    f"({first_line(exc)}). Check that the storage endpoint is reachable and "
                    f"healthy, then rerun: finished parts are kept"
                ) from exc
            wait = policy.delay(attempt)
            logger.warning(
                "%s %s failed (%s); retry %d of %d in %.1f s",
                action,
                name,
                first_line(exc),
                attempt,
                policy.attempts - 1,
                wait,
            )
            time.sleep(wait)
