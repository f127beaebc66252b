"""The transformers engine: CPU or CUDA, batched, requests sorted by length.

Generation uses left padding so every row of a batch ends at the same position; so does
log-likelihood scoring, which lets the model return logits for the last few positions only
(``logits_to_keep``) instead of the whole sequence times the vocabulary.
"""

from __future__ import annotations

import inspect
import logging
from itertools import groupby

from tqdm.auto import tqdm

from chatvec.core.errors import InputError
from chatvec.eval.engines.base import (
    Decoding,
    Engine,
    Generation,
    GenerationRequest,
    Loglikelihood,
    LoglikelihoodRequest,
    fit_scoring,
    fit_window,
    import_transformers,
)

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for CUDA but torch sees no GPU; use --device cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str, config):
    import torch

    if dtype != "auto":
        try:
            return getattr(torch, dtype)
        except AttributeError as exc:
            raise InputError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from exc
    if device == "cpu":
        # bf16 matmuls are slow on most CPUs; float32 is also what the reference checks use
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if saved in (torch.bfloat16, torch.float16) else torch.bfloat16


class HFEngine(Engine):
    name = "hf"

    def __init__(
        self, model_dir: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 16, gpus: int = 1
    ) -> None:
        super().__init__(model_dir, device=device, dtype=dtype, batch_size=batch_size, gpus=gpus)
        import torch

        transformers = import_transformers()
        self._torch = torch
        self.device = resolve_device(device)
        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        self.torch_dtype = resolve_dtype(dtype, self.device, config)
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.torch_dtype, trust_remote_code=False, use_safetensors=True
        ).to(self.device)
        self.model.eval()
        self._read_stops()
        # transformers renamed past_key_values to cache (5.x); accept either
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._share_context = True
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._max_length = int(
            getattr(self.model.config, "max_position_embeddings", None) or min(self._tokenizer.model_max_length, 4096)
        )

    def _read_stops(self) -> None:
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self._tokenizer.eos_token_id
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        pad = self._tokenizer.pad_token_id
        if pad is None:
            pad = gen.pad_token_id if gen.pad_token_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.pad_id = int(pad)

    def use_model_files(self, model_dir: str) -> None:
        """Take the tokenizer, chat template and generation config (stop tokens) from ``model_dir``,
        keeping the loaded weights: a merge swapped in place has the chat model's template and eos."""
        transformers = import_transformers()
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        try:
            gen = transformers.GenerationConfig.from_pretrained(model_dir)
        except OSError:  # no generation_config.json: derived from config.json, as from_pretrained does
            gen = transformers.GenerationConfig.from_model_config(
                transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
            )
        self.model.generation_config = gen
        self._read_stops()

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_length(self) -> int:
        return self._max_length

    # -- generation ---------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest], *, progress: bool = False) -> list[Generation]:
        results: list[Generation | None] = [None] * len(requests)
        # Each request's window is fitted on its own, so its answer never depends on which other
        # requests share its batch; batches then hold requests of one decoding and one budget.
        # Within those, longest prompts first so padding stays small and an out-of-memory shows up
        # on the first batch, not the last.
        fitted = [fit_window(len(r.prompt_ids), r.decoding.max_new_tokens, self.max_length) for r in requests]
        for r, (keep, max_new) in zip(requests, fitted):
            if keep < len(r.prompt_ids) or max_new < r.decoding.max_new_tokens:
                logger.warning(
                    "a prompt of %d tokens plus %d new ones exceeds the model's %d: keeping the last %d "
                    "prompt tokens and %d new ones",
                    len(r.prompt_ids),
                    r.decoding.max_new_tokens,
                    self.max_length,
                    keep,
                    max_new,
                )

        def group(i: int) -> tuple:
            return (_key(requests[i].decoding), fitted[i][1])

        order = sorted(range(len(requests)), key=lambda i: (group(i), -fitted[i][0]))
        bar = tqdm(total=len(requests), desc="generate", unit="item", disable=not progress, leave=False)
        for (_dec, max_new), members in groupby(order, key=group):
            idx = list(members)
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                prompts = [requests[i].prompt_ids[len(requests[i].prompt_ids) - fitted[i][0] :] for i in batch]
                for i, g in zip(batch, self._generate_batch(prompts, requests[batch[0]].decoding, max_new)):
                    results[i] = g
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], dec: Decoding, max_new: int) -> list[Generation]:
        torch = self._torch
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
        sample = dec.temperature > 0
        cfg = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=dec.temperature if sample else None,
            top_p=dec.top_p if sample else None,
            top_k=None,
            repetition_penalty=dec.repetition_penalty,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
        )
        if sample:
            torch.manual_seed(dec.seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), generation_config=cfg
            )
        new = out[:, width:].tolist()
        results = []
        eos = set(self.eos_ids)
        for prompt, ids in zip(prompts, new):
            cut = next((k for k, t in enumerate(ids) if t in eos), None)
            finished = cut is not None
            kept = ids[:cut] if finished else ids
            results.append(
                Generation(
                    text=self._tokenizer.decode(kept, skip_special_tokens=True),
                    prompt_tokens=len(prompt),
                    completion_tokens=len(kept) + (1 if finished else 0),
                    finished=finished,
                )
            )
        return results

    # -- log-likelihood -----------------------------------------------------------------------
    def loglikelihood(self, requests: list[LoglikelihoodRequest], *, progress: bool = False) -> list[Loglikelihood]:
        results: list[Loglikelihood | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", unit="item", disable=not progress, leave=False)
        # Options of a multiple-choice item share their context: compute it once and score every
        # option from its key/value cache. Requests with a context of their own go the plain way.
        groups: dict[tuple, list[int]] = {}
        singles: list[int] = []
        for i, r in enumerate(requests):
            fits = (
                r.context_ids and r.continuation_ids and len(r.context_ids) + len(r.continuation_ids) <= self.max_length
            )
            if fits and self.batch_size > 1 and self._share_context:
                groups.setdefault(tuple(r.context_ids), []).append(i)
            else:
                singles.append(i)
        pieces = []
        for idx in groups.values():
            if len(idx) == 1:
                singles += idx
            else:
                pieces += [idx[k : k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        pieces.sort(key=lambda p: -len(requests[p[0]].context_ids))
        batch: list[list[int]] = []
        for piece in pieces + [None]:
            if batch and (piece is None or sum(map(len, batch)) + len(piece) > self.batch_size):
                try:
                    for i, r in list(self._score_shared([[requests[i] for i in p] for p in batch], batch)):
                        results[i] = r
                    bar.update(sum(map(len, batch)))
                except (AttributeError, TypeError, NotImplementedError) as exc:
                    # a model whose cache cannot be expanded per option: score those the plain way
                    logger.info("shared-context scoring unavailable for %s (%s)", self.model_dir, exc)
                    self._share_context = False
                    singles += [i for p in batch for i in p]
                batch = []
            if piece is not None:
                batch.append(piece)
        prepared = {i: fit_scoring(requests[i], self.max_length) for i in singles}
        order = sorted(singles, key=lambda i: -len(prepared[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, r in zip(chunk, self._score_batch([prepared[i] for i in chunk])):
                results[i] = r
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _score_shared(self, groups: list[list[LoglikelihoodRequest]], indices: list[list[int]]):
        """Score groups of requests that share a context: one pass over the (left-padded)
        contexts, then one pass over every continuation, reading the context from the cache."""
        torch = self._torch
        contexts = [g[0].context_ids for g in groups]
        width = max(map(len, contexts))
        ctx_ids = torch.full((len(groups), width), self.pad_id, dtype=torch.long)
        ctx_mask = torch.zeros((len(groups), width), dtype=torch.long)
        for row, ids in enumerate(contexts):
            ctx_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            ctx_mask[row, width - len(ids) :] = 1
        dev = self.device
        with torch.inference_mode():
            out = self.model(
                input_ids=ctx_ids.to(dev),
                attention_mask=ctx_mask.to(dev),
                position_ids=(ctx_mask.cumsum(-1) - 1).clamp(min=0).to(dev),
                use_cache=True,
                **self._keep_last,
            )
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each option's 1st token
            owner = [g for g, group in enumerate(groups) for _ in group]
            conts = [r.continuation_ids for group in groups for r in group]
            rest = max(len(c) for c in conts) - 1
            later = None
            if rest > 0:
                cache = getattr(out, "cache", None) or out.past_key_values
                cache.reorder_cache(torch.tensor(owner, dtype=torch.long, device=dev))
                cont_ids = torch.full((len(conts), rest), self.pad_id, dtype=torch.long)
                cont_mask = torch.zeros((len(conts), rest), dtype=torch.long)
                for row, c in enumerate(conts):
                    if len(c) > 1:
                        cont_ids[row, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                        cont_mask[row, : len(c) - 1] = 1
                own = torch.tensor(owner, dtype=torch.long)
                lengths = ctx_mask.sum(-1)[own]
                positions = lengths[:, None] + torch.arange(rest)[None, :]
                mask = torch.cat([ctx_mask[own], cont_mask], dim=-1)
                later = torch.log_softmax(
                    self.model(
                        input_ids=cont_ids.to(dev),
                        attention_mask=mask.to(dev),
                        position_ids=positions.to(dev),
                        use_cache=False,
                        **{self._cache_kwarg: cache},
                    ).logits.float(),
                    dim=-1,
                )
        row = 0
        for g, idx in zip(groups, indices):
            for i, r in zip(idx, g):
                c = r.continuation_ids
                steps = [first[owner[row]]] + ([later[row, k] for k in range(len(c) - 1)] if len(c) > 1 else [])
                lp = torch.stack(steps)
                target = torch.tensor(c, dtype=torch.long, device=lp.device)
                # summed in float64: a float32 sum of hundreds of terms is off by about 1e-4
                total = float(lp.gather(-1, target[:, None]).double().sum())
                greedy = bool((lp.argmax(-1) == target).all())
                yield i, Loglikelihood(logprob=total, tokens=len(c), greedy=greedy)
                row += 1

    def _score_batch(self, batch: list[tuple[list[int], int]]) -> list[Loglikelihood]:
        torch = self._torch
        width = max(len(ids) for ids, _ in batch)
        keep = max(n for _, n in batch) + 1
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _n) in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = dict(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
        )
        with torch.inference_mode():
            try:
                logits = self.model(**kwargs, logits_to_keep=keep).logits
            except TypeError:  # a model class without logits_to_keep
                logits = self.model(**kwargs).logits[:, -keep:]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for row, (ids, n) in enumerate(batch):
            if n <= 0:
                out.append(Loglikelihood(logprob=0.0, tokens=0, greedy=True))
                continue
            # logits at position t predict token t+1; the last n tokens sit at keep-n-1 .. keep-2
            lp = logprobs[row, keep - n - 1 : keep - 1]
            target = torch.tensor(ids[-n:], dtype=torch.long, device=lp.device)
            picked = lp.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((lp.argmax(-1) == target).all())
            out.append(Loglikelihood(logprob=float(picked.double().sum()), tokens=n, greedy=greedy))
        return out

    def close(self) -> None:
        torch = self._torch
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _key(dec: Decoding) -> tuple:
    return (dec.max_new_tokens, dec.temperature, dec.repetition_penalty, dec.top_p, dec.seed)
