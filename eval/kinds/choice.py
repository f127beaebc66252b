"""``choice``: multiple choice scored by the log-likelihood of each option.

Item fields: ``question`` (string), ``choices`` (list of at least two strings), ``answer`` (the
correct option: a 0-based index, or a letter A, B, C, ...), ``id`` (optional). The context is
the question rendered as a user turn with the model's chat template (benchmark option
``chat_template: false`` uses the plain format); each option is scored as the assistant's reply.
Metrics: ``acc`` (highest log-likelihood) and ``acc_norm`` (highest log-likelihood per character
of the option, as lm-evaluation-harness normalises, so tokenizers of different granularity
compare fairly).
"""

from __future__ import annotations

import string

from chatvec.eval.engines.base import LoglikelihoodRequest
from chatvec.eval.kinds.base import CellContext, FieldSpec, Kind, dumps, row


def answer_index(answer, n: int) -> int | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < n else None
    if isinstance(answer, str) and len(answer.strip()) == 1:
        idx = string.ascii_uppercase.find(answer.strip().upper())
        return idx if 0 <= idx < n else None
    return None


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


class ChoiceKind(Kind):
    name = "choice"
    description = "multiple choice by log-likelihood: accuracy and length-normalised accuracy"
    fields = (
        FieldSpec("question", (str,)),
        FieldSpec("choices", (list,), doc="the options, a list of strings"),
        FieldSpec("answer", (int, str), doc="index of the correct option (0-based) or its letter"),
    )
    metrics = ("acc", "acc_norm")
    generates = False

    def check_item(self, item: dict) -> list[str]:
        problems = super().check_item(item)
        choices = item.get("choices")
        if isinstance(choices, list):
            if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                problems.append("field 'choices' must be a list of at least two non-empty strings")
            elif "answer" in item and answer_index(item["answer"], len(choices)) is None:
                problems.append(f"field 'answer' ({item['answer']!r}) does not name one of the {len(choices)} choices")
        return problems

    def run(self, items: list[dict], ctx: CellContext) -> list[dict]:
        requests, contexts = [], []
        for item in items:
            text, ctx_ids = ctx.prompts.chat_ids(ctx.messages([("user", item["question"])]))
            contexts.append((text, ctx_ids))
            for choice in item["choices"]:
                requests.append(LoglikelihoodRequest(ctx_ids, ctx.prompts.encode(choice)))
        results = iter(ctx.engine.loglikelihood(requests, progress=ctx.progress))
        rows = []
        for item, (text, ctx_ids) in zip(items, contexts):
            lls = [next(results) for _ in item["choices"]]
            logprobs = [r.logprob for r in lls]
            chars = [len(c) for c in item["choices"]]
            gold = answer_index(item["answer"], len(item["choices"]))
            pred = argmax(logprobs)
            pred_norm = argmax([lp / n for lp, n in zip(logprobs, chars)])
            fields = dict(
                prompt=text,
                response=item["choices"][pred],
                prompt_tokens=len(ctx_ids),
                completion_tokens=sum(r.tokens for r in lls),
                details=dumps(
                    {
                        "logprobs": logprobs,
                        "chars": chars,
                        "tokens": [r.tokens for r in lls],
                        "answer": gold,
                        "pred": pred,
                        "pred_norm": pred_norm,
                    }
                ),
            )
            rows.append(row(item["id"], "acc", float(pred == gold), **fields))
            rows.append(row(item["id"], "acc_norm", float(pred_norm == gold), **fields))
        return rows
