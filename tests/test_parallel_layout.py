"""--tp/--pp/--ep on import: DCP chunks cut the way Megatron shards each tensor, re-assembling
bit-exactly to the TP=1 tensors, and export from any layout giving the original HF model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import load_hf_state
from torch.distributed.checkpoint import FileSystemReader

import hfnemo
from hfnemo.errors import UsageError
from test_reference import load_dcp

LAYOUTS = [(tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2)]


def _chunks(weights: Path) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    md = FileSystemReader(str(weights)).read_metadata().state_dict_metadata
    return {k: sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks)
            for k, v in md.items() if hasattr(v, "chunks")}


@pytest.fixture(scope="module")
def tp_src(tmp_path_factory) -> Path:
    """A Llama with 8 kv heads so that TP 8 divides everything."""
    import json

    from tiny_models import make_tiny_hf, SHAPES
    SHAPES["llama_tp8"] = dict(SHAPES["llama3_gqa"], num_attention_heads=16, num_key_value_heads=8,
                               hidden_size=256, intermediate_size=512, vocab_size=1024)
    try:
        out = make_tiny_hf(tmp_path_factory.mktemp("tp8"), "llama_tp8", dtype=torch.bfloat16)
    finally:
        SHAPES.pop("llama_tp8")
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 8
    return out


@pytest.fixture(scope="module")
def tp1(tp_src: Path, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("tp1") / "nemo"
    hfnemo.convert(tp_src, out)
    return load_dcp(out / "weights")


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_layout_reassembles_and_exports(tp_src: Path, tp1: dict, tmp_path: Path, tp: int, pp: int) -> None:
    nemo = tmp_path / "nemo"
    hfnemo.convert(tp_src, nemo, tp=tp, pp=pp)
    got = load_dcp(nemo / "weights")  # torch's reader assembles the global tensors from the chunks
    assert got.keys() == tp1.keys()
    for k in tp1:
        assert torch.equal(got[k], tp1[k]), k

    ch = _chunks(nemo / "weights")
    L, H, F, V = 2, 256, 512, 1024
    qkv_rows = (16 + 2 * 8) * 16
    m = "module."
    # column-parallel: rows in tp blocks per layer; QKV blocks hold whole query groups
    assert ch[m + "decoder.layers.self_attention.linear_qkv.weight"] == sorted(
        ((l, r * qkv_rows // tp, 0), (1, qkv_rows // tp, H)) for l in range(L) for r in range(tp))
    # GLU fc1: rank r holds gate rows r*F/tp.. and up rows F + r*F/tp.. (two chunks per rank)
    assert ch[m + "decoder.layers.mlp.linear_fc1.weight"] == sorted(
        ((l, h * F + r * F // tp, 0), (1, F // tp, H)) for l in range(L) for h in (0, 1) for r in range(tp))
    # row-parallel: columns in tp blocks
    assert ch[m + "decoder.layers.self_attention.linear_proj.weight"] == sorted(
        ((l, 0, r * H // tp), (1, H, H // tp)) for l in range(L) for r in range(tp))
    assert ch[m + "decoder.layers.mlp.linear_fc2.weight"] == sorted(
        ((l, 0, r * F // tp), (1, H, F // tp)) for l in range(L) for r in range(tp))
    # vocab-parallel embedding and output; replicated norms stay one chunk per layer
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert ch[m + key] == sorted(((r * V // tp, 0), (V // tp, H)) for r in range(tp))
    assert len(ch[m + "decoder.layers.self_attention.linear_qkv.layer_norm_weight"]) == L
    assert ch[m + "decoder.final_layernorm.weight"] == [((0,), (H,))]

    import yaml
    cfg = yaml.safe_load((nemo / "context" / "model.yaml").read_text())["config"]
    assert cfg["tensor_model_parallel_size"] == tp and cfg["pipeline_model_parallel_size"] == pp

    hfnemo.convert(nemo, tmp_path / "back")
    a, b = load_hf_state(tp_src), load_hf_state(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layout_with_cast(tp_src: Path, tp1: dict, tmp_path: Path) -> None:
    """Column cuts and dtype casts together (slice, then cast)."""
    hfnemo.convert(tp_src, tmp_path / "nemo", tp=4, dtype="fp32")
    got = load_dcp(tmp_path / "nemo" / "weights")
    for k in tp1:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], tp1[k].float()), k


def test_moe_layout_tp_and_ep(tmp_path: Path) -> None:
    from tiny_moe_qwen import make_tiny  # noqa: PLC0415
    src = make_tiny(tmp_path / "hf", "mixtral_8x7b")
    hfnemo.convert(src, tmp_path / "tp1")
    hfnemo.convert(src, tmp_path / "nemo", tp=2, ep=4)
    a, b = load_dcp(tmp_path / "tp1" / "weights"), load_dcp(tmp_path / "nemo" / "weights")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ch = _chunks(tmp_path / "nemo" / "weights")
    fc2 = ch["module.decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    assert all(size[:2] == (1, 1) for _, size in fc2) and len({o[:2] for o, _ in fc2}) == 2 * 8
    assert len(fc2) == 2 * 8 * 2  # per (layer, expert), two column halves
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    x, y = load_hf_state(src), load_hf_state(tmp_path / "back")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("kw,words", [
    ({"tp": 3}, ["--tp 3", "query groups"]),
    ({"pp": 3}, ["--pp 3", "layers"]),
    ({"ep": 2}, ["--ep 2", "dense"]),
    ({"tp": 0}, ["--tp 0"]),
])
def test_invalid_layouts_fail_before_writing(tp_src: Path, tmp_path: Path, kw: dict, words: list[str]) -> None:
    with pytest.raises(UsageError) as e:
        hfnemo.convert(tp_src, tmp_path / "out", **kw)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "out").exists()


def test_column_windows_native_and_staged_paths_agree(tp_src: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-parallel shards read in place by the native core (one pread per row) and cut from staged
    whole rows (no native core, or a DCP source) give the same bytes."""
    import hfnemo.exec.sources as sources
    assert sources._C is not None, "the native core must be built for this test (make test builds it)"
    hfnemo.convert(tp_src, tmp_path / "native", tp=4)
    monkeypatch.setattr(sources, "_C", None)
    hfnemo.convert(tp_src, tmp_path / "staged", tp=4)
    for f in ("__0_0.distcp", "__0_1.distcp"):
        assert (tmp_path / "native" / "weights" / f).read_bytes() == (tmp_path / "staged" / "weights" / f).read_bytes()


def test_column_windows_of_a_tensor_are_written_together(tp_src: Path) -> None:
    """At TP > 1 the row-parallel windows of one tensor's rows go to one file, one after the other
    in column order (their source rows are then read from disk once and from the cache after);
    the other chunks keep torch's largest-first order per file."""
    plan = hfnemo.plan(tp_src, to="nemo", tp=4)
    windows = [(i, it) for i, it in enumerate(plan.items) if any(s.cols for s in it.segments)]
    assert windows
    by_tensor: dict[tuple, list[tuple[int, object]]] = {}
    for i, it in windows:
        cut = max(a for a in range(len(it.shape)) if it.shape[a] != it.global_shape[a])  # the column axis
        by_tensor.setdefault((it.key, it.offsets[:cut] + it.offsets[cut + 1:]), []).append((i, it))
    for key, members in by_tensor.items():
        idx = [i for i, _ in members]
        assert len(members) == 4, key
        assert idx == list(range(idx[0], idx[0] + 4)), f"{key}: windows at {idx}"
        assert len({it.file for _, it in members}) == 1
        cols = [it.segments[0].col for _, it in members]
        assert cols == sorted(cols)
    # every file: groups by size, largest first (a group of windows counts as its total)
    for f in plan.files:
        sizes, i = [], 0
        items = [it for it in plan.items if it.file == f]
        while i < len(items):
            it = items[i]
            n = 4 if any(s.cols for s in it.segments) else 1
            sizes.append(sum(x.nbytes for x in items[i:i + n]))
            i += n
        assert sizes == sorted(sizes, reverse=True), f


def test_tp1_write_order_is_torch_order(tp_src: Path) -> None:
    """Without column windows every chunk is a group of its own: largest first per file, ties in
    state-dict order (torch's _split_by_size_and_type), as before grouping existed."""
    plan = hfnemo.plan(tp_src, to="nemo", tp=1)
    for f in plan.files:
        sizes = [it.nbytes for it in plan.items if it.file == f]
        assert sizes == sorted(sizes, reverse=True)


def test_window_readahead_reads_each_source_range_once(tp_src: Path, tmp_path: Path) -> None:
    from hfnemo.exec.sources import SourceReadahead, readahead_distance

    plan = hfnemo.plan(tp_src, to="nemo", tp=4)
    sources = {s.name: s for s in plan.sources}
    ra = SourceReadahead.for_plan(plan.items, sources, ahead=1 << 40, whole_rows=False)
    assert ra is not None
    ranges = [r for rs, _, _ in ra.entries for r in rs]
    assert len(ranges) == len(set(ranges))
    # exactly the source tensors row-parallel chunks cut windows from, each whole
    cut = {s.source for it in plan.items for s in it.segments if s.cols}
    assert sum(n for _, _, n in ranges) == sum(sources[name].nbytes for name in cut)
    ats = [at for _, at, _ in ra.entries]
    assert ats == sorted(ats) and ats[0] >= 0
    ra.start()
    ra.advance(0)
    ra._thread.join(30)
    assert ra.reason == "done" and ra.issued == sum(n for _, _, n in ranges)
    ra.stop()
    # a read-ahead waiting for the executor stops at once; nothing without column windows or when off
    waiting = SourceReadahead.for_plan(plan.items, sources, ahead=1, whole_rows=False)
    waiting.entries = [(rs, at + (1 << 40), pace) for rs, at, pace in waiting.entries]
    waiting.start()
    waiting.stop()
    assert waiting.reason == "stopped" and waiting.issued == 0
    tp1 = hfnemo.plan(tp_src, to="nemo", tp=1)
    assert SourceReadahead.for_plan(tp1.items, {s.name: s for s in tp1.sources}, ahead=1 << 30,
                                    whole_rows=False) is None
    assert SourceReadahead.for_plan(plan.items, sources, ahead=0) is None
    assert readahead_distance({"HFNEMO_READAHEAD": "off"}) == 0
    assert readahead_distance({"HFNEMO_READAHEAD": "64MiB"}) == 64 << 20
    assert 0 < readahead_distance({}) <= 1 << 30


