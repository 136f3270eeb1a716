"""Property-based fuzzing of the byte-level readers ("Nothing lost, nobody in").

Every reader that parses bytes a stranger wrote -- the safetensors header, the HF index, DCP's
``.metadata`` and the torch.save archives inside ``.distcp`` files -- is fed random and mutated
input. The properties, for every input:

* it returns, or raises a :class:`hfnemo.errors.ConversionError` subclass: nothing else escapes;
* it returns within a time limit (each call runs under ``signal.setitimer``);
* it never reads outside the file (archives: outside their chunk), and whatever it returns lies
  inside the file.

Deterministic (``derandomize=True``) and bounded in time, so it runs with the normal suite.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.filesystem import _StorageInfo

from hfnemo.dtypes import BY_NAME, BY_TORCH
from hfnemo.errors import ConversionError
from hfnemo.io import hf, torchzip
from hfnemo.io.dcp import DcpWriter, read_index
from hfnemo.io.safetensors import header_bytes, read_header

FUZZ = settings(derandomize=True, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
TIME_LIMIT_S = 2.0


class Hang(BaseException):
    """Raised by the alarm: a reader ran past TIME_LIMIT_S (BaseException: no reader may swallow it)."""


@contextmanager
def time_limit(seconds: float = TIME_LIMIT_S) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"reader did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def outcome(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``fn(*args)`` under the time limit; a ConversionError is a fine answer (returned, not raised).
    Any other exception propagates and fails the test with its traceback."""
    with time_limit():
        try:
            return fn(*args, **kw)
        except ConversionError as e:
            assert str(e) and e.fix, f"error without a message or fix: {e!r}"
            return e


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# JSON values of every kind, including the nasty ones: huge integers, deep nesting, bools, floats.
JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.sampled_from([2**64, -1, 0, 1, 4, 12]) | st.floats(allow_nan=False)
                | st.text(max_size=8) | st.sampled_from(["BF16", "F32", "I64", "F8_E4M3", "bf16", ""]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


# ------------------------------------------------------------------------------------ safetensors

def _valid_safetensors() -> tuple[bytes, dict]:
    entries = [("a.weight", BY_NAME["bf16"], (3, 4)), ("b.bias", BY_NAME["fp32"], (5,)),
               ("c.empty", BY_NAME["fp16"], (0, 2)), ("d.idx", BY_NAME["i64"], (2, 1))]
    head = header_bytes(entries, {"format": "pt"})
    data = bytes(range(256))[: 3 * 4 * 2 + 5 * 4 + 2 * 8]
    return head + data, json.loads(head[8:])


VALID_ST, VALID_HEADER = _valid_safetensors()
VALID_DATA = VALID_ST[8 + struct.unpack("<Q", VALID_ST[:8])[0]:]


def _check_header(path: Path) -> None:
    res = outcome(read_header, path)
    if isinstance(res, ConversionError):
        assert res.file == str(path)
        return
    tensors, meta = res
    size = path.stat().st_size
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    spans = sorted((t.offset, t.offset + t.nbytes) for t in tensors.values())
    pos = 8 + n
    for begin, end in spans:  # inside the data region, tiling it without overlaps or gaps
        assert begin == pos and end <= size
        pos = end
    assert pos == size
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


def _write(work: Path, name: str, data: bytes) -> Path:
    p = work / name
    p.write_bytes(data)
    return p


@settings(FUZZ, derandomize=True, max_examples=300)
@given(data=st.binary(max_size=300))
def test_header_random_bytes(work: Path, data: bytes) -> None:
    _check_header(_write(work, "random.safetensors", data))


@settings(FUZZ, derandomize=True, max_examples=300)
@given(raw=st.binary(max_size=200), tail=st.binary(max_size=64), fake_len=st.none() | st.integers(0, 2**64 - 1))
def test_header_random_json_bytes(work: Path, raw: bytes, tail: bytes, fake_len: int | None) -> None:
    n = len(raw) if fake_len is None else fake_len
    _check_header(_write(work, "rawjson.safetensors", struct.pack("<Q", n) + raw + tail))


@settings(FUZZ, derandomize=True, max_examples=300)
@given(flips=st.lists(st.tuples(st.integers(0, len(VALID_ST) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_header_flipped_bytes(work: Path, flips: list[tuple[int, int]]) -> None:
    b = bytearray(VALID_ST)
    for at, x in flips:
        b[at] ^= x
    _check_header(_write(work, "flipped.safetensors", bytes(b)))


def test_header_truncated_at_every_position(work: Path) -> None:
    """Every truncation point: inside the length field, the JSON, at its end, inside the data."""
    p = work / "trunc.safetensors"
    for cut in range(len(VALID_ST)):
        p.write_bytes(VALID_ST[:cut])
        assert isinstance(outcome(read_header, p), ConversionError), cut
        p.write_bytes(VALID_ST + b"\0" * (cut % 9 + 1))  # and padded
        assert isinstance(outcome(read_header, p), ConversionError), cut


@settings(FUZZ, derandomize=True, max_examples=300)
@given(delta=st.integers(-600, 600) | st.sampled_from([2**63, 2**64 - 1, 100 * 2**20, 100 * 2**20 + 1]),
       absolute=st.booleans())
def test_header_length_edits(work: Path, delta: int, absolute: bool) -> None:
    (n,) = struct.unpack("<Q", VALID_ST[:8])
    m = (delta if absolute else n + delta) % 2**64
    _check_header(_write(work, "len.safetensors", struct.pack("<Q", m) + VALID_ST[8:]))


@st.composite
def edited_headers(draw: st.DrawFn) -> object:
    header = json.loads(json.dumps(VALID_HEADER))
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "drop_field", "entry", "drop_entry", "offsets", "shape",
                                     "metadata", "add_entry", "whole"]))
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if kind == "field" and isinstance(entry, dict):
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON_VALUES)
        elif kind == "drop_field" and isinstance(entry, dict):
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "entry":
            header[name] = draw(JSON_VALUES)
        elif kind == "drop_entry":
            header.pop(name, None)
        elif kind == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(st.lists(st.integers(-5, 80) | st.sampled_from([2**63, 2**64]),
                                                  min_size=0, max_size=3))
        elif kind == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.lists(st.integers(-2, 12) | st.just(2**62), max_size=4))
        elif kind == "metadata":
            header["__metadata__"] = draw(JSON_VALUES)
        elif kind == "add_entry":
            header[draw(st.text(max_size=5))] = {
                "dtype": draw(st.sampled_from(["BF16", "F32", "U8", "BOOL", "X"])),
                "shape": draw(st.lists(st.integers(0, 8), max_size=3)),
                "data_offsets": draw(st.lists(st.integers(0, 80), min_size=2, max_size=2))}
        elif kind == "whole":
            return draw(JSON_VALUES)
    return header


