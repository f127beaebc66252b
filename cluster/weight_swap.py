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

A ``Swapper`` does better for a run of points over the same CP and vectors: the first point reads
them once into memory on the engine's device (chatvec.merge.resident), and every point is then
computed from memory, the same bytes, straight into the hf model's parameters, or, for vLLM,
inside the worker into staging tensors that ``reload_weights`` takes (vLLM's CPU build repacks
its linear weights for oneDNN and drops the originals, so its weight loader is the way in).
When the inputs do not fit the memory budget, or the plan is not one the resident path computes,
the point is streamed as above, and the swap says why.

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

from chatvec.core.units import format_size

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

    def chatvec_swap_resident(self, plan, budget: int | None) -> dict:
        """``plan``'s point from inputs held in this worker (read on first use), when they fit
        ``budget`` bytes (None: free memory less a margin); streamed otherwise."""
        import torch

        start = time.perf_counter()
        model = self.model_runner.get_model()
        device = str(next(model.parameters()).device)
        state = getattr(self, "_chatvec_resident", None)
        if state is None:
            state = self._chatvec_resident = ResidentState(device, staging=True)
        decision = state.admit(plan, budget)
        if not decision.resident:
            reply = self.chatvec_swap(plan)
            return {**reply, **decision.__dict__, "seconds": time.perf_counter() - start}
        staging = state.staging_buffers

        def stage(task):
            buf = staging.get(task.name)
            if buf is None:
                buf = staging[task.name] = torch.empty(task.numel, dtype=_torch_dtype(task.dtype), device=device)
            return buf

        count = [0]

        def computed():
            for task, tensor in state.merge.write(plan, stage):
                count[0] += 1
                yield task.name, tensor.view(task.shape)

        self.model_runner.reload_weights(weights_iterator=computed())
        return {"tensors": count[0], **decision.__dict__, "seconds": time.perf_counter() - start}

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
    seconds: float  # merge computed and weights in place (reading resident inputs included)
    tensors: int
    resident: bool = False  # computed from inputs held in memory
    why: str = ""  # why not, when streamed from storage
    held_bytes: int = 0  # memory the resident inputs take
    load_seconds: float = 0.0  # reading inputs into memory, this swap


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, _TORCH_DTYPES[dtype])


@dataclass
class Decision:
    resident: bool
    why: str = ""
    held_bytes: int = 0
    load_seconds: float = 0.0


class ResidentState:
    """The resident inputs of one engine, and whether each plan may use them under a budget."""

    def __init__(self, device: str, *, staging: bool = False) -> None:
        from chatvec.merge.resident import ResidentMerge

        self.device = device
        self.merge = ResidentMerge(device)
        # vLLM's loader copies from tensors we hand it: one per output tensor, kept across points
        self.staging = staging
        self.staging_buffers: dict[str, object] = {}

    def cost(self, plan) -> int:
        """Bytes held once ``plan``'s inputs are resident (and its staging tensors, for vLLM)."""
        extra = self.merge.missing_bytes(plan)
        if self.staging:
            extra += sum(t.nbytes for t in plan.tasks.values() if t.name not in self.staging_buffers)
        return self.held + extra

    @property
    def held(self) -> int:
        staged = sum(b.numel() * b.element_size() for b in self.staging_buffers.values())
        return self.merge.nbytes + staged

    def admit(self, plan, budget: int | None) -> Decision:
        """Load what ``plan`` needs when it fits; the decision, with why when it does not."""
        from chatvec.merge.resident import memory_budget, why_not_resident

        why = why_not_resident(plan)
        if why is None:
            need = self.cost(plan)
            limit = memory_budget(self.device) + self.held if budget is None else budget
            if need > limit:
                why = (
                    f"holding CP and vectors in memory needs {format_size(need)}, over the budget of "
                    f"{format_size(limit)} (eval.in_engine_memory)"
                )
        if why is not None:
            logger.warning("streaming swap from storage: %s", why)
            return Decision(False, why, self.held)
        if self.merge.missing_bytes(plan):
            seconds = self.merge.load(plan)
            logger.info(
                "resident inputs on %s: %s (%d tensors), read in %.2f s",
                self.device,
                format_size(self.merge.nbytes),
                len(self.merge.entries),
                seconds,
            )
            return Decision(True, "", self.cost(plan), seconds)
        return Decision(True, "", self.cost(plan))

    def release(self) -> None:
        self.merge.release()
        self.staging_buffers.clear()


