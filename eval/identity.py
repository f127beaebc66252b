"""What a cell was computed from, so a rerun reuses a cell only when its inputs are the same.

A cell's identity has five parts, each a short digest or a name:

- ``model``: the model's contents. A merged model's manifest fingerprint (stable across copies)
  while its files are those the manifest lists; otherwise every file's size plus its mtime (local
  and object stores) or the Hub's sha256, the same file identities the merge cache uses;
- ``data``: the benchmark items the cell ran (after field mapping and limits);
- ``options``: the kind, its options, the prompt settings and the decoding, with the run's caps;
- ``engine``: the engine's name and its library's version (``hf 5.17.0``, ``vllm 0.32.0``);
- ``judge``: the judge's identity, for cells with judged rows (recorded by the judge phase);
- ``scorer``: the toxicity scorer's identity, for cells of kinds that use one (``toxicity``).

The identity is stored in the cell's samples file (Parquet metadata), so it travels with the
rows it describes. A part the planning side cannot know (a model it cannot reach, an engine not
installed there) is None and not compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatvec.eval.benchmarks import BenchmarkSpec
    from chatvec.eval.contracts import RunSettings

logger = logging.getLogger(__name__)

METADATA_KEY = b"chatvec.cell_identity"
_REASONS = {
    "model": "the model's files changed",
    "data": "the benchmark data changed",
    "options": "the benchmark's options or decoding changed",
    "engine": "the engine or its version changed",
    "judge": "the judge changed",
    "scorer": "the toxicity scorer changed",
}


def digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CellIdentity:
    model: str | None = None
    data: str | None = None
    options: str | None = None
    engine: str | None = None
    judge: str | None = None
    scorer: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CellIdentity:
        raw = json.loads(text)
        return cls(**{f.name: raw.get(f.name) for f in fields(cls)})

    def with_judge(self, judge: str | None) -> CellIdentity:
        return replace(self, judge=judge)

    def changes(
        self, recorded: CellIdentity, *, parts: Sequence[str] = ("model", "data", "options", "engine", "scorer")
    ) -> list[str]:
        """The reasons ``recorded`` no longer matches this identity (empty: the same inputs)."""
        out = []
        for part in parts:
            mine, theirs = getattr(self, part), getattr(recorded, part)
            if mine is not None and mine != theirs:
                out.append(_REASONS[part])
        return out


# -- the model ------------------------------------------------------------------------------------
def model_identity(uri: str) -> str | None:
    """A digest of the model's contents at ``uri``, or None when the model cannot be listed."""
    from chatvec.core.file_identity import normalize_uri
    from chatvec.core.storage import Store

    try:
        store = Store(normalize_uri(uri))
        files = [f for f in store.list() if not any(part.startswith(".") for part in f.split("/"))]
    except Exception as exc:  # a model that does not exist yet fails its cells later, with the reason
        logger.debug("no identity for model %s: %s", uri, exc)
        return None
    if not files:
        return None
    sizes = {f: store.size(f) for f in files}
    fingerprint = _manifest_fingerprint(store, sizes)
    if fingerprint is not None:
        return merged_model_identity(fingerprint)
    return "files:" + digest(_file_identities(store, sizes))


def merged_model_identity(fingerprint: str) -> str:
    """The identity of a merge's result, from its plan's fingerprint: the same whether the merge
    was written to a folder (read back from its manifest) or swapped into a running engine."""
    return f"merge:{fingerprint[:16]}"


def _manifest_fingerprint(store, sizes: dict[str, int | None]) -> str | None:
    """The merge fingerprint when every file the manifest lists is there with its recorded size."""
    from chatvec.core.layout import MANIFEST

    if MANIFEST not in sizes:
        return None
    try:
        manifest = json.loads(store.read_text(MANIFEST))
        listed = manifest.get("files") or {}
        if not listed or any(sizes.get(rel) != info.get("size") for rel, info in listed.items()):
            return None
        return manifest.get("fingerprint")
    except (ValueError, AttributeError):
        return None


def _file_identities(store, sizes: dict[str, int | None]) -> list:
    from chatvec.core.file_identity import file_identity

    out = []
    for rel, size in sorted(sizes.items()):
        ident = file_identity(store, rel, size or 0)
        out.append([rel, size, ident.sha256, ident.etag, ident.mtime])
    return out


# -- the benchmark --------------------------------------------------------------------------------
def data_identity(spec: BenchmarkSpec, language: str, items: list[dict]) -> str:
    """The items the cell ran; kinds without items (lm-eval) name their source instead."""
    return digest(items if items else {"source": spec.data.get(language)})


def options_identity(spec: BenchmarkSpec, settings: RunSettings) -> str:
    """The kind, its settings and the decoding as the cell uses it; where the data lives is not
    part of it, nor is a length cap for a kind that generates nothing."""
    from chatvec.eval.kinds import get_kind

    kind = get_kind(spec.kind)
    # the gate is applied to stored rows when summarizing (chatvec.eval.gating): no row depends on it
    described = spec.model_dump(mode="json", exclude={"data", "description", "name", "max_new_tokens", "gate"})
    budget = None
    if kind.generates:
        budget = spec.max_new_tokens or kind.default_max_new_tokens
        if settings.max_new_tokens:
            budget = min(budget, settings.max_new_tokens)
    return digest({"spec": described, "max_new_tokens": budget, "limit": settings.limit, "dtype": settings.dtype})


# -- the engine -----------------------------------------------------------------------------------
@cache
def engine_identity(engine: str) -> str | None:
    """``NAME VERSION`` of an engine (``hf 5.17.0``: transformers; ``vllm 0.32.0``), or None when
    its library is not installed here (then it is not compared)."""
    from chatvec.eval.engines import engine_version

    version = engine_version(engine)
    return None if version is None else f"{engine} {version}"


def cell_identity(
    *,
    model: str | None,
    spec: BenchmarkSpec,
    language: str,
    items: list[dict],
    settings: RunSettings,
    judge: str | None = None,
    toxicity: str | None = None,
) -> CellIdentity:
    """``toxicity``: the run's toxicity scorer identity, recorded for the kinds that use one."""
    from chatvec.eval.kinds import kind_class

    return CellIdentity(
        model=model,
        data=data_identity(spec, language, items),
        options=options_identity(spec, settings),
        engine=engine_identity(settings.engine),
        judge=judge,
        scorer=toxicity if kind_class(spec.kind).uses_toxicity else None,
    )
