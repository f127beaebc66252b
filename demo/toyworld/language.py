"""Two toy languages from one generator.

L1 is a sparse Markov chain over made-up words written in Latin letters, plus the task keywords.
L2 is the same language with every letter mapped to Cyrillic: each L2 word is the *twin* of one L1
word, so the two languages share their grammar and meaning and differ only in script. A script
check therefore tells them apart, and "the right words in the wrong script" is measurable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Letters the made-up words use, and their Cyrillic images (a bijection, so L2 -> L1 is exact).
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
LATIN_TO_CYRILLIC = {
    "a": "а",
    "e": "э",
    "i": "и",
    "o": "о",
    "u": "у",
    "b": "б",
    "d": "д",
    "f": "ф",
    "g": "г",
    "k": "к",
    "l": "л",
    "m": "м",
    "n": "н",
    "p": "п",
    "r": "р",
    "s": "с",
    "t": "т",
    "v": "в",
    "z": "з",
}
CYRILLIC_TO_LATIN = {v: k for k, v in LATIN_TO_CYRILLIC.items()}

# The instruction tasks' keywords are ordinary words of L1 (they occur in raw text too), so code
# switching in pre-training aligns them with their L2 twins like any other word.
TASKS = ("reverse", "repeat", "first", "last")

# Punctuation the two languages share.
PERIOD = "."
EQUALS = "="

LANGUAGES = ("toy-l1", "toy-l2")
SCRIPTS = {"toy-l1": "Latin", "toy-l2": "Cyrillic"}


def to_l2(word: str) -> str:
    return "".join(LATIN_TO_CYRILLIC.get(ch, ch) for ch in word)


def to_l1(word: str) -> str:
    return "".join(CYRILLIC_TO_LATIN.get(ch, ch) for ch in word)


def transliterate(text: str, language: str) -> str:
    """Write ``text`` (words of either language) in ``language``'s script."""
    conv = to_l2 if language == "toy-l2" else to_l1
    return " ".join(conv(w) for w in text.split())


def _make_words(rng: random.Random, n: int, reserved: set[str]) -> list[str]:
    words: list[str] = []
    seen = set(reserved)
    while len(words) < n:
        syllables = rng.choice((2, 2, 3))
        w = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))
        if rng.random() < 0.3:
            w += rng.choice(CONSONANTS)
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


@dataclass
class ToyLanguage:
    """The shared generator: words (L1 spelling) and a sparse Markov chain over them."""

    words: list[str]
    successors: list[list[int]] = field(repr=False)
    weights: list[list[float]] = field(repr=False)
    starts: list[int] = field(repr=False)

    @classmethod
    def generate(cls, seed: int, n_words: int = 150, fanout: int = 4) -> ToyLanguage:
        rng = random.Random(f"toyworld-language-{seed}")
        words = _make_words(rng, n_words, set(TASKS)) + list(TASKS)
        n = len(words)
        successors, weights = [], []
        for _ in range(n):
            succ = rng.sample(range(n), fanout)
            w = [rng.random() ** 2 + 0.05 for _ in succ]
            total = sum(w)
            successors.append(succ)
            weights.append([x / total for x in w])
        starts = rng.sample(range(n), max(4, n // 5))
        return cls(words=words, successors=successors, weights=weights, starts=starts)

    # -- vocabulary ---------------------------------------------------------------------------
    def vocabulary(self) -> list[str]:
        """Every word token of both languages, L1 first (a fixed order: same seed, same ids)."""
        return list(self.words) + [to_l2(w) for w in self.words]

    # -- sampling -----------------------------------------------------------------------------
    def sentence(self, rng: random.Random, min_len: int = 4, max_len: int = 10) -> list[str]:
        """A sentence in L1 spelling (no period)."""
        length = rng.randint(min_len, max_len)
        i = rng.choice(self.starts)
        out = [self.words[i]]
        while len(out) < length:
            i = rng.choices(self.successors[i], self.weights[i])[0]
            out.append(self.words[i])
        return out

    @staticmethod
    def render(words: list[str], language: str) -> list[str]:
        return [to_l2(w) for w in words] if language == "toy-l2" else list(words)

    @staticmethod
    def code_switch(rng: random.Random, words: list[str], language: str, p: float = 0.5) -> list[str]:
        """Render in ``language`` with each word swapped for its twin with probability ``p``."""
        other = "toy-l1" if language == "toy-l2" else "toy-l2"
        return [to_l2(w) if (language if rng.random() >= p else other) == "toy-l2" else w for w in words]
