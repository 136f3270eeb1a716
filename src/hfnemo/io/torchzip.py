"""torch.save archives, written as a stream and read by offset, without torch.save/torch.load.

A DCP chunk is a complete ``torch.save(tensor)`` zip archive (spec §2.2). torch's writer
(caffe2/serialize/inline_container.cc) emits stored (uncompressed) records, each preceded by a
local header whose extra field pads the data to 64 bytes (an "FB" field of 'Z's), sizes and CRC
in a data descriptor *after* the data (flag bit 3), and always a zip64 end record. That layout
is naturally streamable: we write the header, then the tensor bytes in row blocks as they are
produced, then the descriptor. The bytes equal torch.save's except the serialization id.

Reading goes the other way: parse the central directory, unpickle ``data.pkl`` with an
unpickler that admits only ``_rebuild_tensor_v2`` and storage classes, and return where the raw
tensor bytes lie so that callers can pread exactly the rows they need.
"""
from __future__ import annotations

import io
import pickle
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from hfnemo.dtypes import BY_STORAGE, DType
from hfnemo.errors import CorruptCheckpoint
from hfnemo.io.fileio import ReplayMismatch, pread_into

ALIGN = 64
ARCHIVE = "archive"  # torch.save names the archive folder after the file; a stream gets "archive"
_U32 = 0xFFFFFFFF
_FLAGS = 0x0808  # bit 3: data descriptor follows; bit 11: UTF-8 names


# ------------------------------------------------------------------------------ CRC-32 of joined blocks
# The executor's workers compute each block's CRC-32 in parallel (zlib.crc32 releases the GIL);
# the archive joins them in order. A CRC is linear over GF(2): the CRC of A+B is the CRC of A
# carried through len(B) zero bytes, XOR the CRC of B. Carrying through n zero bytes is a
# multiplication by x^(8n) modulo the polynomial, done below with a table of x^(2^k).

_POLY = 0xEDB88320  # CRC-32 (zip), bit-reflected: bit 31 is x^0


def _mulmod(a: int, b: int) -> int:
    """a*b modulo the CRC polynomial, both bit-reflected."""
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


_X2K = [1 << 30]  # x^1, x^2, x^4, ... modulo the polynomial
for _ in range(63):
    _X2K.append(_mulmod(_X2K[-1], _X2K[-1]))


def crc32_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """zlib.crc32(A + B) from zlib.crc32(A), zlib.crc32(B) and len(B)."""
    shift, k, n = 1 << 31, 3, len_b  # x^(8 n): bit j of n contributes x^(2^(j+3))
    while n:
        if n & 1:
            shift = _mulmod(_X2K[k], shift)
        n >>= 1
        k += 1
    return _mulmod(shift, crc_a) ^ crc_b


def _flags(size: int) -> int:
    # miniz writes an empty record with sizes and CRC in the header (all zero), no descriptor.
    return 0x0800 if size == 0 else _FLAGS


def _local_header(name: bytes, cursor: int, size: int) -> bytes:
    """Local file header + name + extra (zip64 sizes when needed, then FB padding to ALIGN)."""
    zip64 = b""
    if size >= _U32 or cursor >= _U32:
        body = b""
        if size >= _U32:
            body += struct.pack("<QQ", size, size)
        if cursor >= _U32:
            body += struct.pack("<Q", cursor)
        zip64 = struct.pack("<HH", 1, len(body)) + body
    start = cursor + 30 + len(name) + len(zip64) + 4
    pad = -start % ALIGN
    extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
    csize = _U32 if size >= _U32 else 0
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, _flags(size), 0, 0, 0, 0, csize, csize,
                       len(name), len(extra)) + name + extra


def _descriptor(crc: int, size: int) -> bytes:
    if size >= _U32:
        return struct.pack("<4sIQQ", b"PK\x07\x08", crc, size, size)
    return struct.pack("<4sIII", b"PK\x07\x08", crc, size, size)


