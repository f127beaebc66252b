"""One filesystem client per (scheme, endpoint, region, credentials source) in a process.

Making an S3 client is not free (it resolves credentials, may ask an instance metadata service,
and opens its own connection pool), and a merge or an eval opens many locations. Every ``Store``
of a process therefore shares the client for its settings. The settings are read from the
environment when a client is asked for, so a changed endpoint or key gets a new client. The
credentials take part in the key only as a digest: the cache never holds them in a form a log
or a repr could show.
"""

from __future__ import annotations

import hashlib
import os
import threading
from urllib.parse import urlparse

from chatvec.core.storage_retry import RetryPolicy

_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)
_HF_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT")

_lock = threading.Lock()
_clients: dict[tuple, object] = {}
created = 0  # clients made in this process: how the tests see that they are shared


def _digest(names: tuple[str, ...]) -> str:
    joined = "\0".join(os.environ.get(n, "") for n in names)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:16]


def s3_settings() -> dict:
    """Keyword arguments for ``pyarrow.fs.S3FileSystem`` from the standard AWS variables."""
    kwargs: dict = {"allow_bucket_creation": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme:
            kwargs["scheme"] = parsed.scheme
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        else:
            kwargs["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return kwargs


def _cached(key: tuple, make):
    global created
    # A forked child must not share its parent's connection pools.
    key = (os.getpid(),) + key
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = make()
            _clients[key] = client
            created += 1
        return client


def s3_filesystem():
    from pyarrow import fs as pafs

    kwargs = s3_settings()
    policy = RetryPolicy.from_env()
    key = (
        "s3",
        kwargs.get("scheme"),
        kwargs.get("endpoint_override"),
        kwargs.get("region"),
        _digest(_CREDENTIAL_VARS),
        policy.request_attempts,
    )

    def make():
        return pafs.S3FileSystem(
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=policy.request_attempts),
            # bounded waits: a dead endpoint fails the request instead of hanging the run
            connect_timeout=float(os.environ.get("CHATVEC_S3_CONNECT_TIMEOUT_S", "10")),
            request_timeout=float(os.environ.get("CHATVEC_S3_REQUEST_TIMEOUT_S", "60")),
            **kwargs,
        )

    return _cached(key, make)


def hf_filesystem():
    from pyarrow import fs as pafs

    def make():
        from huggingface_hub import HfFileSystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem()))

    return _cached(("hf", _digest(_HF_VARS)), make)


def generic_filesystem(uri: str):
    """``(filesystem, path)`` for any other URI ``pyarrow.fs`` opens (gs://, hdfs://, ...)."""
    from pyarrow import fs as pafs

    parsed = urlparse(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    # from_uri resolves the path itself; the client depends on the scheme and authority only
    return _cached(("uri", parsed.scheme, parsed.netloc), lambda: fs), path


def clear() -> None:
    """Forget every client (a test that changes the environment mid-process uses it)."""
    with _lock:
        _clients.clear()
