"""Language fidelity measured on the prose: answers written by hand in every shipped language,
with the code, links, numbers and formulas real answers carry."""

from __future__ import annotations

import pytest

from chatvec.eval.fidelity import HANS, HANT, MIXED, UNDETERMINED, FidelityScorer, ScriptDetector, chinese_script, prose

CODE = """
```python
def fibonacci(n: int) -> list[int]:
    # return the first n Fibonacci numbers
    out = [0, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return out[:n]

print(fibonacci(10))  # prints the sequence, then exits
```
"""

# technical answers: a lot of English-looking code around a little prose in the benchmark's language
ANSWERS = {
    "en": "Here is a short function that returns the first Fibonacci numbers, built step by step:"
    + CODE
    + "Calling `fibonacci(10)` gives ten values. See https://en.wikipedia.org/wiki/Fibonacci_number for more.",
    "zh-Hant": "以下是一個簡單的函式，它會回傳前幾個費波那契數，並逐步說明做法："
    + CODE
    + "呼叫 `fibonacci(10)` 會得到十個數值。更多說明請參考 https://zh.wikipedia.org/wiki/斐波那契数 。"
    + "公式為 $F_n = F_{n-1} + F_{n-2}$，時間複雜度是 O(n)。",
    "zh-Hans": "下面是一个简单的函数，它会返回前几个斐波那契数，并逐步说明做法："
    + CODE
    + "调用 `fibonacci(10)` 会得到十个数值。更多说明请参考 https://zh.wikipedia.org/wiki/斐波那契数 。"
    + "公式为 $F_n = F_{n-1} + F_{n-2}$，时间复杂度是 O(n)。",
    "ko": "다음은 처음 몇 개의 피보나치 수를 돌려주는 간단한 함수입니다. 단계별로 설명하겠습니다:"
    + CODE
    + "`fibonacci(10)` 을 호출하면 열 개의 값이 나옵니다. 자세한 내용은 https://ko.wikipedia.org/ 를 참고하세요. "
    + "점화식은 F(n) = F(n-1) + F(n-2) 입니다.",
    "ja": "以下は、最初のいくつかのフィボナッチ数を返す簡単な関数です。順を追って説明します："
    + CODE
    + "`fibonacci(10)` を呼び出すと十個の値が得られます。詳しくは https://ja.wikipedia.org/ を参照してください。"
    + "漸化式は $F_n = F_{n-1} + F_{n-2}$ です。",
}

# plain conversational answers
PLAIN = {
    "en": "I would recommend visiting the old town in the morning, before the crowds arrive.",
    "zh-Hant": "我建議你早上去老城區走走，那時候遊客還不多，可以慢慢欣賞建築與街景。",
    "zh-Hans": "我建议你早上去老城区走走，那时候游客还不多，可以慢慢欣赏建筑与街景。",
    "ko": "사람들이 몰리기 전에 아침 일찍 구시가지를 방문하시는 것을 추천드립니다.",
    "ja": "人が混む前に、朝のうちに旧市街を訪れることをおすすめします。",
}

LANGS = list(ANSWERS)


@pytest.fixture(scope="module")
def scorer():
    return FidelityScorer(LANGS)


@pytest.mark.parametrize("lang", LANGS)
def test_each_language_is_recognised_through_its_code(scorer, lang):
    d = scorer.detect(ANSWERS[lang], lang)
    assert (d.language, d.in_language) == (lang, True)
    assert scorer.detect(PLAIN[lang], lang).in_language is True


@pytest.mark.parametrize("lang", LANGS)
def test_an_answer_in_another_language_fails_even_with_the_same_code(scorer, lang):
    for other in LANGS:
        if other != lang:
            d = scorer.detect(ANSWERS[other], lang)
            assert d.in_language is False, (lang, other, d)


