"""The small files of an output: config, tokenizer, chat template, generation config, card.

Merged model: config and tokenizer from the CP model (config `torch_dtype` set, `vocab_size`
grown when chat-only tokens were appended); chat template, eos and generation config from the
chat model of the first vector, with token ids translated into the output vocabulary by token
string. Vector (`chatvec extract`): config, tokenizer, template and generation config of the
chat model, plus chatvec_vector.json, so a later merge finds everything it needs in one place.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from chatvec.core.storage import Store
from chatvec.merge.checkpoint import VECTOR_INFO
from chatvec.merge.methods import METHODS
from chatvec.merge.recipe import has_schedule
from chatvec.merge.schedule import format_schedule

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
_ID_KEYS = ("eos_token_id", "bos_token_id", "pad_token_id")


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _load(store: Store, rel: str) -> dict | None:
    if not store.is_file(rel):
        return None
    try:
        return json.loads(store.read_text(rel))
    except ValueError:
        return None


def _tokens(store: Store) -> list[str | None]:
    from chatvec.merge.tokens import read_tokens

    return read_tokens(lambda rel: _load(store, rel))


def _content(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class _IdMap:
    """chat token id -> output token id, through the token string."""

    def __init__(self, chat_tokens: list, out_tokens: list) -> None:
        self.chat = chat_tokens
        self.out = {t: i for i, t in reversed(list(enumerate(out_tokens))) if t is not None}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            mapped = [self(v) for v in value]
            return None if any(m is None for m in mapped) else mapped
        if not isinstance(value, int) or value < 0 or value >= len(self.chat) or self.chat[value] is None:
            return None
        return self.out.get(self.chat[value])


def side_files(plan, manifest: dict) -> dict[str, bytes]:
    if plan.kind == "vector":
        return _vector_files(plan, manifest)
    return _model_files(plan, manifest)


def _model_files(plan, manifest: dict) -> dict[str, bytes]:
    cp, chat = Store(plan.cp_uri), Store(plan.chat_uri)
    out: dict[str, bytes] = {}
    cp_tokens = _tokens(cp)
    out_tokens = list(cp_tokens) + list(plan.appended_tokens)
    id_map = _IdMap(_tokens(chat), out_tokens)

    config = _load(cp, "config.json") or {}
    config["torch_dtype"] = plan.torch_dtype
    if "dtype" in config or "torch_dtype" not in config:
        config["dtype"] = plan.torch_dtype
    if plan.vocab_rows:
        config["vocab_size"] = plan.vocab_rows
    chat_config = _load(chat, "config.json") or {}
    if "eos_token_id" in chat_config:
        mapped = id_map(chat_config["eos_token_id"])
        if mapped is not None:
            config["eos_token_id"] = mapped
    out["config.json"] = _json(config)

    for rel in TOKENIZER_FILES:
        if cp.is_file(rel):
            out[rel] = cp.read_bytes(rel)
    if plan.appended_tokens:
        _append_tokens(out, chat, cp_tokens, plan.appended_tokens)

    tok_cfg = json.loads(out["tokenizer_config.json"]) if "tokenizer_config.json" in out else None
    chat_tok_cfg = _load(chat, "tokenizer_config.json") or {}
    chat_templates = {rel: chat.read_bytes(rel) for rel in TEMPLATE_FILES if chat.is_file(rel)}
    if chat_templates or "chat_template" in chat_tok_cfg:
        out.update(chat_templates)
        if tok_cfg is not None:
            tok_cfg.pop("chat_template", None)
            if "chat_template" in chat_tok_cfg:
                tok_cfg["chat_template"] = chat_tok_cfg["chat_template"]
    else:
        logger.warning("the chat model %s has no chat template; keeping the CP model's", plan.chat_uri)
        out.update({rel: cp.read_bytes(rel) for rel in TEMPLATE_FILES if cp.is_file(rel)})
    eos = _content(chat_tok_cfg.get("eos_token"))
    if tok_cfg is not None and eos is not None:
        if eos in id_map.out:
            tok_cfg["eos_token"] = chat_tok_cfg["eos_token"]
        else:
            logger.warning("the chat model's eos token %r is not in the CP vocabulary; keeping the CP model's", eos)
    if tok_cfg is not None:
        out["tokenizer_config.json"] = _json(tok_cfg)

    gen = _load(chat, "generation_config.json")
    if gen is not None:
        for key in _ID_KEYS:
            if key in gen:
                mapped = id_map(gen[key])
                if mapped is None:
                    logger.warning(
                        "generation_config %s=%r of the chat model has no counterpart in the CP vocabulary; dropped",
                        key,
                        gen[key],
                    )
                    gen.pop(key)
                else:
                    gen[key] = mapped
        out["generation_config.json"] = _json(gen)
    elif cp.is_file("generation_config.json"):
        out["generation_config.json"] = cp.read_bytes("generation_config.json")
    out["README.md"] = model_card(plan, manifest).encode("utf-8")
    return out


def _append_tokens(out: dict[str, bytes], chat: Store, cp_tokens: list, appended: list[str]) -> None:
    """Add the chat-only tokens to the CP tokenizer as added tokens with the chat model's flags."""
    chat_tok = _load(chat, "tokenizer.json") or {}
    chat_added = {a["content"]: a for a in chat_tok.get("added_tokens") or []}
    first = len(cp_tokens)
    if "tokenizer.json" in out:
        doc = json.loads(out["tokenizer.json"])
        added = doc.setdefault("added_tokens", [])
        for k, tok in enumerate(appended):
            entry = dict(
                chat_added.get(tok)
                or {
                    "content": tok,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
            )
            entry["id"] = first + k
            added.append(entry)
        out["tokenizer.json"] = _json(doc)
    if "tokenizer_config.json" in out:
        cfg = json.loads(out["tokenizer_config.json"])
        dec = cfg.get("added_tokens_decoder")
        if isinstance(dec, dict):
            for k, tok in enumerate(appended):
                src = dict(chat_added.get(tok) or {"content": tok, "special": True})
                src.pop("id", None)
                dec[str(first + k)] = src
            out["tokenizer_config.json"] = _json(cfg)
    if "added_tokens.json" in out:
        doc = json.loads(out["added_tokens.json"])
        doc.update({tok: first + k for k, tok in enumerate(appended)})
        out["added_tokens.json"] = _json(doc)


def _vector_files(plan, manifest: dict) -> dict[str, bytes]:
    chat = Store(plan.chat_uri)
    out: dict[str, bytes] = {}
    for rel in ("config.json", "generation_config.json", *TOKENIZER_FILES, *TEMPLATE_FILES):
        if chat.is_file(rel):
            out[rel] = chat.read_bytes(rel)
    out[VECTOR_INFO] = _json(plan.vector_info)
    out["README.md"] = vector_card(plan).encode("utf-8")
    return out


def model_card(plan, manifest: dict) -> str:
    r = plan.recipe
    lines = [
        "---",
        "tags: [chatvec, chat-vector, merge]",
        "---",
        "",
        "# Merged with chatvec",
        "",
        "A continually pre-trained (CP) model given chat skills by adding chat vectors "
        "(Huang et al., ACL 2024, arXiv 2310.04799): `merged = cp + sum_i ratio_i * (chat_i - base_i)`,",
        "computed in float32 and cast once to the output dtype.",
        "",
        f"- CP model: `{r.cp}`",
    ]
    for i, v in enumerate(r.vectors):
        src = f"`{v.vector}` (extracted)" if v.vector else f"`{v.chat}` - `{v.base}`"
        plain = METHODS[v.method].parameters == ("ratio",)
        method = v.method if plain else f"{v.method} (density {format_schedule(v.density)}, seed {v.seed})"
        lines.append(f"- vector {i + 1}: {src}, ratio {format_schedule(v.ratio)}, method {method}")
    if has_schedule(r):
        lines.append(
            "- a list is a ratio over depth (layer i of n at i / (n - 1), mergekit's gradients); a mapping's "
            "first group found in a tensor's name gives its ratio, else `default` (chatvec docs/recipes.md)"
        )
    lines += [
        f"- embeddings policy: {r.embeddings or 'none (vocabularies match)'}; chat-only token rows from chat: {r.chat_tokens_from_chat}",
        f"- dtype: {plan.torch_dtype}",
        f"- tokenizer and config: CP model; chat template, eos and generation config: `{plan.chat_uri}`",
    ]
    if plan.appended_tokens:
        lines.append(f"- tokens appended from the chat model: {', '.join(plan.appended_tokens)}")
    lines += [
        f"- chatvec {manifest.get('chatvec_version')}, plan fingerprint `{manifest.get('fingerprint')}`",
        "",
        "`chatvec_manifest.json` lists the inputs and the size and sha256 of every file.",
        "",
    ]
    return "\n".join(lines)


def vector_card(plan) -> str:
    info = plan.vector_info or {}
    return "\n".join(
        [
            "# Chat vector (chatvec extract)",
            "",
            f"`tau = chat - base`, stored as {info.get('dtype')}: chat `{info.get('chat')}`, base `{info.get('base')}`.",
            "Rows are in the chat model's vocabulary; rows listed under `raw_rows` in chatvec_vector.json",
            "hold the chat model's own values (tokens the base model lacks).",
            "Use it with `chatvec merge --cp CP --vector THIS --out OUT`.",
            "",
        ]
    )
