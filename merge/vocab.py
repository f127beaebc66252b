"""Vocabularies: token strings by id, and which embedding rows of one model match another's.

Embedding-shaped tensors (embed_tokens, lm_head, or one tied matrix) have a row per token.
When the CP model's vocabulary differs from the base/chat models', rows are matched by policy:

* ``skip``: the vector is not added to these tensors; CP rows stay as they are.
* ``overlap``: rows are matched by index over the rows both have; checked first: at every
  shared index where both tokenizers define a token, the token strings must be equal (one
  vocabulary extends the other).
* ``by-token``: rows are matched by token string; CP rows whose token base/chat lack stay.

The vector lives in the chat model's row space ("tau rows"): a chat row either pairs with a
base row (a delta row, chat - base) or has no base counterpart (a chat-only row). When base and
chat have the same number of rows they pair by index, as the rest of the model does.

Chat-only tokens (``chat_tokens_from_chat``): the chat row of a token that only the chat model
has is copied as it is. If the CP vocabulary has that token string, it replaces that CP row;
if not, the token is appended to the output vocabulary (the output tokenizer gains it as an
added token with the chat model's flags, the embedding matrices grow by a row, using CP
padding rows first when the CP matrix is larger than its tokenizer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# name endings of tensors that hold one row per token
VOCAB_SUFFIXES = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "embed_out.weight",
    "tok_embeddings.weight",
    "output.weight",
    "shared.weight",
)

Run = tuple[int, int, int]  # (dst_row, src_row, n)


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(VOCAB_SUFFIXES)


def first_mismatch(a: list[str | None], b: list[str | None], upto: int) -> int | None:
    """First index below `upto` where both define a token and the strings differ."""
    for i in range(min(upto, len(a), len(b))):
        if a[i] is not None and b[i] is not None and a[i] != b[i]:
            return i
    return None


def compress(pairs: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Sorted (dst, src[, src2]) row pairs -> runs (dst, src[, src2], n) of consecutive rows."""
    runs: list[list[int]] = []
    for p in sorted(pairs):
        if runs:
            last = runs[-1]
            n = last[-1]
            if all(last[k] + n == p[k] for k in range(len(p))):
                last[-1] += 1
                continue
        runs.append([*p, 1])
    return [tuple(r) for r in runs]


