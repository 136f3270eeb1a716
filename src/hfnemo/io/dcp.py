"""torch.distributed.checkpoint (DCP) on disk: the ``.metadata`` index and ``.distcp`` files.

Written by hand, streaming (spec §2): every tensor chunk is a torch.save archive written by
:class:`hfnemo.io.torchzip.ArchiveWriter`; BYTE_IO items are raw bytes. ``.metadata`` is a pickle
of torch's own dataclasses, so torch's ``FileSystemReader`` reads what we write. Reading a
``.metadata`` that strangers wrote uses an unpickler that admits only DCP's metadata classes (and
inert stubs for Megatron's plan classes, which NeMo checkpoints pickle); chunk bytes are never
unpickled except their tiny ``data.pkl``, through torchzip's restricted unpickler.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from hfnemo.lazy import LazyModule, prewarm

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # reading .metadata never needs it; writing it does, at the end

# torch.distributed.checkpoint costs 0.6 s to import here and 3.5 s on a CUDA build of torch (most
# of it torch.distributed.tensor): imported on first use, and in a background thread as soon as a
# DcpWriter exists (prewarm), so that a conversion's wall time does not include it.
dcp_md = LazyModule("torch.distributed.checkpoint.metadata")
_dcp_fs = LazyModule("torch.distributed.checkpoint.filesystem")
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
# what importing them adds to the resident size (44 MiB measured with torch 2.13 CPU), reserved in
# the memory budget while the import may still be under way
DCP_IMPORT_RESERVE = 64 << 20
# what `import torch` itself adds, when a CPU conversion has not imported it (the prewarm then
# imports it too): 213 MiB of PSS measured with torch 2.13 CPU, TORCH_CUDA_IMPORT_RESERVE for a
# CUDA build of torch (found on disk without importing it)
TORCH_IMPORT_RESERVE = 256 << 20
TORCH_CUDA_IMPORT_RESERVE = 576 << 20  # torch 2.11.0+cu130 on the H200 machine: 492 MiB (530 with DCP)


def torch_import_reserve() -> int:
    """What importing torch will add to this process's resident size: 0 once it is imported. A
    memory budget set before torch is imported counts it (a conversion that never imports torch
    is the more conservative for it, as it was when torch was imported first)."""
    if "torch" in sys.modules:
        return 0
    return _installed_torch_reserve()


@functools.lru_cache(maxsize=1)
def _installed_torch_reserve() -> int:
    """TORCH_CUDA_IMPORT_RESERVE for a CUDA build of the installed torch, else TORCH_IMPORT_RESERVE
    (looked up on disk once)."""
    import importlib.machinery

    try:  # where torch is installed, found without importing it (and without import hooks)
        spec = importlib.machinery.PathFinder.find_spec("torch")
    except (ImportError, ValueError):
        return TORCH_IMPORT_RESERVE
    for loc in (spec.submodule_search_locations or []) if spec else []:
        lib = os.path.join(loc, "lib")
        try:
            if any(n.startswith("libtorch_cuda") for n in os.listdir(lib)):
                return TORCH_CUDA_IMPORT_RESERVE
        except OSError:
            pass
    return TORCH_IMPORT_RESERVE


def _writes_metadata() -> bool:
    """Of several ranks writing one checkpoint (hfnemo.dist), rank 0 alone writes .metadata."""
    from hfnemo.dist import rank

    return rank() == 0


def prewarm_writer() -> int:
    """Start importing torch's DCP classes in the background (a writer needs them for .metadata);
    returns the bytes the caller's memory budget should reserve for that import, torch's own
    included when it is not imported yet (0 once loaded)."""
    if all(m in sys.modules for m in _DCP_MODULES) or not _writes_metadata():
        return 0
    from hfnemo import torchside

    reserve = DCP_IMPORT_RESERVE + torch_import_reserve()
    if os.environ.get("HFNEMO_PREWARM", "1") == "0":  # import at the end, in the writer (A/B runs)
        return reserve
    if "torch" not in sys.modules and torchside.start():
        return reserve  # a helper process imports torch and will write .metadata (hfnemo.torchside)
    prewarm(*_DCP_MODULES)
    return reserve


def pending_import_bytes() -> int:
    """What a prewarm started by :func:`prewarm_writer` will still add (torch and its DCP classes),
    else 0."""
    from hfnemo import lazy, torchside

    if torchside.running():  # its memory is the tree's until the end
        return DCP_IMPORT_RESERVE + torch_import_reserve()
    if all(m in sys.modules for m in _DCP_MODULES) or not any(m in lazy._started for m in _DCP_MODULES):
        return 0
    return DCP_IMPORT_RESERVE + torch_import_reserve()

from hfnemo.dtypes import BY_TORCH, BY_TORCH_NAME, DType
from hfnemo.errors import CorruptCheckpoint
from hfnemo.io.fileio import OutFile
from hfnemo.io.torchzip import ArchiveWriter, StoredTensor, locate_tensor, tensor_pickle


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a global tensor, located by its global offsets."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # relative path inside the weights directory
    offset: int  # byte offset of its torch.save archive in that file
    length: int


@dataclass(frozen=True)
class GlobalTensor:
    fqn: str
    dtype: DType
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass
class DcpIndex:
    """What a ``.metadata`` says: global tensors with their chunks, and the byte-blob keys."""

    root: Path
    tensors: dict[str, GlobalTensor] = field(default_factory=dict)
    byte_keys: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- reading

class _MegatronStub:
    """Inert stand-in for Megatron classes pickled into .metadata (MCoreSavePlan, ...)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


