"""A model checkpoint at a URI, as the planner sees it: config, tokenizer and tensor headers.

Only headers and small JSON files are read here; tensor bytes are read later by byte range.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from chatvec.core.errors import InputError
from chatvec.core.file_identity import FileIdentity, file_identity, normalize_uri
from chatvec.core.storage import Store
from chatvec.merge.safetensors_format import Header, TensorEntry, header_length, parse_header
from chatvec.merge.tokens import read_tokens

logger = logging.getLogger(__name__)

INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
VECTOR_INFO = "chatvec_vector.json"
# small files whose contents shape the output; they take part in the input identity
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    VECTOR_INFO,
)
# headers of most files fit in this; one read then covers length prefix and JSON on object stores
_HEADER_PROBE = 1 << 18


@dataclass
class Checkpoint:
    uri: str
    role: str
    tensors: dict[str, TensorEntry]
    # where the weight files live: `uri` itself, or a converted copy of a pickle checkpoint
    weights_uri: str
    config: dict[str, Any] | None
    metadata: dict[str, str]
    identities: list[FileIdentity]
    side_files: list[str]
    vector_info: dict[str, Any] | None = None
    _tokens: Any = field(default=None, repr=False)
    _store: Store | None = field(default=None, repr=False)

    @property
    def store(self) -> Store:
        """The checkpoint folder, opened once (open_checkpoint passes the Store it listed)."""
        if self._store is None:
            self._store = Store(self.uri)
        return self._store

    @property
    def is_vector(self) -> bool:
        return self.vector_info is not None

    def read_json(self, rel: str) -> dict | None:
        if rel not in self.side_files:
            return None
        try:
            return json.loads(self.store.read_text(rel))
        except ValueError as exc:
            raise InputError(f"{self.store.describe(rel)} is not valid JSON: {exc}") from None

    def tokens(self) -> list[str | None] | None:
        """Token string of every id (None where an id has no token), or None without a tokenizer."""
        if self._tokens is None:
            self._tokens = read_tokens(self.read_json)
        return self._tokens or None

    def vocab_rows(self) -> int | None:
        cfg = self.config or {}
        size = cfg.get("vocab_size")
        if size is None and isinstance(cfg.get("text_config"), dict):
            size = cfg["text_config"].get("vocab_size")
        return size if isinstance(size, int) else None


def _read_header(store: Store, rel: str) -> tuple[Header, int]:
    name = store.describe(rel)
    with store.open_reader(rel) as reader:
        size = reader.size
        probe = reader.read_at(0, min(size, _HEADER_PROBE if not store.local else 8))
        n = header_length(probe, size, name)
        raw = probe[8 : 8 + n] if len(probe) >= 8 + n else reader.read_at(8, n)
    return parse_header(raw, size, name, rel), size


def _weight_files(store: Store, top: list[str], uri: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to read and, for an index, its name -> file map."""
    indexes = [f for f in top if f.endswith(INDEX_SUFFIX)]
    if indexes:
        rel = "model" + INDEX_SUFFIX if "model" + INDEX_SUFFIX in indexes else indexes[0]
        try:
            index = json.loads(store.read_text(rel))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise InputError(
                f"{store.describe(rel)} is not a valid index: it needs a 'weight_map' of tensor -> file"
            ) from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if f not in top]
        if missing:
            raise InputError(
                f"{uri}: the index lists shard file(s) that do not exist: {', '.join(missing)}. "
                "The checkpoint is incomplete: download or copy the missing files"
            )
        return files, weight_map
    if "model.safetensors" in top:
        return ["model.safetensors"], None
    files = sorted(f for f in top if f.endswith(".safetensors"))
    return files, None


def open_checkpoint(uri: str, role: str, *, allow_pickle: bool = False) -> Checkpoint:
    """Read the config, the tensor headers and the identity of a checkpoint folder at `uri`."""
    uri = normalize_uri(uri)
    store = Store(uri)
    try:
        listing = store.list()
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{role} {uri}: cannot list the folder: {exc}") from None
    if not listing:
        hint = " (a Hugging Face id needs network access)" if uri.startswith("hf://") else ""
        raise InputError(f"{role} {uri} does not exist or is empty: pass a model folder or URI{hint}")
    top = [f for f in listing if "/" not in f]
    files, weight_map = _weight_files(store, top, uri)
    weights_uri = uri
    if not files:
        pickles = [f for f in top if f.endswith(PICKLE_SUFFIXES)]
        if not pickles:
            raise InputError(f"{role} {uri} holds no safetensors weights (files: {', '.join(top[:8])})")
        if not allow_pickle:
            raise InputError(
                f"{role} {uri} has only pickle weights ({', '.join(pickles[:4])}), which can run code when "
                "loaded: convert them to safetensors, or pass --allow-pickle if you trust them"
            )
        from chatvec.merge.pickle_convert import convert_pickles

        weights_uri = convert_pickles(store, pickles)
        converted = Store(weights_uri)
        files, weight_map = _weight_files(converted, converted.list(), weights_uri)
    wstore = store if weights_uri == uri else Store(weights_uri)
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    identities: list[FileIdentity] = []
    for rel in files:
        header, size = _read_header(wstore, rel)
        if not metadata:
            metadata = header.metadata
        identities.append(file_identity(store, rel, size) if weights_uri == uri else FileIdentity(rel, size))
        for name, entry in header.tensors.items():
            if name in tensors:
                raise InputError(f"{role} {uri}: tensor {name!r} is stored twice ({tensors[name].file} and {rel})")
            if weight_map is not None and weight_map.get(name, rel) != rel:
                raise InputError(
                    f"{role} {uri}: the index puts {name!r} in {weight_map[name]} but it is in {rel}; "
                    "the index does not match the shards"
                )
            tensors[name] = entry
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise InputError(
                f"{role} {uri}: the index lists {len(absent)} tensor(s) that no shard holds "
                f"(e.g. {absent[0]!r}); the checkpoint is incomplete"
            )
    if weights_uri != uri:
        identities = [
            file_identity(store, rel, store.size(rel) or 0) for rel in sorted(top) if rel.endswith(PICKLE_SUFFIXES)
        ]
    side = [f for f in top if f in SIDE_FILES]
    identities += [file_identity(store, rel, store.size(rel) or 0) for rel in side]
    ckpt = Checkpoint(
        uri=uri,
        role=role,
        tensors=tensors,
        weights_uri=weights_uri,
        config=None,
        metadata=metadata,
        identities=identities,
        side_files=side,
        _store=store,
    )
    ckpt.config = ckpt.read_json("config.json")
    ckpt.vector_info = ckpt.read_json(VECTOR_INFO)
    if ckpt.vector_info is None and metadata.get("format") == "chatvec-vector":
        raise InputError(f"{role} {uri} is a chat vector but its {VECTOR_INFO} is missing; extract it again")
    return ckpt
