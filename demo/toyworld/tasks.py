"""The instruction tasks the chat model learns (in L1 only) and the toy benchmarks (L1 and L2).

A prompt is ``<keyword> w1 ... wn``; the answer is the words reversed, repeated, the first word or
the last word. The benchmark items carry the expected answer in the prompt's language and in the
other script, so a scorer can tell "right and in the right script" from "right words, wrong script".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from chatvec.demo.toyworld.language import TASKS, ToyLanguage, transliterate

BENCHMARK = "toy-task"
LANGUAGE_ORDER = ("toy-l1", "toy-l2")


def answer_words(task: str, words: list[str]) -> list[str]:
    if task == "reverse":
        return list(reversed(words))
    if task == "repeat":
        return list(words)
    if task == "first":
        return words[:1]
    if task == "last":
        return words[-1:]
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


@dataclass(frozen=True)
class Instruction:
    """One task instance in L1 spelling."""

    task: str
    words: tuple[str, ...]

    def prompt(self, language: str) -> str:
        text = " ".join([self.task, *self.words])
        return transliterate(text, language)

    def answer(self, language: str) -> str:
        return transliterate(" ".join(answer_words(self.task, list(self.words))), language)


def sample_instruction(
    rng: random.Random, language: ToyLanguage, task: str | None = None, min_words: int = 3, max_words: int = 6
) -> Instruction:
    task = task or rng.choice(TASKS)
    words = language.sentence(rng, min_words, max_words)
    return Instruction(task, tuple(words))


def benchmark_items(language: ToyLanguage, seed: int, per_task: int) -> dict[str, list[dict]]:
    """The same instructions posed in each language: ``{language: [item, ...]}``.

    Items are drawn from their own random stream, so they do not depend on the training data's.
    """
    rng = random.Random(f"toyworld-benchmark-{seed}")
    instructions = [sample_instruction(rng, language, task) for task in TASKS for _ in range(per_task)]
    out: dict[str, list[dict]] = {}
    for lang in LANGUAGE_ORDER:
        other = "toy-l1" if lang == "toy-l2" else "toy-l2"
        items = []
        counters = {t: 0 for t in TASKS}
        for ins in instructions:
            counters[ins.task] += 1
            items.append(
                {
                    "id": f"{ins.task}-{counters[ins.task]:03d}",
                    "prompt": ins.prompt(lang),
                    "answer": ins.answer(lang),
                    "answer_other_script": ins.answer(other),
                    "task": ins.task,
                    "language": lang,
                }
            )
        out[lang] = items
    return out


__all__ = ["Instruction", "answer_words", "benchmark_items", "sample_instruction", "BENCHMARK", "LANGUAGE_ORDER"]
