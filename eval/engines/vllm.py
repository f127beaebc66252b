"""The vLLM engine (GPU): vLLM's offline API, fed token ids built by ``eval.prompts``.

vLLM is optional and has no CPU build: it is imported when an engine is created, never at module
import, so this file imports everywhere. Generation passes ``{"prompt_token_ids": ...}`` prompts
and one ``SamplingParams`` per request (temperature 0 = greedy; vLLM stops at the model's eos by
default). Log-likelihood asks for ``prompt_logprobs=1`` with ``max_tokens=1`` and reads each
continuation token's log-probability from the prompt's per-position dictionaries, which always
hold the prompt's own token beside the top-1 token.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from eval.engines.base import (
    Decoding,
    Engine,
    Generation,
    GenerationRequest,
    Loglikelihood,
    LoglikelihoodRequest,
    fit_scoring,
    fit_window,
)
from merge.errors import InputError

logger = logging.getLogger(__name__)


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, model_dir: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 gpus: int = 1, **llm_kwargs: Any) -> None:
        super().__init__(model_dir, device=device, dtype=dtype, batch_size=batch_size, gpus=gpus)
        if device == "cpu":
            raise InputError("the vllm engine needs a GPU; use --engine hf for --device cpu")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise InputError("the vllm engine needs vLLM: pip install 'chatvec[vllm]' (GPU machines only), "
                             "or use --engine hf") from exc
        import transformers

        self._tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        # vLLM reads safetensors itself; trust_remote_code stays off as everywhere in chatvec
        self.llm = LLM(
            model=model_dir,
            tokenizer=model_dir,
            tensor_parallel_size=max(1, int(gpus)),
            dtype=dtype,
            trust_remote_code=False,
            seed=0,
            **llm_kwargs,
        )
        config = self.llm.llm_engine.model_config
        self._max_length = int(getattr(config, "max_model_len", 0) or 4096)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_length(self) -> int:
        return self._max_length

    @staticmethod
    def _params(dec: Decoding, **extra):
        from vllm import SamplingParams

        greedy = dec.temperature <= 0
        return SamplingParams(
            max_tokens=dec.max_new_tokens,
            temperature=0.0 if greedy else dec.temperature,
            top_p=1.0 if greedy else dec.top_p,
            repetition_penalty=dec.repetition_penalty,
            seed=None if greedy else dec.seed,
            skip_special_tokens=True,
            **extra,
        )

    def generate(self, requests: list[GenerationRequest], *, progress: bool = False) -> list[Generation]:
        if not requests:
            return []
        prompts, params = [], []
        for r in requests:
            keep, max_new = fit_window(len(r.prompt_ids), r.decoding.max_new_tokens, self.max_length)
            if keep < len(r.prompt_ids):
                logger.warning("prompt of %d tokens truncated from the left to %d", len(r.prompt_ids), keep)
            prompts.append({"prompt_token_ids": list(r.prompt_ids[-keep:])})
            params.append(self._params(replace(r.decoding, max_new_tokens=max_new)))
        # vLLM schedules and batches itself; sorting by length is its job here
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=progress)
        results = []
        for prompt, out in zip(prompts, outputs):
            comp = out.outputs[0]
            results.append(Generation(
                text=comp.text,
                prompt_tokens=len(prompt["prompt_token_ids"]),
                completion_tokens=len(comp.token_ids),
                finished=comp.finish_reason == "stop",
            ))
        return results

    def loglikelihood(self, requests: list[LoglikelihoodRequest], *, progress: bool = False) -> list[Loglikelihood]:
        if not requests:
            return []
        prompts, spans = [], []
        for r in requests:
            ids, n = fit_scoring(r, self.max_length)
            prompts.append({"prompt_token_ids": ids})
            spans.append(n)
        params = self._params(Decoding(max_new_tokens=1), prompt_logprobs=1)
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=progress)
        results = []
        for prompt, n, out in zip(prompts, spans, outputs):
            ids = prompt["prompt_token_ids"]
            total, greedy = 0.0, True
            for pos in range(len(ids) - n, len(ids)):
                entry = out.prompt_logprobs[pos]
                lp = entry[ids[pos]]
                total += float(getattr(lp, "logprob", lp))
                rank = getattr(lp, "rank", None)
                if rank is not None:
                    greedy = greedy and rank == 1
                else:
                    best = max(entry, key=lambda t: getattr(entry[t], "logprob", entry[t]))
                    greedy = greedy and best == ids[pos]
            results.append(Loglikelihood(logprob=total, tokens=n, greedy=greedy))
        return results

    def close(self) -> None:
        self.llm = None
        try:
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
