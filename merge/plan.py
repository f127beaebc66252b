"""The merge plan: every output tensor, where its inputs' bytes are and how they combine.

Made from headers, configs and tokenizers only, before a byte is written. Every problem found
is collected and raised together in one PlanError. The plan is plain dataclasses so it pickles
cheaply (the Ray driver ships it to every merge actor).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from chatvec.core.errors import InputError, PlanError
from chatvec.core.file_identity import FileIdentity
from chatvec.merge.checkpoint import Checkpoint, open_checkpoint
from chatvec.merge.recipe import MergekitMode, Recipe, VectorSpec
from chatvec.merge.safetensors_format import DTYPE_BY_NAME, FLOAT_DTYPES, ITEMSIZE, NAME_BY_DTYPE, build_header
from chatvec.merge.schedule import Depth, Resolver
from chatvec.merge.vocab import is_vocab_tensor, pair_base_chat, place_rows, tau_rows_from_vector

logger = logging.getLogger(__name__)

# bump when the same recipe over the same inputs would produce different bytes
FORMAT_VERSION = 1
POLICY_HINT = (
    "Choose --embeddings skip (leave the CP rows as they are), overlap (add the vector to the rows "
    "both vocabularies share by index) or by-token (match rows by token string)."
)


@dataclass
class Source:
    """One input tensor's bytes: plan.files[file] at absolute `offset`."""

    file: int
    offset: int
    dtype: str
    numel: int


@dataclass
class Segment:
    """Elements [chat, chat+n) of a term's sources (and [base, base+n) of its base) land on
    output elements [out, out+n)."""

    out: int
    chat: int
    base: int
    n: int


@dataclass
class Term:
    """ratio * method(chat - base), or ratio * method(vector) when `base` is None. `ratio` and
    `density` are this tensor's values (a recipe's schedule resolved by merge/schedule.py)."""

    vector: int
    ratio: float
    method: str
    density: float
    seed: int
    chat: Source
    base: Source | None
    segments: list[Segment]


@dataclass
class RawCopy:
    """Chat-only rows copied verbatim into the output."""

    source: Source
    segments: list[Segment]


@dataclass
class TensorTask:
    name: str
    dtype: str  # output dtype (safetensors name)
    shape: tuple[int, ...]
    cp: Source | None  # None: the output starts from zeros (vectors)
    terms: list[Term] = field(default_factory=list)
    raw: list[RawCopy] = field(default_factory=list)
    # mergekit's general form (merge/gta.py) instead of chatvec's arithmetic; cp is then the base model
    mergekit: MergekitMode | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass
class ShardPlan:
    filename: str
    nbytes: int  # exact size of the output file
    tensor_names: list[str]
    header: bytes = b""


@dataclass
class InputIdentity:
    role: str
    uri: str
    files: list[FileIdentity]


@dataclass
class MergePlan:
    recipe: Recipe | None
    shards: list[ShardPlan]
    total_bytes: int
    inputs: list[InputIdentity]
    files: list[tuple[str, str]]  # (folder URI, relative path) of every input weight file
    tasks: dict[str, TensorTask]
    kind: str = "model"  # "model" or "vector" (chatvec extract)
    shard_size: int = 2_000_000_000
    torch_dtype: str = "bfloat16"
    cp_uri: str | None = None  # config and tokenizer come from here
    chat_uri: str | None = None  # chat template, eos and generation config come from here
    appended_tokens: list[str] = field(default_factory=list)
    vocab_rows: int | None = None  # config vocab_size of the output when it changed
    vector_info: dict | None = None  # what chatvec_vector.json records (extract only)

    def fingerprint(self) -> str:
        payload = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "recipe": self.recipe.fingerprint_payload() if self.recipe is not None else None,
            "vector": {
                k: v for k, v in (self.vector_info or {}).items() if k in ("base", "chat", "dtype", "embeddings")
            },
            "shard_size": self.shard_size,
            "inputs": [{"role": i.role, "uri": i.uri, "files": [asdict(f) for f in i.files]} for i in self.inputs],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def shard_tasks(self, index: int) -> list[TensorTask]:
        return [self.tasks[n] for n in self.shards[index].tensor_names]


