"""The judge phase against the JudgeBackend interface: a local judge model, and any other backend
(the API judge has its own tests against real servers)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from chatvec.core.errors import InputError  # noqa: E402
from chatvec.core.storage import Store  # noqa: E402
from chatvec.demo.tiny import build_model_dir  # noqa: E402
from chatvec.eval.contracts import (  # noqa: E402  # noqa: E402
    DONE,
    Cell,  # noqa: E402
    JudgeBackend,
    JudgeReply,
    RunContext,  # noqa: E402
    RunSettings,
)
from chatvec.eval.judging import LocalJudge, make_judge  # noqa: E402
from chatvec.eval.pipeline import run_pipeline  # noqa: E402
from chatvec.eval.results import read_samples, summarize  # noqa: E402
from chatvec.eval.runner import JudgeRunner, LocalCellExecutor  # noqa: E402
from chatvec.eval.schema import JUDGE_ERROR, JUDGED  # noqa: E402

SETTINGS = RunSettings(device="cpu", batch_size=4, max_new_tokens=4, judge_max_new_tokens=5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("judging")
    return {
        name: str(build_model_dir(root / name, seed=seed, shard_size=None))
        for name, seed in (("alpha", 1), ("judge", 3))
    }


class RecordingBackend:
    """A backend written for this test: it keeps the prompts it was sent and answers from a list
    (a rating, a failed request), so the judge phase's handling of each reply can be checked."""

    identity = "recording:v1"

    def __init__(self, replies: list[JudgeReply]) -> None:
        self.replies = replies
        self.prompts: list[str] = []
        self.budgets: list[int] = []
        self.closed = False

    def judge(self, prompts, *, max_new_tokens, progress=False):
        self.prompts += prompts
        self.budgets.append(max_new_tokens)
        return [self.replies[i % len(self.replies)] for i in range(len(prompts))]

    def close(self):
        self.closed = True


def test_the_judge_phase_uses_any_backend_and_counts_failed_replies(models, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "reference": r}) + "\n"
            for q, r in (
                ("What colour is the sky?", "Blue, by Rayleigh scattering."),
                ("How many legs has a cat?", "Four legs."),
            )
        ),
        encoding="utf-8",
    )
    out = str(tmp_path / "out")
    first = run_pipeline(
        {"m": models["alpha"]},
        executor=LocalCellExecutor(),
        benchmarks=[f"mine={data}:chat:en"],
        languages=["en"],
        out_uri=out,
        settings=SETTINGS,
        show_progress=False,
    )
    assert first.ok
    backend = RecordingBackend([JudgeReply("Fine. Rating: [[7]]", 10, 3), JudgeReply("", error="HTTP 500 twice")])
    assert isinstance(backend, JudgeBackend)
    run = RunContext(
        out_uri=out,
        run_id=first.run_id,
        settings=SETTINGS,
        languages=("en",),
        judged=True,
        judge_identity="recording:v1",
    )
    runner = JudgeRunner("recording", run=run, backend=backend)
    cell = Cell("m", "en", "mine")
    result = runner.judge_cell(cell)
    runner.close()
    assert result.state == DONE and backend.closed
    # the judge saw each question with its reference answer, with the run's judge budget
    assert len(backend.prompts) == 2 and backend.budgets == [4]  # capped by max_new_tokens
    assert "Rayleigh scattering" in backend.prompts[0] and "Four legs" in backend.prompts[1]
    rows = [r for r in read_samples(Store(out), cell).to_pylist() if r["metric"] == "judge_score"]
    assert [(r["score"], r["judge_status"]) for r in rows] == [(7.0, JUDGED), (None, JUDGE_ERROR)]
    assert rows[1]["error"] == "HTTP 500 twice" and all(r["judge_model"] == "recording:v1" for r in rows)
    summary = {r["metric"]: r for r in summarize(out).to_pylist()}
    assert (summary["judge_score"]["n"], summary["judge_score"]["n_unscored"]) == (1, 1)


def test_the_local_judge_renders_with_its_template_and_reports_tokens(models):
    judge = LocalJudge(models["judge"], SETTINGS)
    try:
        assert judge.identity == models["judge"]
        replies = judge.judge(["Rate this answer: blue.", "Rate this answer: four."], max_new_tokens=3)
        assert len(replies) == 2
        assert all(r.error is None and 0 < r.completion_tokens <= 3 and r.prompt_tokens > 5 for r in replies)
        assert judge.judge([], max_new_tokens=3) == []
    finally:
        judge.close()


def test_judge_specs():
    with pytest.raises(InputError, match="needs a model name"):
        make_judge("openai:", SETTINGS)


def test_an_api_judge_through_the_pipeline(models, tmp_path, monkeypatch):
    """`--judge openai:MODEL` end to end against an OpenAI-compatible server on loopback: its
    identity (model and endpoint, never the key) is recorded, a rerun asks nothing, another
    endpoint is another judge."""
    from tests.judge_servers import ScriptedServer, reply

    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    data = tmp_path / "q.jsonl"
    data.write_text(
        json.dumps({"question": "What colour is the sky?", "reference": "Blue, by Rayleigh scattering."}) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"

    def evaluate():
        return run_pipeline(
            {"m": models["alpha"]},
            executor=LocalCellExecutor(),
            benchmarks=[f"mine={data}:chat:en"],
            languages=["en"],
            judge="openai:judge-x",
            out_uri=str(out),
            settings=SETTINGS,
            show_progress=False,
        )

    with ScriptedServer([reply("The answer is short. Rating: [[6]]")]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        first = evaluate()
        assert first.ok and first.counts["judged"] == 1
        assert len(server.requests) == 1 and "Rayleigh scattering" in server.user_messages()[0]
        assert evaluate().counts["judged"] == 0 and len(server.requests) == 1
    rows = [
        r for r in read_samples(Store(str(out)), Cell("m", "en", "mine")).to_pylist() if r["metric"] == "judge_score"
    ]
    assert [(r["score"], r["judge_model"]) for r in rows] == [(6.0, f"openai:judge-x@{server.base_url}")]
    with ScriptedServer([reply("Rating: [[8]]")]) as other:
        monkeypatch.setenv("OPENAI_BASE_URL", other.base_url)
        again = evaluate()
        assert again.redone == {"m/en/mine": ["the judge changed"]} and len(other.requests) == 1
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
