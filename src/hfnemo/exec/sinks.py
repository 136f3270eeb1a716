"""Sinks: where the executor's row blocks go (DCP chunks or safetensors shards)."""
from __future__ import annotations

import os
from pathlib import Path

from hfnemo.dtypes import BY_NAME
from hfnemo.io.dcp import DcpWriter, _ChunkHandle
from hfnemo.io.safetensors import ShardWriter
from hfnemo.plan.plan import OutputItem, Plan


class DcpSink:
    """Each OutputItem is one DCP chunk: a torch.save archive streamed into its .distcp file."""

    def __init__(self, plan: Plan, weights_dir: Path) -> None:
        self.writer = DcpWriter(weights_dir, len(plan.files))
        self.files = list(plan.files)
        chunks: dict[str, list[OutputItem]] = {}
        for it in plan.items:
            chunks.setdefault(it.key, []).append(it)
        for key in chunks:
            its = sorted(chunks[key], key=lambda i: i.offsets)
            self.writer.declare_tensor(key, BY_NAME[its[0].dtype], its[0].global_shape,
                                       [(i.offsets, i.shape) for i in its])
        for b in plan.byte_items:  # blobs first in each file, as torch's writer does
            self.writer.declare_bytes(b.key)
            self.writer.write_bytes(b.key, bytes.fromhex(b.payload_hex), self.files.index(b.file))
        self._handle: _ChunkHandle | None = None

    def begin(self, item: OutputItem) -> None:
        self._handle = self.writer.begin_tensor(item.key, item.offsets, BY_NAME[item.dtype], item.shape,
                                                self.files.index(item.file))

    def write(self, item: OutputItem, data: memoryview) -> None:
        self._handle.write(data)

    def end(self, item: OutputItem) -> None:
        self._handle.finish()
        self._handle = None

    def finish(self, checkpoint_id: str) -> None:
        self.writer.finish(checkpoint_id)

    def abort(self) -> None:
        self.writer.abort()


class SafetensorsSink:
    """Items are grouped by shard in plan order; each shard's header is written before its data."""

    def __init__(self, plan: Plan, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.by_file: dict[str, list[OutputItem]] = {}
        for it in plan.items:
            self.by_file.setdefault(it.file, []).append(it)
        self._shard: ShardWriter | None = None
        self._file: str | None = None

    def begin(self, item: OutputItem) -> None:
        if item.file != self._file:
            self._close()
            entries = [(i.key, BY_NAME[i.dtype], i.shape) for i in self.by_file[item.file]]
            self._shard = ShardWriter(self.out_dir / item.file, entries, {"format": "pt"})
            self._file = item.file

    def write(self, item: OutputItem, data: memoryview) -> None:
        self._shard.write(data)

    def end(self, item: OutputItem) -> None:
        pass

    def _close(self) -> None:
        if self._shard is not None:
            fd = os.open(self._shard.path, os.O_RDONLY)
            self._shard.close()
            os.fsync(fd)
            os.close(fd)
            self._shard = None

    def finish(self) -> None:
        self._close()
        # Zero-size shards never see a begin(); make sure every planned file exists.
        for fname, items in self.by_file.items():
            if not (self.out_dir / fname).exists():
                w = ShardWriter(self.out_dir / fname, [(i.key, BY_NAME[i.dtype], i.shape) for i in items],
                                {"format": "pt"})
                w.close()

    def abort(self) -> None:
        if self._shard is not None:
            try:
                os.close(self._shard._fd)
            except OSError:
                pass
            self._shard = None
