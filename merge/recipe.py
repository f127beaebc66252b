"""What to merge: a CP model plus one or more chat vectors, each with its ratio and method.

A recipe YAML looks like::

    cp: org/llama-2-zh-cp            # any URI: local folder, s3://..., hf://org/name, org/name
    vectors:
      - base: meta-llama/Llama-2-7b-hf
        chat: meta-llama/Llama-2-7b-chat-hf
        ratio: 0.5
      - vector: s3://bucket/vectors/xwin   # written by `chatvec extract`
        ratio: {default: 0.5, self_attn: [0.2, 1.0, 0.4], lm_head: 0}   # a schedule
        method: dare
        density: 0.9
    embeddings: skip                 # skip | overlap | by-token (only needed when vocabularies differ)
    chat_tokens_from_chat: false
    dtype: bfloat16                  # default: the CP model's dtype

Relative paths are taken relative to the working directory, as on the command line.
`ratio` and `density` take a number, a list of control points over the layers' depth or a
mapping of module groups (merge/schedule.py; docs/recipes.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chatvec.core.errors import ConfigError
from chatvec.merge.methods import METHOD_NAMES, METHODS
from chatvec.merge.schedule import Density, Ratio, ScheduleValue, fingerprint_form, format_schedule, is_scalar

# the names come from the method table (merge/methods.py)
Method = Literal[METHOD_NAMES]  # type: ignore[valid-type]
EmbeddingPolicy = Literal["skip", "overlap", "by-token"]
OutDtype = Literal["bfloat16", "float16", "float32"]


class VectorSpec(BaseModel):
    """One chat vector: `chat - base`, or a vector extracted earlier; scaled by `ratio`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str | None = None
    chat: str | None = None
    vector: str | None = None
    # a number, or a schedule over layers and module groups (merge/schedule.py)
    ratio: Ratio = 1.0
    method: Method = "add"
    # ties keeps the top `density` fraction of |tau| per tensor; dare keeps each entry with
    # probability `density` and divides the kept ones by it. A schedule too, each value in (0, 1].
    density: Density = 1.0
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> VectorSpec:
        pair = self.base is not None or self.chat is not None
        if self.vector is not None and pair:
            raise ValueError("give either `vector` or both `base` and `chat`, not both")
        if self.vector is None and (self.base is None or self.chat is None):
            raise ValueError("give both `base` and `chat` (the vector is chat - base), or `vector`")
        return self

    def describe(self) -> str:
        src = self.vector if self.vector is not None else f"{self.chat} - {self.base}"
        plain = METHODS[self.method].parameters == ("ratio",)
        extra = "" if plain else f", {self.method} density {format_schedule(self.density)} seed {self.seed}"
        return f"{format_schedule(self.ratio)} x ({src}{extra})"


class MergekitMode(BaseModel):
    """mergekit's general form instead of chatvec's: base + lambda * combine(weight_i, model_i - base)
    (merge/gta.py). Set by `--mergekit-config` (merge/mergekit_config.py), not by recipes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["task_arithmetic", "ties", "dare_ties", "dare_linear"]
    normalize: bool
    rescale: bool
    lambda_: float = 1.0
    consensus: bool = False  # TIES' sign election ("sum"): ties and dare_ties


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cp: str
    vectors: list[VectorSpec] = Field(min_length=1)
    embeddings: EmbeddingPolicy | None = None
    # Rows of tokens that only the chat model has are copied from the chat model (see
    # merge/vocab.py for where they go when the CP tokenizer lacks them).
    chat_tokens_from_chat: bool = False
    dtype: OutDtype | None = None
    mergekit: MergekitMode | None = None

    def fingerprint_payload(self) -> dict:
        """Everything that decides the output's bytes, in a stable JSON-able form."""
        extra = {"mergekit": self.mergekit.model_dump()} if self.mergekit is not None else {}
        return {
            **extra,
            "cp": _canonical_uri(self.cp),
            "vectors": [
                {
                    "base": _canonical_uri(v.base) if v.base else None,
                    "chat": _canonical_uri(v.chat) if v.chat else None,
                    "vector": _canonical_uri(v.vector) if v.vector else None,
                    "ratio": fingerprint_form(v.ratio),
                    "method": v.method,
                    "density": fingerprint_form(v.density),
                    "seed": int(v.seed),
                }
                for v in self.vectors
            ],
            "embeddings": self.embeddings,
            "chat_tokens_from_chat": self.chat_tokens_from_chat,
            "dtype": self.dtype,
        }

    def describe(self) -> str:
        if self.mergekit is not None:
            m = self.mergekit
            return (
                f"mergekit {m.method} (normalize {m.normalize}, lambda {m.lambda_:g}, rescale {m.rescale}): "
                f"{self.cp} + " + " + ".join(v.describe() for v in self.vectors)
            )
        return f"{self.cp} + " + " + ".join(v.describe() for v in self.vectors)


def has_schedule(recipe: Recipe) -> bool:
    """Whether any vector's ratio or density varies by layer or module."""
    return any(not is_scalar(v.ratio) or not is_scalar(v.density) for v in recipe.vectors)


def _canonical_uri(uri: str) -> str:
    from chatvec.core.file_identity import normalize_uri

    return normalize_uri(uri)


def load_recipe(path_or_uri: str) -> Recipe:
    """Read a recipe YAML (local path or storage URI); ConfigError names every bad key."""
    from chatvec.core.yamlconfig import load_model

    recipe = load_model(str(path_or_uri), Recipe)
    return recipe


def recipe_from_options(
    *,
    cp: str,
    base: str | None,
    chat: str | None,
    vector: str | None,
    ratio: ScheduleValue,
    method: str,
    density: float,
    seed: int,
    embeddings: str | None,
    chat_tokens_from_chat: bool,
    dtype: str | None,
) -> Recipe:
    """The recipe the single-vector command line describes; ConfigError on a bad combination."""
    from pydantic import ValidationError

    try:
        spec = VectorSpec(base=base, chat=chat, vector=vector, ratio=ratio, method=method, density=density, seed=seed)
        return Recipe(
            cp=cp, vectors=[spec], embeddings=embeddings, chat_tokens_from_chat=chat_tokens_from_chat, dtype=dtype
        )
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(f"invalid merge options: {msgs}") from None
