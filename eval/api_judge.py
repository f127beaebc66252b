"""A judge behind an OpenAI-compatible chat-completions endpoint (OpenAI, gateways, ``vllm serve``,
TGI), used with ``--judge openai:MODEL``.

Configuration follows the ``openai`` package: the base URL from ``OPENAI_BASE_URL`` (default
OpenAI's), the key from ``OPENAI_API_KEY``. Each judge prompt (the same text the local judge gets:
question and reference answer, in the benchmark's language) is sent as one user message at
temperature 0; the reply's text is returned as it is, for the kind's parser and ``judge_raw``.

Requests run on a bounded pool of threads. A 429, a 5xx, a timeout, a dropped connection or a
reply that is not a chat completion is retried with exponential backoff (a server's
``Retry-After`` is honoured, capped); any other 4xx is not, since asking again cannot help. A
prompt that still fails gets a reply with ``error`` set, so its row counts as a judge error and
is never dropped.

The key never leaves the client: it is not part of ``identity``, and every error message is
scrubbed of it (and of credentials in the base URL) before it is returned or logged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from chatvec.core.errors import ChatvecError
from chatvec.eval.contracts import JudgeReply
from chatvec.eval.retry import RETRY_STATUS, RetryPolicy, public_url, retry_after_seconds
from chatvec.eval.retry import short as _short

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
PREFIX = "openai:"


class APIJudgeError(ChatvecError):
    """The API judge cannot be used as configured."""


def parse_spec(spec: str) -> str:
    """The model name of an ``openai:MODEL`` judge spec."""
    if not spec.startswith(PREFIX) or not spec[len(PREFIX) :].strip():
        raise APIJudgeError(f"an API judge is given as 'openai:MODEL' (e.g. openai:gpt-4o), got {spec!r}")
    return spec[len(PREFIX) :].strip()


class APIJudge:
    """``JudgeBackend`` over the ``openai`` client; thread-safe, one client for all requests."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 6,
        timeout_s: float = 300.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - openai is a dependency
            raise APIJudgeError("the API judge needs the 'openai' package: pip install openai") from exc
        if concurrency < 1:
            raise APIJudgeError(f"the API judge's concurrency must be at least 1, got {concurrency}")
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key:
            # a local server (vllm serve, TGI) usually wants no key, but the client insists on one
            if urlsplit(self.base_url).hostname in ("127.0.0.1", "localhost", "::1"):
                key = "EMPTY"
            else:
                raise APIJudgeError(
                    f"the API judge at {public_url(self.base_url)} needs a key: set OPENAI_API_KEY "
                    "(and OPENAI_BASE_URL for an endpoint other than OpenAI's)"
                )
        url = urlsplit(self.base_url)
        self._secrets = tuple(s for s in (key, url.password, url.query) if s and s != "EMPTY")
        _LOG_SCRUBBER.add(self._secrets)
        self.identity = f"{PREFIX}{model}@{public_url(self.base_url)}"
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.policy = RetryPolicy(max_retries, backoff_s, max_backoff_s)
        self._openai = openai
        # retries are ours (counted, logged, scrubbed), not the client's
        self._client = openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=0, timeout=timeout_s)
        self._lock = threading.Lock()
        self.retries = 0  # retried requests so far, over all prompts

    # -- JudgeBackend -----------------------------------------------------------------------------
    def judge(self, prompts: Sequence[str], *, max_new_tokens: int, progress: bool = False) -> list[JudgeReply]:
        if not prompts:
            return []
        bar = tqdm(total=len(prompts), desc=f"judge {self.model}", unit="prompt", disable=not progress)
        out: list[JudgeReply | None] = [None] * len(prompts)

        def one(i: int) -> None:
            out[i] = self._ask(prompts[i], max_new_tokens)
            bar.update(1)

        with ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(prompts)), thread_name_prefix="api-judge"
        ) as pool:
            list(pool.map(one, range(len(prompts))))
        bar.close()
        failed = sum(r.error is not None for r in out if r is not None)
        if failed:
            logger.warning("API judge %s: %d of %d prompts failed after retries", self.identity, failed, len(prompts))
        return [r for r in out if r is not None]

    def close(self) -> None:
        self._client.close()

    # -- one prompt -------------------------------------------------------------------------------
    def _ask(self, prompt: str, max_new_tokens: int) -> JudgeReply:
        last = "no attempt made"
        for attempt in range(self.policy.max_retries + 1):
            retry_after = None
            try:
                completion = self._client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=0.0,
                    max_completion_tokens=max_new_tokens,
                )
                return self._reply(completion)
            except self._openai.APIStatusError as exc:
                last = f"HTTP {exc.status_code}: {_short(exc.message)}"
                if exc.status_code not in RETRY_STATUS:
                    return JudgeReply(text="", error=self.scrub(f"{self.identity} refused the request: {last}"))
                retry_after = _retry_after(exc.response)
            except self._openai.APITimeoutError:
                last = f"no reply within {self.timeout_s:g} s"
            except self._openai.APIConnectionError as exc:
                last = f"connection failed: {_short(str(exc))}"
            except _Malformed as exc:
                last = f"not a chat completion: {exc}"
            except (self._openai.APIResponseValidationError, ValueError) as exc:  # ValueError: a body that is not JSON
                last = f"not a chat completion: {_short(str(exc))}"
            except self._openai.OpenAIError as exc:  # anything else the client raises: asking again cannot help
                return JudgeReply(
                    text="", error=self.scrub(f"{self.identity}: {type(exc).__name__}: {_short(str(exc))}")
                )
            if attempt < self.policy.max_retries:
                wait = self.policy.wait(attempt, retry_after)
                with self._lock:
                    self.retries += 1
                logger.info(
                    "API judge %s: %s; retry %d/%d in %.1f s",
                    self.identity,
                    self.scrub(last),
                    attempt + 1,
                    self.policy.max_retries,
                    wait,
                )
                time.sleep(wait)
        return JudgeReply(
            text="", error=self.scrub(f"{self.identity} failed after {self.policy.max_retries + 1} attempts: {last}")
        )

    def _reply(self, completion: Any) -> JudgeReply:
        choices = getattr(completion, "choices", None)
        if not choices:
            raise _Malformed(f"{type(completion).__name__} without choices: {_short(str(completion))}")
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if text is None and getattr(message, "refusal", None):
            text = message.refusal
        if text is None:
            text = ""  # a reasoning judge cut off before it wrote anything: read as unparseable
        usage = getattr(completion, "usage", None)
        return JudgeReply(
            text=str(text),
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        )

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _Malformed(Exception):
    pass


class _ScrubFilter(logging.Filter):
    """Takes secrets out of the HTTP libraries' own log records: httpx logs every request's URL
    at INFO, user and password of a base URL included."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()
        self._installed = False

    def add(self, secrets: Sequence[str]) -> None:
        with self._lock:
            self._secrets.update(secrets)
            if not self._installed:
                for name in ("httpx", "httpx2", "httpcore.http11", "httpcore2.http11", "openai", "openai._base_client"):
                    logging.getLogger(name).addFilter(self)
                self._installed = True

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            clean = message
            for secret in tuple(self._secrets):
                clean = clean.replace(secret, "***")
            if clean != message:
                record.msg, record.args = clean, ()
        return True


_LOG_SCRUBBER = _ScrubFilter()


def _retry_after(response: Any) -> float | None:
    return retry_after_seconds(getattr(response, "headers", {}).get("retry-after") if response is not None else None)
