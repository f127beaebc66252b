"""``lm-eval``: runs lm-evaluation-harness tasks on our engine and maps the results into our schema.

Needs the optional extra: ``pip install 'chatvec[lm-eval]'``. The benchmark's data source is a
comma-separated list of task (or group) names, e.g. ``tmmlu=tmmluplus:lm-eval:zh-Hant``.
Options (``options:`` in a benchmark YAML): ``num_fewshot`` (default: the task's), ``limit``
(documents per task), ``apply_chat_template`` (default false, lm-eval's default: the paper ran
TMMLU+ zero-shot without a chat template), ``include_path`` (a folder of your own task YAMLs).

Requests go through ``ChatvecLM``, an ``lm_eval.api.model.LM`` over our engine: the same engine
settings and tokenization as every other kind. Every per-document metric lm-eval logs becomes one
row per document (``item_id`` = ``<task>/<doc_id>``), so the summary's mean and stderr come from
the same code as for our own kinds; a metric lm-eval only computes over the whole corpus (BLEU,
word perplexity) becomes one row holding lm-eval's aggregate, with ``item_id`` ``<task>/all``.
"""

from __future__ import annotations

import logging
from typing import Any

from chatvec.core.errors import InputError
from chatvec.eval.engines.base import Decoding, GenerationRequest, LoglikelihoodRequest
from chatvec.eval.kinds.base import CellContext, Kind, dumps, row
from chatvec.eval.kinds.perplexity import windows

logger = logging.getLogger(__name__)


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError as exc:
        raise InputError("the lm-eval kind needs lm-evaluation-harness: pip install 'chatvec[lm-eval]'") from exc
    return LM


def make_lm(ctx: CellContext):
    """An lm-eval LM backed by the cell's engine and prompts."""
    LM = _require_lm_eval()
    engine, prompts = ctx.engine, ctx.prompts
    bos = prompts.tokenizer.bos_token

    def encode_context(text: str) -> list[int]:
        # rendered chat templates carry their own BOS; raw lm-eval prompts get the model's
        ids = prompts.encode(text)
        return ids if bos and text.startswith(bos) else prompts.start_ids() + ids

    class ChatvecLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            reqs = []
            for inst in requests:
                context, continuation = inst.args
                # a trailing space belongs to the continuation, as lm-eval's own models do it
                n_spaces = len(context) - len(context.rstrip())
                if n_spaces:
                    continuation = context[-n_spaces:] + continuation
                    context = context[:-n_spaces]
                reqs.append(LoglikelihoodRequest(encode_context(context), prompts.encode(continuation)))
            return [(r.logprob, r.greedy) for r in engine.loglikelihood(reqs, progress=not disable_tqdm)]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            reqs, owner = [], []
            for i, inst in enumerate(requests):
                (text,) = inst.args
                start = prompts.start_ids()
                for context, cont in windows(start + prompts.encode(text), len(start), engine.max_length):
                    reqs.append(LoglikelihoodRequest(context, cont))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, r in zip(owner, engine.loglikelihood(reqs, progress=not disable_tqdm)):
                totals[i] += r.logprob
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False):
            reqs, stops = [], []
            base = ctx.decoding(LmEvalKind)
            for inst in requests:
                context, kwargs = inst.args
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                stops.append([until] if isinstance(until, str) else list(until))
                sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
                dec = Decoding(
                    max_new_tokens=int(kwargs.get("max_gen_toks", base.max_new_tokens)),
                    temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                    repetition_penalty=base.repetition_penalty,
                    seed=base.seed,
                )
                reqs.append(GenerationRequest(encode_context(context), dec))
            out = []
            for gen, until in zip(engine.generate(reqs, progress=not disable_tqdm), stops):
                text = gen.text
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop, 1)[0]
                out.append(text)
            return out

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return prompts.render(chat_history, add_generation_prompt=add_generation_prompt)

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(engine, "model_dir", "chatvec"))

    return ChatvecLM()


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def result_rows(results: dict) -> list[dict]:
    """Rows from lm_eval.simple_evaluate(..., log_samples=True) output."""
    rows = []
    for task, samples in (results.get("samples") or {}).items():
        task_metrics = {
            k.split(",")[0] for k in results.get("results", {}).get(task, {}) if "," in k and "_stderr" not in k
        }
        per_doc: set[str] = set()
        for s in samples:
            prompt = s.get("arguments")
            first = (
                prompt[0][0]
                if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple))
                else None
            )
            resp = s.get("filtered_resps")
            for metric in sorted(task_metrics):
                value = _scalar(s.get(metric))
                if value is None:
                    continue
                per_doc.add(metric)
                rows.append(
                    row(
                        f"{task}/{s.get('doc_id')}",
                        metric,
                        value,
                        prompt=str(first) if first else None,
                        response=None if resp is None else str(resp)[:2000],
                        details=dumps({"task": task, "target": str(s.get("target"))[:500]}),
                    )
                )
        for metric in sorted(task_metrics - per_doc):
            for key, value in results["results"][task].items():
                if key.split(",")[0] == metric and _scalar(value) is not None:
                    rows.append(
                        row(f"{task}/all", metric, float(value), details=dumps({"task": task, "aggregate": True}))
                    )
                    break
    return rows


class LmEvalKind(Kind):
    name = "lm-eval"
    description = "lm-evaluation-harness tasks by name, on the same engine"
    fields = ()
    metrics = ()  # the tasks' own (acc, acc_norm, exact_match, ...)
    generates = False
    uses_items = False
    default_max_new_tokens = 256

    def run(self, items: list[dict], ctx: CellContext) -> list[dict]:
        _require_lm_eval()
        import lm_eval
        from lm_eval.tasks import TaskManager

        opts = ctx.spec.options
        tasks = [t.strip() for t in ctx.spec.data[ctx.language].split(",") if t.strip()]
        manager = TaskManager(include_path=opts.get("include_path"))
        results = lm_eval.simple_evaluate(
            model=make_lm(ctx),
            tasks=tasks,
            num_fewshot=opts.get("num_fewshot"),
            limit=opts.get("limit"),
            log_samples=True,
            apply_chat_template=bool(opts.get("apply_chat_template", False)),
            task_manager=manager,
        )
        if results is None:
            raise RuntimeError(f"lm-eval returned no results for {tasks}")
        rows = result_rows(results)
        if not rows:
            raise RuntimeError(f"lm-eval produced no per-document metrics for {tasks}")
        return rows
