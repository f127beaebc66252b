"""Pickle checkpoints (.bin/.pt), only when the user passed --allow-pickle.

They are loaded with ``torch.load(weights_only=True)`` (tensors and plain containers only, no
arbitrary objects) and rewritten once as safetensors in a local cache folder keyed by the
files' identity, so the rest of chatvec reads them by byte range like any other input. The
cache is on this machine: a Ray merge with pickle inputs works on one node only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from chatvec.core.errors import InputError
from chatvec.core.storage import Store

logger = logging.getLogger(__name__)


def cache_root() -> str:
    return os.environ.get("CHATVEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "chatvec")


def convert_pickles(store: Store, pickles: list[str]) -> str:
    """Convert `pickles` (relative paths in `store`) and return the folder of safetensors files."""
    ident = json.dumps([[store.uri, p, store.size(p), store.mtime(p)] for p in sorted(pickles)])
    folder = os.path.join(cache_root(), "pickle", hashlib.sha256(ident.encode()).hexdigest()[:24])
    done = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(done):
        return folder
    import torch
    from safetensors.torch import save_file

    files = [p for p in pickles if not p.endswith(".json")]
    os.makedirs(folder, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k, rel in enumerate(sorted(files)):
        logger.warning("loading pickle checkpoint %s (--allow-pickle)", store.describe(rel))
        local = store.path(rel) if store.local else None
        try:
            if local is None:
                import io

                state = torch.load(io.BytesIO(store.read_bytes(rel)), map_location="cpu", weights_only=True)
            else:
                state = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{store.describe(rel)} could not be loaded as a weights-only pickle: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{store.describe(rel)} is not a mapping of tensor names to tensors")
        name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        # tied weights share storage in a pickle; safetensors wants each tensor on its own
        tensors = {n: t.detach().contiguous().clone() for n, t in state.items()}
        tmp = os.path.join(folder, name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(folder, name))
        weight_map.update({n: name for n in tensors})
    with open(done + ".tmp", "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    os.replace(done + ".tmp", done)
    return folder
