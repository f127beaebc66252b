"""A model folder's tokens as strings, id by id, from whichever tokenizer files it has.

Shared by the plan (matching vocabulary rows) and the side files (the output tokenizer); it
knows nothing of checkpoints, so neither depends on the other through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def read_tokens(read_json: Callable[[str], Any]) -> list[str | None]:
    """id -> token string from tokenizer.json (any model type) or vocab.json + added_tokens.json;
    `read_json(rel)` gives a file of the model folder parsed, or None when it is not there."""
    id2tok: dict[int, str] = {}
    doc = read_json("tokenizer.json")
    if doc is not None:
        vocab = (doc.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            id2tok.update({int(i): t for t, i in vocab.items()})
        elif isinstance(vocab, list):  # Unigram: [[token, score], ...]
            id2tok.update({i: (e[0] if isinstance(e, list) else e) for i, e in enumerate(vocab)})
        for added in doc.get("added_tokens") or []:
            id2tok[int(added["id"])] = added["content"]
    else:
        vocab = read_json("vocab.json")
        if isinstance(vocab, dict):
            id2tok.update({int(i): t for t, i in vocab.items()})
            for t, i in (read_json("added_tokens.json") or {}).items():
                id2tok[int(i)] = t
    if not id2tok:
        return []
    tokens: list[str | None] = [None] * (max(id2tok) + 1)
    for i, t in id2tok.items():
        tokens[i] = t
    return tokens
