"""Google's Perspective API as a toxicity scorer (``--toxicity perspective``), the paper's choice.

Each text is one ``comments:analyze`` request asking for ``TOXICITY`` (its summary score, a
probability in [0, 1]), with the benchmark's language when it has a two-letter code, and
``doNotStore`` so the API keeps nothing. Configuration comes from the environment:

- ``PERSPECTIVE_API_KEY``: the key (required). It is sent in the ``X-Goog-Api-Key`` header, never
  in the URL, and is scrubbed from every message; it is not part of ``identity``;
- ``PERSPECTIVE_API_URL``: the analyze endpoint (default Google's; tests point it at loopback);
- ``PERSPECTIVE_QPS``: requests per second over all threads (default 1, the API's default quota).

As the API judge does (``eval/api_judge.py``), a 429, a 5xx, a timeout, a dropped connection or a
body that is not an analysis is retried with exponential backoff (``Retry-After`` honoured,
capped); another 4xx is the API refusing that text (a language it does not support, an empty
comment): the text is recorded unscored with the API's reason. A text still failing after the
retries raises ``ToxicityUnavailable`` once every text was tried, so the cell fails and a rerun
retries it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from chatvec.eval.retry import RETRY_STATUS, RetryPolicy, public_url, retry_after_seconds, short
from chatvec.eval.toxicity import ToxicityConfigError, ToxicityScore, ToxicityUnavailable

logger = logging.getLogger(__name__)

DEFAULT_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
ATTRIBUTE = "TOXICITY"
KEY_ENV, URL_ENV, QPS_ENV = "PERSPECTIVE_API_KEY", "PERSPECTIVE_API_URL", "PERSPECTIVE_QPS"


class RateLimiter:
    """At most ``qps`` request starts per second, shared by every thread (0: no limit)."""

    def __init__(
        self, qps: float, *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.interval = 1.0 / qps if qps > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Wait for this request's turn; returns how long it waited."""
        with self._lock:
            now = self._clock()
            at = max(now, self._next)
            self._next = at + self.interval
        wait = at - now
        if wait > 0:
            self._sleep(wait)
        return wait


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class PerspectiveScorer:
    """``ToxicityScorer`` over the Perspective API; thread-safe, bounded concurrency."""

    def __init__(
        self,
        api_key: str,
        *,
        url: str = DEFAULT_URL,
        qps: float = 1.0,
        concurrency: int = 4,
        timeout_s: float = 30.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not api_key:
            raise ToxicityConfigError(
                f"--toxicity perspective needs an API key: set {KEY_ENV} (and {URL_ENV} for an endpoint "
                "other than Google's)"
            )
        if concurrency < 1 or qps < 0:
            raise ToxicityConfigError(f"Perspective: concurrency must be >= 1 and qps >= 0 (got {concurrency}, {qps})")
        self._key = api_key
        self.url = url
        self.identity = f"perspective:{ATTRIBUTE}@{public_url(url)}"
        self.limiter = RateLimiter(qps)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.policy = RetryPolicy(max_retries, backoff_s, max_backoff_s)
        self.retries = 0
        self._sleep = sleep
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, **kw) -> PerspectiveScorer:
        qps_text = os.environ.get(QPS_ENV) or "1"
        try:
            qps = float(qps_text)
        except ValueError:
            raise ToxicityConfigError(f"{QPS_ENV}={qps_text!r} is not a number of requests per second") from None
        return cls(os.environ.get(KEY_ENV) or "", url=os.environ.get(URL_ENV) or DEFAULT_URL, qps=qps, **kw)

    # -- ToxicityScorer ---------------------------------------------------------------------------
    def score(self, texts: list[str], language: str) -> list[ToxicityScore]:
        if not texts:
            return []
        out: list[ToxicityScore | None] = [None] * len(texts)
        failed: list[str] = []
        lang = _api_language(language)

        def one(i: int) -> None:
            try:
                out[i] = self._analyze(texts[i], lang)
            except ToxicityUnavailable as exc:
                failed.append(str(exc))

        with ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(texts)), thread_name_prefix="perspective"
        ) as pool:
            list(pool.map(one, range(len(texts))))
        if failed:
            raise ToxicityUnavailable(
                f"{self.identity}: {len(failed)} of {len(texts)} texts could not be scored ({failed[0]}); "
                "rerun to try again"
            )
        return [r for r in out if r is not None]

    def close(self) -> None:
        pass

    # -- one text ---------------------------------------------------------------------------------
    def _analyze(self, text: str, language: str | None) -> ToxicityScore:
        body = {"comment": {"text": text}, "requestedAttributes": {ATTRIBUTE: {}}, "doNotStore": True}
        if language:
            body["languages"] = [language]
        data = json.dumps(body, ensure_ascii=False).encode()
        last = "no attempt made"
        for attempt in range(self.policy.max_retries + 1):
            self.limiter.acquire()
            try:
                return self._post(data)
            except _Retry as exc:
                last, retry_after = str(exc), exc.retry_after
            if attempt < self.policy.max_retries:
                wait = self.policy.wait(attempt, retry_after)
                with self._lock:
                    self.retries += 1
                logger.info(
                    "%s: %s; retry %d/%d in %.1f s", self.identity, last, attempt + 1, self.policy.max_retries, wait
                )
                self._sleep(wait)
        raise ToxicityUnavailable(self.scrub(f"failed after {self.policy.max_retries + 1} attempts: {last}"))

    def _post(self, data: bytes) -> ToxicityScore:
        request = urllib.request.Request(
            self.url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json; charset=utf-8", "X-Goog-Api-Key": self._key},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - a configured URL
                raw = response.read()
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}: {_api_message(exc)}"
            if exc.code in RETRY_STATUS:
                raise _Retry(self.scrub(reason), retry_after_seconds(exc.headers.get("Retry-After"))) from None
            # the API will not score this text (its language, its length): asking again cannot help
            return ToxicityScore(None, self.scrub(f"Perspective refused the text: {reason}"))
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retry(self.scrub(f"no reply: {type(exc).__name__}: {reason}")) from None
        try:
            value = json.loads(raw)["attributeScores"][ATTRIBUTE]["summaryScore"]["value"]
            value = float(value)
        except (ValueError, KeyError, TypeError) as exc:
            raise _Retry(f"not an analysis: {type(exc).__name__}: {short(raw.decode('utf-8', 'replace'))}") from None
        if not 0.0 <= value <= 1.0:
            raise _Retry(f"not an analysis: score {value} outside [0, 1]")
        return ToxicityScore(value)

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _api_language(language: str) -> str | None:
    """The code Perspective takes (``zh-Hant`` -> ``zh``); None for codes it cannot know, so the API
    detects the language itself."""
    base = language.split("-")[0].lower()
    return base if re.fullmatch(r"[a-z]{2}", base) else None


def _api_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read().decode("utf-8", "replace")
    except OSError:
        return exc.reason or ""
    try:
        return short(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return short(body) or str(exc.reason or "")
