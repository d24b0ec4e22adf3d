"""Read CTranslate2 `model.bin` files without CTranslate2.

Layout (little-endian; facts from CTranslate2's `model_spec.py` / `models/model.cc`):

    uint32 binary_version                       # 1..6 understood here
    [v>=2] string spec name, uint32 spec revision
    uint32 n_variables, then per variable:
        string name, uint8 rank, uint32 dims[rank],
        v>=4: uint8 dtype id, uint32 n_bytes    # ids below
        v<4:  uint8 item size, uint32 n_items   # 4 float32, 2 int16, 1 int8
        raw bytes
    [v>=3] uint32 n_aliases, then (alias string, target string) pairs

A string is a uint16 length that counts a trailing NUL, then the bytes. The file may be split into
parts (PyPI packages cap file sizes); the parts are memory-mapped and read as one byte sequence, so
tensors are numpy views into the page cache and nothing is copied until it is converted.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SlimWhisperError

MAX_BINARY_VERSION = 6  # newest layout known; CTranslate2 4.x writes 6
_DTYPES: dict[int, np.dtype | None] = {  # CTranslate2's DataType enum order
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: None,  # bfloat16: numpy has no such dtype, decoded by _bfloat16_to_float32
}
_LEGACY_ITEM_SIZES = {4: 0, 2: 2, 1: 1}  # v<4 stored only the item size: width -> dtype id


@dataclass
class CT2Checkpoint:
    """The decoded contents of a `model.bin`: raw tensors in their stored dtype, plus aliases.

    bfloat16 tensors are widened to float32 (exact); every other tensor keeps its stored dtype.
    Scalars (rank 0) are model metadata such as `encoder/num_heads`.
    """

    binary_version: int
    spec: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)  # alias name -> target variable name


class _ByteStream:
    """Sequential reads over one or more memory-mapped files, as if they were concatenated."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.label = " + ".join(str(p) for p in paths)
        self._parts: list[memoryview] = [_map_file(p) for p in paths]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts]).tolist()
        self.size = self._starts[-1]
        self.pos = 0

    def read(self, n: int, what: str) -> memoryview | bytes:
        """Next `n` bytes: a zero-copy view if they lie in one part, else a joined copy."""
        if n < 0 or self.pos + n > self.size:
            raise SlimWhisperError(
                f"{self.label} is truncated or corrupt: reading {what} needs {n} bytes at offset "
                f"{self.pos}, but the file has only {self.size} bytes. Reinstall or re-download "
                "the model files."
            )
        chunks = []
        pos, end = self.pos, self.pos + n
        while pos < end:
            i = int(np.searchsorted(self._starts, pos, side="right")) - 1
            part, base = self._parts[i], self._starts[i]
            take = min(end, base + len(part)) - pos
            chunks.append(part[pos - base : pos - base + take])
            pos += take
        self.pos = end
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def unpack(self, fmt: str, what: str) -> int:
        """One little-endian integer (`fmt` is a struct code such as "I", "H" or "B")."""
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        """A length-prefixed, NUL-terminated UTF-8 string."""
        length = self.unpack("H", f"the length of {what}")
        raw = bytes(self.read(length, what))
        return raw.rstrip(b"\0").decode("utf-8", errors="replace")