@settings(FUZZ, derandomize=True, max_examples=400)
@given(header=edited_headers(), pad=st.integers(0, 7), data_delta=st.integers(-8, 8))
def test_header_json_field_edits(work: Path, header: object, pad: int, data_delta: int) -> None:
    raw = json.dumps(header).encode() + b" " * pad
    data = VALID_DATA[:len(VALID_DATA) + data_delta] if data_delta < 0 else VALID_DATA + b"\0" * data_delta
    _check_header(_write(work, "edit.safetensors", struct.pack("<Q", len(raw)) + raw + data))


def test_header_deeply_nested_json(work: Path) -> None:
    for raw in (b"[" * 100_000, b'{"a":' * 50_000, b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}"):
        res = outcome(read_header, _write(work, "deep.safetensors", struct.pack("<Q", len(raw)) + raw))
        assert isinstance(res, ConversionError)


@settings(FUZZ, derandomize=True, max_examples=200)
@given(index=JSON_VALUES | st.fixed_dictionaries({"weight_map": JSON_VALUES})
       | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3)}))
def test_index_json_edits(work: Path, index: object) -> None:
    d = work / "hfdir"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes(VALID_ST)
    (d / hf.INDEX).write_text(json.dumps(index))
    res = outcome(hf.scan_weights, d)
    if not isinstance(res, ConversionError):
        assert all(t.offset + t.nbytes <= os.path.getsize(t.file) and Path(t.file).parent == d
                   for t in res.values())


# ------------------------------------------------------------------------------------ DCP .metadata

def _make_dcp(root: Path) -> None:
    full = torch.arange(24, dtype=torch.float32).view(4, 6)
    w = DcpWriter(root, ["__0_0.distcp", "__0_1.distcp"])
    chunks = [((0, 0), (2, 6)), ((2, 0), (2, 6))]
    w.declare_tensor("module.w", BY_TORCH[torch.float32], (4, 6), chunks)
    w.declare_bytes("module.extra")
    for i, (off, size) in enumerate(chunks):
        h = w.begin_tensor("module.w", off, BY_TORCH[torch.float32], size, i)
        h.write(full[off[0]:off[0] + size[0]].contiguous().numpy().tobytes())
        h.finish()
    w.write_bytes("module.extra", b"hello", 0)
    w.finish("fuzz")


@pytest.fixture(scope="module")
def dcp_dir(work: Path) -> Path:
    root = work / "dcp"
    _make_dcp(root)
    return root


