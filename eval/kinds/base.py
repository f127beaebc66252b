"""What a benchmark kind is: the item fields it needs, how it runs a cell, how its judge reads.

A kind turns a cell's items into sample rows (dicts with ``chatvec.eval.schema.ROW_FIELDS`` keys). Kinds
that generate answers also record language fidelity; kinds whose metric needs a judge leave that
metric's score empty with ``judge_status`` ``pending`` (a judge was given: the judge phase fills
it) or ``no_judge`` (none was given: it stays unscored, never invented).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from chatvec.eval.engines.base import Decoding, Generation, GenerationRequest
from chatvec.eval.schema import NO_JUDGE, NOT_JUDGED, PENDING

if TYPE_CHECKING:
    from chatvec.eval.engines.base import Engine
    from chatvec.eval.fidelity import FidelityScorer
    from chatvec.eval.prompts import Prompts
    from chatvec.eval.toxicity import ToxicityScorer


@dataclass(frozen=True)
class FieldSpec:
    name: str
    types: tuple[type, ...]
    required: bool = True
    doc: str = ""

    def type_names(self) -> str:
        names = {str: "string", int: "integer", float: "number", list: "list", dict: "object", bool: "boolean"}
        return " or ".join(names.get(t, t.__name__) for t in self.types)


ID_FIELD = FieldSpec("id", (str, int), required=False, doc="unique item id (default: the line number)")


class BenchmarkSettings(Protocol):
    """What a kind reads of its benchmark. ``chatvec.eval.benchmarks.BenchmarkSpec`` is one; kinds do not
    import it, so that benchmarks (which look kinds up by name) and kinds import one way only."""

    name: str
    kind: str
    data: dict[str, str]
    max_new_tokens: int | None
    temperature: float
    repetition_penalty: float
    seed: int
    system_prompt: str | None
    options: dict[str, Any]


@dataclass
class CellContext:
    """Everything a kind needs to run one (model, language, benchmark) cell."""

    engine: Engine
    prompts: Prompts
    fidelity: FidelityScorer
    spec: BenchmarkSettings
    language: str
    judge: bool  # a judge will score judged metrics later
    max_new_tokens: int | None = None  # a run-wide cap (quick runs, demos)
    progress: bool = False
    toxicity: ToxicityScorer | None = None  # for kinds that score toxicity (None: none given)

    def decoding(self, kind: Kind) -> Decoding:
        n = self.spec.max_new_tokens or kind.default_max_new_tokens
        if self.max_new_tokens:
            n = min(n, self.max_new_tokens)
        return Decoding(
            max_new_tokens=n,
            temperature=self.spec.temperature,
            repetition_penalty=self.spec.repetition_penalty,
            seed=self.spec.seed,
        )

    def messages(self, turns: Sequence[tuple[str, str]]) -> list[dict]:
        return self.prompts.conversation(turns, system=self.spec.system_prompt)

    def ask(self, kind: Kind, questions: Sequence[str]) -> tuple[list[str], list[Generation]]:
        """Each question as the user's only message, answered with ``kind``'s decoding:
        (rendered prompts, answers), in question order."""
        dec = self.decoding(kind)
        prompts, requests = [], []
        for question in questions:
            text, ids = self.prompts.chat_ids(self.messages([("user", question)]))
            prompts.append(text)
            requests.append(GenerationRequest(ids, dec))
        return prompts, self.engine.generate(requests, progress=self.progress)

    @property
    def pending_status(self) -> str:
        return PENDING if self.judge else NO_JUDGE


class Kind:
    """Base class. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    fields: ClassVar[tuple[FieldSpec, ...]] = ()
    metrics: ClassVar[tuple[str, ...]] = ()
    generates: ClassVar[bool] = True  # produces answers (language fidelity is scored)
    uses_items: ClassVar[bool] = True  # False: the data source names something else (lm-eval tasks)
    default_max_new_tokens: ClassVar[int] = 256
    # metric -> its worst value, for metrics where lower is better (what an answer in the wrong
    # language scores under ``gate: in_language``); other metrics fail with 0
    worst: ClassVar[dict[str, float]] = {}
    uses_toxicity: ClassVar[bool] = False  # its rows are scored by the run's toxicity scorer

    # -- data ---------------------------------------------------------------------------------
    @classmethod
    def all_fields(cls) -> tuple[FieldSpec, ...]:
        return (ID_FIELD,) + tuple(cls.fields)

    def check_item(self, item: dict) -> list[str]:
        """Problems with one item (missing or mistyped fields), without its location."""
        problems = []
        for f in self.all_fields():
            if f.name not in item or item[f.name] is None:
                if f.required:
                    problems.append(f"missing field {f.name!r} ({f.doc})" if f.doc else f"missing field {f.name!r}")
                continue
            value = item[f.name]
            if (isinstance(value, bool) and bool not in f.types) or not isinstance(value, f.types):
                problems.append(f"field {f.name!r} must be a {f.type_names()}, got {type(value).__name__}")
        return problems

    @classmethod
    def check_settings(cls, spec: BenchmarkSettings) -> list[str]:
        """Problems with a benchmark's options for this kind (checked before any model loads)."""
        return []

    # -- running ------------------------------------------------------------------------------
    def run(self, items: list[dict], ctx: CellContext) -> list[dict]:
        raise NotImplementedError

    def aggregate(self, metric: str, rows: list[dict]) -> tuple[float | None, float | None, int]:
        """(value, stderr, n) of one metric over a cell's rows: the mean of the scored rows and
        its standard error (sample standard deviation / sqrt(n); None for n < 2)."""
        return mean_stderr([r["score"] for r in rows if r["score"] is not None])

    def gate_failure(self, metric: str) -> float | None:
        """What an answer outside the target language scores on ``metric`` when the benchmark is
        gated (``chatvec.eval.gating``); None: the metric is not gated (language fidelity itself,
        or a kind with no generated text)."""
        if not self.generates or metric == "in_language":
            return None
        return self.worst.get(metric, 0.0)

    # -- judging ------------------------------------------------------------------------------
    def judge_prompt(self, row: dict) -> str | None:
        """The judge's user message for a row waiting for the judge (None: not judged)."""
        return None

    def read_judgment(self, row: dict, text: str) -> tuple[float | None, str]:
        raise NotImplementedError(f"kind {self.name} has no judged metric")


