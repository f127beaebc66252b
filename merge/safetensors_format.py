"""The safetensors file format: parse and check a header, and build one.

A file is ``u64 little-endian N`` + ``N`` bytes of JSON + the tensor data. The JSON maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) and may hold ``"__metadata__"`` (str -> str). Everything is checked before a byte
of data is trusted: the header bound, JSON shape, known dtypes, ``prod(shape) * itemsize ==
end - begin``, offsets inside the file, no overlaps and no holes, and that the file ends where
the data ends (a shorter file is truncated).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from chatvec.core.errors import InputError

# safetensors' own bound: larger headers are refused so a corrupt length cannot exhaust memory.
MAX_HEADER_BYTES = 100_000_000

# dtype -> item size in bytes
ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "C64": 8,
}
# dtypes the arithmetic reads and writes (float32 math in between)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# recipe / torch names -> safetensors names
DTYPE_BY_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
NAME_BY_DTYPE = {v: k for k, v in DTYPE_BY_NAME.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: absolute [offset, offset + nbytes) in `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Header:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def _bad(name: str, why: str) -> InputError:
    return InputError(f"{name} is not a valid safetensors file: {why}. Re-download or re-save it")


def header_length(prefix: bytes, file_size: int, name: str) -> int:
    """The JSON length from the first 8 bytes, checked against the file size and the bound."""
    if file_size < 8 or len(prefix) < 8:
        raise _bad(name, f"it has {file_size} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise _bad(name, f"its header claims {n} bytes, more than the {MAX_HEADER_BYTES}-byte limit (corrupted header)")
    if 8 + n > file_size:
        raise _bad(name, f"its header claims {n} bytes but the file has only {file_size} (truncated or corrupted)")
    return n


def parse_header(raw: bytes, file_size: int, name: str, rel: str) -> Header:
    """Parse the JSON header `raw` of a file of `file_size` bytes; `rel` names it in entries."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(name, f"its header is not JSON ({exc}); the header is corrupted") from None
    if not isinstance(doc, dict):
        raise _bad(name, "its header is not a JSON object")
    data_start = 8 + len(raw)
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(name, "__metadata__ must map strings to strings")
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for tname, info in doc.items():
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} or len(info) != 3:
            raise _bad(name, f"tensor {tname!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEMSIZE:
            raise _bad(name, f"tensor {tname!r} has unknown dtype {dtype!r} (known: {', '.join(ITEMSIZE)})")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _bad(name, f"tensor {tname!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _bad(name, f"tensor {tname!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected:
            raise _bad(
                name, f"tensor {tname!r} spans {end - begin} bytes but shape {shape} of {dtype} needs {expected}"
            )
        if data_start + end > file_size:
            raise _bad(
                name,
                f"tensor {tname!r} ends at byte {data_start + end} but the file has {file_size} bytes: "
                "the file is truncated",
            )
        spans.append((begin, end, tname))
        entries[tname] = TensorEntry(tname, dtype, tuple(shape), rel, data_start + begin, end - begin)
    spans.sort()
    pos = 0
    for begin, end, tname in spans:
        if begin < pos:
            raise _bad(name, f"tensor {tname!r} overlaps the tensor before it")
        if begin > pos:
            raise _bad(name, f"there is a hole of {begin - pos} bytes before tensor {tname!r}")
        pos = end
    if data_start + pos != file_size:
        raise _bad(name, f"its tensors end at byte {data_start + pos} but the file has {file_size} bytes")
    return Header(entries, metadata, data_start)


def build_header(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """Length prefix + JSON for tensors laid out in the given order, padded to 8 bytes."""
    doc: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name, dtype, shape, nbytes in tensors:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    # safetensors pads with spaces so the data section starts 8-byte aligned
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw
