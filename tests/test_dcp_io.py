"""The byte-level formats: torch.save archives, DCP .metadata, chunked reads, hostile pickles."""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from hfnemo.dtypes import BY_NAME, BY_TORCH
from hfnemo.errors import CorruptCheckpoint
from hfnemo.exec.sources import RowReader, dcp_sources
from hfnemo.io import torchzip
from hfnemo.io.dcp import DcpWriter, read_index

SHAPES = [(3, 5), (1, 384, 256), (7,), (0, 4), (2, 1, 3, 5)]
DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.int64]


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_archive_is_torch_save_byte_for_byte(shape: tuple, dtype: torch.dtype) -> None:
    t = (torch.randn(shape) * 100).to(dtype)
    ref = io.BytesIO()
    torch.save(t, ref)
    ours = torchzip.archive_bytes(torchzip.tensor_pickle(BY_TORCH[dtype], shape), _bytes(t))
    ref_b = ref.getvalue()
    assert len(ours) == len(ref_b)
    # Only the serialization id (40 digits) and its CRC differ: torch draws it at random.
    zr, zo = zipfile.ZipFile(io.BytesIO(ref_b)), zipfile.ZipFile(io.BytesIO(ours))
    sid = zr.getinfo("archive/.data/serialization_id")
    diff = [i for i, (a, b) in enumerate(zip(ref_b, ours)) if a != b]
    lo = sid.header_offset
    assert all(lo <= i for i in diff), diff[:5]
    assert zo.testzip() is None  # every CRC checks out
    assert torch.equal(torch.load(io.BytesIO(ours), weights_only=True), t)


def test_archive_streams_in_blocks() -> None:
    t = torch.randn(1000, 37)
    whole = torchzip.archive_bytes(torchzip.tensor_pickle(BY_NAME["fp32"], (1000, 37)), _bytes(t))
    out = io.BytesIO()
    w = torchzip.ArchiveWriter(out.write, torchzip.tensor_pickle(BY_NAME["fp32"], (1000, 37)), t.numel() * 4)
    data = _bytes(t)
    for i in range(0, len(data), 4093):
        w.write(data[i:i + 4093])
    assert w.finish() == len(whole) and out.getvalue() == whole


def test_crc32_combine_is_zlib_crc_of_the_join() -> None:
    import random
    import zlib

    rng = random.Random(7)
    for _ in range(200):
        a = os.urandom(rng.choice([0, 1, 3, rng.randint(0, 4000)]))
        b = os.urandom(rng.choice([0, 1, 2, 7, rng.randint(0, 9000)]))
        assert torchzip.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    head, big = os.urandom(33), bytes(1 << 26)  # a 64 MiB block, as the executor's are
    assert torchzip.crc32_combine(zlib.crc32(head), zlib.crc32(big), len(big)) == zlib.crc32(head + big)
    # lengths past 2^32 (a multi-GiB record): both ways of joining three parts agree
    c1, c2, c3 = (zlib.crc32(os.urandom(k)) for k in (5, 6, 7))
    mid = (1 << 32) + 5
    left = torchzip.crc32_combine(torchzip.crc32_combine(c1, c2, mid), c3, 7)
    right = torchzip.crc32_combine(c1, torchzip.crc32_combine(c2, c3, 7), mid + 7)
    assert left == right


def test_archive_with_block_crcs_from_elsewhere_is_the_same_archive() -> None:
    """The executor's workers checksum blocks in parallel; the archive joins their CRCs."""
    import zlib

    t = torch.randn(1000, 37)
    data = _bytes(t)
    pkl = torchzip.tensor_pickle(BY_NAME["fp32"], (1000, 37))
    whole = torchzip.archive_bytes(pkl, data)
    out = io.BytesIO()
    w = torchzip.ArchiveWriter(out.write, pkl, len(data))
    for i, step in enumerate(range(0, len(data), 4093)):
        block = data[step:step + 4093]
        w.write(block, zlib.crc32(block) if i % 3 else None)  # mixed: some computed here
    assert w.finish() == len(whole) and out.getvalue() == whole
    assert zipfile.ZipFile(io.BytesIO(out.getvalue())).testzip() is None