_DCP_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"},
    "torch.distributed._shard.sharded_tensor.metadata": {"TensorProperties", "MEM_FORMAT_ENCODING"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict"},
    # torch's FileSystemWriter records storage_meta.checkpoint_id as a path object (torch >= 2.4)
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BufferedIOBase, path: str) -> None:
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _DCP_ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module.split(".")[0] in ("megatron", "nemo"):
            return type(name, (_MegatronStub,), {"__module__": module})
        raise CorruptCheckpoint(
            f".metadata pickles {module}.{name}, which a DCP index never needs; refusing to load it",
            file=self.path, fix="the checkpoint is corrupt or hostile: do not use it")


class _Record:
    """Stand-in for a DCP metadata class when reading: keeps the pickled state as attributes
    (no torch.distributed import: 0.6-3.5 s). Dataclasses pickle their ``__dict__``; torch's
    TensorProperties pickles a tuple (dtype first)."""

    _TUPLE_FIELDS: tuple[str, ...] = ()

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.__dict__.update(kwargs)

    def __setstate__(self, state: object) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            self.__dict__.update(state[1])  # (None, slots-dict) of slotted dataclasses
            if isinstance(state[0], dict):
                self.__dict__.update(state[0])
        elif isinstance(state, tuple):
            self.__dict__.update(zip(self._TUPLE_FIELDS, state))


class _TensorPropertiesRecord(_Record):
    _TUPLE_FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")


def _passthrough(*args: object) -> object:
    """Stand-in for enum lookups / _get_layout(name): the argument itself."""
    return args[0] if args else None


_RECORD_CLASSES: dict[str, type] = {}


def _record_class(module: str, name: str) -> object:
    if name in ("_MEM_FORMAT_ENCODING", "MEM_FORMAT_ENCODING", "_get_layout"):
        return _passthrough
    key = f"{module}.{name}"
    cls = _RECORD_CLASSES.get(key)
    if cls is None:
        base = _TensorPropertiesRecord if name == "TensorProperties" else _Record
        cls = _RECORD_CLASSES[key] = type(name, (base,), {"__module__": "hfnemo.io.dcp.records", "dcp_name": name})
    return cls