def _cap(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _family(ckpt: Checkpoint) -> tuple[str | None, tuple[str, ...]]:
    cfg = ckpt.config or {}
    return cfg.get("model_type"), tuple(cfg.get("architectures") or ())


class _Builder:
    """Collects files and problems while the plan is made."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.files: list[tuple[str, str]] = []
        self._file_ids: dict[tuple[str, str], int] = {}

    def source(self, ckpt: Checkpoint, name: str) -> Source:
        e = ckpt.tensors[name]
        key = (ckpt.weights_uri, e.file)
        if key not in self._file_ids:
            self._file_ids[key] = len(self.files)
            self.files.append(key)
        return Source(self._file_ids[key], e.offset, e.dtype, e.numel)


def _open_all(roles: list[tuple[str, str]], allow_pickle: bool) -> tuple[dict[str, Checkpoint], list[str]]:
    opened, problems, seen = {}, [], {}
    for role, uri in roles:
        if uri in seen:
            opened[role] = opened[seen[uri]]
            continue
        try:
            opened[role] = open_checkpoint(uri, role, allow_pickle=allow_pickle)
            seen[uri] = role
        except InputError as exc:
            problems.append(str(exc))
    return opened, problems


def _shards(tasks: list[TensorTask], shard_size: int, metadata: dict[str, str]) -> list[ShardPlan]:
    groups: list[list[TensorTask]] = []
    size = 0
    for t in tasks:
        if not groups or (size + t.nbytes > shard_size and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    out = []
    for i, group in enumerate(groups):
        header = build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in group], metadata)
        out.append(
            ShardPlan(
                filename=f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors",
                nbytes=len(header) + sum(t.nbytes for t in group),
                tensor_names=[t.name for t in group],
                header=header,
            )
        )
    return out


def _file_order(ckpt: Checkpoint) -> list[str]:
    """Tensor names in the order their bytes sit in the checkpoint, so reads run forward."""
    return sorted(ckpt.tensors, key=lambda n: (ckpt.tensors[n].file, ckpt.tensors[n].offset))


def _row_segments(runs, rowlen: int, with_base: bool) -> list[Segment]:
    if with_base:
        return [Segment(o * rowlen, c * rowlen, b * rowlen, n * rowlen) for o, c, b, n in runs]
    return [Segment(o * rowlen, c * rowlen, -1, n * rowlen) for o, c, n in runs]


def _torch_dtype(recipe_dtype: str | None, ckpt: Checkpoint) -> str:
    if recipe_dtype:
        return recipe_dtype
    cfg = ckpt.config or {}
    for key in ("torch_dtype", "dtype"):
        if isinstance(cfg.get(key), str) and cfg[key] in DTYPE_BY_NAME:
            return cfg[key]
    counts = Counter(e.dtype for e in ckpt.tensors.values() if e.dtype in FLOAT_DTYPES)
    return NAME_BY_DTYPE[counts.most_common(1)[0][0]] if counts else "float32"


def build_plan(recipe: Recipe, *, shard_size: int = 2_000_000_000, allow_pickle: bool = False) -> MergePlan:
    """Validate the recipe's inputs against each other and lay out the merged checkpoint."""
    roles = [("cp", recipe.cp)]
    pairs: list[tuple[str | None, str]] = []  # (base role, chat-or-vector role) per vector
    for i, v in enumerate(recipe.vectors):
        tag = f" {i + 1}" if len(recipe.vectors) > 1 else ""
        if v.vector is not None:
            roles.append((f"vector{tag}", v.vector))
            pairs.append((None, f"vector{tag}"))
        else:
            roles += [(f"base{tag}", v.base), (f"chat{tag}", v.chat)]
            pairs.append((f"base{tag}", f"chat{tag}"))
    opened, problems = _open_all(roles, allow_pickle)
    if problems:
        raise PlanError(problems, "Fix the inputs above; nothing was written.")
    planner = _Planner(recipe, opened)
    planner.check_families()
    for vi, (base_role, chat_role) in enumerate(pairs):
        base = opened[base_role] if base_role else None
        chat = opened[chat_role]
        if chat.is_vector == (base is None):  # wrong kind of input: reported by check_families
            planner.add_vector(vi, base, chat, base_role, chat_role)
    return planner.finish(shard_size, chat_uri=opened[pairs[0][1]].uri)


class _Planner:
    def __init__(self, recipe: Recipe, opened: dict[str, Checkpoint]) -> None:
        self.recipe = recipe
        self.opened = opened
        self.cp = cp = opened["cp"]
        self.b = _Builder()
        self.problems = self.b.problems
        self.appended: dict[str, int] = {}  # chat-only token -> its id in the output vocabulary
        self.resolvers: dict[int, tuple[Resolver, Resolver]] = {}  # vector -> (ratio, density)
        self.cp_float = [n for n in _file_order(cp) if cp.tensors[n].dtype in FLOAT_DTYPES]
        self.vocab_names = [n for n in self.cp_float if is_vocab_tensor(n) and len(cp.tensors[n].shape) == 2]
        out_dtype = DTYPE_BY_NAME[recipe.dtype] if recipe.dtype else None
        self.depth = Depth(self.cp_float, cp.config)
        self.tasks: dict[str, TensorTask] = {}
        for n in _file_order(cp):
            e = cp.tensors[n]
            dtype = (out_dtype or e.dtype) if e.dtype in FLOAT_DTYPES else e.dtype
            self.tasks[n] = TensorTask(n, dtype, e.shape, self.b.source(cp, n))
            if e.dtype.startswith("F8"):
                self.problems.append(
                    f"cp tensor {n} is {e.dtype}; chatvec merges float64/32/16 and bfloat16 only: dequantize the model first"
                )

    def check_families(self) -> None:
        cp, problems = self.cp, self.problems
        fam = _family(cp)
        if cp.config is None:
            problems.append(
                f"cp {cp.uri} has no config.json; chatvec needs it to check the model family and to write the output"
            )
        for role, ckpt in self.opened.items():
            if role == "cp":
                continue
            if ckpt.is_vector and not role.startswith("vector"):
                problems.append(f"{role} {ckpt.uri} is a chat vector; pass it with --vector")
            if not ckpt.is_vector and role.startswith("vector"):
                problems.append(
                    f"{role} {ckpt.uri} is not a chat vector written by `chatvec extract`; pass models with --base/--chat"
                )
            if ckpt.config is None:
                problems.append(f"{role} {ckpt.uri} has no config.json")
            elif cp.config is not None and _family(ckpt) != fam:
                other = _family(ckpt)
                problems.append(
                    f"{role} {ckpt.uri} is a different model family: {other[0]} {list(other[1])} "
                    f"vs the CP model's {fam[0]} {list(fam[1])}"
                )

    def add_vector(
        self, vi: int, base: Checkpoint | None, chat: Checkpoint, base_role: str | None, chat_role: str
    ) -> None:
        """Add vector `vi` to every CP float tensor it pairs with by name."""
        spec = self.recipe.vectors[vi]
        _check_names(self.problems, self.cp, base, chat, base_role, chat_role)
        self.resolvers[vi] = self._resolvers(vi, spec)
        raw_rows = (chat.vector_info or {}).get("raw_rows", {}) if base is None else {}
        for n in self.cp_float:
            if n not in chat.tensors or (base is not None and n not in base.tensors):
                continue
            chat_entry, cp_entry = chat.tensors[n], self.cp.tensors[n]
            base_entry = base.tensors[n] if base is not None else None
            bad = [
                f"{r} is {x.dtype}"
                for r, x in ((base_role, base_entry), (chat_role, chat_entry))
                if x is not None and x.dtype not in FLOAT_DTYPES
            ]
            if bad:
                self.problems.append(f"{n}: cannot do arithmetic: {', '.join(bad)}")
                continue
            shapes = {"cp": cp_entry.shape, chat_role: chat_entry.shape}
            if base_entry is not None:
                shapes[base_role] = base_entry.shape
            desc = ", ".join(f"{r} {list(s)}" for r, s in shapes.items())
            vocab = n in self.vocab_names and all(len(s) == 2 for s in shapes.values())
            # an extracted vector with chat-only rows came from base/chat vocabularies that differ
            same = len(set(shapes.values())) == 1 and not raw_rows.get(n)
            if not vocab or (same and self.recipe.embeddings is None):
                if same:
                    whole = [Segment(0, 0, 0 if base is not None else -1, cp_entry.numel)]
                    self._add_term(vi, chat, base, n, whole)
                else:
                    self.problems.append(f"{n}: shapes differ: {desc}")
            elif len({s[1] for s in shapes.values()}) != 1:
                self.problems.append(f"{n}: shapes differ beyond the vocabulary rows: {desc}")
            elif self.recipe.embeddings is None:
                rows = ", ".join(f"{r} {s[0]}" for r, s in shapes.items())
                self.problems.append(f"{n}: the vocabularies differ ({rows} rows) and no embeddings policy was given")
            else:
                self._vocab_term(vi, n, base, chat, raw_rows.get(n, []))

    def _resolvers(self, vi: int, spec: VectorSpec) -> tuple[Resolver, Resolver]:
        """The vector's ratio and density per tensor; a schedule's problems go with the plan's."""
        ratio, density = Resolver(spec.ratio, self.depth), Resolver(spec.density, self.depth)
        tag = f"vector {vi + 1} " if len(self.recipe.vectors) > 1 else ""
        tied = bool((self.cp.config or {}).get("tie_word_embeddings")) or not any(
            "lm_head" in n or "embed_out" in n for n in self.cp_float
        )
        for resolver, what in ((ratio, "ratio"), (density, "density")):
            self.problems.extend(resolver.problems(self.cp_float, f"{tag}{what}", tied=tied))
        return ratio, density

    def _add_term(self, vi: int, chat: Checkpoint, base: Checkpoint | None, name: str, segs: list[Segment]) -> None:
        ratio, density = (r(name) for r in self.resolvers[vi])
        if ratio is None or density is None:
            return  # matches no group of a mapping without default: a problem already listed
        # chatvec's own arithmetic adds nothing for ratio 0: the term is left out, so the CP
        # bytes stay as they are (adding +0 would turn a -0 entry into +0). mergekit's formulas
        # are followed as they are, zero weights included.
        if ratio == 0.0 and self.recipe.mergekit is None:
            return
        spec = self.recipe.vectors[vi]
        self.tasks[name].terms.append(
            Term(
                vector=vi,
                ratio=float(ratio),
                method=spec.method,
                density=float(density),
                seed=int(spec.seed),
                chat=self.b.source(chat, name),
                base=self.b.source(base, name) if base is not None else None,
                segments=segs,
            )
        )

    def _vocab_term(self, vi: int, n: str, base: Checkpoint | None, chat: Checkpoint, raw_rows: list) -> None:
        """An embedding-shaped tensor under an embeddings policy: rows matched as merge/vocab.py says."""
        if self.recipe.embeddings == "skip" and not self.recipe.chat_tokens_from_chat:
            return  # CP rows stay as they are; no rows to match
        cp_entry, chat_entry = self.cp.tensors[n], chat.tensors[n]
        cp_tokens = self.cp.tokens()
        if base is None:
            tau = tau_rows_from_vector(chat_entry.shape[0], raw_rows)
        else:
            tau = pair_base_chat(
                base.tensors[n].shape[0], chat_entry.shape[0], base.tokens(), chat.tokens(), self.recipe.embeddings
            )
            if isinstance(tau, str):
                self.problems.append(f"{n}: {tau}")
                return
        next_id = len(cp_tokens) if cp_tokens else cp_entry.shape[0]
        placed = place_rows(
            tau,
            chat.tokens(),
            cp_entry.shape[0],
            cp_tokens,
            self.recipe.embeddings,
            self.recipe.chat_tokens_from_chat,
            self.appended,
            next_id,
        )
        if isinstance(placed, str):
            self.problems.append(f"{n}: {placed}")
            return
        rowlen = cp_entry.shape[1]
        segs = _row_segments(placed.delta, rowlen, with_base=True)
        if base is None:
            segs = [Segment(s.out, s.chat, -1, s.n) for s in segs]
        if segs:
            self._add_term(vi, chat, base, n, segs)
        if placed.raw:
            self.tasks[n].raw.append(
                RawCopy(self.b.source(chat, n), _row_segments(placed.raw, rowlen, with_base=False))
            )

    def finish(self, shard_size: int, chat_uri: str) -> MergePlan:
        tasks, vocab_rows = self.tasks, None
        if self.appended:
            rows = max(self.appended.values()) + 1
            for n in self.vocab_names:
                t = tasks[n]
                t.shape = (max(t.shape[0], rows), *t.shape[1:])
            if self.vocab_names:
                vocab_rows = max(tasks[self.vocab_names[0]].shape[0], self.cp.vocab_rows() or 0)
        if self.problems:
            hint = POLICY_HINT if any("policy" in p for p in self.problems) else ""
            raise PlanError(self.problems, f"Nothing was written. {hint}".strip())
        if self.recipe.mergekit is not None:
            for t in tasks.values():
                if t.terms:
                    t.mergekit = self.recipe.mergekit
        shards = _shards(list(tasks.values()), shard_size, {"format": "pt"})
        return MergePlan(
            recipe=self.recipe,
            shards=shards,
            total_bytes=sum(s.nbytes for s in shards),
            inputs=_identities(self.opened),
            files=self.b.files,
            tasks=tasks,
            kind="model",
            shard_size=shard_size,
            torch_dtype=_torch_dtype(self.recipe.dtype, self.cp),
            cp_uri=self.cp.uri,
            chat_uri=chat_uri,
            appended_tokens=sorted(self.appended, key=self.appended.get),
            vocab_rows=vocab_rows,
        )


def _check_names(
    problems: list[str],
    cp: Checkpoint,
    base: Checkpoint | None,
    chat: Checkpoint,
    base_role: str | None,
    chat_role: str,
) -> None:
    cp_float = {n for n, e in cp.tensors.items() if e.dtype in FLOAT_DTYPES}
    others = [(base_role, base), (chat_role, chat)] if base is not None else [(chat_role, chat)]
    for role, ckpt in others:
        names = {n for n, e in ckpt.tensors.items() if e.dtype in FLOAT_DTYPES}
        missing = sorted(cp_float - names)
        extra = sorted(names - cp_float)
        if missing:
            problems.append(
                f"{len(missing)} tensor(s) of the CP model are missing from {role} {ckpt.uri}: {_cap(missing)}"
            )
        if extra:
            problems.append(f"{len(extra)} tensor(s) of {role} {ckpt.uri} are not in the CP model: {_cap(extra)}")


def _identities(opened: dict[str, Checkpoint]) -> list[InputIdentity]:
    out, seen = [], set()
    for role, ckpt in opened.items():
        if ckpt.uri in seen:
            continue
        seen.add(ckpt.uri)
        out.append(InputIdentity(role, ckpt.uri, list(ckpt.identities)))
    return out
