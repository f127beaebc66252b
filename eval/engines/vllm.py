"""The vLLM engine (GPU): vLLM's offline API, fed token ids built by ``eval.prompts``.

vLLM is optional and has no CPU build: it is imported when an engine is created, never at module
import, so this file imports everywhere. It is kept to the hf engine's semantics:

- prompts go in as ``{"prompt_token_ids": [...]}`` (``TokensPrompt``), one ``SamplingParams`` per
  request; temperature 0 is greedy;
- generation stops at exactly the hf engine's eos ids (``generation_config.eos_token_id``, else
  the tokenizer's): vLLM would also stop at the tokenizer's eos and add generation_config's own,
  so its eos handling is switched off (``ignore_eos``) and those ids are passed as
  ``stop_token_ids``. Text is decoded here with the hf engine's call, not vLLM's detokenizer;
- log-likelihood asks for ``prompt_logprobs=1`` with ``max_tokens=1`` and reads each continuation
  token's log-probability from the prompt's per-position dictionaries (entry 0 is None; each other
  holds the prompt's own token beside the top-1, with its rank);
- the dtype is resolved as the hf engine does (vLLM's own "auto" turns float32 checkpoints into
  float16 or bfloat16 depending on the release).

vLLM refuses a prompt that fills ``max_model_len`` once one output token is asked for, so this
engine's window is one token shorter than vLLM's ``max_model_len``.
"""
from __future__ import annotations

import gc
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

        from eval.engines.hf import resolve_dtype

        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.eos_ids = _eos_ids(model_dir, config, self._tokenizer)
        torch_dtype = resolve_dtype(dtype, "cuda", config)
        # vLLM reads safetensors itself; trust_remote_code stays off as everywhere in chatvec
        self.llm = LLM(
            model=model_dir,
            tokenizer=model_dir,
            tensor_parallel_size=max(1, int(gpus)),
            dtype=str(torch_dtype).removeprefix("torch."),
            trust_remote_code=False,
            seed=0,
            **llm_kwargs,
        )
        model_len = int(getattr(self.llm.llm_engine.model_config, "max_model_len", 0) or 4096)
        # the hf engine's window, so both cut prompts alike; vLLM needs one slot for the output token
        window = int(getattr(config, "max_position_embeddings", None) or min(self._tokenizer.model_max_length, 4096))
        self._max_length = max(2, min(window, model_len - 1))

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_length(self) -> int:
        return self._max_length

    def _params(self, dec: Decoding, **extra):
        from vllm import SamplingParams

        greedy = dec.temperature <= 0
        return SamplingParams(
            max_tokens=dec.max_new_tokens,
            temperature=0.0 if greedy else dec.temperature,
            top_p=1.0 if greedy else dec.top_p,
            repetition_penalty=dec.repetition_penalty,
            seed=None if greedy else dec.seed,
            ignore_eos=True,
            stop_token_ids=list(self.eos_ids),
            detokenize=False,
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
            prompts.append({"prompt_token_ids": [int(t) for t in r.prompt_ids[len(r.prompt_ids) - keep:]]})
            params.append(self._params(replace(r.decoding, max_new_tokens=max_new)))
        # vLLM schedules and batches itself and returns outputs in request order
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=progress)
        eos = set(self.eos_ids)
        results = []
        for prompt, out in zip(prompts, outputs):
            ids = list(out.outputs[0].token_ids)
            # the stop token is in token_ids; some releases report "length" when it is also the
            # last allowed one, so look at the token rather than finish_reason
            finished = bool(ids) and ids[-1] in eos
            kept = ids[:-1] if finished else ids
            results.append(Generation(
                text=self._tokenizer.decode(kept, skip_special_tokens=True),
                prompt_tokens=len(prompt["prompt_token_ids"]),
                completion_tokens=len(ids),
                finished=finished,
            ))
        return results

    def loglikelihood(self, requests: list[LoglikelihoodRequest], *, progress: bool = False) -> list[Loglikelihood]:
        results: list[Loglikelihood] = [Loglikelihood(logprob=0.0, tokens=0, greedy=True) for _ in requests]
        todo, prompts = [], []
        for i, r in enumerate(requests):
            ids, n = fit_scoring(r, self.max_length)
            if n > 0:  # nothing to score (vLLM also refuses an empty prompt)
                todo.append((i, n))
                prompts.append({"prompt_token_ids": [int(t) for t in ids]})
        if not prompts:
            return results
        params = self._params(Decoding(max_new_tokens=1), prompt_logprobs=1)
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=progress)
        for (i, n), prompt, out in zip(todo, prompts, outputs):
            ids = prompt["prompt_token_ids"]
            total, greedy = 0.0, True
            for pos in range(len(ids) - n, len(ids)):
                entry = out.prompt_logprobs[pos]
                lp = entry[ids[pos]]
                total += float(lp.logprob)
                if lp.rank is not None:
                    greedy = greedy and lp.rank == 1
                else:
                    greedy = greedy and max(entry, key=lambda t: entry[t].logprob) == ids[pos]
            results[i] = Loglikelihood(logprob=total, tokens=n, greedy=greedy)
        return results

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        # the V1 engine runs its model in a child process: stop it now rather than at collection
        shutdown = getattr(llm, "shutdown", None) or getattr(getattr(llm.llm_engine, "engine_core", None),
                                                             "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as exc:  # noqa: BLE001 - best effort; the memory is freed below anyway
                logger.debug("vLLM shutdown: %s", exc)
        del llm
        try:
            from vllm.distributed import cleanup_dist_env_and_memory
        except ImportError:  # pragma: no cover - releases without it
            cleanup_dist_env_and_memory = None
        if cleanup_dist_env_and_memory is not None:
            cleanup_dist_env_and_memory()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _eos_ids(model_dir: str, config, tokenizer) -> list[int]:
    """The ids the hf engine stops at: the model's generation_config eos, else the tokenizer's."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: transformers derives one from config.json
        gen = GenerationConfig.from_model_config(config)
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    return [int(eos)] if isinstance(eos, int) else [int(t) for t in (eos or [])]
