"""Engines load models from local folders; a model at a remote URI is copied to a local cache first.

``s3://``, ``gs://``, ``hdfs://`` and ``hf://org/name`` models are copied, file by file, into
``$CHATVEC_CACHE`` (default ``~/.cache/chatvec/models``) under a folder named after the URI. A copy
is complete when its ``.chatvec-complete`` marker exists, so an interrupted copy is redone rather
than loaded half-written; a remote model whose files changed size is copied again.
Pickle weights (``.bin``, ``.pt``, ``.pth``) are never copied: engines load safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from chatvec.core.errors import InputError
from chatvec.core.storage import Store, is_local, local_path

logger = logging.getLogger(__name__)

MARKER = ".chatvec-complete"
_SKIP = (".bin", ".pt", ".pth", ".pkl", ".msgpack", ".h5", ".ckpt")


def cache_root() -> Path:
    return Path(os.environ.get("CHATVEC_CACHE") or Path.home() / ".cache" / "chatvec" / "models")


def check_model_dir(path: str, uri: str | None = None) -> None:
    """A usable model folder: a config.json and safetensors weights (pickles are refused)."""
    uri = uri or path
    if not os.path.isdir(path):
        raise InputError(f"model {uri} does not exist: pass a folder with a Hugging Face checkpoint")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"model {uri} has no config.json: pass a folder with a Hugging Face checkpoint")
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):
        if any(n.endswith(_SKIP) for n in names):
            raise InputError(
                f"model {uri} has only pickle weights (.bin/.pt); chatvec loads safetensors only. "
                "Convert it once with transformers (save_pretrained(safe_serialization=True))."
            )
        raise InputError(f"model {uri} has no .safetensors weights")


def local_model_dir(uri: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local folder holding the model at ``uri`` (the folder itself when it is local)."""
    if is_local(uri):
        path = os.path.abspath(local_path(uri))
        if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", uri):
            # looks like a Hugging Face repo id rather than a relative path
            return local_model_dir(f"hf://{uri}", cache_dir)
        check_model_dir(path, uri)
        return path
    store = Store(uri)
    try:
        files = [f for f in store.list() if not f.endswith(_SKIP) and "/." not in f"/{f}"]
    except Exception as exc:
        raise InputError(f"cannot list model {uri}: {exc}") from exc
    if "config.json" not in files:
        raise InputError(f"model {uri} does not exist or has no config.json")
    sizes = {f: store.size(f) for f in files}
    root = Path(cache_dir) if cache_dir else cache_root()
    slug = re.sub(r"[^\w.-]+", "_", uri.split("://", 1)[-1])[-80:]
    dest = root / f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
    marker = dest / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == sizes:
                return str(dest)
        except ValueError:
            pass
        logger.info("cached copy of %s is stale; copying again", uri)
    # copy beside the destination and rename, so two processes copying at once never mix files
    tmp = root / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    logger.info("copying model %s to %s (%d files)", uri, dest, len(files))
    try:
        for rel in files:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            reader = store.open_reader(rel)
            try:
                with open(target, "wb") as fh:
                    chunk = 64 << 20
                    for off in range(0, reader.size, chunk):
                        fh.write(reader.read_at(off, min(chunk, reader.size - off)))
            finally:
                reader.close()
        (tmp / MARKER).write_text(json.dumps(sizes))
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process renamed its complete copy first
            if not (dest / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check_model_dir(str(dest), uri)
    return str(dest)