def test_block_crcs_from_the_workers_give_the_same_files(tp_src: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers checksum each block and the archive joins the CRCs; the files are the bytes
    of computing the CRC as the bytes are written, and every zip record checks out."""
    import zipfile

    import io

    from hfnemo.exec.sinks import DcpSink

    import functools

    from hfnemo import api
    from hfnemo.plan.planner import Budget

    monkeypatch.setattr(api, "Budget", functools.partial(Budget, max_block=8192))  # many blocks a chunk
    hfnemo.convert(tp_src, tmp_path / "workers", tp=2)
    monkeypatch.setattr(DcpSink, "wants_crc", False)
    hfnemo.convert(tp_src, tmp_path / "inline", tp=2)
    for f in ("__0_0.distcp", "__0_1.distcp"):
        assert (tmp_path / "workers" / "weights" / f).read_bytes() == (tmp_path / "inline" / "weights" / f).read_bytes()
    weights = tmp_path / "workers" / "weights"
    storage = FileSystemReader(str(weights)).read_metadata().storage_data
    checked = 0
    for info in storage.values():
        data = (weights / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
        if data[:2] == b"PK":  # a torch.save archive (blobs of _extra_state are archives too)
            assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None
            checked += 1
    assert checked >= len(hfnemo.plan(tp_src, to="nemo", tp=2).items)


def test_whole_row_readahead_follows_the_executor(tp_src: Path) -> None:
    """Whole-row ranges: every source byte once, read no further than ``ahead`` in front of the
    executor's position, and never what the executor has already handed to its workers."""
    import time

    from hfnemo.exec.sources import SourceReadahead

    plan = hfnemo.plan(tp_src, to="nemo", tp=1)
    sources = {s.name: s for s in plan.sources}
    ra = SourceReadahead.for_plan(plan.items, sources, ahead=4096)
    assert sum(n for rs, _, _ in ra.entries for _, _, n in rs) == plan.read_bytes
    assert all(pace == 1.0 for _, _, pace in ra.entries)  # bf16 in, bf16 out
    ra.start()
    time.sleep(0.2)
    early = ra.issued  # the executor has handed out nothing: 4096 bytes ahead of position 0
    assert early <= 4096 + (8 << 20), early
    ra.advance(plan.write_bytes)  # the executor is at the end: nothing left to read ahead
    ra._thread.join(30)
    assert ra.reason == "done"
    assert ra.issued <= early + (8 << 20) * len(ra.entries), (ra.issued, early)
    ra.stop()
    # an executor far ahead from the start: nothing is read at all
    behind = SourceReadahead.for_plan(plan.items, sources, ahead=1 << 30)
    behind.advance(plan.write_bytes)
    behind.start()
    behind._thread.join(30)
    assert behind.reason == "done" and behind.issued == 0
    behind.stop()


@pytest.mark.parametrize("tp", [1, 2])
def test_readahead_of_a_dcp_source_locates_its_chunks(tp_src: Path, tmp_path: Path, tp: int) -> None:
    """Export and reshard read DCP chunks: the read-ahead locates them when due (in its thread) and
    covers every source byte once, row-parallel chunks (split trailing dims) included."""
    from hfnemo.exec.sources import RowReader, SourceReadahead
    from hfnemo.io.dcp import read_index

    hfnemo.convert(tp_src, tmp_path / "nemo", tp=tp)
    plan = hfnemo.plan(tmp_path / "nemo", to="hf")
    sources = {s.name: s for s in plan.sources}
    reader = RowReader(index=read_index(tmp_path / "nemo" / "weights"))
    try:
        assert SourceReadahead.for_plan(plan.items, sources, ahead=1 << 40) is None or all(
            not callable(r) for r, _, _ in SourceReadahead.for_plan(plan.items, sources, ahead=1 << 40).entries)
        ra = SourceReadahead.for_plan(plan.items, sources, ahead=1 << 40, reader=reader)
        assert ra is not None and all(callable(r) for r, _, _ in ra.entries)
        located = [rng for r, _, _ in ra.entries for rng in r()]
        assert len(located) == len(set(located))
        assert sum(n for _, _, n in located) == sum(s.nbytes for s in plan.sources if s.shape)
        ra.start()
        ra._thread.join(30)
        assert ra.reason == "done", ra.reason
        assert ra.issued == sum(n for _, _, n in located)
        ra.stop()
    finally:
        reader.close()