def _central_entry(name: bytes, crc: int, size: int, offset: int) -> bytes:
    body = b""
    if size >= _U32:
        body += struct.pack("<QQ", size, size)
    if offset >= _U32:
        body += struct.pack("<Q", offset)
    extra = struct.pack("<HH", 1, len(body)) + body if body else b""
    s32 = _U32 if size >= _U32 else size
    o32 = _U32 if offset >= _U32 else offset
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, _flags(size), 0, 0, 0, crc, s32, s32,
                       len(name), len(extra), 0, 0, 0, 0, o32) + name + extra


def _end_records(n: int, cd_offset: int, cd_size: int) -> bytes:
    eocd64_offset = cd_offset + cd_size
    out = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 45, 0, 0, n, n, cd_size, cd_offset)
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64_offset, 1)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), min(cd_size, _U32), min(cd_offset, _U32), 0)
    return out


class _Global:
    """A reference to ``module.name`` that pickles as that global (GLOBAL opcode) without importing
    ``module``: torch.save's pickles name torch's rebuild function and storage classes, and a CPU
    conversion writes them without torch (:class:`_StubPickler` writes the opcode itself)."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: object) -> None:  # (the pickler asks that a reduce callable be callable)
        raise TypeError(f"{self.module}.{self.name} is a pickle reference, not the function")


_GLOBALS: dict[tuple[str, str], _Global] = {}


def _global(module: str, name: str) -> _Global:
    """One instance per global, so that the pickler's memo refers back to it as it would to the
    real object (BINGET after the first GLOBAL)."""
    return _GLOBALS.setdefault((module, name), _Global(module, name))


class _TensorStub:
    """Pickles exactly like torch.save pickles a contiguous CPU tensor, without having one."""

    def __init__(self, dtype: DType, shape: tuple[int, ...]) -> None:
        self.dtype = dtype
        self.shape = shape

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (_global("torch._utils", "_rebuild_tensor_v2"),
                (_StorageStub(self.dtype, _numel(self.shape)), 0, tuple(self.shape),
                 _contiguous_strides(self.shape), False, OrderedDict()))


class _StorageStub:
    def __init__(self, dtype: DType, numel: int) -> None:
        self.dtype = dtype
        self.numel = numel
        self.key = "0"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


class _StubPickler(pickle._Pickler):  # the Python pickler: its dispatch table takes _Global
    """Numbers storages "0", "1", ... in the order the pickle meets them, as torch.save does, and
    writes :class:`_Global` references as the globals they name. Protocol 2 output of the Python
    pickler is the C pickler's byte for byte (checked against torch.save in tests/test_dcp_io)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.storages: list[_StorageStub] = []

    def _save_global_ref(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + obj.module.encode("utf-8") + b"\n" + obj.name.encode("utf-8") + b"\n")
        self.memoize(obj)

    dispatch[_Global] = _save_global_ref

    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _StorageStub):
            if obj not in self.storages:
                obj.key = str(len(self.storages))
                self.storages.append(obj)
            return ("storage", _global("torch", obj.dtype.storage), obj.key, "cpu", obj.numel)
        return None


def tensor_pickle(dtype: DType, shape: tuple[int, ...]) -> bytes:
    """data.pkl of ``torch.save(t)`` for a contiguous CPU tensor of this dtype and shape."""
    buf = io.BytesIO()
    _StubPickler(buf, protocol=2).dump(_TensorStub(dtype, shape))
    return buf.getvalue()


def tensor_stub(dtype: DType, shape: tuple[int, ...]) -> _TensorStub:
    """A placeholder that pickles like a contiguous CPU tensor (for :func:`state_pickle`)."""
    return _TensorStub(dtype, tuple(shape))


def state_pickle(obj: object) -> tuple[bytes, list[tuple[str, int]]]:
    """data.pkl of ``torch.save(obj)`` where ``obj`` holds :func:`tensor_stub` placeholders (a state
    dict, Megatron's checkpoint dict). Returns the pickle and, in storage-key order (the order
    torch.save writes the ``data/<key>`` records), each storage's key and byte size. Every stub
    gets its own storage: tensors written from a plan never share one."""
    buf = io.BytesIO()
    p = _StubPickler(buf, protocol=2)
    p.dump(obj)
    return buf.getvalue(), [(s.key, s.numel * s.dtype.itemsize) for s in p.storages]