def test_the_code_would_have_decided_without_stripping(scorer):
    # the regression this guards: the Korean answer read whole is English to the detector
    from chatvec.eval.fidelity import _detector

    whole = _detector(scorer._lingua_set).detect_language_of(ANSWERS["ko"])
    assert whole.iso_code_639_1.name.lower() == "en"
    body = prose(ANSWERS["ko"])
    assert "def" not in body and "http" not in body and "fibonacci" not in body and "10" not in body


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "OK",
        "Yes!",
        "42",
        "네.",
        "好。",
        "はい",
        "`x = 1`",
        CODE,
        "https://example.com/a/b",
        "$E = mc^2$",
        "3.14159 2.71828 1.41421",
    ],
)
def test_too_little_prose_is_undetermined_not_a_failure(scorer, text):
    for lang in LANGS:
        d = scorer.detect(text, lang)
        assert (d.language, d.in_language) == (UNDETERMINED, None), (lang, text, d)


def test_a_short_but_clear_answer_is_determined(scorer):
    assert scorer.detect("감사합니다, 좋아요", "ko").in_language is True
    assert scorer.detect("Thank you very much.", "ko").in_language is False


def test_mixed_chinese_script_is_judged_by_share(scorer):
    trad = PLAIN["zh-Hant"]
    # one Simplified character slipped into a Traditional answer: still Traditional
    slip = trad.replace("遊客", "游客").replace("欣賞", "欣赏")
    assert chinese_script(slip) == HANT
    assert scorer.detect(slip, "zh-Hant").in_language is True
    assert scorer.detect(slip, "zh-Hans").in_language is False
    # half and half: neither script's answer
    half = trad[: len(trad) // 2] + PLAIN["zh-Hans"][len(trad) // 2 :]
    assert chinese_script(half) == MIXED
    assert scorer.detect(half, "zh-Hant").in_language is False
    assert scorer.detect(half, "zh-Hans").in_language is False
    assert chinese_script(PLAIN["zh-Hans"]) == HANS
    # a stricter share flips the slipped answer to mixed
    assert chinese_script(slip, share=0.95) == MIXED


def test_custom_detectors_read_the_prose_and_are_passed_in():
    toy = ScriptDetector({"toy-a": "Latin", "toy-b": "Cyrillic"})
    f = FidelityScorer(["toy-a", "toy-b"], detectors={"toy-a": toy, "toy-b": toy})
    text = "вела мино тарек\n```\nprint('hello world from latin code')\n```\nhttps://example.com/latin/words"
    d = f.detect(text, "toy-b")
    assert (d.language, d.script, d.in_language) == ("toy-b", "Cyrillic", True)
    assert f.detect(text, "toy-a").in_language is False


@pytest.mark.parametrize(
    "text, kept",
    [
        ("我有3個蘋果和2個橘子。", "我有 個蘋果和 個橘子。"),  # the number goes, the sentence stays
        ("參考https://x.com/a。然後再說", "參考 。然後再說"),  # a URL ends where the prose resumes
        ("請寄信到 a.b@example.com，謝謝", "請寄信到 ,謝謝"),
        ("서울의 인구는 약 940만 명입니다", "서울의 인구는 약 만 명입니다"),
        ("The well-known result is e = mc^2, so what.", "The well-known result is , so what."),
        ("x_1 = 5 と y^2", "と"),
        ("Use <b>bold</b> and \\(a+b\\) or $$\\sum_i x_i$$ here", "Use bold and or here"),
    ],
)
def test_prose_keeps_the_words_and_drops_the_rest(text, kept):
    assert prose(text) == kept


@pytest.mark.parametrize(
    "lang, text",
    [
        ("ko", "이 함수는 list를 반환하고, 내부에서 Python의 generator와 yield 문법을 사용합니다."),
        ("ja", "このAPIはJSONを返します。エラーの場合はHTTPステータスコードを確認してください。"),
        ("zh-Hant", "建議使用 PyTorch 或 TensorFlow 來訓練模型，並用 Docker 部署到伺服器上。"),
        ("zh-Hans", "建议使用 PyTorch 或 TensorFlow 来训练模型，并用 Docker 部署到服务器上。"),
        ("en", "The character 水 means water in Chinese, and 山 means mountain; both are pictographs."),
    ],
)
def test_borrowed_words_and_quoted_characters_do_not_change_the_language(scorer, lang, text):
    d = scorer.detect(text, lang)
    assert (d.language, d.in_language) == (lang, True), d
