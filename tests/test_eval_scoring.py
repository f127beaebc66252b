"""Judge parsing, language and script detection, refusal phrases and aggregation, on fixed inputs."""

from __future__ import annotations

import math

import pytest

from chatvec.eval.fidelity import FidelityScorer, ScriptDetector, register_detector, unregister_detector
from chatvec.eval.judge_prompts import TEXTS, multiturn_prompt, rating_prompt, safety_prompt
from chatvec.eval.judgments import parse_rating, parse_verdict
from chatvec.eval.kinds.base import mean_stderr
from chatvec.eval.kinds.perplexity import PerplexityKind, windows
from chatvec.eval.kinds.safety import is_refusal, refusal_phrases
from chatvec.eval.schema import JUDGED, OUT_OF_RANGE, UNPARSEABLE


# -- judge ratings ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is accurate and complete.\n\nRating: [[8]]", (8.0, JUDGED)),
        ("評分：[[7]]", (7.0, JUDGED)),
        ("점수: [[ 10 ]]", (10.0, JUDGED)),
        ("［［６］］", (6.0, JUDGED)),  # full-width brackets and digit
        ("[[7.5]]", (7.5, JUDGED)),
        ("[[9/10]]", (9.0, JUDGED)),
        ("[[0]]", (0.0, JUDGED)),
        ("First [[4]] then, on reflection, still [[4]].", (4.0, JUDGED)),
    ],
)
def test_well_formed_ratings(text, expected):
    assert parse_rating(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Rating: 6", (6.0, JUDGED)),
        ("I would give it 3/10 overall.", (3.0, JUDGED)),
        ("評価：5", (5.0, JUDGED)),
        ("评分为 9", (9.0, JUDGED)),
        ("It scores 2 out of 10.", (2.0, JUDGED)),
    ],
)
def test_fallback_ratings(text, expected):
    assert parse_rating(text) == expected


@pytest.mark.parametrize(
    "text, status",
    [
        ("", UNPARSEABLE),
        ("The answer is good.", UNPARSEABLE),
        ("[[rating]]", UNPARSEABLE),
        ("[[eight]]", UNPARSEABLE),
        ("[[11]]", OUT_OF_RANGE),
        ("[[-1]]", OUT_OF_RANGE),
        ("[[100]]", OUT_OF_RANGE),
    ],
)  # several ratings: the final one counts (tests/test_judge_parse.py)
def test_bad_ratings_are_recorded_not_guessed(text, status):
    assert parse_rating(text) == (None, status)


def test_bracketed_rating_wins_over_fallback_numbers():
    assert parse_rating("Score: 3. Final verdict [[7]]") == (7.0, JUDGED)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("It explains how to break in. [[UNSAFE]]", (1.0, JUDGED)),
        ("The assistant refused. [[SAFE]]", (0.0, JUDGED)),
        ("[[safe]]", (0.0, JUDGED)),
        ("［［ＵＮＳＡＦＥ］］", (1.0, JUDGED)),
        ("it is unsafe", (None, UNPARSEABLE)),
    ],
)
def test_safety_verdicts(text, expected):
    assert parse_verdict(text) == expected


def test_judge_prompts_are_in_the_benchmark_language():
    for lang, t in TEXTS.items():
        prompt = rating_prompt(lang, "Q?", "A.", "R.")
        assert t.single in prompt and t.reference in prompt and t.language_name in prompt
        assert "[[" in prompt and "Q?" in prompt and "R." in prompt and prompt.endswith("A.")
        assert t.reference not in rating_prompt(lang, "Q?", "A.", None)
        multi = multiturn_prompt(lang, ["q1", "q2"], ["a1", "a2"], None)
        assert t.multi in multi and "q1" in multi and "a1" in multi and multi.endswith("a2")
        assert t.safety in safety_prompt(lang, "bad request", "answer")
    # a language without its own prompts gets the English ones, naming the language
    fr = rating_prompt("fr", "Q?", "A.", None)
    assert TEXTS["en"].single in fr and "written in fr" in fr


# -- language and script ----------------------------------------------------------------------------
SENTENCES = {
    "en": "The weather is lovely today, so we are going for a walk in the park.",
    "zh-Hant": "今天天氣很好，我們去公園散步吧。這裡的風景真漂亮。",
    "zh-Hans": "今天天气很好，我们去公园散步吧。这里的风景真漂亮。",
    "ko": "오늘 날씨가 정말 좋네요. 공원에 산책하러 갈까요?",
    "ja": "今日はとても良い天気ですね。公園へ散歩に行きましょう。",
}


@pytest.fixture(scope="module")
def scorer():
    return FidelityScorer(["en", "zh-Hant", "zh-Hans", "ko", "ja"])


@pytest.mark.parametrize("lang", list(SENTENCES))
def test_detects_each_language_and_script(scorer, lang):
    d = scorer.detect(SENTENCES[lang], lang)
    assert d.in_language is True
    assert d.language == lang
    if lang.startswith("zh"):
        assert d.script == lang.split("-")[1]


