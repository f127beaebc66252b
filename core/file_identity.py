"""What identifies a file or a model location without reading its bytes."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from chatvec.core.storage import Store, is_local, local_path

logger = logging.getLogger(__name__)

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def normalize_uri(uri: str) -> str:
    """An absolute local path, a URI with a scheme, or ``hf://org/name`` for a bare Hub id."""
    uri = str(uri)
    if not is_local(uri):
        return uri.rstrip("/")
    path = local_path(uri)
    if not os.path.exists(path) and _HF_ID.match(path) and not path.startswith((".", "/")):
        return f"hf://{path}"
    return os.path.abspath(path)


@dataclass(frozen=True)
class FileIdentity:
    """What identifies an input file's contents without reading it."""

    rel: str
    size: int
    sha256: str | None = None
    etag: str | None = None
    mtime: float | None = None


def file_identity(store: Store, rel: str, size: int) -> FileIdentity:
    """What identifies one file's contents without reading it: the merge cache's notion of "the
    same input", reused for eval's cell identity."""
    if store.local:
        st = os.stat(store.path(rel))
        return FileIdentity(rel, size, mtime=st.st_mtime_ns / 1e9)
    if store.uri.startswith("hf://"):
        try:
            from huggingface_hub import HfFileSystem

            info = HfFileSystem().info(store.path(rel))
            lfs = info.get("lfs") or {}
            return FileIdentity(rel, size, sha256=lfs.get("sha256"), etag=info.get("blob_id"))
        except Exception as exc:  # identity is best effort; size still takes part
            logger.debug("no Hub metadata for %s: %s", store.describe(rel), exc)
            return FileIdentity(rel, size)
    return FileIdentity(rel, size, mtime=store.mtime(rel))
