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
