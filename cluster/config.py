"""ray_config.yaml: how chatvec runs on a cluster. Every CLI flag that overlaps overrides it."""
from __future__ import annotations

import os
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from merge.yamlconfig import load_model

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
    gpus_per_worker: Union[float, Auto] = "auto"
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
        from merge.errors import ConfigError
        from merge.units import parse_size

        try:
            parse_size(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v


class EvalSettings(_Strict):
    workers: int = Field(default=1, ge=0)
    engine: Literal["hf", "vllm"] = "hf"
    # GPUs per engine = vLLM's tensor_parallel_size; "auto": 1 with GPUs, 0 without.
    gpus_per_engine: Union[int, Auto] = "auto"
    cpus_per_engine: float = Field(default=1.0, ge=0)
    batch_size: int = Field(default=16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    judge_workers: int = Field(default=1, ge=1)
    max_restarts: int = Field(default=1, ge=0)


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
