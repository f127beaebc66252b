"""A real evaluation run (the CLI, the toy world's chat model, the hf engine) judged by an API
judge on loopback that records every request: what the judge is sent and what is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from judge_servers import ScriptedServer, reply

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "demo" / "toyworld" / "checkpoints" / "chat"
KEY = "sk-run-Wq93distinctive-KEY-0815"
QUESTIONS = [("c1", "reverse tubegul poku zobaz", "zobaz poku tubegul"), ("c2", "first kilu lirab folis", "kilu")]
TURNS = [("m1", ["reverse tubegul poku zobaz", "last ropoto rinori riga"], "riga")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("judged-run")
    chat = tmp / "chat.jsonl"
    chat.write_text(
        "".join(json.dumps({"id": i, "question": q, "reference": ref}) + "\n" for i, q, ref in QUESTIONS),
        encoding="utf-8",
    )
    multi = tmp / "multi.jsonl"
    multi.write_text(
        "".join(json.dumps({"id": i, "turns": t, "reference": ref}) + "\n" for i, t, ref in TURNS), encoding="utf-8"
    )
    out = tmp / "out"
    with ScriptedServer([reply("The answer follows the instruction. [[7]]")]) as server:
        env = dict(os.environ, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=KEY)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "chatvec.cli",
                "eval",
                "--model",
                f"chat={CHAT}",
                "--benchmark",
                f"toychat={chat}:chat:toy-l1",
                "--benchmark",
                f"toymulti={multi}:multiturn:toy-l1",
                "--judge",
                "openai:judge-x",
                "--judge-max-tokens",
                "7",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--max-new-tokens",
                "12",
                "--out",
                str(out),
                "--quiet",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    samples = {}
    for f in sorted(out.rglob("samples/**/*.parquet")):
        for r in pq.read_table(f).to_pylist():
            samples.setdefault(r["benchmark"], []).append(r)
    return {"server": server, "samples": samples, "out": out, "log": proc.stdout + proc.stderr}


def test_each_judge_request_holds_the_question_the_reference_and_the_models_answer(run):
    sent = run["server"].user_messages()
    rows = [r for r in run["samples"]["toychat"] if r["metric"] == "judge_score"]
    assert len(rows) == len(QUESTIONS)
    for item_id, question, reference in QUESTIONS:
        [r] = [r for r in rows if r["item_id"] == item_id]
        assert r["response"]  # the model answered something to judge
        # the toy languages have no judge prompts of their own: the English ones, naming the language
        mine = [m for m in sent if f"[Question]\n{question}\n" in m]
        assert len(mine) == 1, (question, sent)
        assert f"[Reference answer]\n{reference}\n" in mine[0]
        assert mine[0].endswith(f"[Assistant's answer]\n{r['response']}")
    body = run["server"].requests[0]
    assert body["model"] == "judge-x" and body["temperature"] == 0 and len(body["messages"]) == 1
    assert all(b["max_completion_tokens"] == 7 for b in run["server"].requests)  # --judge-max-tokens


def test_judged_rows_keep_the_raw_judgment_and_the_judges_identity(run):
    judged = [r for rs in run["samples"].values() for r in rs if r["metric"] == "judge_score"]
    assert len(judged) == len(QUESTIONS) + len(TURNS)
    for r in judged:
        assert (r["score"], r["judge_status"]) == (7.0, "ok")
        assert r["judge_raw"] == "The answer follows the instruction. [[7]]"
        assert r["judge_model"] == f"openai:judge-x@{run['server'].base_url}"


def test_turn_two_sees_the_models_own_turn_one_answer(run):
    [r] = [r for r in run["samples"]["toymulti"] if r["metric"] == "judge_score"]
    details = json.loads(r["details"])
    first, second = details["answers"]
    (_, (q1, q2), reference) = TURNS[0]
    assert first.strip()
    # the second turn's prompt is the conversation so far: question 1, the model's answer, question 2
    prompt = r["prompt"]
    assert prompt.index(q1) < prompt.index(first) < prompt.index(q2)
    # and that first answer is the model's own: what it answers to the same question on its own
    [alone] = [c for c in run["samples"]["toychat"] if c["item_id"] == "c1" and c["metric"] == "judge_score"]
    assert QUESTIONS[0][1] == q1 and alone["response"] == first
    # the judge sees the whole conversation and the reference
    [sent] = [m for m in run["server"].user_messages() if q2 in m]
    assert first in sent and second in sent and reference in sent and sent.index(first) < sent.index(q2)


def test_the_key_is_nowhere_in_what_the_run_wrote(run):
    assert KEY not in run["log"]
    for f in run["out"].rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert all(h["authorization"] == f"Bearer {KEY}" for h in run["server"].headers)


def test_the_report_shows_the_judging_and_the_raw_judgments(run, tmp_path):
    from chatvec.core.storage import Store
    from chatvec.eval.browser import page_rel
    from chatvec.eval.report import ModelInfo, write_report
    from chatvec.eval.results import read_table

    summary = read_table(Store(str(run["out"])), "summary.parquet")
    uri = write_report(
        str(tmp_path / "report"),
        run_id="r",
        summary=summary,
        results_uri=str(run["out"]),
        models=[ModelInfo(name="chat", role="chat")],
    )
    index = Path(uri).read_text(encoding="utf-8")
    judging = index[index.index("<h2>Judging</h2>") : index.index("<h2>Answers</h2>")]
    assert f"openai:judge-x@{run['server'].base_url}" in judging and "3 judged row(s); 0 without a score" in judging
    page = (tmp_path / "report" / page_rel("toymulti", "toy-l1")).read_text(encoding="utf-8")
    assert "The answer follows the instruction. [[7]]" in page and "(1) reverse tubegul poku zobaz" in page
    assert KEY not in index and KEY not in page


def test_a_failed_judgment_is_counted_unscored_and_judged_again_on_rerun(tmp_path):
    from tests.judge_servers import status

    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(json.dumps({"id": i, "question": q, "reference": ref}) + "\n" for i, q, ref in QUESTIONS),
        encoding="utf-8",
    )
    out = tmp_path / "out"

    def refuse_c2(h, body):  # the judge endpoint refuses one prompt (a 400 is not retried)
        text = body["messages"][0]["content"]
        (status(400, message="prompt rejected") if QUESTIONS[1][1] in text else reply("ok [[6]]"))(h, body)

    def cli(server):
        env = dict(os.environ, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=KEY)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "chatvec.cli",
                "eval",
                "--model",
                f"chat={CHAT}",
                "--benchmark",
                f"toychat={data}:chat:toy-l1",
                "--judge",
                "openai:judge-x",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--max-new-tokens",
                "12",
                "--out",
                str(out),
                "--quiet",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        rows = [
            r
            for f in out.rglob("samples/**/*.parquet")
            for r in pq.read_table(f).to_pylist()
            if r["metric"] == "judge_score"
        ]
        summary = [r for r in pq.read_table(out / "summary.parquet").to_pylist() if r["metric"] == "judge_score"]
        return proc, {r["item_id"]: r for r in rows}, summary

    with ScriptedServer([refuse_c2]) as server:
        proc, rows, [summary] = cli(server)
        assert rows["c1"]["score"] == 6.0 and rows["c1"]["judge_status"] == "ok"
        # without --judge-max-tokens the judge's budget (2048) is capped by --max-new-tokens
        assert server.requests[0]["max_completion_tokens"] == 12
        assert rows["c2"]["score"] is None and rows["c2"]["judge_status"] == "error"
        assert "HTTP 400" in (rows["c2"]["error"] or "") and KEY not in (rows["c2"]["error"] or "")
        assert (summary["n"], summary["n_unscored"], summary["value"]) == (1, 1, 6.0)  # never averaged in
        sent = len(server.requests)
        server.script = [reply("better now [[9]]")]
        proc, rows, [summary] = cli(server)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # only the failed row went to the judge again
    assert len(server.requests) == sent + 1 and QUESTIONS[1][1] in server.user_messages()[-1]
    assert (rows["c1"]["score"], rows["c2"]["score"]) == (6.0, 9.0)
    assert (summary["n"], summary["n_unscored"]) == (2, 0)