class _DtypeRef:
    """Stand-in for a torch dtype pickled into .metadata: str() is torch's ("torch.bfloat16"), so
    hfnemo.dtypes.BY_TORCH finds it without importing torch."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return f"torch.{self.name}"

    __repr__ = __str__


_DTYPE_REFS: dict[str, _DtypeRef] = {}


class _FastMetadataUnpickler(_MetadataUnpickler):
    """The same allow-list, but DCP classes become :class:`_Record` stand-ins, torch.Size a tuple
    and the dtypes hfnemo knows :class:`_DtypeRef`: no torch import."""

    def find_class(self, module: str, name: str) -> object:
        if name in _DCP_ALLOWED.get(module, ()) and module not in ("torch", "collections", "builtins", "pathlib"):
            return _record_class(module, name)
        if module == "torch":
            if name == "Size":
                return tuple
            if name in BY_TORCH_NAME:
                return _DTYPE_REFS.setdefault(name, _DtypeRef(name))
        return super().find_class(module, name)


def _dcp_name(obj: object) -> str:
    return getattr(type(obj), "dcp_name", type(obj).__name__)


def read_index(weights_dir: str | Path) -> DcpIndex:
    """Parse ``weights_dir/.metadata`` safely and check every chunk lies inside its file."""
    root = Path(weights_dir)
    mpath = root / ".metadata"
    try:
        with open(mpath, "rb") as f:
            md = _FastMetadataUnpickler(f, str(mpath)).load()
    except FileNotFoundError as e:
        raise CorruptCheckpoint("no .metadata: not a torch distributed checkpoint", file=mpath,
                                fix="point hfnemo at the checkpoint directory that holds weights/.metadata") from e
    except CorruptCheckpoint:
        raise
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise CorruptCheckpoint(f".metadata does not unpickle: {e}", file=mpath,
                                fix="the checkpoint is corrupt: re-create or re-copy it") from e
    if _dcp_name(md) != "Metadata" or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise CorruptCheckpoint(".metadata does not hold a DCP Metadata object", file=mpath,
                                fix="the checkpoint is corrupt: re-create it")
    try:
        return _index_from(md, root, mpath)
    except CorruptCheckpoint:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        # a pickle of the right classes can still hold values of any type
        raise CorruptCheckpoint(f".metadata holds malformed values ({type(e).__name__}: {str(e)[:200]})",
                                file=mpath, fix="the checkpoint is corrupt: re-create or re-copy it") from e


def _is_index(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _index_from(md: dcp_md.Metadata, root: Path, mpath: Path) -> DcpIndex:
    storage: dict[tuple, object] = {}
    for k, v in (getattr(md, "storage_data", None) or {}).items():  # MetadataIndex equality: (fqn, offset)
        off = getattr(k, "offset", None)
        storage[(getattr(k, "fqn", None), tuple(off) if off is not None else None)] = v
    sizes: dict[str, int] = {}
    index = DcpIndex(root)
    for fqn, meta in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise CorruptCheckpoint(f"state dict key {fqn!r} is not a string", file=mpath,
                                    fix="the checkpoint is corrupt: re-create it")
        if _dcp_name(meta) == "BytesStorageMetadata":
            index.byte_keys.append(fqn)
            continue
        dtype = BY_TORCH.get(meta.properties.dtype)
        if dtype is None:
            raise CorruptCheckpoint(f"unsupported dtype {meta.properties.dtype}", file=mpath, tensor=fqn,
                                    fix="hfnemo converts floating-point and integer tensors only")
        shape = tuple(meta.size)
        if not all(_is_index(d) for d in shape):
            raise CorruptCheckpoint(f"tensor size {shape!r} is not a list of non-negative integers", file=mpath,
                                    tensor=fqn, fix="the checkpoint is corrupt: re-create it")
        chunks = []
        for i, c in enumerate(meta.chunks):
            c_off, c_size = tuple(c.offsets), tuple(c.sizes)
            if (len(c_off) != len(shape) or len(c_size) != len(shape)
                    or not all(_is_index(o) and _is_index(n) and o + n <= d
                               for o, n, d in zip(c_off, c_size, shape))):
                raise CorruptCheckpoint(f"chunk at offsets {c_off!r} of sizes {c_size!r} does not fit the "
                                        f"tensor's size {shape}", file=mpath, tensor=fqn,
                                        fix="the checkpoint is corrupt: re-create it")
            info = storage.get((fqn, c_off))
            if info is None:
                raise CorruptCheckpoint(f"chunk at offsets {tuple(c.offsets)} has no storage entry", file=mpath,
                                        tensor=fqn, fix="the checkpoint is incomplete: re-create it")
            if (_dcp_name(info) != "_StorageInfo" or not isinstance(getattr(info, "relative_path", None), str)
                    or not _is_index(info.offset) or not _is_index(info.length)):
                raise CorruptCheckpoint(f"storage entry {info!r} is malformed", file=mpath, tensor=fqn,
                                        fix="the checkpoint is corrupt: re-create it")
            fpath = root / info.relative_path
            if (Path(info.relative_path).is_absolute() or ".." in Path(info.relative_path).parts
                    or not Path(info.relative_path).parts):
                raise CorruptCheckpoint(f"chunk points outside the checkpoint ({info.relative_path!r})",
                                        file=mpath, tensor=fqn, fix="the checkpoint is hostile: do not use it")
            if info.relative_path not in sizes:
                try:
                    if not fpath.is_file():
                        raise FileNotFoundError(2, "not a regular file")
                    sizes[info.relative_path] = os.path.getsize(fpath)
                except OSError as e:
                    raise CorruptCheckpoint("chunk file is missing", file=fpath, tensor=fqn,
                                            fix="copy the whole weights/ directory") from e
            if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[info.relative_path]:
                raise CorruptCheckpoint(
                    f"chunk bytes {info.offset}..{info.offset + info.length} lie outside the "
                    f"{sizes[info.relative_path]}-byte file", file=fpath, tensor=fqn,
                    fix="the file is truncated: re-copy the checkpoint")
            chunks.append(Chunk(c_off, c_size, info.relative_path, info.offset, info.length))
        index.tensors[fqn] = GlobalTensor(fqn, dtype, shape, tuple(chunks))
    return index


class ChunkLocator:
    """Finds (and caches) where each chunk's raw tensor bytes begin."""

    def __init__(self, index: DcpIndex) -> None:
        self.index = index
        self._cache: dict[tuple[str, int], StoredTensor] = {}

    def locate(self, fd: int, fqn: str, chunk: Chunk) -> StoredTensor:
        key = (chunk.file, chunk.offset)
        st = self._cache.get(key)
        if st is None:
            path = str(self.index.root / chunk.file)
            st = locate_tensor(fd, chunk.offset, chunk.length, path=path, what=fqn)
            if st.shape != chunk.sizes:
                raise CorruptCheckpoint(f"chunk holds shape {st.shape}, .metadata says {chunk.sizes}",
                                        file=path, tensor=fqn, fix="the checkpoint is corrupt: re-create it")
            self._cache[key] = st
        return st


