"""``multiturn``: a conversation of two (or more) user turns; the last answer is judged 0-10 in
the context of the whole conversation.

Item fields: ``turns`` (list of strings, at least two user messages), ``reference`` (string,
optional: a reference for the last answer), ``id`` (optional). The model answers turn by turn,
each turn seeing its own earlier answers. Metrics: ``judge_score`` (last answer) and
``in_language`` (last answer).
"""

from __future__ import annotations

from chatvec.eval.engines.base import GenerationRequest
from chatvec.eval.judge_prompts import multiturn_prompt
from chatvec.eval.kinds.base import CellContext, FieldSpec, answer_fields, dumps, in_language_row, row
from chatvec.eval.kinds.chat import RatedKind


class MultiturnKind(RatedKind):
    name = "multiturn"
    description = "two-turn conversations, the second answer judged 0-10 in context"
    fields = (
        FieldSpec("turns", (list,), doc="the user's messages, in order (at least two)"),
        FieldSpec("reference", (str,), required=False, doc="a reference for the last answer"),
        FieldSpec("category", (str,), required=False),
    )

    def check_item(self, item: dict) -> list[str]:
        problems = super().check_item(item)
        turns = item.get("turns")
        if isinstance(turns, list) and (len(turns) < 2 or not all(isinstance(t, str) for t in turns)):
            problems.append("field 'turns' must be a list of at least two strings")
        return problems

    def run(self, items: list[dict], ctx: CellContext) -> list[dict]:
        dec = ctx.decoding(self)
        answers: list[list[str]] = [[] for _ in items]
        totals = [[0, 0] for _ in items]
        last = {}
        for turn in range(max((len(item["turns"]) for item in items), default=0)):
            active = [i for i, item in enumerate(items) if turn < len(item["turns"])]
            prompts, requests = {}, []
            for i in active:
                convo = []
                for q, a in zip(items[i]["turns"][:turn], answers[i]):
                    convo += [("user", q), ("assistant", a)]
                convo.append(("user", items[i]["turns"][turn]))
                text, ids = ctx.prompts.chat_ids(ctx.messages(convo))
                prompts[i] = text
                requests.append(GenerationRequest(ids, dec))
            for i, gen in zip(active, ctx.engine.generate(requests, progress=ctx.progress)):
                answers[i].append(gen.text)
                totals[i][0] += gen.prompt_tokens
                totals[i][1] += gen.completion_tokens
                last[i] = (prompts[i], gen)
        rows = []
        for i, item in enumerate(items):
            prompt, gen = last[i]
            fields = answer_fields(ctx, prompt, gen)
            fields["prompt_tokens"], fields["completion_tokens"] = totals[i]
            details = dumps({"turns": item["turns"], "answers": answers[i], "reference": item.get("reference")})
            rows.append(
                row(item["id"], "judge_score", None, judge_status=ctx.pending_status, details=details, **fields)
            )
            rows.append(in_language_row(item["id"], fields, details))
        return rows

    def judge_text(self, r: dict, details: dict) -> str:
        return multiturn_prompt(r["language"], details["turns"], details["answers"], details.get("reference"))
