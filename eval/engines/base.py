"""The interface every engine implements: generate answers and score log-likelihoods.

Requests carry token ids, never text: prompts are rendered and tokenized once, in
``chatvec.eval.prompts``, so the hf and vllm engines see exactly the same tokens.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


def import_transformers():
    """``transformers``, set up not to import scikit-learn.

    transformers' assisted decoding imports scikit-learn's ``roc_curve`` whenever scikit-learn is
    installed (lm-eval brings it), and its model classes import assisted decoding: 0.6 s of every
    engine start on a 2-core machine (bench/engine_start.py). chatvec never decodes with an
    assistant model, and transformers treats "scikit-learn unavailable" as "no
    confidence-threshold tuning", so the check is answered False for the modules that have not been
    imported yet."""
    import transformers

    if "transformers.generation.candidate_generator" not in sys.modules:
        import transformers.utils as utils

        utils.is_sklearn_available = _no_sklearn
    return transformers


def _no_sklearn() -> bool:
    return False


@dataclass(frozen=True)
class Decoding:
    """Per-benchmark decoding. temperature 0 means greedy. Generation always stops at eos."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    repetition_penalty: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    decoding: Decoding = field(default_factory=Decoding)


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # stopped at eos (False: ran into max_new_tokens)


@dataclass
class LoglikelihoodRequest:
    context_ids: list[int]
    continuation_ids: list[int]


@dataclass
class Loglikelihood:
    logprob: float  # sum over the continuation's tokens, natural log
    tokens: int  # continuation tokens scored
    greedy: bool  # every continuation token was the argmax


def fit_window(prompt_len: int, max_new_tokens: int, max_length: int) -> tuple[int, int]:
    """(prompt tokens to keep, new tokens to allow) so both fit the model's window. The answer's
    budget shrinks first, but the prompt keeps at least half the window; the prompt's start is
    what gets cut (the question sits at its end)."""
    if prompt_len + max_new_tokens <= max_length:
        return prompt_len, max_new_tokens
    keep = min(prompt_len, max(max_length // 2, max_length - max_new_tokens))
    return keep, max(1, min(max_new_tokens, max_length - keep))


def fit_scoring(req: LoglikelihoodRequest, max_length: int) -> tuple[list[int], int]:
    """(token ids, how many trailing ones to score) of a log-likelihood request, cut from the left
    to fit the model's window."""
    ids = (list(req.context_ids) + list(req.continuation_ids))[-max_length:]
    # the first token of a sequence has nothing to be predicted from
    return ids, min(len(req.continuation_ids), len(ids) - 1)


class Engine(ABC):
    """One loaded model. Build with ``chatvec.eval.engines.load_engine``; call ``close`` when done."""

    name: str = "engine"

    def __init__(
        self, model_dir: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 16, gpus: int = 1
    ) -> None:
        self.model_dir = model_dir
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.gpus = gpus

    @property
    @abstractmethod
    def tokenizer(self):
        """The model's own tokenizer (transformers), used to render and tokenize prompts."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Longest sequence (prompt + continuation) the model accepts."""

    @abstractmethod
    def generate(self, requests: list[GenerationRequest], *, progress: bool = False) -> list[Generation]:
        """One answer per request, in request order."""

    @abstractmethod
    def loglikelihood(self, requests: list[LoglikelihoodRequest], *, progress: bool = False) -> list[Loglikelihood]:
        """log P(continuation | context) per request, in request order."""

    def use_model_files(self, model_dir: str) -> None:
        """Take tokenizer, chat template and stop tokens from ``model_dir`` (weights swapped in place)."""
        raise NotImplementedError(f"the {self.name} engine cannot take another model's files in place")

    def close(self) -> None:  # noqa: B027 - engines without resources to free need not override it
        """Free the model (GPU memory) now rather than at garbage collection."""

    def describe(self) -> str:
        return f"{self.name}:{self.model_dir}"
