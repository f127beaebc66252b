"""Scores that count only in the target language: ``gate: in_language`` on a benchmark.

A right answer in the wrong language is a failure for someone who merged a chat vector to get a
model that answers in *their* language (the paper's Table 7). A benchmark that declares
``gate: in_language`` gets, next to each of its metrics ``m``, a gated metric ``m@lang``:

- an answer detected in the target language keeps its score;
- an answer detected in another language (or, for Chinese, the other script) fails: 0 for
  metrics where higher is better (0/1 metrics fail), the metric's worst value for those where
  lower is better (``unsafe``, ``toxicity``: a kind declares it in ``Kind.worst``);
- an answer whose language could not be decided (too little prose, no detector) is left out
  of the gated metric's ``n`` and counted in its ``n_unscored``;
- a row that is itself unscored (waiting for a judge, an API that refused the text) stays
  unscored: the gate never invents a score the ungated metric does not have.

Gating is computed when the summary is made, from the ``in_language`` column every generated
answer's rows already store. No stored row changes with the gate, so the gate is not part of a
cell's identity: turning it on or off recomputes the summary, never a cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from chatvec.core.errors import InputError

if TYPE_CHECKING:
    from chatvec.eval.kinds.base import Kind

IN_LANGUAGE = "in_language"
GATES = (IN_LANGUAGE,)
SUFFIX = {IN_LANGUAGE: "@lang"}  # gate -> what its metrics' names end with
_GATE_OF = {suffix: gate for gate, suffix in SUFFIX.items()}


def gated_name(metric: str, gate: str = IN_LANGUAGE) -> str:
    return metric + SUFFIX[gate]


def split_metric(name: str) -> tuple[str, str | None]:
    """(the metric a name is based on, its gate or None): ``exact_match@lang`` ->
    (``exact_match``, ``in_language``)."""
    base, sep, suffix = name.rpartition("@")
    if sep and base and f"@{suffix}" in _GATE_OF:
        return base, _GATE_OF[f"@{suffix}"]
    return name, None


def base_metric(name: str) -> str:
    return split_metric(name)[0]


def check_gate(benchmark: str, gate: str | None, kind: type[Kind]) -> None:
    """A gate the benchmark can have: a known one, on a kind whose answers are generated text."""
    if gate is None:
        return
    if gate not in GATES:
        raise InputError(
            f"benchmark {benchmark!r}: unknown gate {gate!r}; the gates are: {', '.join(GATES)} (or leave 'gate' out)"
        )
    if not kind.generates:
        raise InputError(
            f"benchmark {benchmark!r}: gate {gate!r} needs generated answers, and kind {kind.name!r} "
            "generates no text (it scores log-likelihoods); remove 'gate' from this benchmark"
        )


def gateable(kind: Kind, metric: str) -> bool:
    return kind.gate_failure(metric) is not None


def metric_names(kind: Kind, gate: str | None) -> list[str]:
    """Every metric name a benchmark of ``kind`` with ``gate`` reports, gated ones included."""
    names = list(kind.metrics)
    if gate is not None:
        names += [gated_name(m, gate) for m in kind.metrics if gateable(kind, m)]
    return names


def check_metric(name: str, available: Iterable[str], where: str = "") -> str:
    """``name`` if it is one of ``available`` (gated names included), else a clear error."""
    have = list(dict.fromkeys(available))
    if name in have:
        return name
    base, gate = split_metric(name)
    hint = ""
    if gate is not None and base in have:
        hint = f"; {name!r} needs 'gate: {gate}' on the benchmark"
    raise InputError(
        f"{where + ': ' if where else ''}unknown metric {name!r}; available: {', '.join(have) or 'none'}{hint}"
    )


# -- scoring ---------------------------------------------------------------------------------------
def gated_score(score: float | None, in_language: bool | None, failure: float) -> float | None:
    """One row's gated score (see the module docstring)."""
    if score is None or in_language is None:
        return None
    return score if in_language else failure


def gated_rows(kind: Kind, metric: str, rows: Sequence[Mapping]) -> list[dict] | None:
    """``rows`` of ``metric`` with their gated scores (None: the metric is not gated), ready for
    the kind's own ``aggregate``; ``metric`` in the copies is the gated name."""
    failure = kind.gate_failure(metric)
    if failure is None:
        return None
    name = gated_name(metric)
    return [{**r, "metric": name, "score": gated_score(r["score"], r.get("in_language"), failure)} for r in rows]


def gates_of(specs: Iterable) -> dict[str, str]:
    """benchmark name -> gate, for the benchmarks (specs or cells' specs) that declare one."""
    return {s.name: s.gate for s in specs if getattr(s, "gate", None)}