def object_pickle(obj: object) -> bytes:
    """data.pkl for plain Python objects without tensors (e.g. ``[None]`` for _extra_state)."""
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


class ArchiveWriter:
    """Streams one torch.save-compatible archive to ``fd`` at its current position.

    Usage: ``w = ArchiveWriter(sink, pkl, data_size)``; ``w.write(block)`` until data_size
    bytes; ``w.finish()`` returns the archive length. ``sink`` writes bytes fully (a file
    descriptor's write_all, or BytesIO.write). Alignment is relative to the archive start, as in
    torch (a DCP file holds archives back to back at arbitrary offsets).

    An archive of many tensors (a state dict): ``ArchiveWriter(sink, pkl, None)``, then for every
    storage in key order ``begin_record(key, size)``, ``write(...)``, ``end_record()``.

    Resume: ``skip(n, crc)`` stands for ``n`` data bytes the file already holds (``skip_sink(n)``
    accounts for them) whose CRC-32 up to that point was ``crc`` (kept in the journal).
    """

    def __init__(self, sink: Callable[[bytes | memoryview], object], pkl: bytes, data_size: int | None,
                 skip_sink: Callable[[int], object] | None = None) -> None:
        self.sink = sink
        self.skip_sink = skip_sink
        self.pos = 0
        self.central: list[bytes] = []
        self._crcs: list[int] = []
        self._small(b"data.pkl", pkl)
        self._small(b".format_version", b"1")
        self._small(b".storage_alignment", b"64")
        self._small(b"byteorder", b"little")
        self._rec: list[int] | None = None  # [size, done, crc] of the open storage record
        if data_size is not None:
            self.begin_record("0", data_size)

    def _name(self, name: bytes) -> bytes:
        return ARCHIVE.encode() + b"/" + name

    def _emit(self, data: bytes | memoryview) -> None:
        self.sink(data)
        self.pos += len(data)

    def _open(self, name: bytes, size: int) -> None:
        self._record_name = self._name(name)
        self._record_offset = self.pos
        self._emit(_local_header(self._record_name, self.pos, size))

    def _close(self, crc: int, size: int) -> None:
        if size:
            self._emit(_descriptor(crc, size))
        self.central.append(_central_entry(self._record_name, crc, size, self._record_offset))
        self._crcs.append(crc)

    def _small(self, name: bytes, data: bytes) -> None:
        self._open(name, len(data))
        self._emit(data)
        self._close(zlib.crc32(data), len(data))

    def begin_record(self, key: str, size: int) -> None:
        """Open storage record ``data/<key>`` of ``size`` bytes; write() then fills it."""
        if self._rec is not None:
            raise AssertionError("the previous storage record is still open")
        self._open(b"data/" + key.encode(), size)
        self._rec = [size, 0, 0]

    def write(self, block: memoryview | bytes, crc: int | None = None) -> None:
        """Append tensor bytes (any block size). ``crc``: the block's own CRC-32, computed
        elsewhere (a worker thread); without it the CRC is computed here as the bytes pass."""
        view = memoryview(block).cast("B")
        rec = self._rec
        rec[2] = zlib.crc32(view, rec[2]) if crc is None else crc32_combine(rec[2], crc, len(view))
        self._emit(view)
        rec[1] += len(view)

    @property
    def data_crc(self) -> int | None:
        """CRC-32 of the open storage record's bytes so far (None when no record is open)."""
        return self._rec[2] if self._rec is not None else None

    def skip(self, n: int, crc: int) -> None:
        """``n`` bytes of the open record are already written (resume); ``crc`` covers the record so far."""
        if self.skip_sink is None or self._rec is None:
            raise AssertionError("skip() needs a skip_sink and an open record")
        if crc is None:
            raise ReplayMismatch("the journal has no CRC for a record the archive still needs")
        self.skip_sink(n)
        self.pos += n
        self._rec[1] += n
        self._rec[2] = crc

    def end_record(self) -> None:
        size, done, crc = self._rec
        if done != size:
            raise AssertionError(f"archive got {done} of {size} data bytes")
        self._close(crc, size)
        self._rec = None

    def finish(self) -> int:
        if self._rec is not None:
            self.end_record()
        self._small(b"version", b"3\n")
        # torch writes a random id; ours is derived from the content so reruns give equal bytes.
        sid = f"{zlib.crc32(b''.join(c.to_bytes(4, 'little') for c in self._crcs)):020d}{self.pos:020d}"
        self._small(b".data/serialization_id", sid.encode())
        cd_offset = self.pos
        cd = b"".join(self.central)
        self._emit(cd)
        self._emit(_end_records(len(self.central), cd_offset, len(cd)))
        return self.pos