# -- helpers shared by the kinds ------------------------------------------------------------------
def mean_stderr(values: list[float]) -> tuple[float | None, float | None, int]:
    n = len(values)
    if n == 0:
        return None, None, 0
    mean = sum(values) / n
    if n < 2:
        return mean, None, n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n), n


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def loads(text: str | None) -> dict:
    return json.loads(text) if text else {}


def row(item_id: str, metric: str, score: float | None, **fields) -> dict:
    out = {"item_id": item_id, "metric": metric, "score": score, "judge_status": NOT_JUDGED}
    out.update(fields)
    return out


def answer_fields(ctx: CellContext, prompt: str, gen: Generation) -> dict:
    """The columns every generated answer carries: text, tokens and language fidelity."""
    det = ctx.fidelity.detect(gen.text, ctx.language)
    return {
        "prompt": prompt,
        "response": gen.text,
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "detected_language": det.language,
        "detected_script": det.script,
        "in_language": det.in_language,
    }


def in_language_row(item_id: str, fields: dict, details: str | None = None) -> dict:
    value = fields["in_language"]
    return row(
        item_id,
        "in_language",
        None if value is None else float(value),
        details=details,
        error=None if value is not None else _no_language_reason(fields),
        **fields,
    )


def _no_language_reason(fields: dict) -> str:
    if fields.get("detected_language") == "undetermined":
        return "too little prose to tell its language (undetermined, not a failure)"
    return "no language detector for this language"
