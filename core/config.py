"""ray_config.yaml: how chatvec runs on a cluster. Every CLI flag that overlaps overrides it."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatvec.core.yamlconfig import load_model

DEFAULT_CONFIG = "ray_config.yaml"
Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RaySettings(_Strict):
    # "local" starts Ray in this process (or joins the job's cluster when run by `ray job submit`,
    # which sets RAY_ADDRESS); "auto" joins a running cluster; anything else is an address.
    address: str = "local"
    namespace: str = "chatvec"
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    # Only used when address is "local": resources of the in-process cluster (None = detect).
    num_cpus: int | None = None
    num_gpus: int | None = None


class MergeSettings(_Strict):
    workers: int = Field(default=2, ge=0)
    # "auto": one GPU per merge actor when the cluster has GPUs, none otherwise.
    gpus_per_worker: float | Auto = "auto"
    cpus_per_worker: float = Field(default=1.0, ge=0)
    shard_size: str = "2GB"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_restarts: int = Field(default=3, ge=0)
    lock_ttl_s: float = Field(default=600.0, gt=0)

    @field_validator("gpus_per_worker")
    @classmethod
    def _non_negative(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return v

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        from chatvec.core.errors import ConfigError
        from chatvec.core.units import parse_size

        try:
            parse_size(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v


class VLLMSettings(_Strict):
    """The vllm engine's settings (chatvec.eval.engines.vllm.VLLMOptions)."""

    # context window; null = the model's own (a smaller one needs less KV cache)
    max_model_len: int | None = Field(default=None, ge=2)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # skip CUDA graphs / torch.compile: starts in seconds, decodes somewhat slower (auto: on CPU)
    enforce_eager: bool | Auto = "auto"
    # CPU build only: KV-cache size in GiB (what VLLM_CPU_KVCACHE_SPACE sets)
    cpu_kvcache_gib: float = Field(default=4.0, gt=0)
    # run the engine inside the actor's process instead of spawning two more (auto: on CPU)
    in_process: bool | Auto = "auto"
    # any other vllm.LLM keyword argument
    llm_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("llm_kwargs")
    @classmethod
    def _not_managed(cls, v: dict) -> dict:
        managed = {"model", "tokenizer", "tensor_parallel_size", "dtype", "trust_remote_code", "seed"}
        clash = sorted(managed & set(v))
        if clash:
            raise ValueError(
                f"chatvec sets {', '.join(clash)} itself (dtype: --dtype; tensor_parallel_size: "
                "eval.gpus_per_engine); remove it from llm_kwargs"
            )
        return v

    def options(self) -> dict[str, Any]:
        """Keyword arguments of chatvec.eval.engines.vllm.VLLMOptions."""
        return self.model_dump()


class EvalSettings(_Strict):
    workers: int = Field(default=1, ge=0)
    engine: Literal["hf", "vllm"] = "hf"
    # GPUs per engine = vLLM's tensor_parallel_size; "auto": 1 with GPUs, 0 without.
    gpus_per_engine: int | Auto = "auto"
    cpus_per_engine: float = Field(default=1.0, ge=0)
    batch_size: int = Field(default=16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    judge_workers: int = Field(default=1, ge=1)
    # engines (eval actors) per model; "auto": the eval actors shared out over the run's models
    replicas: int | Auto = Field(default=1, ge=1)
    judge_max_new_tokens: int = Field(default=2048, ge=1)  # room for a judge that reasons before it rates
    max_restarts: int = Field(default=1, ge=0)
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)
    # in-engine sweeps: memory the CP and vector tensors may take on the engine's device so each
    # point is computed from memory: "auto" (free memory less a margin), a size ("24GB"), or "off"
    # (every point read from storage)
    in_engine_memory: str = "auto"

    @field_validator("in_engine_memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        from chatvec.core.errors import ConfigError
        from chatvec.core.units import parse_size

        if v not in ("auto", "off"):
            try:
                parse_size(v)
            except ConfigError as exc:
                raise ValueError(f"{exc}, or auto, or off") from None
        return v

    def engine_options(self, engine: str) -> dict[str, Any]:
        """The chosen engine's own settings (only vllm has any)."""
        return self.vllm.options() if engine == "vllm" else {}


class StorageSettings(_Strict):
    root: str = "./chatvec-store"


class ChatvecConfig(_Strict):
    ray: RaySettings = Field(default_factory=RaySettings)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)


def load_config(path: str | None = None) -> ChatvecConfig:
    """Load `path`, or ./ray_config.yaml when it exists, or the built-in defaults."""
    if path is None:
        path = os.environ.get("CHATVEC_CONFIG") or (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None)
    if path is None:
        return ChatvecConfig()
    return load_model(path, ChatvecConfig)
