"""A merge point's weights swapped into a running engine, computed in memory, no checkpoint written.

The tensors come from ``chatvec.merge.in_memory.merged_tensors``: the bytes ``chatvec merge`` of the
same plan would write, in the output dtype. They are handed to the engine as tensors of that
dtype, so the engine casts them exactly as it casts a checkpoint it loads: it then holds what it
would hold after loading the merged model.

- vLLM: ``SwapExtension`` is given to ``vllm.LLM`` as ``worker_extension_cls``; its method runs
  inside every worker (``collective_rpc``), computes the tensors there (nothing crosses
  processes but the plan) and feeds them to ``model_runner.reload_weights``, which fuses
  q/k/v and gate/up itself. The prefix cache is reset afterwards.
- hf: the tensors are copied into the model's parameters, paired by name.

A merged checkpoint also takes its chat template, eos and generation config from the chat model
(merge/metadata_files.py). Those small files are written to a temporary folder, outside the
store, and the engine re-reads its tokenizer and stop tokens from there.

Lives in cluster/ (not eval/): it joins merge/ and eval/, which do not import each other's insides.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)

EXTENSION = "chatvec.cluster.weight_swap.SwapExtension"
_TORCH_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def swappable(plan) -> str | None:
    """Why the engine cannot take ``plan``'s weights in place (None: it can). Appended vocabulary
    rows change tensor shapes, which a loaded engine cannot grow into."""
    if plan.appended_tokens or plan.vocab_rows:
        return (
            f"its vocabulary grows by {len(plan.appended_tokens) or 'some'} row(s) (tokens taken from the chat "
            "model), which changes tensor shapes"
        )
    return None


def torch_tensors(plan, device: str = "cpu") -> Iterator[tuple[str, object]]:
    """(name, torch tensor in the output dtype) for every tensor of the merge, in checkpoint order."""
    import torch

    from chatvec.merge.in_memory import merged_tensors

    for name, dtype, shape, data in merged_tensors(plan, device="cpu"):
        tensor = (
            torch.frombuffer(data, dtype=getattr(torch, _TORCH_DTYPES[dtype]))
            if data.size
            else torch.empty(0, dtype=getattr(torch, _TORCH_DTYPES[dtype]))
        )
        yield name, tensor.reshape(shape).to(device)


class SwapExtension:
    """Methods added to every vLLM worker (``worker_extension_cls``)."""

    def chatvec_swap(self, plan) -> dict:
        start = time.perf_counter()
        count = [0]

        def counted():
            for pair in torch_tensors(plan):
                count[0] += 1
                yield pair

        self.model_runner.reload_weights(weights_iterator=counted())
        return {"tensors": count[0], "seconds": time.perf_counter() - start}


@dataclass
class SwapTiming:
    seconds: float  # merge computed and weights in place
    tensors: int


def swap_into(engine, plan) -> SwapTiming:
    """Put ``plan``'s merged weights into ``engine`` (an hf or vllm engine loaded from the plan's CP)."""
    start = time.perf_counter()
    if engine.name == "vllm":
        replies = engine.llm.collective_rpc("chatvec_swap", args=(plan,))
        engine.llm.reset_prefix_cache()  # cached keys/values were computed with the old weights
        tensors = int(replies[0]["tensors"])
    else:
        tensors = _copy_into_hf(engine, plan)
    return SwapTiming(seconds=time.perf_counter() - start, tensors=tensors)


def _copy_into_hf(engine, plan) -> int:
    import torch

    params = dict(engine.model.named_parameters())
    params.update({k: v for k, v in engine.model.named_buffers() if k not in params})
    missing = [name for name in plan.tasks if name not in params]
    tied = getattr(engine.model.config, "tie_word_embeddings", False)
    # a tied head has no tensor of its own in the checkpoint, and none is needed here either
    missing = [n for n in missing if not (tied and n == "lm_head.weight")]
    if missing:
        raise RuntimeError(
            f"the hf model has no parameter for {', '.join(missing[:5])}: it cannot take this merge in place"
        )
    count = 0
    with torch.no_grad():
        for name, tensor in torch_tensors(plan):
            target = params.get(name)
            if target is None:
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                raise RuntimeError(
                    f"{name}: the merge gives {tuple(tensor.shape)}, the loaded model holds {tuple(target.shape)}"
                )
            target.copy_(tensor.to(device=target.device))
            count += 1
    return count


class PointFiles:
    """The merged model's small files (config, tokenizer, chat template, generation config) in a
    temporary folder, for the engine to take its tokenizer and stop tokens from."""

    def __init__(self, plan) -> None:
        from chatvec.merge.metadata_files import side_files

        self.path = tempfile.mkdtemp(prefix="chatvec-point-")
        for rel, data in side_files(plan, {"fingerprint": plan.fingerprint()}).items():
            full = os.path.join(self.path, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as fh:
                fh.write(data)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def load_point(engine, plan) -> SwapTiming:
    """Swap ``plan`` into ``engine``: weights, then tokenizer, chat template and stop tokens."""
    timing = swap_into(engine, plan)
    files = PointFiles(plan)
    try:
        engine.use_model_files(files.path)
    finally:
        files.close()
    return timing


def fingerprint_identity(plan) -> str:
    """The model identity a committed checkpoint of ``plan`` gets (chatvec.eval.identity reads it from the
    manifest), so cells of the two paths are the same cells."""
    from chatvec.eval.identity import merged_model_identity

    return merged_model_identity(plan.fingerprint())