@pytest.mark.parametrize(
    "expected, text",
    [
        ("ko", SENTENCES["en"]),  # the paper's failure: answering in English
        ("zh-Hant", SENTENCES["zh-Hans"]),  # right language, wrong script
        ("zh-Hans", SENTENCES["zh-Hant"]),
        ("ja", SENTENCES["zh-Hant"]),
    ],
)  # too little text to tell is undetermined (tests/test_fidelity.py)
def test_answers_in_another_language_or_script_are_not_in_language(scorer, expected, text):
    assert scorer.detect(text, expected).in_language is False


def test_script_shared_by_both_chinese_scripts_counts_for_either(scorer):
    text = "我是學生。我在大學工作。"  # 學 is Traditional-only; 我是 ... 大 are shared
    assert scorer.detect(text, "zh-Hant").in_language
    shared = "我们不是人"  # only 们 is Simplified-only
    assert not scorer.detect(shared, "zh-Hant").in_language
    assert scorer.detect(shared, "zh-Hans").in_language


def test_unknown_language_without_detector_is_undecided(scorer):
    d = scorer.detect("Zorblat vexin quor.", "tlh-x")
    assert d.in_language is None and d.language is None


def test_registered_script_detector_for_languages_lingua_does_not_know():
    detector = ScriptDetector({"toy-a": "Latin", "toy-b": "Cyrillic"})
    try:
        detector.register()
        f = FidelityScorer(["toy-a", "toy-b"])
        assert f.detect("vela mino tarek", "toy-a").in_language
        assert not f.detect("вела мино тарек", "toy-a").in_language
        d = f.detect("вела мино tarek", "toy-b")
        assert d.in_language and d.script == "Cyrillic" and d.language == "toy-b"
        assert f.detect("123 ...", "toy-b").in_language is False
    finally:
        unregister_detector("toy-a")
        unregister_detector("toy-b")


def test_custom_detector_overrides_lingua():
    register_detector("en", lambda text, langs: ("en", None) if "yes" in text else (None, None))
    try:
        f = FidelityScorer(["en"])
        assert f.detect("今天天氣很好 yes", "en").in_language
    finally:
        unregister_detector("en")
    assert not FidelityScorer(["en"]).detect("今天天氣很好", "en").in_language


# -- refusals and aggregation -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "lang, text, refused",
    [
        ("en", "I'm sorry, but I can't help with that.", True),
        ("en", "Sure! Step one: ...", False),
        ("zh-Hant", "抱歉，我無法協助這個請求。", True),
        ("zh-Hans", "对不起，我不能提供这些信息。", True),
        ("ko", "죄송하지만 그 요청은 도와드릴 수 없습니다.", True),
        ("ja", "申し訳ありませんが、そのご依頼にはお答えできません。", True),
        ("ja", "はい、こちらが方法です。", False),
    ],
)
def test_refusal_phrases(lang, text, refused):
    assert is_refusal(text, refusal_phrases(lang)) is refused


def test_mean_and_stderr():
    values = [1.0, 0.0, 1.0, 1.0]
    mean, se, n = mean_stderr(values)
    m = sum(values) / 4
    assert (mean, n) == (m, 4)
    assert se == pytest.approx(math.sqrt(sum((v - m) ** 2 for v in values) / 3 / 4))
    assert mean_stderr([]) == (None, None, 0)
    assert mean_stderr([5.0]) == (5.0, None, 1)


def test_perplexity_is_token_weighted_over_the_cell():
    import json

    parts = [(10.0, 5, 20), (30.0, 10, 40)]  # (nll, tokens, bytes)
    rows = [
        {"score": math.exp(nll / t), "details": json.dumps({"nll": nll, "tokens": t, "bytes": b})}
        for nll, t, b in parts
    ]
    value, se, n = PerplexityKind().aggregate("perplexity", rows)
    assert n == 2 and value == pytest.approx(math.exp(40.0 / 15))
    assert se is not None and se > 0
    bpb, _, _ = PerplexityKind().aggregate("bits_per_byte", rows)
    assert bpb == pytest.approx(40.0 / math.log(2) / 60)


def test_perplexity_windows_cover_every_token_once():
    ids = list(range(23))
    for max_len in (4, 7, 50):
        ws = windows(ids, 1, max_len)
        scored = [t for _ctx, cont in ws for t in cont]
        assert scored == ids[1:]
        assert all(len(ctx) + len(cont) <= max_len and ctx for ctx, cont in ws)
        assert all(ctx == ids[ids.index(cont[0]) - len(ctx) : ids.index(cont[0])] for ctx, cont in ws)


@pytest.mark.parametrize(
    "prompt, new, window, expected",
    [
        (100, 50, 512, (100, 50)),  # fits
        (480, 64, 512, (448, 64)),  # the prompt's start goes first while it keeps half the window
        (400, 512, 512, (256, 256)),  # a huge answer budget gives way to half the window
        (1000, 16, 512, (496, 16)),
    ],
)
def test_prompt_and_answer_fit_the_window(prompt, new, window, expected):
    from chatvec.eval.engines.base import fit_window

    keep, max_new = fit_window(prompt, new, window)
    assert (keep, max_new) == expected and keep + max_new <= window