def archive_bytes(pkl: bytes, data: bytes | None = None) -> bytes:
    """A whole small archive in memory (extra_state blobs, tests)."""
    out = io.BytesIO()
    writer = ArchiveWriter(out.write, pkl, None if data is None else len(data))
    if data is not None:
        writer.write(data)
    writer.finish()
    return out.getvalue()


# ----------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class StoredTensor:
    """Where a torch.save archive keeps its tensor: absolute file offset of element 0."""

    dtype: DType
    shape: tuple[int, ...]
    offset: int  # absolute offset in the containing file of the first element
    nbytes: int


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a plain tensor archive holds; anything else is refused, never called."""

    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
                ("torch", "Size")}

    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        if module == "torch" and name in BY_STORAGE:
            return ("storage-class", name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise CorruptCheckpoint(f"tensor archive pickles {module}.{name}, which a tensor never needs",
                                file=self.path, fix="the checkpoint is corrupt or hostile: do not use it")

    def persistent_load(self, pid: object) -> object:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], tuple) or not isinstance(pid[2], str)):
            raise CorruptCheckpoint(f"unexpected storage reference {pid!r}", file=self.path,
                                    fix="the checkpoint is corrupt: re-create it")
        return ("storage", BY_STORAGE[pid[1][1]], pid[2], pid[4])


def _rebuild(storage: object, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
             *_rest: object) -> tuple[object, ...]:
    return ("tensor", storage, storage_offset, tuple(size), tuple(stride))


def _read_exact(fd: int, offset: int, n: int, path: str) -> bytes:
    buf = bytearray(n)
    pread_into(fd, memoryview(buf), offset, path=path)
    return bytes(buf)


class _Archive:
    """The central directory of one torch archive at ``[offset, offset+length)`` of ``fd``."""

    def __init__(self, fd: int, offset: int, length: int, path: str, what: str, max_entries: int) -> None:
        self.fd, self.offset, self.length, self.path, self.what = fd, offset, length, path, what
        try:
            self._parse(max_entries)
        except struct.error as e:  # a field cut short by a corrupt length
            raise self.bad(f"zip structure is truncated or corrupt ({e})") from e

    def _parse(self, max_entries: int) -> None:
        fd, offset, length, path = self.fd, self.offset, self.length, self.path
        if length < 22:
            raise self.bad(f"chunk of {length} bytes is too small to be a torch archive")
        tail_len = min(length, 22 + 20 + 56 + 65535)
        tail = _read_exact(fd, offset + length - tail_len, tail_len, path)
        eocd = tail.rfind(b"PK\x05\x06")
        if eocd < 0:
            raise self.bad("no zip end-of-central-directory record in the chunk")
        _, _, _, _, n_entries, cd_size, cd_off, _ = struct.unpack("<4sHHHHIIH", tail[eocd:eocd + 22])
        if cd_off == _U32 or cd_size == _U32 or n_entries == 0xFFFF:
            loc = tail.rfind(b"PK\x06\x07", 0, eocd)
            if loc < 0:
                raise self.bad("zip64 end record missing")
            (eocd64_off,) = struct.unpack("<Q", tail[loc + 8:loc + 16])
            if eocd64_off + 56 > length:
                raise self.bad("zip64 end record lies outside the chunk")
            rec = _read_exact(fd, offset + eocd64_off, 56, path)
            if rec[:4] != b"PK\x06\x06":
                raise self.bad("zip64 end record is corrupt")
            n_entries, _, cd_size, cd_off = struct.unpack("<QQQQ", rec[24:56])
        if cd_off + cd_size > length or n_entries > max_entries:
            raise self.bad("central directory lies outside the chunk")
        cd = _read_exact(fd, offset + cd_off, cd_size, path)
        self.entries: dict[str, tuple[int, int]] = {}
        p = 0
        for _ in range(n_entries):
            if cd[p:p + 4] != b"PK\x01\x02":
                raise self.bad("central directory entry is corrupt")
            (method, csize, usize, nlen, elen, clen, loff) = (
                struct.unpack("<H", cd[p + 10:p + 12])[0], *struct.unpack("<II", cd[p + 20:p + 28]),
                *struct.unpack("<HHH", cd[p + 28:p + 34]), struct.unpack("<I", cd[p + 42:p + 46])[0])
            name = cd[p + 46:p + 46 + nlen].decode("utf-8", "replace")
            extra = cd[p + 46 + nlen:p + 46 + nlen + elen]
            if method != 0:
                raise self.bad(f"record {name} is compressed; torch archives store records uncompressed")
            if usize == _U32 or loff == _U32:
                q = 0
                while q + 4 <= len(extra):
                    hid, hlen = struct.unpack("<HH", extra[q:q + 4])
                    if hid == 1:
                        vals = extra[q + 4:q + 4 + hlen]
                        k = 0
                        if usize == _U32:
                            usize = struct.unpack("<Q", vals[k:k + 8])[0]
                            k += 16
                        if loff == _U32:
                            loff = struct.unpack("<Q", vals[k:k + 8])[0]
                    q += 4 + hlen
            self.entries[name.split("/", 1)[-1]] = (loff, usize)
            p += 46 + nlen + elen + clen

    def bad(self, msg: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(msg, file=self.path, tensor=self.what, fix="the checkpoint is corrupt: re-create it")

    def data_start(self, rec: str) -> tuple[int, int]:
        """Absolute offset and size of record ``rec``'s bytes."""
        if rec not in self.entries:
            raise self.bad(f"archive has no record {rec!r}")
        loff, usize = self.entries[rec]
        if loff + 30 > self.length:
            raise self.bad(f"local header of {rec!r} lies outside the chunk")
        lh = _read_exact(self.fd, self.offset + loff, 30, self.path)
        if lh[:4] != b"PK\x03\x04":
            raise self.bad(f"local header of {rec!r} is corrupt")
        nlen, elen = struct.unpack("<HH", lh[26:30])
        start = loff + 30 + nlen + elen
        if start + usize > self.length:
            raise self.bad(f"record {rec!r} runs past the end of the chunk")
        return self.offset + start, usize

    def unpickle(self, unpickler: Callable[[bytes, str], pickle.Unpickler], max_bytes: int) -> object:
        pkl_at, pkl_len = self.data_start("data.pkl")
        if pkl_len > max_bytes:
            raise self.bad(f"data.pkl of {pkl_len} bytes is implausibly large")
        try:
            return unpickler(_read_exact(self.fd, pkl_at, pkl_len, self.path), self.path).load()
        except CorruptCheckpoint as e:
            if e.tensor is None:  # the unpickler knows the file, not which tensor the chunk holds
                e.tensor = self.what
            raise
        except Exception as e:  # malformed pickle streams raise a zoo of exception types
            raise self.bad(f"data.pkl does not unpickle: {e}") from e


