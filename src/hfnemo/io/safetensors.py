"""safetensors: header parsing without touching tensor data, and an incremental shard writer.

Format (huggingface/safetensors README): 8-byte little-endian u64 N, then N bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data region; offsets are relative to the data region, which the tensors tile without gaps.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hfnemo.dtypes import BY_SAFETENSORS, DType
from hfnemo.errors import CorruptCheckpoint
from hfnemo.io.fileio import OutFile

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class StTensor:
    """One tensor of one safetensors file: where its bytes are, absolutely."""

    name: str
    file: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def read_header(path: str | Path) -> tuple[dict[str, StTensor], dict[str, str]]:
    """Parse and validate one file's header; returns (tensors, __metadata__). Reads no data."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpoint(
                    f"safetensors file is {size} bytes, too short for its 8-byte header length",
                    file=path, fix="the file is truncated: re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CorruptCheckpoint(
                    f"header length {n} is larger than the file ({size} bytes) allows",
                    file=path, fix="the file is truncated or not a safetensors file: re-download it")
            raw = f.read(n)
    except OSError as e:
        raise CorruptCheckpoint(f"cannot read safetensors file: {e.strerror}", file=path,
                                fix="check that the file exists and is readable") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, huge integers
        raise CorruptCheckpoint(f"header is not valid JSON: {str(e)[:200]}", file=path,
                                fix="the file is corrupt: re-download it") from e
    if not isinstance(header, dict):
        raise CorruptCheckpoint("header is not a JSON object", file=path, fix="re-download the file")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CorruptCheckpoint("__metadata__ is not an object", file=path, fix="re-download the file")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, StTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        t = _parse_entry(path, name, info, data_start, data_len)
        tensors[name] = t
        spans.append((t.offset - data_start, t.offset - data_start + t.nbytes, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise CorruptCheckpoint(f"tensor data {what} (offsets {begin}..{end})", file=path, tensor=name,
                                    fix="the header is inconsistent: re-download the file")
        pos = end
    if pos != data_len:
        raise CorruptCheckpoint(
            f"tensors cover {pos} bytes of a {data_len}-byte data region",
            file=path, fix="the file is truncated or padded: re-download it")
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _parse_entry(path: str, name: str, info: object, data_start: int, data_len: int) -> StTensor:
    def bad(msg: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(msg, file=path, tensor=name, fix="the header is corrupt: re-download the file")

    if not isinstance(info, dict):
        raise bad("header entry is not an object")
    code = info.get("dtype")
    if not isinstance(code, str) or code not in BY_SAFETENSORS:
        raise CorruptCheckpoint(f"unknown dtype {code!r}", file=path, tensor=name,
                                fix=f"hfnemo reads {', '.join(BY_SAFETENSORS)}")
    dtype = BY_SAFETENSORS[code]
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    offs = info.get("data_offsets")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise bad(f"data_offsets {offs!r} is not [begin, end]")
    begin, end = offs
    nbytes = _numel(tuple(shape)) * dtype.itemsize
    if not 0 <= begin <= end <= data_len:
        raise bad(f"data_offsets [{begin}, {end}] lie outside the {data_len}-byte data region")
    if end - begin != nbytes:
        raise bad(f"data_offsets span {end - begin} bytes but shape {shape} of {code} needs {nbytes}")
    return StTensor(name, path, dtype, tuple(shape), data_start + begin, nbytes)


def header_bytes(entries: list[tuple[str, DType, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length + JSON header for tensors laid out back to back in the given order.

    The JSON is padded with spaces to a multiple of 8 bytes, as safetensors does, so that the data
    region starts aligned.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for name, dtype, shape in entries:
        n = _numel(shape) * dtype.itemsize
        header[name] = {"dtype": dtype.safetensors, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors file incrementally: header first, then each tensor's bytes in order.

    ``opener(path)`` opens the file (default: a fresh :class:`OutFile`; on resume, one that keeps
    the bytes already written, which ``skip`` then accounts for)."""

    def __init__(self, path: str | Path, entries: list[tuple[str, DType, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, opener: Callable[[Path], OutFile] = OutFile) -> None:
        self.path = str(path)
        self.file = opener(Path(path))
        head = header_bytes(entries, metadata)
        self.file.write(head)
        self.expected_bytes = len(head) + sum(_numel(s) * d.itemsize for _, d, s in entries)
        self.written = len(head)

    def write(self, data: memoryview | bytes) -> None:
        self.written += self.file.write(data)

    def skip(self, n: int) -> None:
        self.written += self.file.skip(n)

    def close(self, sync: bool = False) -> None:
        self.file.close(sync=sync)
        if self.written != self.expected_bytes:
            raise CorruptCheckpoint(f"wrote {self.written} bytes, planned {self.expected_bytes}", file=self.path,
                                    fix="this is a bug in hfnemo: please report it")

    def abort(self) -> None:
        self.file.abort()
