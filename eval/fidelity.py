"""Language fidelity: is an answer written in the benchmark's language (and, for Chinese, script)?

Only the answer's prose is read: fenced and inline code, URLs, e-mail addresses, numbers and
formulas are stripped first (``prose``), since a Korean answer with a Python block is still a
Korean answer. An answer with too little prose left to tell (fewer than ``min_units``: words in
alphabetic scripts, characters in Chinese, Japanese and Korean) is ``undetermined``: its
``in_language`` is None, so it counts among the unscored rows rather than as a failure.

Detection uses lingua restricted to the languages in play (the run's languages plus English, the
language a model drifts into; never all 75 of lingua's languages, which is slower and noisier).
Chinese answers then get their script by share: of the characters that exist in only one of the
two scripts, at least ``script_share`` (default 80%) must be Traditional for ``Hant`` or
Simplified for ``Hans``; below that the text is ``mixed``, and text made only of characters both
scripts share is ``both`` and counts for either. One stray character does not flip an answer.

Languages lingua does not know (a user's synthetic language, say) get a detector, passed to
``FidelityScorer(detectors=...)`` or registered with ``register_detector``; ``ScriptDetector``
tells languages apart by the Unicode script of their letters. Such a detector reads the prose
and decides on its own, empty text included.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

logger = logging.getLogger(__name__)

# (text, languages in play) -> (detected language code or None, script or None)
Detector = Callable[[str, Sequence[str]], "tuple[str | None, str | None]"]

_DETECTORS: dict[str, Detector] = {}
# used when a run names fewer than two languages lingua knows: it needs something to compare with
_DEFAULT_PEERS = ("en", "zh", "ko", "ja")

HANT, HANS, BOTH, MIXED = "Hant", "Hans", "both", "mixed"
UNDETERMINED = "undetermined"  # detected_language of an answer with too little prose to tell
MIN_UNITS = 3
SCRIPT_SHARE = 0.8


@dataclass(frozen=True)
class Detection:
    language: str | None  # "en", "zh-Hant", "zh-Hans", "zh" (script undecided), "ko", ...
    script: str | None
    in_language: bool | None  # None: no detector for the expected language


def register_detector(language: str, detector: Detector) -> None:
    """Detect answers expected in ``language`` with ``detector`` instead of lingua."""
    _DETECTORS[language] = detector


def unregister_detector(language: str) -> None:
    _DETECTORS.pop(language, None)


def base_code(language: str) -> str:
    return language.split("-")[0].lower()


def lingua_language(language: str):
    """The lingua Language for a code ("zh-Hant" -> CHINESE), or None when lingua lacks it."""
    from lingua import IsoCode639_1, Language

    iso = getattr(IsoCode639_1, base_code(language).upper(), None)
    if iso is None:
        return None
    try:
        return Language.from_iso_code_639_1(iso)
    except ValueError:
        return None


@lru_cache(maxsize=16)
def _detector(languages: frozenset):
    from lingua import LanguageDetectorBuilder

    langs = {lingua_language(c) for c in languages}
    langs.discard(None)
    if len(langs) < 2:
        langs |= {lingua_language(c) for c in _DEFAULT_PEERS}
    logger.debug("building lingua detector for %s", sorted(str(x) for x in langs))
    return LanguageDetectorBuilder.from_languages(*langs).build()


def chinese_script(text: str, share: float = SCRIPT_SHARE) -> str | None:
    """``Hant`` / ``Hans`` when at least ``share`` of the script-exclusive characters are of that
    script, ``mixed`` when neither is, ``both`` when no character is exclusive, None without Han."""
    import hanzidentifier

    # each occurrence counts: a character written ten times weighs ten times
    kinds = Counter(hanzidentifier.identify(ch) for ch in text if _is_han(ch))
    trad, simp = kinds[hanzidentifier.TRADITIONAL], kinds[hanzidentifier.SIMPLIFIED]
    if trad + simp == 0:
        return BOTH if kinds[hanzidentifier.BOTH] else None
    if trad >= share * (trad + simp):
        return HANT
    if simp >= share * (trad + simp):
        return HANS
    return MIXED


def _is_han(ch: str) -> bool:
    return _script_of(ch) == "Han"


def script_matches(expected: str, script: str | None) -> bool:
    """For zh-Hant / zh-Hans: the text's script (``chinese_script``, by share) is the expected one,
    or made only of characters both scripts share."""
    suffix = expected.split("-", 1)[1] if "-" in expected else ""
    if suffix == HANT:
        return script in (HANT, BOTH)
    if suffix == HANS:
        return script in (HANS, BOTH)
    return True


# -- prose ---------------------------------------------------------------------------------------
_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?(?:^[ \t]*\1[^\n]*$|\Z)", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_MATH = re.compile(r"\$\$.*?\$\$|\\\[.*?\\\]|\\\(.*?\\\)|\$[^$\n]+\$", re.DOTALL)
_URL_CHARS = r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]"  # ASCII only: CJK prose often runs on without a space
_URL = re.compile(rf"(?:https?|ftp)://{_URL_CHARS}+|www\.{_URL_CHARS}+|[\w.+-]+@[A-Za-z0-9.-]+\.[A-Za-z]+")
_TAG = re.compile(r"</?[A-Za-z][^>\n]*>")
# "a = b + c", "f(x) ≤ 2y": short operands joined by operators
_OPERATORS = r"(?:[=+*^<>×÷±≤≥≠≈·]|\s[-/]\s)"  # a hyphen or slash only with spaces: "well-known" is prose
_OPERAND = r"[A-Za-z0-9().]{1,6}"
_FORMULA = re.compile(rf"(?<!\w){_OPERAND}(?:\s*{_OPERATORS}+\s*{_OPERAND})+(?!\w)")
# a token with a digit or an operator in it is a number, an identifier or a piece of formula
# (a token here ends at spaces and at CJK characters and punctuation, so a Chinese sentence with a
# number in it loses the number, not the sentence)
_WORDCHAR = (
    r"[^\s\u1100-\u11ff\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
    r"\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)
_TECHNICAL = re.compile(rf"{_WORDCHAR}*[0-9=+*/^<>_\\|{{}}\[\]#@~]{_WORDCHAR}*")
_WIDE = ("Han", "Hiragana", "Katakana", "Hangul", "Cjk")  # scripts written without spaces, or by syllable


def prose(text: str) -> str:
    """``text`` without code, math, URLs, tags, numbers and formula-like tokens."""
    text = unicodedata.normalize("NFKC", text or "")
    for pattern in (_FENCE, _MATH, _INLINE_CODE, _URL, _TAG):
        text = pattern.sub(" ", text)
    # indented code blocks: four spaces or a tab after a blank line, as Markdown reads them
    text = re.sub(r"(?:(?<=\n\n)|\A)(?:(?: {4}|\t)[^\n]*(?:\n|\Z))+", " ", text)
    text = _FORMULA.sub(" ", text)
    text = _TECHNICAL.sub(" ", text)
    return " ".join(text.split())


def prose_units(text: str) -> int:
    """How much there is to read: words of alphabetic scripts, plus each Han, kana or Hangul
    character (one of those carries about as much as a word)."""
    units = 0
    for word in re.findall(r"[^\W\d_]+", text):
        wide = sum(1 for ch in word if (_script_of(ch) or "") in _WIDE)
        units += wide + (1 if wide < len(word) else 0)
    return units


# -- the scorer ----------------------------------------------------------------------------------
class FidelityScorer:
    """Detects the language of answers; build once per run with the languages in play.

    ``detectors`` maps a language to its own detector (languages lingua does not know); those
    registered with ``register_detector`` are used for the languages not given here."""

    def __init__(
        self,
        languages: Iterable[str],
        *,
        detectors: Mapping[str, Detector] | None = None,
        min_units: int = MIN_UNITS,
        script_share: float = SCRIPT_SHARE,
    ) -> None:
        self.languages = tuple(sorted(set(languages) | {"en"}))
        self.detectors = dict(detectors or {})
        self.min_units = min_units
        self.script_share = script_share
        known = frozenset(c for c in self.languages if self._custom(c) is None and lingua_language(c) is not None)
        self._lingua_set = known

    def _custom(self, language: str) -> Detector | None:
        return self.detectors.get(language) or _DETECTORS.get(language)

    def detect(self, text: str, expected: str) -> Detection:
        custom = self._custom(expected)
        body = prose(text)
        if custom is not None:
            lang, script = custom(body, self.languages)
            return Detection(lang, script, lang == expected)
        if lingua_language(expected) is None:
            return Detection(None, None, None)
        if prose_units(body) < self.min_units:
            return Detection(UNDETERMINED, None, None)
        found = _detector(self._lingua_set | {expected}).detect_language_of(body)
        if found is None:
            return Detection(UNDETERMINED, None, None)
        code = found.iso_code_639_1.name.lower()
        if code != "zh":
            return Detection(code, None, code == base_code(expected))
        script = chinese_script(body, self.script_share)
        detected = {HANT: "zh-Hant", HANS: "zh-Hans"}.get(script or "", "zh")
        ok = base_code(expected) == "zh" and script_matches(expected, script)
        return Detection(detected, script, ok)


def _script_of(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    try:
        name = unicodedata.name(ch)
    except ValueError:
        return None
    first = name.split()[0]
    return {"CJK": "Han"}.get(first, first.title())


class ScriptDetector:
    """Tells languages apart by the script most of the text's letters are written in.

    ``ScriptDetector({"toy-l1": "Latin", "toy-l2": "Cyrillic"})``; script names are the first
    word of the letters' Unicode names, title-cased ("Latin", "Cyrillic", "Greek", "Hangul",
    "Hiragana"; CJK ideographs are "Han"). Register it for each of its languages.
    """

    def __init__(self, scripts: dict[str, str]) -> None:
        self.scripts = dict(scripts)
        self._by_script = {s: code for code, s in self.scripts.items()}

    def __call__(self, text: str, languages: Sequence[str] = ()) -> tuple[str | None, str | None]:
        counts = Counter(s for s in map(_script_of, text) if s)
        if not counts:
            return None, None
        script = counts.most_common(1)[0][0]
        return self._by_script.get(script), script

    def register(self) -> ScriptDetector:
        for code in self.scripts:
            register_detector(code, self)
        return self
