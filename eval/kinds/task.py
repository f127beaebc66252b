"""The ``task`` kind: instructions with one right answer (reverse these words, repeat them, ...).

Item fields: ``prompt`` (the instruction, sent as the user's message), ``answer`` (the expected
answer, in the benchmark's language), ``answer_other_script`` (optional: the same answer spelled
in the other script, word for word), ``task`` (optional: the task's name, kept in details).

Metrics per answer:
- ``exact_match``: the answer, word for word, in the benchmark's language (and so its script).
- ``either_script``: the right words in the right order, each in the target script or in the
  item's ``answer_other_script`` spelling: the skill, whatever the script.
- ``closed``: the model ended its answer with its closing (eos) token instead of running into the
  token limit: the chat *format*, independent of the content.
- ``in_language``: the answer is written in the benchmark's language (its script, for languages
  the benchmark declares by script), as for every generated answer.

Language fidelity for languages that a script alone identifies (a synthetic language lingua does
not know) comes from the benchmark's ``scripts`` (language -> script), which the evaluator turns
into an ``chatvec.eval.fidelity.ScriptDetector`` for the cell; the kind itself knows no language.
"""

from __future__ import annotations

from collections.abc import Sequence

from chatvec.eval.kinds.base import CellContext, FieldSpec, Kind, answer_fields, dumps, in_language_row, row

# Sentence-final marks a model may add after an otherwise exact answer.
_TRAILING = ".!?。！？"


# -- answers ------------------------------------------------------------------------------------
def normalize_words(text: str | None) -> list[str]:
    """Case-folded words, with sentence-final marks at the very end dropped."""
    if not text:
        return []
    stripped = text.strip().rstrip(_TRAILING).strip()
    return [w.casefold() for w in stripped.split()]


def exact_match(response: str | None, answer: str) -> float:
    return 1.0 if normalize_words(response) == normalize_words(answer) and normalize_words(answer) else 0.0


def either_script_match(response: str | None, answers: Sequence[str]) -> float:
    """1.0 when the response has the answer's words in order, each word in any given spelling.

    ``answers`` are spellings of the same answer, word-aligned (the target script first, then the
    other script); a response mixing the scripts word by word still counts.
    """
    spellings = [normalize_words(a) for a in answers if a]
    if not spellings:
        return 0.0
    got = normalize_words(response)
    n = len(spellings[0])
    if n == 0 or len(got) != n:
        return 0.0
    aligned = [s for s in spellings if len(s) == n]
    return 1.0 if all(any(word == s[i] for s in aligned) for i, word in enumerate(got)) else 0.0


def closed(finished: bool | None) -> float | None:
    """1.0 when generation stopped at the model's closing token; None when the engine did not say."""
    return None if finished is None else (1.0 if finished else 0.0)


# -- the kind -----------------------------------------------------------------------------------
class TaskKind(Kind):
    name = "task"
    description = "instructions with one right answer: exact match, either-script match, closing rate"
    fields = (
        FieldSpec("prompt", (str,), doc="the instruction, sent as the user's message"),
        FieldSpec("answer", (str,), doc="the expected answer in the benchmark's language"),
        FieldSpec(
            "answer_other_script", (str,), required=False, doc="the same answer in the other script, word for word"
        ),
        FieldSpec("task", (str,), required=False, doc="the task's name"),
    )
    metrics = ("exact_match", "either_script", "closed", "in_language")
    default_max_new_tokens = 32

    def run(self, items: list[dict], ctx: CellContext) -> list[dict]:
        prompts, gens = ctx.ask(self, [item["prompt"] for item in items])
        rows = []
        for item, prompt, gen in zip(items, prompts, gens):
            fields = answer_fields(ctx, prompt, gen)
            spellings = [item["answer"]] + ([item["answer_other_script"]] if item.get("answer_other_script") else [])
            details = dumps(
                {
                    "answer": item["answer"],
                    "answer_other_script": item.get("answer_other_script"),
                    "task": item.get("task"),
                    "finished": gen.finished,
                }
            )
            scores = {
                "exact_match": exact_match(gen.text, item["answer"]),
                "either_script": either_script_match(gen.text, spellings),
                "closed": closed(gen.finished),
            }
            for metric, score in scores.items():
                rows.append(row(item["id"], metric, score, details=details, **fields))
            rows.append(in_language_row(item["id"], fields, details))
        return rows
