"""Retrying HTTP APIs the same way everywhere (the API judge, the Perspective toxicity scorer).

A 408, 409, 429 or 5xx is worth asking again; other 4xx are the server refusing the request.
Waits grow exponentially with jitter, a server's ``Retry-After`` is honoured up to a cap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    backoff_s: float = 1.0  # first wait; doubles each retry, with jitter
    max_backoff_s: float = 30.0

    def wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER_S)
        base = min(self.backoff_s * (2**attempt), self.max_backoff_s)
        return base * (0.5 + random.random() / 2)  # jitter: concurrent retries spread out


def public_url(url: str) -> str:
    """``url`` without user, password, query or fragment: safe to record and print."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (None for none, or for an HTTP date: our own backoff)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."
