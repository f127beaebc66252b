"""The vllm engine's settings in ray_config.yaml (eval.vllm): read, validated, handed to the engine."""

from __future__ import annotations

import pytest

from chatvec.core.config import load_config
from chatvec.core.errors import ConfigError
from chatvec.eval.engines.vllm import VLLMOptions


def test_settings_reach_the_engine_options(tmp_path):
    path = tmp_path / "ray_config.yaml"
    path.write_text(
        "eval:\n  engine: vllm\n  vllm:\n    max_model_len: 512\n    enforce_eager: true\n"
        "    cpu_kvcache_gib: 1\n    llm_kwargs: {max_num_seqs: 8}\n"
    )
    ev = load_config(str(path)).eval
    opts = VLLMOptions.of(ev.engine_options("vllm"))
    got = (opts.max_model_len, opts.enforce_eager, opts.cpu_kvcache_gib, opts.llm_kwargs)
    assert got == (512, True, 1, {"max_num_seqs": 8})
    assert opts.in_process == "auto" and opts.gpu_memory_utilization == 0.9
    assert ev.engine_options("hf") == {}  # the hf engine has no settings of its own
    defaults = VLLMOptions.of(load_config(None).eval.engine_options("vllm"))
    assert defaults.enforce_eager == "auto" and defaults.max_model_len is None


@pytest.mark.parametrize(
    "body, words",
    [
        ("    gpu_memory_utilization: 1.5\n", ["gpu_memory_utilization"]),
        ("    cpu_kvcache_gib: big\n", ["cpu_kvcache_gib"]),
        ("    kv_cache: 1\n", ["kv_cache"]),
        ("    llm_kwargs: {dtype: float16, seed: 3}\n", ["llm_kwargs", "dtype", "seed", "--dtype"]),
    ],
)
def test_bad_settings_name_the_key(tmp_path, body, words):
    path = tmp_path / "ray_config.yaml"
    path.write_text("eval:\n  vllm:\n" + body)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    for word in words:
        assert word in str(err.value)
