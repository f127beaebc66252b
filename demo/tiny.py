"""Tiny but real Hugging Face checkpoints: a base, a chat and a CP model that share a family.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few sentences in
English, Chinese, Korean and Japanese (so any text encodes), and the weights are seeded random
initialisations. The numbers these models produce mean nothing; they exist so that every code
path (sharded safetensors, tied embeddings, extended vocabularies, chat templates) is exercised
with real files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# A plain-text chat template (no special tokens needed), rendered the same by every engine.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
CHAT_TEMPLATE_CHAT = CHAT_TEMPLATE.replace("### Assistant:", "### Assistant (chat):")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. How are you today?",
    "Please explain why the sky is blue and why the sea looks green.",
    "I cannot help with that request because it could cause harm.",
    "今天天氣很好，我們去公園散步吧。請問你叫什麼名字？",
    "今天天气很好，我们去公园散步吧。请问你叫什么名字？",
    "오늘 날씨가 정말 좋네요. 공원에 산책하러 갈까요?",
    "今日はとても良い天気ですね。公園へ散歩に行きましょう。",
    "def add(a, b):\n    return a + b\n",
    "### User:\n### Assistant:\n",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", True),
    "mistral": ("MistralConfig", "MistralForCausalLM", False),
}


@dataclass(frozen=True)
class Triple:
    base: Path
    chat: Path
    cp: Path


def build_tokenizer(extra_tokens: Sequence[str] = (), vocab_size: int = 384):
    """A byte-level BPE tokenizer; `extra_tokens` are appended after the base vocabulary, in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    if extra_tokens:
        # added as regular vocabulary so their ids follow the base vocabulary in the given order
        fast.add_tokens(list(extra_tokens), special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(arch: str, vocab_size: int, hidden: int, layers: int, tok):
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(_ARCHS)}")
    config_name, _model_name, tied = _ARCHS[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    return getattr(transformers, config_name)(**kwargs)


def build_model_dir(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    *,
    seed: int = 0,
    extra_tokens: Sequence[str] = (),
    dtype: str = "bfloat16",
    shard_size: str | int | None = "50KB",
    hidden: int = 64,
    layers: int = 2,
    init_from: str | os.PathLike | None = None,
    noise: float = 0.0,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Save a tiny model (config, safetensors shards + index, tokenizer, chat template).

    With `init_from`, start from that tiny model's weights, add seeded Gaussian noise of scale
    `noise` to every tensor, and grow the vocabulary by `extra_tokens` (new rows seeded random).
    """
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    if init_from is not None:
        src_tok = transformers.AutoTokenizer.from_pretrained(init_from)
        tok = src_tok
        if extra_tokens:
            tok.add_tokens(list(extra_tokens), special_tokens=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
        if len(tok) != model.config.vocab_size:
            old = model.config.vocab_size
            model.resize_token_embeddings(len(tok), mean_resizing=False)
            with torch.no_grad():
                emb = model.get_input_embeddings().weight
                emb[old:] = torch.randn(emb.shape[0] - old, emb.shape[1], generator=gen) * 0.02
                head = model.get_output_embeddings()
                if head is not None and head.weight.data_ptr() != emb.data_ptr():
                    head.weight[old:] = (
                        torch.randn(head.weight.shape[0] - old, head.weight.shape[1], generator=gen) * 0.02
                    )
        if noise:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * noise)
    else:
        tok = build_tokenizer(extra_tokens)
        config = _config(arch, len(tok), hidden, layers, tok)
        torch.manual_seed(seed)
        model_cls = getattr(transformers, _ARCHS[arch][1])
        model = model_cls(config)
        with torch.no_grad():
            # default inits leave norms at exactly 1 and biases at 0; randomise them so a test
            # would notice a merge that skips those tensors
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    tok.chat_template = chat_template
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    save_kwargs = {"safe_serialization": True}
    if shard_size is not None:
        save_kwargs["max_shard_size"] = shard_size
    else:
        save_kwargs["max_shard_size"] = "100GB"
    model.save_pretrained(out, **save_kwargs)
    tok.save_pretrained(out)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.save_pretrained(out)
    return out


def build_triple(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    *,
    seed: int = 0,
    cp_extra_tokens: int = 0,
    chat_extra_tokens: int = 0,
    dtype: str = "bfloat16",
    shard_size: str | int | None = "50KB",
    hidden: int = 64,
    layers: int = 2,
) -> Triple:
    """base (random), chat = base + noise (+ chat-only tokens), cp = base + other noise (+ new words)."""
    root = Path(out_dir)
    base = build_model_dir(
        root / "base", arch, seed=seed, dtype=dtype, shard_size=shard_size, hidden=hidden, layers=layers
    )
    chat_tokens = [f"<|chat_{i}|>" for i in range(chat_extra_tokens)]
    cp_tokens = [f"語彙{i}" for i in range(cp_extra_tokens)]
    # The chat model's template differs slightly, so tests can tell where a merged model's came from.
    chat = build_model_dir(
        root / "chat",
        arch,
        seed=seed + 1,
        dtype=dtype,
        shard_size=shard_size,
        init_from=base,
        noise=0.02,
        extra_tokens=chat_tokens,
        chat_template=CHAT_TEMPLATE_CHAT,
    )
    cp = build_model_dir(
        root / "cp",
        arch,
        seed=seed + 2,
        dtype=dtype,
        shard_size=shard_size,
        init_from=base,
        noise=0.02,
        extra_tokens=cp_tokens,
    )
    return Triple(base=base, chat=chat, cp=cp)
