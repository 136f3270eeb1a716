"""NeMo 1 ``.nemo`` files: the NeMo 1 directory packed into a tar, read in place and written streaming.

What NeMo 1 writes and reads (NVIDIA/NeMo ``nemo/core/connectors/save_restore_connector.py``
``_make_nemo_file_from_folder`` / ``_unpack_nemo_file``; ``nemo/collections/nlp/parts/nlp_overrides.py``
``NLPSaveRestoreConnector``): ``tarfile.open(path, "w:")`` then ``tar.add(folder, arcname=".")``, so
member names are ``./model_config.yaml``, ``./model_weights.ckpt`` (TP = PP = 1),
``./mp_rank_XX/model_weights.ckpt`` (TP > 1), ``./tp_rank_XX_pp_rank_YYY/model_weights.ckpt``
(PP > 1), artifacts ``./<hash>_<name>``, or a ``./model_weights/`` directory of torch-dist (DCP)
files (dist-ckpt models). NeMo >= 1.7 writes uncompressed tars; older ones gzip (``w:gz``); the
reader tries ``r:`` first, then ``r:gz``.

Reading: tar members are stored contiguously, so a member is a byte range of the tar file;
hfnemo's readers pread tensors straight out of it (:class:`Member` is what a reader opens: its
``__fspath__`` is the tar file, its ``offset`` where the member's data starts). Nothing is
extracted except the small artifacts (tokenizer files, configs), into a scratch directory that
lives as long as the :class:`NemoTar`. A gzip ``.nemo`` cannot be read in place: it is
decompressed once into a scratch ``.tar`` (streamed, bounded memory; disk = its uncompressed size).
A dist-ckpt model's ``model_weights/`` is indexed in place too (:func:`dcp_index`).

Writing: :class:`TarWriter` streams members into one file: a member's header is written first
(GNU format: the header's length never depends on the size, which a size over 8 GiB encodes in
base-256 in place), its data follows as it is produced, and the header is rewritten with the
final size when the member ends; :class:`NemoTarSink` is the executor sink that streams each
rank's ``torch.save`` archive as one member.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from hfnemo.dtypes import BY_NAME
from hfnemo.errors import CorruptCheckpoint, UsageError
from hfnemo.io.fileio import write_all
from hfnemo.io.torchzip import ArchiveWriter, state_pickle, tensor_stub

NEMO_SUFFIX = ".nemo"
# Artifacts and configs are extracted to scratch when at most this big (tokenizer.json of a
# 256k-vocabulary model is ~35 MB); anything larger stays in the tar.
SMALL_MEMBER = 256 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = 512


def member_name(name: str) -> str:
    """A member name as a relative path: NeMo's ``./mp_rank_00/model_weights.ckpt`` ->
    ``mp_rank_00/model_weights.ckpt`` (``.`` for the root entry)."""
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") or "."


@dataclass(frozen=True)
class Member:
    """One regular file inside a tar: bytes ``[offset, offset + size)`` of ``tar``.

    ``os.fspath(member)`` is the tar file (what a reader opens); ``str(member)`` names the member
    for messages (``model.nemo!mp_rank_00/model_weights.ckpt``)."""

    tar: Path
    name: str
    offset: int
    size: int

    def __fspath__(self) -> str:
        return str(self.tar)

    def __str__(self) -> str:
        return f"{self.tar}!{self.name}"

    def is_file(self) -> bool:
        return True


@dataclass
class NemoTar:
    """An opened ``.nemo``: its regular members by relative name, and the scratch directory that
    holds what had to be extracted (small artifacts; the decompressed tar of a gzip ``.nemo``)."""

    path: Path  # the .nemo as given
    data: Path  # the uncompressed tar the members' offsets refer to
    members: dict[str, Member]
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def read_bytes(self, name: str) -> bytes:
        m = self.members[name]
        with open(m.tar, "rb") as f:
            f.seek(m.offset)
            data = f.read(m.size)
        if len(data) != m.size:
            raise CorruptCheckpoint(f"member {name} ends {m.size - len(data)} bytes early", file=self.path,
                                    fix="the .nemo file is truncated: re-copy it")
        return data

    def scratch_dir(self) -> Path:
        if self.scratch is None:
            self.scratch = tempfile.TemporaryDirectory(prefix="hfnemo-nemo-")
        return Path(self.scratch.name)

    def extract(self, name: str) -> Path:
        """Member ``name`` copied into the scratch directory (for small files only)."""
        m = self.members[name]
        if m.size > SMALL_MEMBER:
            raise CorruptCheckpoint(f"member {name} is {m.size} bytes; only small artifacts are extracted",
                                    file=self.path, fix="this .nemo holds an unexpectedly large artifact")
        out = self.scratch_dir() / "files" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.read_bytes(name))
        return out

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None


def is_nemo_tar(p: Path) -> bool:
    """A regular file that is a tar (ustar/GNU magic) or, named ``*.nemo``, a gzip stream."""
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            head = f.read(_BLOCK)
    except OSError:
        return False
    if len(head) == _BLOCK and head[257:262] == b"ustar":
        return True
    return p.suffix == NEMO_SUFFIX and (head[:2] == _GZIP_MAGIC or len(head) == 0)


def wants_tar(dst: str | os.PathLike) -> bool:
    """Whether an output path names a ``.nemo`` file (written as a tar) rather than a directory."""
    return Path(dst).suffix == NEMO_SUFFIX


def open_tar(path: Path) -> NemoTar:
    """Index a ``.nemo``'s members from its tar headers (no member data is read)."""
    path = Path(path)
    scratch = None
    data = path
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == _GZIP_MAGIC:
        # gzip has no random access: decompress once into scratch, then read that in place.
        scratch = tempfile.TemporaryDirectory(prefix="hfnemo-nemo-")
        data = Path(scratch.name) / (path.stem + ".tar")
        try:
            with gzip.open(path, "rb") as src, open(data, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            scratch.cleanup()
            raise CorruptCheckpoint(f"gzip-compressed .nemo does not decompress: {e}", file=path,
                                    fix="the file is truncated or not a .nemo: re-copy it") from None
    members: dict[str, Member] = {}
    size = os.path.getsize(data)
    try:
        with tarfile.open(data, "r:") as tf:
            for ti in tf:
                name = member_name(ti.name)
                if not ti.isreg():
                    continue
                if ti.sparse is not None:
                    raise CorruptCheckpoint(f"member {name} is a sparse file", file=path,
                                            fix="re-pack the .nemo without --sparse")
                if ti.offset_data + ti.size > size:
                    raise CorruptCheckpoint(f"member {name} runs {ti.offset_data + ti.size - size} bytes past "
                                            "the end of the file", file=path,
                                            fix="the .nemo file is truncated: re-copy it")
                if name in members:
                    raise CorruptCheckpoint(f"member {name} appears twice", file=path,
                                            fix="re-pack the .nemo from its directory")
                members[name] = Member(data, name, ti.offset_data, ti.size)
    except tarfile.TarError as e:
        if scratch is not None:
            scratch.cleanup()
        raise CorruptCheckpoint(f"not a readable tar: {e}", file=path,
                                fix="the file is truncated or not a .nemo: re-copy it") from None
    return NemoTar(path, data, members, scratch)


# ------------------------------------------------------------------------------ writing

class TarWriter:
    """Streams tar members into ``fd`` (an empty regular file, written from offset 0).

    ``begin(name)`` writes a header, ``write(block)`` appends data, ``end()`` pads to 512 bytes and
    rewrites the header with the final size (pwrite); ``add_file``/``add_dir`` for whole entries;
    ``close()`` writes the two zero blocks that end an archive. Headers are GNU format with mtime
    0, uid/gid 0 and no owner names: reruns give byte-identical files."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self._open: tuple[str, int, int] | None = None  # name, header offset, header length
        self._size = 0

    @staticmethod
    def _header(name: str, size: int, kind: bytes, mode: int) -> bytes:
        ti = tarfile.TarInfo(name)
        ti.size, ti.type, ti.mode, ti.mtime = size, kind, mode, 0
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")

    def _emit(self, data: bytes | memoryview) -> None:
        self.pos += write_all(self.fd, data)

    def begin(self, name: str) -> None:
        if self._open is not None:
            raise AssertionError(f"tar member {self._open[0]} is still open")
        head = self._header(name, 0, tarfile.REGTYPE, 0o644)
        self._open = (name, self.pos, len(head))
        self._size = 0
        self._emit(head)

    def write(self, block: bytes | memoryview) -> None:
        self._size += len(memoryview(block).cast("B"))
        self._emit(block)

    def end(self) -> None:
        name, at, length = self._open
        head = self._header(name, self._size, tarfile.REGTYPE, 0o644)
        if len(head) != length:  # GNU headers depend on the name only
            raise AssertionError("tar header length changed with the member size")
        os.pwrite(self.fd, head, at)
        pad = -self._size % _BLOCK
        if pad:
            self._emit(bytes(pad))
        self._open = None

    def add_dir(self, name: str) -> None:
        self._emit(self._header(name, 0, tarfile.DIRTYPE, 0o755))

    def add_file(self, name: str, path: Path) -> None:
        self.begin(name)
        with open(path, "rb") as f:
            while True:
                chunk = f.read(8 << 20)
                if not chunk:
                    break
                self.write(chunk)
        self.end()

    def close(self) -> None:
        if self._open is not None:
            raise AssertionError(f"tar member {self._open[0]} is still open")
        self._emit(bytes(2 * _BLOCK))


def arcname(rel: str) -> str:
    """NeMo's member spelling for a path relative to the packed folder (``tar.add(d, arcname=".")``)."""
    return "." if rel in ("", ".") else f"./{rel}"


def add_tree(writer: TarWriter, root: Path, done_dirs: set[str]) -> None:
    """Every file under ``root`` as members (sorted, directories before their files, as tarfile's
    recursive add orders them)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir and rel_dir not in done_dirs:
            writer.add_dir(arcname(rel_dir))
            done_dirs.add(rel_dir)
        for fname in sorted(filenames):
            rel = f"{rel_dir}/{fname}" if rel_dir else fname
            writer.add_file(arcname(rel), Path(dirpath) / fname)


class NemoTarSink:
    """The executor sink for a ``.nemo`` tar: every planned rank file (``model_weights.ckpt``,
    ``mp_rank_XX/model_weights.ckpt``, ...) becomes one member holding a ``torch.save`` archive of
    the rank's state dict, streamed block by block as TorchSaveSink streams it into a file (the
    data.pkl first, written whole from the plan's dtypes and shapes, then each storage record)."""

    wants_crc = True

    def __init__(self, plan, writer: TarWriter, done_dirs: set[str],
                 wrap: Callable[[str, "OrderedDict[str, object]"], object] = lambda f, sd: sd) -> None:
        self.tar = writer
        self.wrap = wrap
        self.dirs = done_dirs
        self.by_file: dict[str, list] = {f: [] for f in plan.files}
        for it in plan.items:
            self.by_file.setdefault(it.file, []).append(it)
        self._file: str | None = None
        self._archive: ArchiveWriter | None = None
        self._keys: dict[int, str] = {}
        self.done: list[str] = []

    def _open(self, fname: str) -> None:
        items = self.by_file[fname]
        sd: OrderedDict[str, object] = OrderedDict()
        for it in items:
            sd[it.key] = tensor_stub(BY_NAME[it.dtype], it.shape)
        pkl, storages = state_pickle(self.wrap(fname, sd))
        if [n for _, n in storages] != [it.nbytes for it in items]:
            raise AssertionError(f"{fname}: pickled storages do not match the planned tensors")
        self._keys = {id(it): k for it, (k, _) in zip(items, storages)}
        parent = Path(fname).parent.as_posix()
        if parent != "." and parent not in self.dirs:
            self.tar.add_dir(arcname(parent))
            self.dirs.add(parent)
        self.tar.begin(arcname(fname))
        self._archive = ArchiveWriter(self.tar.write, pkl, None)
        self._file = fname

    def _close(self) -> None:
        if self._archive is not None:
            self._archive.finish()
            self.tar.end()
            self.done.append(self._file)
            self._archive, self._file = None, None

    def begin(self, item) -> None:
        if item.file != self._file:
            self._close()
            self._open(item.file)
        self._archive.begin_record(self._keys[id(item)], item.nbytes)

    def write(self, item, data: memoryview, crc: int | None = None) -> None:
        self._archive.write(data, crc)

    def end(self, item) -> None:
        self._archive.end_record()

    def finish(self) -> None:
        self._close()
        for fname in self.by_file:  # a rank file with no tensors still exists
            if fname not in self.done:
                self._open(fname)
                self._close()

    def abort(self) -> None:
        self._archive, self._file = None, None


def check_members(tar: NemoTar, names: Iterable[str]) -> None:
    missing = [n for n in names if n not in tar.members]
    if missing:
        raise CorruptCheckpoint(f"{len(missing)} member(s) missing from the .nemo: {', '.join(missing[:4])}",
                                file=tar.path, fix="re-create the .nemo with every rank's model_weights.ckpt")


def refuse_format(fmt: str | None, dst: Path) -> None:
    if fmt not in (None, "nemo1", "nemo1-dist", "nemo2"):
        raise UsageError(f"a {NEMO_SUFFIX} output is a NeMo 1 tar; --format {fmt} cannot be written into it",
                         file=dst, fix=f"use --format nemo1 or nemo1-dist, or an output path not ending in {NEMO_SUFFIX}")


# ------------------------------------------------------------------------------ NeMo 1 checkpoints

def open_nemo1_tar(path: Path):
    """A ``.nemo`` opened as :class:`hfnemo.io.legacy.LegacyCheckpoint`: rank files are
    :class:`Member` byte ranges of the tar, artifacts are extracted into scratch."""
    from hfnemo.io import legacy

    tar = open_tar(Path(path))
    try:
        if legacy.NEMO1_CONFIG not in tar.members:
            raise CorruptCheckpoint(f"the .nemo has no {legacy.NEMO1_CONFIG}", file=tar.path,
                                    fix="point at a NeMo 1 .nemo file (a tar of model_config.yaml and model weights)")
        cfg = legacy.nemo1_yaml(tar.read_bytes(legacy.NEMO1_CONFIG), tar.members[legacy.NEMO1_CONFIG])
        lay = legacy.nemo1_layout(cfg)
        names = {rank: legacy.nemo1_file(*rank, lay) for rank in lay.ranks()}
        dist = None
        if not any(n in tar.members for n in names.values()) and f"{legacy.NEMO1_DIST}/.metadata" in tar.members:
            dist, names = dcp_index(tar, legacy.NEMO1_DIST), {}
        check_members(tar, names.values())
        side = {}
        for name in sorted(tar.members):
            m = legacy._ARTIFACT.match(name)
            if m and "/" not in name:
                side[m.group(1)] = tar.extract(name)
        return legacy.LegacyCheckpoint("nemo1", tar.path, lay, {r: tar.members[n] for r, n in names.items()},
                                       cfg, side, tar=tar, dist=dist)
    except BaseException:
        tar.close()
        raise


def dcp_index(tar: NemoTar, folder: str):
    """The DCP index of the torch-dist directory ``folder`` inside the tar (a dist-ckpt model's
    ``model_weights/``), with every chunk located in the tar file itself: ``index.root`` is ``/`` and
    each chunk's file is the tar's path below it, its offset the member's data offset plus the
    chunk's. Each chunk is first checked to lie inside its own member."""
    import io
    import pickle

    from hfnemo.io import dcp

    mname = f"{folder}/.metadata"
    where = tar.members[mname]
    try:
        md = dcp._FastMetadataUnpickler(io.BytesIO(tar.read_bytes(mname)), str(where)).load()
    except CorruptCheckpoint:
        raise
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise CorruptCheckpoint(f".metadata does not unpickle: {e}", file=where,
                                fix="the checkpoint is corrupt: re-create or re-copy it") from e
    if dcp._dcp_name(md) != "Metadata" or not isinstance(getattr(md, "storage_data", None), dict):
        raise CorruptCheckpoint(".metadata does not hold a DCP Metadata object", file=where,
                                fix="the checkpoint is corrupt: re-create it")
    rel_tar = os.path.relpath(tar.data.resolve(), "/")
    storage = {}
    for key, info in md.storage_data.items():
        if dcp._dcp_name(info) != "_StorageInfo" or not isinstance(getattr(info, "relative_path", None), str):
            raise CorruptCheckpoint(f"storage entry {info!r} is malformed", file=where,
                                    fix="the checkpoint is corrupt: re-create it")
        name = member_name(f"{folder}/{info.relative_path}")
        m = tar.members.get(name)
        if m is None or ".." in Path(info.relative_path).parts:
            raise CorruptCheckpoint(f"chunk file {info.relative_path!r} is not in the .nemo", file=where,
                                    tensor=getattr(key, "fqn", None), fix="re-create the .nemo with every file")
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and 0 <= info.offset
                and 0 <= info.length and info.offset + info.length <= m.size):
            raise CorruptCheckpoint(f"chunk bytes {info.offset}..{info.offset + info.length} lie outside "
                                    f"the {m.size}-byte member", file=m, tensor=getattr(key, "fqn", None),
                                    fix="the .nemo is truncated or corrupt: re-copy it")
        storage[key] = type(info)(relative_path=rel_tar, offset=m.offset + info.offset, length=info.length)
    md.storage_data = storage
    try:
        return dcp._index_from(md, Path("/"), Path(str(where)))
    except CorruptCheckpoint:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, RuntimeError, pickle.PickleError) as e:
        raise CorruptCheckpoint(f".metadata holds malformed values ({type(e).__name__}: {str(e)[:200]})",
                                file=where, fix="the checkpoint is corrupt: re-create or re-copy it") from e
