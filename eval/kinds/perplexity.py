"""``perplexity``: how well a model predicts text in the target language.

Item fields: ``text`` (string), ``id`` (optional). Each text is scored from its start (after the
model's BOS token where it has one; without one the first token is not scored) in windows of the
model's maximum length, every window conditioned on the tokens just before it.
Metrics: ``perplexity`` (token level: the cell's value is exp(total NLL / total tokens), not a
mean of item perplexities) and ``bits_per_byte`` (total NLL in bits / total UTF-8 bytes; unlike
perplexity, comparable between models with different tokenizers, e.g. a CP model with an
extended vocabulary against its base).
"""

from __future__ import annotations

import math

from chatvec.eval.engines.base import LoglikelihoodRequest
from chatvec.eval.kinds.base import CellContext, FieldSpec, Kind, dumps, loads, row


def windows(ids: list[int], start: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs covering ids[start:], each at most max_length tokens long."""
    out = []
    pos = max(start, 1)
    while pos < len(ids):
        end = min(len(ids), pos + max_length - 1)
        context = ids[max(0, end - max_length) : pos]
        out.append((context, ids[pos:end]))
        pos = end
    return out


class PerplexityKind(Kind):
    name = "perplexity"
    description = "token-level perplexity and bits per byte on target-language text"
    fields = (FieldSpec("text", (str,), doc="the text to score"),)
    metrics = ("perplexity", "bits_per_byte")
    generates = False

    def run(self, items: list[dict], ctx: CellContext) -> list[dict]:
        requests, owners = [], []
        for i, item in enumerate(items):
            start = ctx.prompts.start_ids()
            ids = start + ctx.prompts.encode(item["text"])
            for context, cont in windows(ids, len(start), ctx.engine.max_length):
                requests.append(LoglikelihoodRequest(context, cont))
                owners.append(i)
        nll = [0.0] * len(items)
        tokens = [0] * len(items)
        for i, r in zip(owners, ctx.engine.loglikelihood(requests, progress=ctx.progress)):
            nll[i] -= r.logprob
            tokens[i] += r.tokens
        rows = []
        for i, item in enumerate(items):
            n_bytes = len(item["text"].encode("utf-8"))
            details = dumps({"nll": nll[i], "tokens": tokens[i], "bytes": n_bytes})
            fields = dict(prompt=item["text"], prompt_tokens=tokens[i], completion_tokens=0, details=details)
            ppl = math.exp(nll[i] / tokens[i]) if tokens[i] else None
            bpb = nll[i] / math.log(2) / n_bytes if n_bytes else None
            rows.append(row(item["id"], "perplexity", ppl, **fields))
            rows.append(row(item["id"], "bits_per_byte", bpb, **fields))
        return rows

    def aggregate(self, metric: str, rows: list[dict]) -> tuple[float | None, float | None, int]:
        """Totals over the cell (token- or byte-weighted), with a delta-method standard error."""
        parts = [loads(r["details"]) for r in rows if r["score"] is not None]
        denom_key = "tokens" if metric == "perplexity" else "bytes"
        parts = [p for p in parts if p.get(denom_key)]
        if not parts:
            return None, None, 0
        total = sum(p[denom_key] for p in parts)
        mean = sum(p["nll"] for p in parts) / total  # nats per token / per byte
        n = len(parts)
        se = None
        if n > 1:
            # ratio estimator: residuals of each item's NLL against its share of the total
            var = sum((p["nll"] - mean * p[denom_key]) ** 2 for p in parts) / (n - 1) * n / total**2
            se = math.sqrt(var)
        if metric == "perplexity":
            value = math.exp(mean)
            return value, (value * se if se is not None else None), n
        scale = 1 / math.log(2)
        return mean * scale, (se * scale if se is not None else None), n