def _is_index(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def locate_tensor(fd: int, offset: int, length: int, *, path: str = "?", what: str = "?") -> StoredTensor:
    """Find the tensor bytes of the archive stored at ``[offset, offset+length)`` of ``fd``."""
    arc = _Archive(fd, offset, length, path, what, 64)
    obj = arc.unpickle(_RestrictedUnpickler, 1 << 20)
    if not (isinstance(obj, tuple) and len(obj) == 5 and obj[0] == "tensor"):
        raise arc.bad("chunk does not hold a single tensor")
    _, storage, soff, size, stride = obj
    if not (isinstance(storage, tuple) and len(storage) == 4 and storage[0] == "storage"
            and isinstance(storage[1], DType) and isinstance(storage[2], str)
            and isinstance(size, tuple) and isinstance(stride, tuple) and _is_index(soff)
            and all(_is_index(d) for d in size) and all(_is_index(d) for d in stride)):
        raise arc.bad("chunk's tensor record is malformed (storage, offset, size or stride)")
    _, dtype, key, _numel_s = storage
    if stride != _contiguous_strides(size) and _numel(size) > 1:
        raise arc.bad(f"chunk tensor is not contiguous (stride {stride})")
    nbytes = _numel(size) * dtype.itemsize
    if nbytes == 0:
        return StoredTensor(dtype, size, offset, 0)
    data_at, data_len = arc.data_start(f"data/{key}")
    if soff * dtype.itemsize + nbytes > data_len:
        raise arc.bad(f"tensor needs {nbytes} bytes but its storage record holds {data_len}")
    return StoredTensor(dtype, size, data_at + soff * dtype.itemsize, nbytes)


# ------------------------------------------------------------------ archives holding a dict of tensors

@dataclass(frozen=True)
class ArchivedTensor:
    """A tensor met while unpickling a dict archive: where its storage lies, not its bytes."""

    dtype: DType
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    key: str  # storage record data/<key>
    storage_offset: int  # in elements


class InertObject:
    """Stand-in for an admitted non-tensor class (argparse.Namespace, Megatron enums): keeps its
    pickled attributes as data, runs no code."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) form
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str) and k != "args"})
        else:
            self.state = state


class _DictUnpickler(_RestrictedUnpickler):
    """For whole checkpoints (torch.save of a state dict or Megatron's dict): tensors, plain
    containers, and the classes ``inert`` names as inert stubs. Everything else is refused."""

    def __init__(self, data: bytes, path: str, inert: Callable[[str, str], bool]) -> None:
        super().__init__(data, path)
        self.inert = inert

    def find_class(self, module: str, name: str) -> object:
        import torch

        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_ref
        if (module, name) == ("torch", "Size"):
            return tuple
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("builtins", "set") or (module, name) == ("builtins", "frozenset"):
            return {"set": set, "frozenset": frozenset}[name]
        if self.inert(module, name):
            return type(name, (InertObject,), {"__module__": "hfnemo.inert." + module})
        return super().find_class(module, name)


def _rebuild_ref(storage: object, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                 *_rest: object) -> ArchivedTensor:
    _, dtype, key, _numel_s = storage
    return ArchivedTensor(dtype, tuple(size), tuple(stride), key, int(storage_offset))


def read_archive(fd: int, length: int, *, path: str = "?", inert: Callable[[str, str], bool] = lambda m, n: False,
                 max_pickle: int = 256 << 20, offset: int = 0) -> tuple[object, Callable[[ArchivedTensor], StoredTensor]]:
    """Unpickle the data.pkl of a torch archive (no tensor bytes are read): the whole file, or the
    ``length`` bytes at ``offset`` (a member of a ``.nemo`` tar).

    Returns the object, with every tensor as an :class:`ArchivedTensor`, and a function giving where
    a tensor's bytes lie (absolute file offsets; checked to be contiguous and inside its storage record)."""
    arc = _Archive(fd, offset, length, path, "data.pkl", 1 << 24)
    obj = arc.unpickle(lambda data, p: _DictUnpickler(data, p, inert), max_pickle)

    def locate(t: ArchivedTensor) -> StoredTensor:
        if t.stride != _contiguous_strides(t.shape) and _numel(t.shape) > 1:
            raise arc.bad(f"a tensor of shape {t.shape} is not contiguous (stride {t.stride})")
        nbytes = _numel(t.shape) * t.dtype.itemsize
        data_at, data_len = arc.data_start(f"data/{t.key}")
        if (t.storage_offset * t.dtype.itemsize) + nbytes > data_len:
            raise arc.bad(f"a tensor needs {nbytes} bytes but its storage record holds {data_len}")
        return StoredTensor(t.dtype, t.shape, data_at + t.storage_offset * t.dtype.itemsize, nbytes)

    return obj, locate