class Swapper:
    """Swaps merge points into one engine, from resident inputs where the budget allows.

    ``budget``: bytes the resident inputs may take (None: free memory less a margin; 0: always
    stream from storage)."""

    def __init__(self, engine, budget: int | None = None) -> None:
        self.engine = engine
        self.budget = budget
        self.state: ResidentState | None = None
        self._params: dict | None = None

    def swap(self, plan) -> SwapTiming:
        start = time.perf_counter()
        if self.budget == 0:
            timing = swap_into(self.engine, plan)
            timing.why = "in-engine memory is off (eval.in_engine_memory: off)"
            return timing
        if self.engine.name == "vllm":
            reply = self.engine.llm.collective_rpc("chatvec_swap_resident", args=(plan, self.budget))[0]
            self.engine.llm.reset_prefix_cache()  # cached keys/values were computed with the old weights
            fields = {k: reply[k] for k in ("resident", "why", "held_bytes", "load_seconds")}
            return SwapTiming(seconds=time.perf_counter() - start, tensors=int(reply["tensors"]), **fields)
        if self.state is None:
            self.state = ResidentState(str(self.engine.model.device))
        decision = self.state.admit(plan, self.budget)
        if not decision.resident:
            timing = swap_into(self.engine, plan)
            timing.why, timing.held_bytes = decision.why, decision.held_bytes
            return timing
        # the loaded model's tensors stay the same objects from point to point
        self._params = _hf_params(self.engine, plan, self._params)
        tensors = _write_into_hf(self.engine, plan, self.state.merge, self._params)
        return SwapTiming(time.perf_counter() - start, tensors, True, "", decision.held_bytes, decision.load_seconds)

    def load_point(self, plan) -> SwapTiming:
        """Swap ``plan`` in: weights, then tokenizer, chat template and stop tokens."""
        timing = self.swap(plan)
        _use_point_files(self.engine, plan)
        return timing

    def close(self) -> None:
        if self.state is not None:
            self.state.release()
        self.state = None


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


def _hf_params(engine, plan, params: dict | None = None) -> dict:
    """The hf model's tensors by checkpoint name (``params`` when given: found before); an error
    when one the plan writes is missing."""
    if params is None:
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
    return params


def _write_into_hf(engine, plan, merge, params: dict) -> int:
    """``plan``'s point computed from ``merge``'s resident inputs straight into ``params``."""
    import torch

    def target(task):
        param = params.get(task.name)
        if param is not None and tuple(param.shape) != tuple(task.shape):
            raise RuntimeError(
                f"{task.name}: the merge gives {tuple(task.shape)}, the loaded model holds {tuple(param.shape)}"
            )
        return None if param is None else param.data

    with torch.no_grad():
        return sum(1 for _ in merge.write(plan, target))


def _copy_into_hf(engine, plan) -> int:
    import torch

    params = _hf_params(engine, plan)
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
    _use_point_files(engine, plan)
    return timing


def _use_point_files(engine, plan) -> None:
    files = PointFiles(plan)
    try:
        engine.use_model_files(files.path)
    finally:
        files.close()


def resident_budget(setting: str | int | None) -> int | None:
    """``eval.in_engine_memory`` as bytes: "auto" -> None (free memory less a margin), "off" -> 0
    (always stream from storage), or a size such as "24GB"."""
    from chatvec.core.units import parse_size

    if setting is None or setting == "auto":
        return None
    if setting == "off":
        return 0
    return parse_size(setting)


def fingerprint_identity(plan) -> str:
    """The model identity a committed checkpoint of ``plan`` gets (chatvec.eval.identity reads it from the
    manifest), so cells of the two paths are the same cells."""
    from chatvec.eval.identity import merged_model_identity

    return merged_model_identity(plan.fingerprint())
