"""The API judge against servers that fail the ways real ones do: 5xx, 429 with Retry-After,
stalls past the timeout, bodies that are not chat completions, refusals; and the key kept out of
everything it writes."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from judge_servers import ScriptedServer, garbage, reply, stall, status

from chatvec.eval.api_judge import APIJudge, APIJudgeError, RetryPolicy, parse_spec, public_url

KEY = "sk-test-Zq8distinctive-KEY-4711"


def judge_for(server: ScriptedServer, **kw) -> APIJudge:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_backoff_s", 0.05)
    return APIJudge("judge-model", base_url=server.base_url, api_key=KEY, **kw)


def test_request_shape_and_retries_after_server_errors():
    with ScriptedServer([status(500), status(503), reply("Fine answer. [[7]]")]) as server:
        judge = judge_for(server)
        [r] = judge.judge(["Rate this: question and reference"], max_new_tokens=2048)
        judge.close()
    assert r.error is None and r.text == "Fine answer. [[7]]"
    assert (r.prompt_tokens, r.completion_tokens) == (11, 3)
    assert len(server.requests) == 3 and judge.retries == 2
    body = server.requests[-1]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": "Rate this: question and reference"}]
    assert body["max_completion_tokens"] == 2048
    assert server.headers[-1]["authorization"] == f"Bearer {KEY}"


def test_429_waits_as_long_as_retry_after_says():
    with ScriptedServer([status(429, {"Retry-After": "0.3"}, "rate limited"), reply("[[4]]")]) as server:
        judge = judge_for(server, backoff_s=0.0, max_backoff_s=0.0)  # without Retry-After: no wait at all
        [r] = judge.judge(["p"], max_new_tokens=16)
    assert r.text == "[[4]]" and r.error is None
    assert server.arrivals[1] - server.arrivals[0] >= 0.3


def test_retry_after_is_capped_and_backoff_grows():
    policy = RetryPolicy(max_retries=5, backoff_s=1.0, max_backoff_s=8.0)
    assert policy.wait(0, 2.5) == 2.5 and policy.wait(0, 10_000) == 60.0
    waits = [policy.wait(a, None) for a in range(6)]
    assert 0.5 <= waits[0] <= 1.0 and 2.0 <= waits[2] <= 4.0 and all(4.0 <= w <= 8.0 for w in waits[3:])


def test_a_stalled_request_times_out_and_is_retried():
    with ScriptedServer([stall(3.0, reply("[[1]]")), reply("[[9]]")]) as server:
        judge = judge_for(server, timeout_s=0.5)
        [r] = judge.judge(["p"], max_new_tokens=16)
    assert r.text == "[[9]]" and r.error is None and len(server.requests) == 2


@pytest.mark.parametrize(
    "bad",
    [
        garbage(),
        garbage(b"{not json", "application/json"),
        garbage(json.dumps({"object": "chat.completion", "choices": []}).encode()),
        garbage(json.dumps({"unexpected": True}).encode()),
    ],
)
def test_garbage_bodies_are_retried_then_reported(bad):
    with ScriptedServer([bad, reply("[[6]]")]) as server:
        [ok] = judge_for(server).judge(["p"], max_new_tokens=16)
    assert ok.text == "[[6]]" and ok.error is None and len(server.requests) == 2
    with ScriptedServer([bad]) as server:
        [failed] = judge_for(server, max_retries=2).judge(["p"], max_new_tokens=16)
    assert failed.error and "failed after 3 attempts" in failed.error and failed.text == ""
    assert len(server.requests) == 3


def test_client_errors_are_not_retried():
    with ScriptedServer([status(400, message="max_completion_tokens is too large")]) as server:
        [r] = judge_for(server).judge(["p"], max_new_tokens=10**6)
    assert len(server.requests) == 1
    assert "HTTP 400" in r.error and "max_completion_tokens is too large" in r.error


def test_failures_keep_their_place_and_never_drop_a_prompt():
    # prompt "p1" always fails; the others succeed with a rating made from the prompt
    def text(body):
        return f"[[{body['messages'][0]['content'][1:]}]]"

    lock = threading.Lock()

    def step(h, body):
        if body["messages"][0]["content"] == "p1":
            status(502)(h, body)
        else:
            reply(text)(h, body)

    with lock, ScriptedServer([step]) as server:
        replies = judge_for(server, max_retries=1, concurrency=4).judge([f"p{i}" for i in range(8)], max_new_tokens=8)
    assert len(replies) == 8
    assert replies[1].error and "HTTP 502" in replies[1].error
    assert [r.text for i, r in enumerate(replies) if i != 1] == [f"[[{i}]]" for i in range(8) if i != 1]


def test_concurrency_is_bounded_and_used():
    # each request takes long enough that the pool's threads overlap even on a busy machine
    with ScriptedServer([stall(1.0, reply("[[5]]"))]) as server:
        replies = judge_for(server, concurrency=3).judge(["p"] * 6, max_new_tokens=8)
    assert all(r.text == "[[5]]" for r in replies)
    assert server.max_in_flight == 3


def test_key_never_appears_in_identity_errors_or_logs(caplog):
    # a hostile or buggy gateway that echoes the key back in its error body
    echo = status(503, message=f"bad upstream for key {KEY}")
    refuse = status(401, message=f"Incorrect API key provided: {KEY}")
    caplog.set_level(logging.DEBUG)
    for script in ([echo], [refuse]):
        with ScriptedServer(script) as server:
            user_url = server.base_url.replace("http://", "http://admin:hunter2pass@")
            judge = APIJudge("m", base_url=user_url, api_key=KEY, max_retries=1, backoff_s=0.01)
            [r] = judge.judge(["p"], max_new_tokens=8)
        assert r.error and "***" in r.error
        for text in (r.error, judge.identity, caplog.text):
            assert KEY not in text and "hunter2pass" not in text
    assert judge.identity == f"openai:m@{server.base_url}"


def test_configuration_from_the_openai_environment(monkeypatch):
    with ScriptedServer([reply("[[3]]")]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        judge = APIJudge(parse_spec("openai:gpt-judge"))
        [r] = judge.judge(["p"], max_new_tokens=8)
    assert r.text == "[[3]]" and judge.identity == f"openai:gpt-judge@{server.base_url}"
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"


def test_bad_configuration_says_what_to_do(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(APIJudgeError, match="OPENAI_API_KEY"):
        APIJudge("gpt-4o", base_url="https://gateway.example.com/v1")
    with pytest.raises(APIJudgeError, match="openai:MODEL"):
        parse_spec("openai:")
    with pytest.raises(APIJudgeError, match="concurrency"):
        APIJudge("m", base_url="http://127.0.0.1:9/v1", concurrency=0)
    # a local server needs no key
    assert APIJudge("m", base_url="http://127.0.0.1:9/v1").identity == "openai:m@http://127.0.0.1:9/v1"
    assert public_url("https://u:p@h.example:8443/v1/?key=abc#x") == "https://h.example:8443/v1"
