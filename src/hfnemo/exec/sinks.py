"""Sinks: where the executor's row blocks go (DCP chunks, safetensors shards, legacy rank files).

Every sink takes an ``opener(path) -> OutFile`` for its files and, besides begin/write/end, has
``skip(item, n, crc)`` (``n`` bytes of the item are already in the file: a resumed run replays the
finished part of the plan through it) and ``crc()`` (the CRC-32 of the open torch.save record so
far, which the journal keeps so that a replayed archive can still write its central directory).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable

from hfnemo.dtypes import BY_NAME
from hfnemo.io.dcp import DcpWriter, _ChunkHandle
from hfnemo.io.fileio import OutFile
from hfnemo.io.torchzip import ArchiveWriter, state_pickle, tensor_stub
from hfnemo.io.safetensors import ShardWriter
from hfnemo.plan.plan import OutputItem, Plan


class DcpSink:
    """Each OutputItem is one DCP chunk: a torch.save archive streamed into its .distcp file."""

    wants_crc = True  # the executor's workers compute each block's CRC-32 (the zip records need it)

    def __init__(self, plan: Plan, weights_dir: Path, opener: Callable[[Path], OutFile] = OutFile) -> None:
        self.writer = DcpWriter(weights_dir, list(plan.files), opener=opener)
        self.files = list(plan.files)
        self.declare(self.writer, plan)
        for b in plan.byte_items:  # blobs first in each file, as torch's writer does
            self.writer.write_bytes(b.key, bytes.fromhex(b.payload_hex), self.files.index(b.file))
        self._handle: _ChunkHandle | None = None

    def begin(self, item: OutputItem) -> None:
        self._handle = self.writer.begin_tensor(item.key, item.offsets, BY_NAME[item.dtype], item.shape,
                                                self.files.index(item.file))

    def write(self, item: OutputItem, data: memoryview, crc: int | None = None) -> None:
        self._handle.write(data, crc)

    def skip(self, item: OutputItem, n: int, crc: int | None) -> None:
        self._handle.skip(n, crc)

    def crc(self) -> int | None:
        return self._handle.archive.data_crc if self._handle is not None else None

    def end(self, item: OutputItem) -> None:
        self._handle.finish()
        self._handle = None

    @staticmethod
    def declare(writer: DcpWriter, plan: Plan) -> None:
        """Every global tensor of ``plan`` with its chunks, and its blobs, in ``.metadata``'s order."""
        chunks: dict[str, list[OutputItem]] = {}
        for it in plan.items:
            chunks.setdefault(it.key, []).append(it)
        for key in chunks:
            its = sorted(chunks[key], key=lambda i: i.offsets)
            writer.declare_tensor(key, BY_NAME[its[0].dtype], its[0].global_shape,
                                  [(i.offsets, i.shape) for i in its])
        for b in plan.byte_items:
            writer.declare_bytes(b.key)

    def finish(self, checkpoint_id: str) -> None:
        self.writer.finish(checkpoint_id)

    def abort(self) -> None:
        self.writer.abort()


class SafetensorsSink:
    """Items are grouped by shard in plan order; each shard's header is written before its data."""

    def __init__(self, plan: Plan, out_dir: Path, opener: Callable[[Path], OutFile] = OutFile) -> None:
        self.out_dir = out_dir
        self.opener = opener
        self.by_file: dict[str, list[OutputItem]] = {}
        for it in plan.items:
            self.by_file.setdefault(it.file, []).append(it)
        self._shard: ShardWriter | None = None
        self._file: str | None = None

    def begin(self, item: OutputItem) -> None:
        if item.file != self._file:
            self._close()
            entries = [(i.key, BY_NAME[i.dtype], i.shape) for i in self.by_file[item.file]]
            self._shard = ShardWriter(self.out_dir / item.file, entries, {"format": "pt"}, self.opener)
            self._file = item.file

    def write(self, item: OutputItem, data: memoryview) -> None:
        self._shard.write(data)

    def skip(self, item: OutputItem, n: int, crc: int | None) -> None:
        self._shard.skip(n)

    def crc(self) -> int | None:
        return None

    def end(self, item: OutputItem) -> None:
        pass

    def _close(self) -> None:
        if self._shard is not None:
            self._shard.close(sync=True)
            self._shard = None

    def finish(self) -> None:
        self._close()
        # Zero-size shards never see a begin(); make sure every planned file exists.
        for fname, items in self.by_file.items():
            if not (self.out_dir / fname).exists():
                w = ShardWriter(self.out_dir / fname, [(i.key, BY_NAME[i.dtype], i.shape) for i in items],
                                {"format": "pt"}, self.opener)
                w.close(sync=True)

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None