def _check_index(root: Path) -> None:
    res = outcome(read_index, root)
    if isinstance(res, ConversionError):
        return
    for t in res.tensors.values():
        for c in t.chunks:
            p = (root / c.file).resolve()
            assert p.parent == root.resolve() and 0 <= c.offset and c.offset + c.length <= p.stat().st_size


def _metadata_variant(dcp_dir: Path, work: Path, data: bytes) -> Path:
    root = work / "dcpv"
    root.mkdir(exist_ok=True)
    for f in dcp_dir.glob("*.distcp"):
        if not (root / f.name).exists():
            (root / f.name).write_bytes(f.read_bytes())
    (root / ".metadata").write_bytes(data)
    return root


@settings(FUZZ, derandomize=True, max_examples=300)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
       cut=st.none() | st.integers(0, 10**6))
def test_read_index_mutated_pickle(dcp_dir: Path, work: Path, flips: list, cut: int | None) -> None:
    b = bytearray((dcp_dir / ".metadata").read_bytes())
    for at, x in flips:
        b[at % len(b)] ^= x
    if cut is not None:
        b = b[: cut % (len(b) + 1)]
    _check_index(_metadata_variant(dcp_dir, work, bytes(b)))


@settings(FUZZ, derandomize=True, max_examples=200)
@given(data=st.binary(max_size=200) | st.binary(max_size=60).map(lambda b: b"\x80\x04" + b))
def test_read_index_random_bytes(dcp_dir: Path, work: Path, data: bytes) -> None:
    _check_index(_metadata_variant(dcp_dir, work, data))


PATHS = st.sampled_from(["__0_0.distcp", "__0_1.distcp", "../__0_0.distcp", "/etc/passwd", "missing.distcp",
                         "", "."]) | JSON_SCALARS


@st.composite
def metadata_objects(draw: st.DrawFn) -> object:
    """Well-formed pickles of DCP's own classes holding ill-formed values."""
    md = pickle.loads(_VALID_MD)
    what = draw(st.sampled_from(["storage", "chunks", "sdm", "props", "size", "storage_map", "plain"]))
    key = next(k for k in md.storage_data if k.fqn == "module.w")
    if what == "storage":
        md.storage_data[key] = _StorageInfo(draw(PATHS), draw(JSON_SCALARS), draw(JSON_SCALARS))
    elif what == "chunks":
        meta = md.state_dict_metadata["module.w"]
        meta.chunks = draw(st.lists(st.builds(dcp_md.ChunkStorageMetadata,
                                              offsets=st.lists(st.integers(-3, 9), max_size=3),
                                              sizes=st.lists(st.integers(-3, 9), max_size=3)), max_size=3)
                           | JSON_VALUES)
    elif what == "sdm":
        md.state_dict_metadata = draw(JSON_VALUES)
    elif what == "props":
        md.state_dict_metadata["module.w"].properties = draw(JSON_VALUES)
    elif what == "size":
        md.state_dict_metadata["module.w"].size = draw(JSON_VALUES)
    elif what == "storage_map":
        md.storage_data = draw(JSON_VALUES)
    else:
        return draw(JSON_VALUES)
    return md


_VALID_MD = b""


@settings(FUZZ, derandomize=True, max_examples=200)
@given(md=metadata_objects())
def test_read_index_well_formed_pickle_bad_values(dcp_dir: Path, work: Path, md: object) -> None:
    _check_index(_metadata_variant(dcp_dir, work, pickle.dumps(md)))


@pytest.fixture(scope="module", autouse=True)
def _valid_md(dcp_dir: Path) -> None:
    global _VALID_MD
    _VALID_MD = (dcp_dir / ".metadata").read_bytes()


# ------------------------------------------------------------------------------------ torch archives

def _archive(kind: str) -> bytes:
    if kind == "ours":
        return torchzip.archive_bytes(torchzip.tensor_pickle(BY_NAME["fp32"], (2, 3)), bytes(range(24)))
    buf = io.BytesIO()
    torch.save(torch.arange(6, dtype=torch.bfloat16).view(3, 2), buf)
    return buf.getvalue()


ARCHIVES = {k: _archive(k) for k in ("ours", "torch")}
PAD = 333  # the archive sits in the middle of a file: reads must stay inside [PAD, PAD + len)


