"""`chatvec extract`: the chat vector tau = chat - base as a safetensors checkpoint.

The vector has the chat model's tensor names and row space. Its files carry the safetensors
metadata ``format=chatvec-vector`` with base, chat and dtype, and ``chatvec_vector.json`` records
the same plus, per embedding tensor, the chat-only rows (tokens the base model lacks), which
hold the chat model's own values instead of a difference. Stored as float32 (default), the
vector gives exactly the numbers a direct merge computes, so extract + merge == direct merge.
"""

from __future__ import annotations

from chatvec.core.errors import PlanError
from chatvec.merge.plan import (
    MergePlan,
    RawCopy,
    Segment,
    TensorTask,
    Term,
    _Builder,
    _file_order,
    _identities,
    _open_all,
    _row_segments,
    _shards,
)
from chatvec.merge.safetensors_format import DTYPE_BY_NAME, FLOAT_DTYPES
from chatvec.merge.vocab import is_vocab_tensor, pair_base_chat


def build_extract_plan(
    base: str,
    chat: str,
    *,
    dtype: str = "float32",
    shard_size: int = 2_000_000_000,
    embeddings: str | None = None,
    allow_pickle: bool = False,
) -> MergePlan:
    """Plan the vector's files. When base and chat vocabularies differ, rows pair by token
    string (or by index with ``embeddings="overlap"``, after the prefix check)."""
    if dtype not in DTYPE_BY_NAME:
        raise PlanError([f"unknown dtype {dtype!r}"], "Use float32, bfloat16 or float16.")
    opened, problems = _open_all([("base", base), ("chat", chat)], allow_pickle)
    if problems:
        raise PlanError(problems, "Fix the inputs above; nothing was written.")
    base_ckpt, chat_ckpt = opened["base"], opened["chat"]
    builder = _Builder()
    problems = builder.problems
    family = lambda c: ((c.config or {}).get("model_type"), tuple((c.config or {}).get("architectures") or ()))  # noqa: E731
    if base_ckpt.config is not None and chat_ckpt.config is not None and family(base_ckpt) != family(chat_ckpt):
        problems.append(f"base and chat are different model families: {family(base_ckpt)[0]} vs {family(chat_ckpt)[0]}")
    for ckpt in (base_ckpt, chat_ckpt):
        if ckpt.is_vector:
            problems.append(f"{ckpt.role} {ckpt.uri} is already a chat vector")
    out_dtype = DTYPE_BY_NAME[dtype]
    chat_float = [n for n in _file_order(chat_ckpt) if chat_ckpt.tensors[n].dtype in FLOAT_DTYPES]
    base_float = {n for n, e in base_ckpt.tensors.items() if e.dtype in FLOAT_DTYPES}
    missing, extra = sorted(set(chat_float) - base_float), sorted(base_float - set(chat_float))
    if missing:
        problems.append(f"{len(missing)} tensor(s) of chat are missing from base: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) of base are missing from chat: {', '.join(extra[:5])}")
    tasks: dict[str, TensorTask] = {}
    raw_rows: dict[str, list[list[int]]] = {}
    for n in chat_float:
        if n not in base_float:
            continue
        chat_entry, base_entry = chat_ckpt.tensors[n], base_ckpt.tensors[n]
        task = TensorTask(n, out_dtype, chat_entry.shape, None)
        tasks[n] = task
        term = dict(
            vector=0,
            ratio=1.0,
            method="add",
            density=1.0,
            seed=0,
            chat=builder.source(chat_ckpt, n),
            base=builder.source(base_ckpt, n),
        )
        if chat_entry.shape == base_entry.shape:
            task.terms.append(Term(**term, segments=[Segment(0, 0, 0, chat_entry.numel)]))
            continue
        if not (
            is_vocab_tensor(n)
            and len(chat_entry.shape) == 2
            and len(base_entry.shape) == 2
            and chat_entry.shape[1] == base_entry.shape[1]
        ):
            problems.append(f"{n}: shapes differ: base {list(base_entry.shape)}, chat {list(chat_entry.shape)}")
            continue
        tau = pair_base_chat(
            base_entry.shape[0], chat_entry.shape[0], base_ckpt.tokens(), chat_ckpt.tokens(), embeddings
        )
        if isinstance(tau, str):
            problems.append(f"{n}: {tau}")
            continue
        rowlen = chat_entry.shape[1]
        task.terms.append(
            Term(**term, segments=_row_segments([(c, c, base_row, k) for c, base_row, k in tau.delta], rowlen, True))
        )
        if tau.raw:
            task.raw.append(
                RawCopy(builder.source(chat_ckpt, n), _row_segments([(c, c, k) for c, k in tau.raw], rowlen, False))
            )
            raw_rows[n] = [[c, k] for c, k in tau.raw]
    if problems:
        raise PlanError(problems, "Nothing was written.")
    info = {
        "format": "chatvec-vector",
        "base": base_ckpt.uri,
        "chat": chat_ckpt.uri,
        "dtype": dtype,
        "embeddings": embeddings,
        "raw_rows": raw_rows,
        "description": f"vector {chat_ckpt.uri} - {base_ckpt.uri} ({dtype})",
    }
    meta = {"format": "chatvec-vector", "base": base_ckpt.uri, "chat": chat_ckpt.uri, "dtype": dtype}
    ordered = list(tasks.values())
    shards = _shards(ordered, shard_size, meta)
    return MergePlan(
        recipe=None,
        shards=shards,
        total_bytes=sum(s.nbytes for s in shards),
        inputs=_identities(opened),
        files=builder.files,
        tasks=tasks,
        kind="vector",
        shard_size=shard_size,
        torch_dtype=dtype,
        cp_uri=None,
        chat_uri=chat_ckpt.uri,
        vector_info=info,
    )
