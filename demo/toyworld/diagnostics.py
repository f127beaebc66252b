"""Checks on a trained toy model that say whether the world can show a chat vector effect at all."""

from __future__ import annotations

import torch

from chatvec.demo.toyworld.language import ToyLanguage, to_l2


def twin_alignment(model, language: ToyLanguage, vocab: dict[str, int]) -> float:
    """Share of L2 words whose nearest L1 input embedding (cosine) is their own twin.

    Chance is 1 / number of words. Skill learned on L1 reaches L2 prompts only when this is high.
    """
    emb = model.get_input_embeddings().weight.detach().float()
    l1 = torch.tensor([vocab[w] for w in language.words])
    l2 = torch.tensor([vocab[to_l2(w)] for w in language.words])
    a = torch.nn.functional.normalize(emb[l2], dim=-1)
    b = torch.nn.functional.normalize(emb[l1], dim=-1)
    nearest = (a @ b.T).argmax(dim=-1)
    return float((nearest == torch.arange(len(l1))).float().mean())