def _index(tokens: list[str | None], rows: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, t in enumerate(tokens[:rows]):
        if t is not None and t not in out:
            out[t] = i
    return out


@dataclass
class TauRows:
    """How the rows of a vector (in the chat model's row space) were formed."""

    rows: int
    delta: list[tuple[int, int, int]] = field(default_factory=list)  # (chat_row, base_row, n)
    raw: list[tuple[int, int]] = field(default_factory=list)  # (chat_row, n): chat-only rows


def pair_base_chat(
    base_rows: int,
    chat_rows: int,
    base_tokens: list | None,
    chat_tokens: list | None,
    policy: str | None,
) -> TauRows | str:
    """Pair chat rows with base rows; a string is a problem description."""
    if base_rows == chat_rows:
        return TauRows(chat_rows, [(0, 0, chat_rows)] if chat_rows else [], [])
    if base_tokens is None or chat_tokens is None:
        return "base and chat have different vocabularies and no tokenizer.json/vocab.json to match their rows"
    if policy == "overlap":
        shared = min(base_rows, chat_rows)
        bad = first_mismatch(base_tokens, chat_tokens, shared)
        if bad is not None:
            return (
                f"--embeddings overlap needs one vocabulary to extend the other, but at id {bad} base has "
                f"{base_tokens[bad]!r} and chat has {chat_tokens[bad]!r}; use --embeddings by-token"
            )
        raw = [(r, 1) for r in range(shared, chat_rows) if r < len(chat_tokens) and chat_tokens[r] is not None]
        return TauRows(
            chat_rows, [(0, 0, shared)] if shared else [], [tuple(x) for x in compress((r,) for r, _ in raw)]
        )
    base_ids = _index(base_tokens, base_rows)
    pairs, raw = [], []
    for r in range(min(chat_rows, len(chat_tokens))):
        t = chat_tokens[r]
        if t is None:
            continue
        if t in base_ids:
            pairs.append((r, base_ids[t]))
        else:
            raw.append((r,))
    return TauRows(chat_rows, compress(pairs), compress(raw))


def tau_rows_from_vector(rows: int, raw: list[list[int]]) -> TauRows:
    """Rows of an extracted vector: everything is a delta except the recorded chat-only rows."""
    raw_runs = sorted((int(a), int(n)) for a, n in raw)
    delta, pos = [], 0
    for a, n in raw_runs:
        if a > pos:
            delta.append((pos, pos, a - pos))
        pos = max(pos, a + n)
    if pos < rows:
        delta.append((pos, pos, rows - pos))
    return TauRows(rows, delta, raw_runs)


@dataclass
class OutRows:
    """Where a vector's rows go in the output matrix."""

    delta: list[tuple[int, int, int, int]] = field(default_factory=list)  # (out_row, chat_row, base_row, n)
    raw: list[tuple[int, int, int]] = field(default_factory=list)  # (out_row, chat_row, n)


def place_rows(
    tau: TauRows,
    tau_tokens: list | None,
    cp_rows: int,
    cp_tokens: list | None,
    policy: str | None,
    take_chat_only: bool,
    appended: dict[str, int],
    next_id: int,
) -> OutRows | str:
    """Map tau rows onto output rows; `appended` (token -> new id) grows as tokens are appended."""
    out = OutRows()
    if policy in (None, "overlap"):
        if policy == "overlap" and tau_tokens is not None and cp_tokens is not None:
            delta_rows = sum(n for _c, _b, n in tau.delta)
            bad = first_mismatch(tau_tokens, cp_tokens, min(cp_rows, max((c + n for c, _b, n in tau.delta), default=0)))
            if bad is not None and delta_rows:
                return (
                    f"--embeddings overlap needs one vocabulary to extend the other, but at id {bad} the CP model has "
                    f"{cp_tokens[bad]!r} and the chat model has {tau_tokens[bad]!r}; use --embeddings by-token"
                )
        elif policy == "overlap":
            return "--embeddings overlap checks the tokenizers, but tokenizer.json/vocab.json is missing"
        for c, b, n in tau.delta:
            n = min(n, cp_rows - c)
            if n > 0:
                out.delta.append((c, c, b, n))
    elif policy == "by-token":
        if tau_tokens is None or cp_tokens is None:
            return "--embeddings by-token matches rows by token string, but tokenizer.json/vocab.json is missing"
        cp_ids = _index(cp_tokens, cp_rows)
        pairs = []
        for c, b, n in tau.delta:
            for k in range(n):
                t = tau_tokens[c + k] if c + k < len(tau_tokens) else None
                if t is not None and t in cp_ids:
                    pairs.append((cp_ids[t], c + k, b + k))
        out.delta = compress(pairs)
    if take_chat_only and tau.raw:
        if tau_tokens is None or cp_tokens is None:
            return "--chat-tokens-from-chat matches tokens by string, but tokenizer.json/vocab.json is missing"
        cp_ids = _index(cp_tokens, len(cp_tokens))
        pairs = []
        for c, n in tau.raw:
            for r in range(c, c + n):
                t = tau_tokens[r] if r < len(tau_tokens) else None
                if t is None:
                    continue
                if t in cp_ids:
                    pairs.append((cp_ids[t], r))
                else:
                    if t not in appended:
                        appended[t] = next_id + len(appended)
                    pairs.append((appended[t], r))
        out.raw = compress(pairs)
        # a chat-only row replaces the CP row entirely, so no delta may land on it as well
        taken = {o + k for o, _c, n in out.raw for k in range(n)}
        if taken:
            out.delta = _drop_rows(out.delta, taken)
    return out


def _drop_rows(runs: list[tuple[int, int, int, int]], rows: set[int]) -> list[tuple[int, int, int, int]]:
    pairs = [(o + k, c + k, b + k) for o, c, b, n in runs for k in range(n) if o + k not in rows]
    return compress(pairs)
