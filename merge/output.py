"""The output location: cache hits, refusal to clobber, and the commit.

Layout of a merged model (Hugging Face layout plus chatvec's files)::

    model-0000k-of-0000N.safetensors    written first, each recorded in .chatvec/shards/ once published
    config.json, tokenizer files, chat_template.jinja, generation_config.json, README.md
    model.safetensors.index.json        written after everything above
    chatvec_manifest.json               written LAST: the commit point

A location holding a manifest is committed. The same plan fingerprint there is a cache hit;
another fingerprint is refused unless `overwrite`, which first removes the manifest and the index
(so a crash half-way cannot leave a stale commit) and then the files the old manifest listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from chatvec.core.errors import OutputExistsError
from chatvec.core.layout import MANIFEST
from chatvec.core.storage import Store
from chatvec.merge.metadata_files import side_files
from chatvec.merge.plan import FORMAT_VERSION, MergePlan
from chatvec.merge.shard_writer import RECORDS, ShardResult

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


def chatvec_version() -> str:
    try:
        from importlib.metadata import version

        return version("chatvec")
    except Exception:  # running from a source tree that was never installed
        return "0+unknown"


@dataclass
class MergeSummary:
    out_uri: str
    total_bytes: int
    seconds: float
    shards_written: int
    shards_resumed: int
    cached: bool
    device: str
    # bytes of the shards each worker wrote in this run (by ShardResult.written_by)
    bytes_by_worker: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        from chatvec.core.units import format_size

        if self.cached:
            return f"already merged: {self.out_uri} (same recipe and inputs; nothing to do)"
        rate = self.total_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        line = (
            f"merged {format_size(self.total_bytes)} in {self.seconds:.2f} s ({rate:.2f} GB/s) on {self.device}: "
            f"{self.shards_written} shard(s) written, {self.shards_resumed} resumed -> {self.out_uri}"
        )
        if len(self.bytes_by_worker) > 1:
            line += "\nbytes per worker: " + ", ".join(
                f"{who} {format_size(n)}" for who, n in sorted(self.bytes_by_worker.items())
            )
        return line


def _read_manifest(store: Store) -> dict | None:
    if not store.is_file(MANIFEST):
        return None
    try:
        return json.loads(store.read_text(MANIFEST))
    except ValueError as exc:  # cut short or corrupt: nothing was committed there
        logger.warning("%s is unreadable (%s): merging again", store.describe(MANIFEST), exc)
        return None


def _intact(store: Store, manifest: dict) -> bool:
    files = manifest.get("files") or {}
    return bool(files) and all(store.size(rel) == info.get("size") for rel, info in files.items())


def _uncommit(store: Store, manifest: dict | None) -> None:
    store.delete(MANIFEST)
    store.delete(INDEX)
    for rel in (manifest or {}).get("files", {}):
        store.delete(rel)
        store.delete(f"{RECORDS}/{rel}.json")


def check_output(plan: MergePlan, out: Store | str, *, overwrite: bool) -> dict | None:
    """The committed manifest when `out` already holds this plan's result, else None.

    Raises OutputExistsError when it holds something else and `overwrite` is false; with
    `overwrite`, removes the other commit (call that only under the output lock).
    """
    store = out if isinstance(out, Store) else Store(out)
    out_uri = store.describe()
    manifest = _read_manifest(store)
    fp = plan.fingerprint()
    if manifest is not None:
        if manifest.get("fingerprint") == fp and _intact(store, manifest):
            return manifest
        if manifest.get("fingerprint") == fp:
            logger.warning("%s: files listed in the manifest are missing or changed; merging again", out_uri)
            store.delete(MANIFEST)
            store.delete(INDEX)
            return None
        if not overwrite:
            raise OutputExistsError(
                f"{out_uri} already holds a merged model from a different recipe or different inputs "
                f"({manifest.get('recipe_text', 'unknown recipe')}). Pass --overwrite to replace it, or choose another --out"
            )
        logger.info("overwriting the model committed at %s", out_uri)
        _uncommit(store, manifest)
        return None
    if store.is_file(INDEX) and not store.exists(RECORDS):
        if not overwrite:
            raise OutputExistsError(
                f"{out_uri} already holds a model that chatvec did not write ({INDEX} is there). "
                "Pass --overwrite to replace it, or choose another --out"
            )
        store.delete(INDEX)
    return None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit(plan: MergePlan, results: list[ShardResult], store: Store) -> dict:
    """Write the side files, then the index, then the manifest (the commit point); return it."""
    out_uri = store.describe()
    by_name = {r.filename: r for r in results}
    missing = [s.filename for s in plan.shards if s.filename not in by_name]
    if missing:
        raise RuntimeError(f"cannot commit {out_uri}: shard(s) not written: {', '.join(missing)}")
    files: dict[str, dict] = {}
    for shard in plan.shards:
        r = by_name[shard.filename]
        if r.nbytes != shard.nbytes:
            raise RuntimeError(f"cannot commit {out_uri}: {r.filename} has {r.nbytes} bytes, planned {shard.nbytes}")
        files[r.filename] = {"size": r.nbytes, "sha256": r.sha256, "written_by": r.written_by}
    manifest_base = _manifest(plan, files)
    for rel, data in side_files(plan, manifest_base).items():
        store.write_bytes(rel, data)
        files[rel] = {"size": len(data), "sha256": _sha(data)}
    weight_map = {name: s.filename for s in plan.shards for name in s.tensor_names}
    index = {
        "metadata": {
            "total_size": sum(t.nbytes for t in plan.tasks.values()),
            "chatvec_fingerprint": plan.fingerprint(),
        },
        "weight_map": weight_map,
    }
    data = json.dumps(index, indent=2).encode()
    store.write_bytes(INDEX, data)
    files[INDEX] = {"size": len(data), "sha256": _sha(data)}
    manifest = _manifest(plan, files)
    store.write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def _mode(plan: MergePlan) -> str:
    mergekit = plan.recipe.mergekit if plan.recipe is not None else None
    return f"mergekit {mergekit.method}" if mergekit is not None else "chatvec"


def _manifest(plan: MergePlan, files: dict) -> dict:
    return {
        "chatvec_version": chatvec_version(),
        "format": FORMAT_VERSION,
        "kind": plan.kind,
        # whose formulas: chatvec's (the papers') or mergekit's (--mergekit-config, merge/gta.py)
        "mode": _mode(plan),
        "fingerprint": plan.fingerprint(),
        "recipe": plan.recipe.fingerprint_payload() if plan.recipe is not None else None,
        "recipe_text": plan.recipe.describe()
        if plan.recipe is not None
        else (plan.vector_info or {}).get("description"),
        "vector": plan.vector_info,
        "inputs": [{"role": i.role, "uri": i.uri, "files": [f.__dict__ for f in i.files]} for i in plan.inputs],
        "dtype": plan.torch_dtype,
        "appended_tokens": plan.appended_tokens,
        "files": dict(files),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