def test_locate_tensor_refuses_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    buf = io.BytesIO()
    torch.save(Evil(), buf)
    p = tmp_path / "chunk"
    p.write_bytes(buf.getvalue())
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(CorruptCheckpoint) as e:
            torchzip.locate_tensor(fd, 0, len(buf.getvalue()), path=str(p))
    finally:
        os.close(fd)
    assert "system" in str(e.value) and not (tmp_path / "pwned").exists()


def test_metadata_unpickler_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CorruptCheckpoint):
        read_index(tmp_path)
    assert not (tmp_path / "pwned").exists()


def _write(root: Path, fqn: str, full: torch.Tensor, chunks: list[tuple[tuple, tuple]]) -> None:
    w = DcpWriter(root, ["__0_0.distcp", "__0_1.distcp"])
    dt = BY_TORCH[full.dtype]
    w.declare_tensor(fqn, dt, tuple(full.shape), chunks)
    for i, (off, size) in enumerate(chunks):
        part = full[tuple(slice(o, o + s) for o, s in zip(off, size))].contiguous()
        h = w.begin_tensor(fqn, off, dt, size, i % 2)
        data = _bytes(part)
        h.write(data[: len(data) // 2])
        h.write(data[len(data) // 2:])
        h.finish()
    w.finish("x")


@pytest.mark.parametrize("layout", ["per_layer", "one_chunk", "tp_columns", "tp_rows"])
def test_row_reads_across_chunk_layouts(tmp_path: Path, layout: str) -> None:
    """Rows of each layer come back whatever the chunking: one chunk per layer (NeMo import), one
    chunk for everything (plain DCP), or tensor-parallel splits along columns or rows."""
    L, R, C = 3, 10, 8
    full = torch.randn(L, R, C).to(torch.bfloat16)
    chunks = {
        "per_layer": [((l, 0, 0), (1, R, C)) for l in range(L)],
        "one_chunk": [((0, 0, 0), (L, R, C))],
        "tp_columns": [((l, 0, c), (1, R, C // 2)) for l in range(L) for c in (0, C // 2)],
        "tp_rows": [((l, r, 0), (1, R // 2, C)) for l in range(L) for r in (0, R // 2)],
    }[layout]
    _write(tmp_path, "module.decoder.layers.mlp.linear_fc2.weight", full, chunks)
    # torch's own reader agrees with what we wrote
    md = FileSystemReader(str(tmp_path)).read_metadata()
    assert tuple(md.state_dict_metadata["module.decoder.layers.mlp.linear_fc2.weight"].size) == (L, R, C)
    index = read_index(tmp_path)
    sources, prefix = dcp_sources(index)
    assert prefix == "module."
    reader = RowReader(index=index)
    try:
        for l in range(L):
            src = sources[f"decoder.layers.{l}.mlp.linear_fc2.weight"]
            for r0, r1 in ((0, R), (3, 7), (4, 6)):
                buf = bytearray((r1 - r0) * C * 2)
                reader.read_rows(src, r0, r1, memoryview(buf))
                got = torch.frombuffer(buf, dtype=torch.bfloat16).view(r1 - r0, C)
                assert torch.equal(got, full[l, r0:r1]), (l, r0, r1)
    finally:
        reader.close()


def test_missing_chunk_coverage_is_reported(tmp_path: Path) -> None:
    full = torch.randn(2, 4, 4)
    _write(tmp_path, "module.decoder.layers.x.weight", full, [((0, 0, 0), (1, 4, 4))])  # layer 1 absent
    index = read_index(tmp_path)
    sources, _ = dcp_sources(index)
    reader = RowReader(index=index)
    with pytest.raises(CorruptCheckpoint) as e:
        reader.read_rows(sources["decoder.layers.1.x.weight"], 0, 4, memoryview(bytearray(64)))
    assert "cover" in str(e.value)
    reader.close()


def test_chunk_outside_file_is_reported(tmp_path: Path) -> None:
    _write(tmp_path, "module.embedding.word_embeddings.weight", torch.randn(4, 4), [((0, 0), (4, 4))])
    for f in tmp_path.glob("*.distcp"):
        if f.stat().st_size:
            os.truncate(f, f.stat().st_size - 10)
    with pytest.raises(CorruptCheckpoint) as e:
        read_index(tmp_path)
    assert "outside" in str(e.value) and e.value.tensor == "module.embedding.word_embeddings.weight"
