"""Language fidelity: is an answer written in the benchmark's language (and, for Chinese, script)?

Detection uses lingua restricted to the languages in play (the run's languages plus English, the
language a model drifts into; never all 75 of lingua's languages, which is slower and noisier).
Chinese answers then get their script from hanzidentifier: ``zh-Hant`` asks for Traditional,
``zh-Hans`` for Simplified; text whose characters are shared by both scripts counts for either,
text that holds characters exclusive to the other script does not.

Languages lingua does not know (a user's synthetic language, say) get a detector registered with
``register_detector``; ``ScriptDetector`` tells languages apart by the Unicode script of their
letters.
"""
from __future__ import annotations

import logging
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

# (text, languages in play) -> (detected language code or None, script or None)
Detector = Callable[[str, Sequence[str]], "tuple[str | None, str | None]"]

_DETECTORS: dict[str, Detector] = {}
# used when a run names fewer than two languages lingua knows: it needs something to compare with
_DEFAULT_PEERS = ("en", "zh", "ko", "ja")

HANT, HANS, BOTH, MIXED = "Hant", "Hans", "both", "mixed"


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


def chinese_script(text: str) -> str | None:
    import hanzidentifier

    kind = hanzidentifier.identify(text)
    return {
        hanzidentifier.TRADITIONAL: HANT,
        hanzidentifier.SIMPLIFIED: HANS,
        hanzidentifier.BOTH: BOTH,
        hanzidentifier.MIXED: MIXED,
    }.get(kind)


def script_matches(expected: str, script: str | None) -> bool:
    """For zh-Hant / zh-Hans: the text holds no character exclusive to the other script."""
    suffix = expected.split("-", 1)[1] if "-" in expected else ""
    if suffix == HANT:
        return script in (HANT, BOTH)
    if suffix == HANS:
        return script in (HANS, BOTH)
    return True


class FidelityScorer:
    """Detects the language of answers; build once per run with the languages in play."""

    def __init__(self, languages: Iterable[str]) -> None:
        self.languages = tuple(sorted(set(languages) | {"en"}))
        known = frozenset(c for c in self.languages if c not in _DETECTORS and lingua_language(c) is not None)
        self._lingua_set = known

    def detect(self, text: str, expected: str) -> Detection:
        if expected in _DETECTORS:
            lang, script = _DETECTORS[expected](text, self.languages)
            return Detection(lang, script, lang == expected)
        if lingua_language(expected) is None:
            return Detection(None, None, None)
        if not text or not text.strip():
            return Detection(None, None, False)
        found = _detector(self._lingua_set | {expected}).detect_language_of(text)
        if found is None:
            return Detection(None, None, False)
        code = found.iso_code_639_1.name.lower()
        if code != "zh":
            return Detection(code, None, code == base_code(expected))
        script = chinese_script(text)
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

    def register(self) -> "ScriptDetector":
        for code in self.scripts:
            register_detector(code, self)
        return self