def _map_file(path: Path) -> memoryview:
    """Memory-map a file read-only (empty files cannot be mapped, so they read as b"")."""
    with open(path, "rb") as fh:
        if path.stat().st_size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so shifting the bits up is an exact conversion."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _read_variable(stream: _ByteStream, version: int) -> tuple[str, np.ndarray]:
    """One (name, array) record; the array views the mapped file when the dtype allows."""
    name = stream.string("a variable name")
    rank = stream.unpack("B", f"the rank of {name}")
    shape = tuple(stream.unpack("I", f"the shape of {name}") for _ in range(rank))
    if version >= 4:
        type_id = stream.unpack("B", f"the dtype of {name}")
        n_bytes = stream.unpack("I", f"the size of {name}")
    else:
        item_size = stream.unpack("B", f"the item size of {name}")
        if item_size not in _LEGACY_ITEM_SIZES:
            raise SlimWhisperError(f"{stream.label}: {name} has an unknown item size {item_size}")
        type_id = _LEGACY_ITEM_SIZES[item_size]
        n_bytes = stream.unpack("I", f"the size of {name}") * item_size
    if type_id not in _DTYPES:
        raise SlimWhisperError(f"{stream.label}: {name} has an unknown dtype id {type_id}")
    dtype = _DTYPES[type_id] or np.dtype("<u2")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n_bytes != expected:
        raise SlimWhisperError(
            f"{stream.label} is corrupt: {name} has shape {shape} and dtype {dtype} "
            f"({expected} bytes) but the record says {n_bytes} bytes"
        )
    array = np.frombuffer(stream.read(n_bytes, f"the data of {name}"), dtype=dtype).reshape(shape)
    return name, (_bfloat16_to_float32(array) if type_id == 5 else array)


def read_ct2(paths: Path | Sequence[Path]) -> CT2Checkpoint:
    """Parse a CTranslate2 `model.bin` (or its parts, in order) into tensors and aliases.

    Raises:
        SlimWhisperError: the file is truncated, corrupt, or written by an unknown format version.
    """
    stream = _ByteStream([paths] if isinstance(paths, Path) else list(paths))
    version = stream.unpack("I", "the binary version")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise SlimWhisperError(
            f"{stream.label}: CTranslate2 binary version {version} is not supported (this reader "
            f"knows versions 1-{MAX_BINARY_VERSION}); is this really a CTranslate2 model.bin? "
            "If it was written by a newer CTranslate2, re-convert it with ct2-transformers-converter "
            "from CTranslate2 4.x, or load the original Hugging Face model directory instead."
        )
    spec, revision = "", 1
    if version >= 2:
        spec = stream.string("the spec name")
        revision = stream.unpack("I", "the spec revision")
    count = stream.unpack("I", "the number of variables")
    variables = dict(_read_variable(stream, version) for _ in range(count))
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(stream.unpack("I", "the number of aliases")):
            alias = stream.string("an alias name")
            aliases[alias] = stream.string(f"the target of alias {alias}")
    if stream.pos != stream.size:
        raise SlimWhisperError(
            f"{stream.label} is corrupt: {stream.size - stream.pos} unexpected bytes after the last "
            "record. Reinstall or re-download the model files."
        )
    return CT2Checkpoint(version, spec, revision, variables, aliases)


def to_float32(checkpoint: CT2Checkpoint) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Float32 tensors by variable name (int8/int16 weights de-quantised) and scalar metadata.

    CTranslate2 quantises a weight `w` as `round(w * scale)` with one scale per output row (int8)
    or one per tensor (int16), so `w = q / scale`; the `*_scale` variables are consumed here.
    Aliases are left to the caller: converting an aliased tensor twice would double its memory.
    """
    variables = checkpoint.variables
    tensors: dict[str, np.ndarray] = {}
    scalars: dict[str, object] = {}
    for name, array in variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in variables:
            continue
        if array.ndim == 0:
            scalars[name] = array.item()
        elif array.dtype in (np.int8, np.int16):
            tensors[name] = _dequantize_one(name, array, variables.get(name + "_scale"))
        elif array.dtype.kind == "f":
            tensors[name] = array.astype(np.float32, copy=False)
        else:
            raise SlimWhisperError(f"model.bin variable {name} has unexpected dtype {array.dtype}")
    return tensors, scalars


def _dequantize_one(name: str, q: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Undo CTranslate2's symmetric quantisation of one weight."""
    if scale is None:
        raise SlimWhisperError(f"model.bin holds quantised {name} but no {name}_scale")
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == 1:  # one scale per output row
        scale = scale.reshape((-1,) + (1,) * (q.ndim - 1))
    return q.astype(np.float32) / scale