# ----------------------------------------------------------------------------------- writing

class DcpWriter:
    """Writes its ``.distcp`` files (``names``) item by item, then ``.metadata`` last.

    Several writers may write one checkpoint (hfnemo.dist: one per process, each its own files):
    each closes its files (:meth:`close`), and one of them adds the others' ``storage_data`` to its
    own and writes ``.metadata`` (:meth:`write_metadata`).

    ``opener(path)`` opens each data file (default: a fresh :class:`OutFile`; the resume journal
    passes one that keeps the bytes a previous run wrote)."""

    def __init__(self, weights_dir: str | Path, names: list[str],
                 opener: Callable[[Path], OutFile] = OutFile) -> None:
        prewarm_writer()
        self.root = Path(weights_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.names = list(names)
        self.files = [opener(self.root / n) for n in self.names]
        self.pos = [0] * len(self.names)
        self.state_dict_metadata: dict[str, object] = {}
        self.storage_data: dict = {}

    def declare_tensor(self, fqn: str, dtype: DType, shape: tuple[int, ...],
                       chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        """Register a global tensor and its chunk list (in the order readers will see them)."""
        # plain records until finish() builds torch's DCP objects (see the lazy import above)
        self.state_dict_metadata[fqn] = ("tensor", dtype, tuple(shape), [(tuple(o), tuple(s)) for o, s in chunks])

    def declare_bytes(self, key: str) -> None:
        self.state_dict_metadata[key] = ("bytes",)

    def write_bytes(self, key: str, payload: bytes, file: int) -> None:
        start = self.pos[file]
        self.pos[file] += self.files[file].write(payload)
        self.storage_data[(key, None)] = (self.names[file], start, len(payload))

    def begin_tensor(self, fqn: str, offsets: tuple[int, ...], dtype: DType, shape: tuple[int, ...],
                     file: int) -> "_ChunkHandle":
        return _ChunkHandle(self, fqn, offsets, dtype, shape, file)

    def finish(self, checkpoint_id: str) -> None:
        self.close()
        self.write_metadata(checkpoint_id)

    def close(self) -> None:
        """fsync and close the data files (idempotent)."""
        for f in self.files:
            f.close(sync=True)

    def write_metadata(self, checkpoint_id: str) -> None:
        """``.metadata`` for every declared tensor, from ``storage_data`` (where each chunk is):
        by the torch helper process when it runs and torch is not imported here (hfnemo.torchside),
        else in this process."""
        from hfnemo import torchside

        torchside.run("hfnemo.io.dcp", "write_metadata_file", os.path.abspath(self.root), self.state_dict_metadata,
                      self.storage_data, checkpoint_id, needs=_DCP_MODULES)

    def abort(self) -> None:
        for f in self.files:
            f.abort()


class _ChunkHandle:
    def __init__(self, w: DcpWriter, fqn: str, offsets: tuple[int, ...], dtype: DType,
                 shape: tuple[int, ...], file: int) -> None:
        self.w, self.fqn, self.offsets, self.file = w, fqn, offsets, file
        self.start = w.pos[file]
        f = w.files[file]
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        self.archive = ArchiveWriter(f.write, tensor_pickle(dtype, shape), nbytes, f.skip)

    def write(self, block: memoryview | bytes, crc: int | None = None) -> None:
        self.archive.write(block, crc)

    def skip(self, n: int, crc: int | None) -> None:
        self.archive.skip(n, crc)

    def finish(self) -> None:
        length = self.archive.finish()
        self.w.pos[self.file] += length
        self.w.storage_data[(self.fqn, tuple(self.offsets))] = (self.w.names[self.file], self.start, length)


def write_metadata_file(root: str, state_dict_metadata: dict, storage_data: dict, checkpoint_id: str) -> None:
    """Build DCP's Metadata with torch's own classes and write ``root/.metadata`` (fsynced, atomic).
    ``state_dict_metadata``: fqn -> ("tensor", DType, shape, [(offsets, sizes)...]) or ("bytes",);
    ``storage_data``: (fqn, offsets or None) -> (file name, offset, length)."""
    root_p = Path(root)
    tensor_keys = [k for k, v in state_dict_metadata.items() if v[0] == "tensor"]
    sdm: dict[str, object] = {}
    for k, v in state_dict_metadata.items():
        if v[0] == "bytes":
            sdm[k] = dcp_md.BytesStorageMetadata()
            continue
        _, dtype, shape, chunks = v
        sdm[k] = dcp_md.TensorStorageMetadata(
            properties=dcp_md.TensorProperties(dtype=dtype.torch),
            size=torch.Size(shape),
            chunks=[dcp_md.ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(z)) for o, z in chunks])
    storage = {(dcp_md.MetadataIndex(k) if off is None else dcp_md.MetadataIndex(k, torch.Size(off))):
               _dcp_fs._StorageInfo(*info) for (k, off), info in storage_data.items()}
    md = dcp_md.Metadata(
        state_dict_metadata=sdm,
        planner_data=None,
        storage_data=storage,
        storage_meta=dcp_md.StorageMeta(checkpoint_id=checkpoint_id, save_id="", load_id=None),
    )
    # Megatron's loaders read per-key mcore_data with getattr(md, "mcore_data", {}); NVIDIA's
    # importer writes an empty dict per tensor key, so we do too.
    md.mcore_data = {k: {} for k in tensor_keys}
    # torch writes a random save_id; ours is a uuid4-shaped digest of the rest of the metadata,
    # so that a rerun (or a resumed run) writes the same bytes.
    md.storage_meta.save_id = str(uuid.UUID(bytes=hashlib.sha256(pickle.dumps(md)).digest()[:16], version=4))
    tmp = root_p / ".metadata.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(md, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root_p / ".metadata")
