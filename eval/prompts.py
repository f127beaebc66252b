"""Prompts are built here and nowhere else, so every engine scores the same token ids.

A conversation is rendered with the model's own chat template (``tokenizer.apply_chat_template``
from the model's files) and tokenized without adding special tokens again: templates that want a
BOS token write it themselves. A model without a chat template (a base or CP model often has
none) gets a plain ``### User: / ### Assistant:`` format, with a warning, so it can still be
compared on the same questions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

_WARNED: set[str] = set()  # one warning per model and process, not one per cell
PLAIN_USER = "### User:\n"
PLAIN_ASSISTANT = "### Assistant:\n"


def _merge_system(messages: Sequence[dict]) -> list[dict]:
    """Fold a system message into the first user turn, for templates that reject the system role."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
        if msgs and msgs[0]["role"] == "user":
            msgs[0]["content"] = f"{system}\n\n{msgs[0]['content']}"
    return msgs


class Prompts:
    """Renders and tokenizes prompts for one model."""

    def __init__(self, tokenizer, *, model_name: str = "", use_template: bool = True) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.has_template = use_template and bool(getattr(tokenizer, "chat_template", None))
        if use_template and not self.has_template and model_name not in _WARNED:
            _WARNED.add(model_name)
            logger.warning(
                "model %s has no chat template; prompts use a plain '### User: / ### Assistant:' format",
                model_name or "(unnamed)",
            )

    # -- text ---------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """The conversation as the model sees it, ending where the assistant starts to write."""
        if self.has_template:
            try:
                return self.tokenizer.apply_chat_template(
                    list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
                )
            except Exception as exc:  # jinja raises for templates without a system role
                if messages and messages[0]["role"] == "system":
                    logger.info(
                        "chat template of %s rejects a system message (%s); folding it into the user turn",
                        self.model_name,
                        exc,
                    )
                    return self.tokenizer.apply_chat_template(
                        _merge_system(messages), tokenize=False, add_generation_prompt=add_generation_prompt
                    )
                raise
        return self._plain(messages, add_generation_prompt)

    def _plain(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        bos = self.tokenizer.bos_token or ""
        parts = [bos]
        for m in messages:
            if m["role"] == "system":
                parts.append(f"{m['content']}\n\n")
            elif m["role"] == "user":
                parts.append(f"{PLAIN_USER}{m['content']}\n\n")
            else:
                eos = self.tokenizer.eos_token or ""
                parts.append(f"{PLAIN_ASSISTANT}{m['content']}{eos}\n\n")
        if add_generation_prompt:
            parts.append(PLAIN_ASSISTANT)
        return "".join(parts)

    @staticmethod
    def conversation(turns: Sequence[tuple[str, str]], system: str | None = None) -> list[dict]:
        """[(role, content), ...] with an optional system prompt first."""
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": role, "content": content} for role, content in turns]
        return msgs

    # -- tokens -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of already-rendered text (no special tokens added: the text has them)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_ids(self, messages: Sequence[dict]) -> tuple[str, list[int]]:
        text = self.render(messages)
        return text, self.encode(text)

    def start_ids(self) -> list[int]:
        """What a raw document starts with: BOS where the model has one, else nothing."""
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
