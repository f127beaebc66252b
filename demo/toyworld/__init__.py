"""A seeded toy world in which the chat vector effect is real: two synthetic languages that
differ only in script, a word-level tokenizer, and tiny Llama base / chat / CP models trained on
CPU in minutes. See README.md in this folder for what the world shows and what it does not."""

from __future__ import annotations

from chatvec.demo.toyworld.build import WorldConfig, build_world, load_world

__all__ = ["WorldConfig", "build_world", "load_world"]
