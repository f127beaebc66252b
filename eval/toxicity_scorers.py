"""Choosing the toxicity scorer from its spec (``--toxicity``, ``toxicity:`` in a sweep file):
``NAME`` or ``NAME:ARGUMENT``, the name registered in ``TOXICITY``: ``perspective`` or
``hf:MODEL[#LABEL]`` (what they are: ``chatvec.eval.toxicity``). An extension registers its own
the same way, with a class that has the ``identity``/``make`` shape of the two below::

    from chatvec.eval.toxicity_scorers import TOXICITY
    TOXICITY.register("my-api", "my_package.toxicity:MyAPIScorers")

``toxicity_identity`` checks a spec and names the scorer before anything loads (an unknown scorer,
a missing key, a classifier that is not there or has no toxic label fail here, so before any model
loads); ``make_toxicity`` loads it where the cells run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any

from chatvec.core.errors import InputError
from chatvec.core.registry import Registry
from chatvec.eval.perspective import PerspectiveScorer
from chatvec.eval.toxicity import (
    HF_PREFIX,
    PERSPECTIVE,
    HFToxicity,
    ToxicityConfigError,
    ToxicityScorer,
    parse_hf,
    toxic_label,
)

logger = logging.getLogger(__name__)


def _check_exists(uri: str) -> None:
    from chatvec.core.storage import is_local, local_path

    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", uri)  # org/name: fetched from the Hub when loaded
    if is_local(uri) and not hub_id and not os.path.isdir(local_path(uri)):
        raise InputError(f"toxicity classifier {uri} does not exist: pass a folder, a URI or a Hub id (org/name)")


def _local_config(uri: str) -> dict | None:
    from chatvec.core.storage import is_local, local_path

    path = os.path.join(local_path(uri), "config.json") if is_local(uri) else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def absolute_toxicity(spec: str | None) -> str | None:
    """The spec with a relative local classifier folder made absolute (actors run elsewhere)."""
    spec = spec.strip() if spec else None
    if not spec or not spec.startswith(HF_PREFIX):
        return spec
    from chatvec.core.storage import is_local, local_path

    uri, label = parse_hf(spec)
    if is_local(uri) and os.path.exists(local_path(uri)):
        uri = os.path.abspath(local_path(uri))
    return f"{HF_PREFIX}{uri}" + (f"#{label}" if label else "")


def classifier_identity(uri: str) -> str | None:
    """A digest of a classifier's files (sizes and mtimes, or the Hub's hashes), as models' are."""
    from chatvec.core.file_identity import file_identity, normalize_uri
    from chatvec.core.storage import Store

    try:
        store = Store(normalize_uri(uri))
        files = sorted(f for f in store.list() if not any(p.startswith(".") for p in f.split("/")))
    except Exception as exc:  # left to the load, which says what is wrong
        logger.debug("no identity for classifier %s: %s", uri, exc)
        return None
    parts = []
    for rel in files:
        size = store.size(rel) or 0
        ident = file_identity(store, rel, size)
        parts.append([rel, size, ident.sha256, ident.etag, ident.mtime])
    return "files:" + hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


class PerspectiveScorers:
    """``perspective``: Google's Perspective API; takes no argument."""

    @staticmethod
    def identity(arg: str | None) -> str:
        return PerspectiveScorers.make(arg, None).identity

    @staticmethod
    def make(arg: str | None, settings: Any) -> ToxicityScorer:
        if arg is not None:
            raise ToxicityConfigError(f"--toxicity perspective takes no argument (got perspective:{arg})")
        return PerspectiveScorer.from_env()


class HFScorers:
    """``hf:MODEL[#LABEL]``: a Hugging Face sequence-classification model in the evaluator's process."""

    @staticmethod
    def identity(arg: str | None) -> str:
        from chatvec.eval.preflight import check_models

        uri, label = parse_hf(f"{HF_PREFIX}{arg or ''}")
        _check_exists(uri)
        check_models({"toxicity classifier": uri})
        config = _local_config(uri)
        index = toxic_label(config.get("id2label") or {}, label, uri) if config is not None else label
        return f"{HF_PREFIX}{uri} {classifier_identity(uri)} label={index}"

    @staticmethod
    def make(arg: str | None, settings: Any) -> ToxicityScorer:
        uri, label = parse_hf(f"{HF_PREFIX}{arg or ''}")
        return HFToxicity(
            uri,
            label=label,
            device=settings.device,
            batch_size=settings.batch_size,
            cache_dir=settings.cache_dir,
            identity=HFScorers.identity(arg),
        )


# toxicity scorers by the name before the first ``:`` of ``--toxicity NAME[:ARGUMENT]``
TOXICITY: Registry[type] = Registry("toxicity scorer")
TOXICITY.register(PERSPECTIVE, PerspectiveScorers, summary="Google's Perspective API, key in PERSPECTIVE_API_KEY")
TOXICITY.register(HF_PREFIX.rstrip(":"), HFScorers, summary="hf:MODEL, a Hugging Face sequence-classification model")


def _scorers(spec: str | None) -> tuple[Any, str | None]:
    """The registered scorer class of a spec, and its argument (None without a ``:``)."""
    spec = (spec or "").strip()
    name, sep, arg = spec.partition(":")
    if not name or name not in TOXICITY:
        raise ToxicityConfigError(
            f"unknown toxicity scorer {spec!r}: use "
            + " or ".join(f"'{n}' ({TOXICITY.summary(n)})" for n in TOXICITY.names())
        )
    return TOXICITY[name], (arg if sep else None)


def toxicity_identity(spec: str) -> str:
    """What toxicity cells record about their scorer, known before anything loads. Checks the
    spec (an unknown scorer, a missing key, a classifier without a toxic label fail here)."""
    scorers, arg = _scorers(spec)
    return scorers.identity(arg)


def make_toxicity(spec: str, settings: Any) -> ToxicityScorer:
    """The scorer for ``--toxicity SPEC``, loaded. ``settings``: the run's RunSettings (device,
    batch size, model cache), not imported here since the pipeline imports this module."""
    scorers, arg = _scorers(spec)
    return scorers.make(arg, settings)
