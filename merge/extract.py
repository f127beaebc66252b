"""`chatvec extract`: the chat vector tau = chat - base as a safetensors checkpoint.

The vector has the chat model's tensor names and row space. Its files carry the safetensors
metadata ``format=chatvec-vector`` with base, chat and dtype, and ``chatvec_vector.json`` records
the same plus, per embedding tensor, the chat-only rows (tokens the base model lacks), which
hold the chat model's own values instead of a difference. Stored as float32 (default), the
vector gives exactly the numbers a direct merge computes, so extract + merge == direct merge.
"""
from __future__ import annotations

from merge.errors import PlanError
from merge.plan import (
    MergePlan, RawCopy, Segment, TensorTask, Term, _Builder, _file_order, _identities, _open_all,
    _row_segments, _shards,
)
from merge.safetensors_format import DTYPE_BY_NAME, FLOAT_DTYPES
from merge.vocab import is_vocab_tensor, pair_base_chat


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
    b_ck, c_ck = opened["base"], opened["chat"]
    b = _Builder()
    problems = b.problems
    fam = lambda c: ((c.config or {}).get("model_type"), tuple((c.config or {}).get("architectures") or ()))  # noqa: E731
    if b_ck.config is not None and c_ck.config is not None and fam(b_ck) != fam(c_ck):
        problems.append(f"base and chat are different model families: {fam(b_ck)[0]} vs {fam(c_ck)[0]}")
    for ck in (b_ck, c_ck):
        if ck.is_vector:
            problems.append(f"{ck.role} {ck.uri} is already a chat vector")
    out_dtype = DTYPE_BY_NAME[dtype]
    chat_float = [n for n in _file_order(c_ck) if c_ck.tensors[n].dtype in FLOAT_DTYPES]
    base_float = {n for n, e in b_ck.tensors.items() if e.dtype in FLOAT_DTYPES}
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
        ce, be = c_ck.tensors[n], b_ck.tensors[n]
        task = TensorTask(n, out_dtype, ce.shape, None)
        tasks[n] = task
        term = dict(vector=0, ratio=1.0, method="add", density=1.0, seed=0, chat=b.source(c_ck, n), base=b.source(b_ck, n))
        if ce.shape == be.shape:
            task.terms.append(Term(**term, segments=[Segment(0, 0, 0, ce.numel)]))
            continue
        if not (is_vocab_tensor(n) and len(ce.shape) == 2 and len(be.shape) == 2 and ce.shape[1] == be.shape[1]):
            problems.append(f"{n}: shapes differ: base {list(be.shape)}, chat {list(ce.shape)}")
            continue
        tau = pair_base_chat(be.shape[0], ce.shape[0], b_ck.tokens(), c_ck.tokens(), embeddings)
        if isinstance(tau, str):
            problems.append(f"{n}: {tau}")
            continue
        rowlen = ce.shape[1]
        task.terms.append(Term(**term, segments=_row_segments([(c, c, bb, k) for c, bb, k in tau.delta], rowlen, True)))
        if tau.raw:
            task.raw.append(RawCopy(b.source(c_ck, n), _row_segments([(c, c, k) for c, k in tau.raw], rowlen, False)))
            raw_rows[n] = [[c, k] for c, k in tau.raw]
    if problems:
        raise PlanError(problems, "Nothing was written.")
    info = {
        "format": "chatvec-vector",
        "base": b_ck.uri,
        "chat": c_ck.uri,
        "dtype": dtype,
        "embeddings": embeddings,
        "raw_rows": raw_rows,
        "description": f"vector {c_ck.uri} - {b_ck.uri} ({dtype})",
    }
    meta = {"format": "chatvec-vector", "base": b_ck.uri, "chat": c_ck.uri, "dtype": dtype}
    ordered = list(tasks.values())
    shards = _shards(ordered, shard_size, meta)
    return MergePlan(
        recipe=None, shards=shards, total_bytes=sum(s.nbytes for s in shards), inputs=_identities(opened),
        files=b.files, tasks=tasks, kind="vector", shard_size=shard_size, torch_dtype=dtype,
        cp_uri=None, chat_uri=c_ck.uri, vector_info=info,
    )