def _check_locate(work: Path, blob: bytes, length: int | None = None) -> None:
    p = work / "chunk.distcp"
    p.write_bytes(b"\xAA" * PAD + blob + b"PK\x05\x06" * 40)  # trailing junk that looks like zip records
    length = len(blob) if length is None else length
    lo, hi = PAD, PAD + length
    real = torchzip.pread_into
    reads: list[tuple[int, int]] = []

    def spy(fd: int, buf: memoryview, offset: int, *, path: Any = "?") -> None:
        reads.append((offset, offset + len(buf)))
        return real(fd, buf, offset, path=path)

    fd = os.open(p, os.O_RDONLY)
    torchzip.pread_into = spy
    try:
        res = outcome(torchzip.locate_tensor, fd, PAD, length, path=str(p), what="t")
    finally:
        torchzip.pread_into = real
        os.close(fd)
    assert all(lo <= a and b <= hi for a, b in reads), ("read outside the chunk", reads, (lo, hi))
    if not isinstance(res, ConversionError):
        assert lo <= res.offset and res.offset + res.nbytes <= hi and res.nbytes >= 0
        assert all(isinstance(s, int) and s >= 0 for s in res.shape)


@settings(FUZZ, derandomize=True, max_examples=300)
@given(kind=st.sampled_from(sorted(ARCHIVES)),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3))
def test_locate_tensor_flipped_bytes(work: Path, kind: str, flips: list) -> None:
    b = bytearray(ARCHIVES[kind])
    for at, x in flips:
        b[at % len(b)] ^= x
    _check_locate(work, bytes(b))


@settings(FUZZ, derandomize=True, max_examples=200)
@given(kind=st.sampled_from(sorted(ARCHIVES)), cut=st.integers(0, 10**6), from_end=st.booleans())
def test_locate_tensor_truncated(work: Path, kind: str, cut: int, from_end: bool) -> None:
    blob = ARCHIVES[kind]
    cut %= len(blob) + 1
    if from_end:
        _check_locate(work, blob, length=cut)  # a chunk length shorter than the archive
    else:
        _check_locate(work, blob[cut:])


@settings(FUZZ, derandomize=True, max_examples=200)
@given(at=st.integers(0, 10**6), value=st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1, 1 << 20]),
       width=st.sampled_from([2, 4, 8]), kind=st.sampled_from(sorted(ARCHIVES)))
def test_locate_tensor_field_edits(work: Path, at: int, value: int, width: int, kind: str) -> None:
    """Overwrite a little-endian integer field anywhere in the zip structures with a boundary value."""
    b = bytearray(ARCHIVES[kind])
    at %= len(b) - width
    b[at:at + width] = (value % 2**(8 * width)).to_bytes(width, "little")
    _check_locate(work, bytes(b))


class _Storage:
    def __init__(self, pid: object) -> None:
        self.pid = pid


class _Reduce:
    def __init__(self, args: tuple) -> None:
        self.args = args

    def __reduce__(self) -> tuple:
        return (torch._utils._rebuild_tensor_v2, self.args)


class _PidPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        return obj.pid if isinstance(obj, _Storage) else None


PICKLE_SCALARS = JSON_SCALARS | st.just("tensor") | st.just(("storage", torch.FloatStorage, "0", "cpu", 6))
STORAGE_PIDS = (st.tuples(st.just("storage"), st.sampled_from([torch.FloatStorage, torch.BFloat16Storage]),
                          st.sampled_from(["0", "1", ""]) | PICKLE_SCALARS, st.just("cpu"),
                          st.integers(-1, 100) | PICKLE_SCALARS)
                | st.tuples(PICKLE_SCALARS) | PICKLE_SCALARS)
INTS = st.integers(-3, 10) | st.sampled_from([2**40, 2**63])


@st.composite
def tensor_pickles(draw: st.DrawFn) -> bytes:
    storage = _Storage(draw(STORAGE_PIDS))
    if draw(st.booleans()):
        args = (storage if draw(st.booleans()) else draw(PICKLE_SCALARS), draw(INTS | PICKLE_SCALARS),
                tuple(draw(st.lists(INTS, max_size=3))), tuple(draw(st.lists(INTS, max_size=3))),
                False, draw(st.just(None) | st.dictionaries(st.text(max_size=3), INTS, max_size=1)))
        obj: object = _Reduce(args[: draw(st.integers(0, 6))] if draw(st.booleans()) else args)
    else:  # plain data that merely looks like what _rebuild returns
        obj = draw(st.tuples(st.just("tensor"), PICKLE_SCALARS | st.just(storage), INTS, st.lists(INTS, max_size=3),
                             st.lists(INTS, max_size=3)).map(tuple) | st.lists(PICKLE_SCALARS, max_size=6).map(tuple))
    buf = io.BytesIO()
    _PidPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


@settings(FUZZ, derandomize=True, max_examples=300)
@given(pkl=tensor_pickles())
def test_locate_tensor_hostile_data_pkl(work: Path, pkl: bytes) -> None:
    _check_locate(work, torchzip.archive_bytes(pkl, bytes(range(24))))
