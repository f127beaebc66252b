"""Training data for the three models, as batches of token ids drawn from seeded random streams.

- base: raw text. Each chunk is monolingual (40%), code-switched (30%: words swapped with their
  twins in the other language), parallel ``L1 = L2`` (20%) or a sentence followed by a repeat of
  one of its spans (10%, so the model learns to copy). Outside the parallel chunks a chunk is L2
  with probability 0.4. Code switching is what aligns an L2 word's embedding with its L1 twin;
  without it no skill crosses from L1 to L2.
- chat: supervised fine-tuning on L1 instructions, loss on the answer and the closing token only.
- cp: raw L2 text (monolingual and copy chunks), continuing the base.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from chatvec.demo.toyworld.language import EQUALS, PERIOD, ToyLanguage
from chatvec.demo.toyworld.tasks import answer_words, sample_instruction
from chatvec.demo.toyworld.tokenizer import ASSISTANT, END, PAD, USER, vocab_list

IGNORE = -100


@dataclass(frozen=True)
class Mixture:
    mono: float = 0.4
    code_switched: float = 0.3
    parallel: float = 0.2
    copy: float = 0.1
    l2_share: float = 0.4


BASE_MIXTURE = Mixture()
CP_MIXTURE = Mixture(mono=0.8, code_switched=0.0, parallel=0.0, copy=0.2, l2_share=1.0)


class Corpora:
    """Turns the toy language into id tensors; every draw takes an explicit ``random.Random``."""

    def __init__(self, language: ToyLanguage) -> None:
        self.language = language
        self.ids = {tok: i for i, tok in enumerate(vocab_list(language))}

    def encode(self, words: list[str]) -> list[int]:
        return [self.ids[w] for w in words]

    # -- raw text ------------------------------------------------------------------------------
    def chunk(self, rng: random.Random, mix: Mixture) -> list[str]:
        lang = self.language
        kind = rng.choices(
            ("mono", "code_switched", "parallel", "copy"), (mix.mono, mix.code_switched, mix.parallel, mix.copy)
        )[0]
        target = "toy-l2" if rng.random() < mix.l2_share else "toy-l1"
        s = lang.sentence(rng)
        if kind == "mono":
            return lang.render(s, target) + [PERIOD]
        if kind == "code_switched":
            return lang.code_switch(rng, s, target) + [PERIOD]
        if kind == "parallel":
            first, second = ("toy-l1", "toy-l2") if rng.random() < 0.5 else ("toy-l2", "toy-l1")
            return lang.render(s, first) + [EQUALS] + lang.render(s, second) + [PERIOD]
        i = rng.randrange(len(s) - 1)
        j = rng.randint(i + 2, len(s))
        return lang.render(s, target) + [PERIOD] + lang.render(s[i:j], target) + [PERIOD]

    def raw_batch(self, rng: random.Random, mix: Mixture, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(batch_size):
            row: list[int] = []
            while len(row) < seq_len:
                row += self.encode(self.chunk(rng, mix))
            rows.append(row[:seq_len])
        ids = torch.tensor(rows, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    # -- instructions --------------------------------------------------------------------------
    def sft_example(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """Token ids as the chat template writes them, and labels that cover only the answer."""
        ins = sample_instruction(rng, self.language)
        prompt = [USER, ins.task, *ins.words, ASSISTANT]
        answer = answer_words(ins.task, list(ins.words)) + [END]
        ids = self.encode(prompt + answer)
        labels = [IGNORE] * len(prompt) + self.encode(answer)
        return ids, labels

    def sft_batch(self, rng: random.Random, batch_size: int) -> dict[str, torch.Tensor]:
        examples = [self.sft_example(rng) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in examples)
        pad = self.ids[PAD]
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for r, (x, y) in enumerate(examples):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(y)] = torch.tensor(y)
            mask[r, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
