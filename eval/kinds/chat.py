"""``chat``: open questions; the judge rates each answer 0-10 against a reference answer.

Item fields: ``question`` (string), ``reference`` (string, optional: the answer that counts as a
10; without it the judge rates on its own), ``category`` (string, optional), ``id`` (optional).
Metrics: ``judge_score`` (0-10, judged) and ``in_language`` (1 when the answer is in the
benchmark's language and script).
"""

from __future__ import annotations

from chatvec.eval.judge_prompts import rating_prompt
from chatvec.eval.judgments import parse_rating
from chatvec.eval.kinds.base import CellContext, FieldSpec, Kind, answer_fields, dumps, in_language_row, loads, row


class RatedKind(Kind):
    """Answers the judge rates 0-10 (``judge_score``), plus ``in_language``; subclasses say how
    a row's details become the judge's prompt."""

    metrics = ("judge_score", "in_language")
    default_max_new_tokens = 512

    def judge_text(self, r: dict, details: dict) -> str:
        raise NotImplementedError

    def judge_prompt(self, r: dict) -> str | None:
        if r["metric"] != "judge_score":
            return None
        return self.judge_text(r, loads(r["details"]))

    def read_judgment(self, r: dict, text: str) -> tuple[float | None, str]:
        return parse_rating(text)


class ChatKind(RatedKind):
    name = "chat"
    description = "open questions judged 0-10 against a reference answer"
    fields = (
        FieldSpec("question", (str,), doc="the user's question"),
        FieldSpec("reference", (str,), required=False, doc="a reference answer that deserves a 10"),
        FieldSpec("category", (str,), required=False),
    )

    def run(self, items: list[dict], ctx: CellContext) -> list[dict]:
        prompts, gens = ctx.ask(self, [item["question"] for item in items])
        rows = []
        for item, prompt, gen in zip(items, prompts, gens):
            fields = answer_fields(ctx, prompt, gen)
            details = dumps(
                {"question": item["question"], "reference": item.get("reference"), "category": item.get("category")}
            )
            rows.append(
                row(item["id"], "judge_score", None, judge_status=ctx.pending_status, details=details, **fields)
            )
            rows.append(in_language_row(item["id"], fields, details))
        return rows

    def judge_text(self, r: dict, details: dict) -> str:
        return rating_prompt(r["language"], details["question"], r["response"] or "", details.get("reference"))
