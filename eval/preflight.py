"""Models checked before any of them loads, so a run never stops half-way for a bad folder.

A model folder that exists but cannot be evaluated safely is an error for the whole run, listed
with every other problem at once: no safetensors weights, only pickle weights (never loaded:
unpickling runs code), or a config that asks for remote code (``auto_map``: the architecture is
defined by Python files shipped in the checkpoint, which chatvec never runs, and loading the
built-in class instead would evaluate some other model). A location with nothing there yet is
left to the cell that needs it (a sweep may still be writing it), where it fails that cell alone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from chatvec.core.errors import ChatvecError, InputError
from chatvec.core.storage import Store, is_local, local_path

logger = logging.getLogger(__name__)

PICKLE = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _problem(uri: str, names: list[str], config_text: str | None) -> str | None:
    if config_text is None:
        return f"model {uri} has no config.json: pass a folder with a Hugging Face checkpoint"
    try:
        config = json.loads(config_text)
    except ValueError as exc:
        return f"model {uri}: config.json is not valid JSON ({exc})"
    if not isinstance(config, dict):
        return f"model {uri}: config.json is not a JSON object"
    if config.get("auto_map"):
        classes = ", ".join(sorted(config["auto_map"])) if isinstance(config["auto_map"], dict) else "some classes"
        return (
            f"model {uri} asks for remote code (config.json auto_map: {classes}); chatvec never runs code "
            f"shipped in a checkpoint. Use a checkpoint of an architecture transformers knows, or one saved "
            f"without auto_map"
        )
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights:
        if any(n.endswith(PICKLE) for n in names):
            return (
                f"model {uri} has only pickle weights (.bin/.pt); chatvec loads safetensors only. Convert it "
                f"once with transformers (save_pretrained(safe_serialization=True))"
            )
        return f"model {uri} has no .safetensors weights"
    return None


def model_problem(uri: str) -> str | None:
    """What makes the model at ``uri`` unusable, or None (also None when nothing is there yet,
    and for Hugging Face ids, which are checked when they are fetched)."""
    if is_local(uri):
        path = os.path.abspath(local_path(uri))
        if not os.path.isdir(path):
            return None
        names = sorted(os.listdir(path))
        config = os.path.join(path, "config.json")
        text = open(config, encoding="utf-8").read() if os.path.isfile(config) else None
        return _problem(uri, names, text)
    if uri.startswith("hf://"):
        return None
    try:
        store = Store(uri)
    except InputError:  # a kind of location this process cannot open: left to whatever loads it
        return None
    names = [rel for rel in store.list() if "/" not in rel]
    if not names:
        return None
    text = store.read_text("config.json") if "config.json" in names else None
    return _problem(uri, names, text)


def check_models(models: Mapping[str, str]) -> None:
    """Raise one ``InputError`` naming every unusable model of ``models`` ({name: uri})."""
    problems = []
    for name, uri in models.items():
        try:
            problem = model_problem(uri)
        except ChatvecError:
            raise
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"model {uri}: cannot read it ({exc})"
        if problem:
            problems.append(f"{name}: {problem}")
    if problems:
        raise InputError("cannot evaluate: " + "; ".join(problems) + ". Nothing was run")
