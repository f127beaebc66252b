"""Judge backends: what the judge phase sends prompts to.

A judge prompt is the text of one user message (a kind's ``judge_prompt``: the question, the
reference answer, the answer to rate). A backend answers a list of them with ``JudgeReply``
objects, in order. Two backends exist:

- ``LocalJudge``: a model loaded into one of our engines; each prompt is rendered with the
  judge's own chat template, as any model's prompt is;
- ``chatvec.eval.api_judge.APIJudge``: an OpenAI-compatible chat-completions endpoint
  (``--judge openai:MODEL``).

``identity`` is what judged rows record in ``judge_model`` and what a cell's identity compares on
a rerun: stable, and never a secret (no API key in it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from chatvec.core.errors import InputError
from chatvec.core.registry import Registry
from chatvec.eval.contracts import JudgeBackend, JudgeReply

if TYPE_CHECKING:
    from chatvec.eval.contracts import RunSettings

logger = logging.getLogger(__name__)

# API judge backends by the prefix of ``--judge PREFIX:MODEL``; any other spec is a judge model's
# location, run by ``LocalJudge``. A backend class takes ``model=`` and has the JudgeBackend shape.
JUDGES: Registry[type] = Registry("judge backend")
JUDGES.register("openai", "chatvec.eval.api_judge:APIJudge", summary="an OpenAI-compatible chat-completions endpoint")


class LocalJudge:
    """A judge model in one of our engines (``settings.engine``), loaded when constructed."""

    def __init__(self, uri: str, settings: RunSettings) -> None:
        from chatvec.eval.engines import load_engine_for
        from chatvec.eval.prompts import Prompts

        self.uri = uri
        self.identity = uri
        self.settings = settings
        self.engine = load_engine_for(settings, uri)
        self.prompts = Prompts(self.engine.tokenizer, model_name=f"judge {uri}")

    def judge(self, prompts: list[str], *, max_new_tokens: int, progress: bool = False) -> list[JudgeReply]:
        from chatvec.eval.engines.base import Decoding, GenerationRequest

        if not prompts:
            return []
        decoding = Decoding(max_new_tokens=max_new_tokens)
        requests = []
        for text in prompts:
            _, ids = self.prompts.chat_ids(self.prompts.conversation([("user", text)]))
            requests.append(GenerationRequest(ids, decoding))
        gens = self.engine.generate(requests, progress=progress)
        return [JudgeReply(g.text, g.prompt_tokens, g.completion_tokens) for g in gens]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def api_judge_of(spec: str) -> tuple[str, str] | None:
    """(backend name, model) when ``spec`` names a registered API backend, else None."""
    prefix, sep, model = spec.partition(":")
    return (prefix, model) if sep and prefix in JUDGES else None


def is_api_judge(spec: str) -> bool:
    return api_judge_of(spec) is not None


def judge_budget(settings: RunSettings) -> int:
    """The judge's generation budget: its own setting, under the run-wide cap (quick runs)."""
    cap = settings.max_new_tokens
    return min(settings.judge_max_new_tokens, cap) if cap else settings.judge_max_new_tokens


def judge_identity(spec: str, settings: RunSettings) -> str:
    """What judged cells record about their judge, known before any judge loads: an API judge's
    own identity (its model and endpoint), or a judge model's URI, the identity of its files and
    its engine; then the judge's budget, since a judge cut short rates differently."""
    if is_api_judge(spec):
        backend = make_judge(spec, settings)
        try:
            who = backend.identity
        finally:
            backend.close()
    else:
        from chatvec.eval.identity import engine_identity, model_identity

        who = f"{spec} {model_identity(spec)} {engine_identity(settings.engine)}"
    return f"{who} budget={judge_budget(settings)}"


def make_judge(spec: str, settings: RunSettings) -> JudgeBackend:
    """The backend for ``--judge SPEC``: ``PREFIX:MODEL`` for a registered API backend
    (``openai:MODEL``), else a judge model's URI."""
    api = api_judge_of(spec)
    if api is None:
        return LocalJudge(spec, settings)
    backend, model = api
    if not model:
        raise InputError(f"--judge {backend}:MODEL needs a model name, e.g. --judge openai:gpt-4o")
    try:
        cls = JUDGES[backend]
    except ImportError as exc:
        raise InputError(
            f"--judge {spec}: the {backend} judge is not available in this installation ({exc}); "
            "judge with a model folder or URI instead"
        ) from exc
    return cls(model=model)