class TorchSaveSink:
    """Legacy per-rank checkpoints: each file is one torch.save archive of a dict of many tensors.

    Items arrive grouped by file, in the plan's order. When a file's first item begins, its
    data.pkl is written whole (every tensor's dtype and shape is known from the plan), then every
    tensor's storage record is streamed block by block as the executor produces it. ``wrap(file,
    state_dict)`` builds the pickled object around the file's state dict: the state dict itself
    (NeMo 1) or Megatron-LM's ``{"args", "checkpoint_version", "iteration", "model"}``.
    """

    wants_crc = True

    def __init__(self, plan: Plan, out_dir: Path, wrap: Callable[[str, "OrderedDict[str, object]"], object],
                 opener: Callable[[Path], OutFile] = OutFile) -> None:
        self.out_dir = out_dir
        self.wrap = wrap
        self.opener = opener
        self.by_file: dict[str, list[OutputItem]] = {f: [] for f in plan.files}
        for it in plan.items:
            self.by_file.setdefault(it.file, []).append(it)
        self._file: str | None = None
        self._out: OutFile | None = None
        self._archive: ArchiveWriter | None = None
        self._keys: dict[int, str] = {}  # id(item) -> storage key in the open file
        self.done: list[str] = []

    def _open(self, fname: str) -> None:
        items = self.by_file[fname]
        sd: OrderedDict[str, object] = OrderedDict()
        for it in items:
            if it.key in sd:
                raise AssertionError(f"{it.key} planned twice in {fname}")
            sd[it.key] = tensor_stub(BY_NAME[it.dtype], it.shape)
        pkl, storages = state_pickle(self.wrap(fname, sd))
        if [n for _, n in storages] != [it.nbytes for it in items]:
            raise AssertionError(f"{fname}: pickled storages do not match the planned tensors")
        self._keys = {id(it): k for it, (k, _) in zip(items, storages)}
        path = self.out_dir / fname
        path.parent.mkdir(parents=True, exist_ok=True)
        self._out = self.opener(path)
        self._archive = ArchiveWriter(self._out.write, pkl, None, self._out.skip)
        self._file = fname

    def _close(self) -> None:
        if self._archive is not None:
            self._archive.finish()
            self._out.close(sync=True)
            self.done.append(self._file)
            self._archive, self._out, self._file = None, None, None

    def begin(self, item: OutputItem) -> None:
        if item.file != self._file:
            self._close()
            self._open(item.file)
        self._archive.begin_record(self._keys[id(item)], item.nbytes)

    def write(self, item: OutputItem, data: memoryview, crc: int | None = None) -> None:
        self._archive.write(data, crc)

    def skip(self, item: OutputItem, n: int, crc: int | None) -> None:
        self._archive.skip(n, crc)

    def crc(self) -> int | None:
        return self._archive.data_crc if self._archive is not None else None

    def end(self, item: OutputItem) -> None:
        self._archive.end_record()

    def finish(self) -> None:
        self._close()
        for fname in self.by_file:  # a rank file with no tensors still exists
            if fname not in self.done:
                self._open(fname)
                self._close()

    def abort(self) -> None:
        if self._out is not None:
            self._out.abort()
        self._archive, self._out, self._file = None, None, None
