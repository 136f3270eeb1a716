"""--format nemo1|megatron: per-rank legacy checkpoints (spec §6) written as torch.save archives of
local shards, read back by torch.load, re-assembling to the TP=1 tensors and exporting to the
original HF model bit-exactly."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
import torch
import yaml
from legacy_helpers import load_rank, make_tp4_llama, rank_files, reassemble, unstack
from test_reference import load_dcp
from tiny_models import load_hf_state

import hfnemo
from hfnemo.dtypes import BY_TORCH
from hfnemo.errors import CorruptCheckpoint, UsageError
from hfnemo.io import torchzip

L, H, F, V, HEADS, GROUPS, D = 4, 128, 512, 1024, 8, 4, 16
LAYOUTS = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2)]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_tp4_llama(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def tp1(src: Path, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("tp1") / "nemo"
    hfnemo.convert(src, out)
    return unstack(load_dcp(out / "weights"))


def _expected_local(key: str, tp: int) -> tuple[int, ...]:
    qkv = (HEADS + 2 * GROUPS) * D
    table = {"linear_qkv.weight": (qkv // tp, H), "linear_proj.weight": (H, HEADS * D // tp),
             "linear_fc1.weight": (2 * F // tp, H), "linear_fc2.weight": (H, F // tp),
             "word_embeddings.weight": (V // tp, H), "output_layer.weight": (V // tp, H)}
    for suffix, shape in table.items():
        if key.endswith(suffix):
            return shape
    return (H,)  # norms


@pytest.mark.parametrize("fmt", ["nemo1", "megatron"])
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_legacy_layout(src: Path, tp1: dict, tmp_path: Path, fmt: str, tp: int, pp: int) -> None:
    out = tmp_path / fmt
    hfnemo.convert(src, out, format=fmt, tp=tp, pp=pp)
    files = rank_files(out, fmt)
    if fmt == "nemo1":
        want = (["model_weights.ckpt"] if tp == pp == 1 else
                [f"mp_rank_{t:02d}/model_weights.ckpt" for t in range(tp)] if pp == 1 else
                [f"tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt" for t in range(tp) for p in range(pp)])
        cfg = yaml.safe_load((out / "model_config.yaml").read_text())
        assert cfg["mcore_gpt"] is True and cfg["tensor_model_parallel_size"] == tp
        assert cfg["pipeline_model_parallel_size"] == pp and cfg["activation"] == "swiglu"
        assert cfg["num_query_groups"] == GROUPS and cfg["normalization"] == "rmsnorm"
        assert V % (cfg["make_vocab_size_divisible_by"] * tp) == 0
        assert all((out / v.removeprefix("nemo:")).is_file() for v in cfg["tokenizer"]["hf_files"].values())
    else:
        assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
        want = [f"release/mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + "/model_optim_rng.pt"
                for t in range(tp) for p in range(pp)]
    assert sorted(p.relative_to(out).as_posix() for p in files.values()) == sorted(want)

    per_stage = L // pp
    for (t, p), path in files.items():
        sd = load_rank(path, fmt)  # nemo1: weights_only=True; megatron: Namespace allowlisted
        prefix = "model." if fmt == "nemo1" else ""
        assert all(k.startswith(prefix) for k in sd)
        keys = {k[len(prefix):] for k in sd if "_extra_state" not in k}
        layer_keys = {k for k in keys if k.startswith("decoder.layers.")}
        assert {int(k.split(".")[2]) for k in layer_keys} == set(range(per_stage))  # local indices
        assert ("embedding.word_embeddings.weight" in keys) == (p == 0)
        assert ("output_layer.weight" in keys) == ("decoder.final_layernorm.weight" in keys) == (p == pp - 1)
        assert len(layer_keys) == 6 * per_stage
        assert sum("_extra_state" in k for k in sd) == 5 * per_stage
        for k in keys:
            assert tuple(sd[prefix + k].shape) == _expected_local(k, tp), (k, t, p)
    if fmt == "megatron":
        with torch.serialization.safe_globals([argparse.Namespace]):
            a = torch.load(files[(0, 0)], weights_only=True)["args"]
        assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (tp, pp)
        assert a.num_query_groups == GROUPS and a.group_query_attention and a.swiglu
        assert a.padded_vocab_size == V and a.untie_embeddings_and_output_weights and a.params_dtype == torch.bfloat16

    got = reassemble(out, fmt, tp, pp, L)  # plain torch cat of the local shards
    assert got.keys() == tp1.keys()
    for k in tp1:
        assert torch.equal(got[k], tp1[k]), k

    hfnemo.convert(out, tmp_path / "back")
    a, b = load_hf_state(src), load_hf_state(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_tied_embeddings_with_pp(tmp_path: Path) -> None:
    """Tied + PP>1: the last stage holds its own output_layer.weight, a copy of the embedding rows."""
    src = make_tp4_llama(tmp_path / "hf", num_layers=2, tie_word_embeddings=True)
    hfnemo.convert(src, tmp_path / "mg", format="megatron", tp=2, pp=2)
    files = rank_files(tmp_path / "mg", "megatron")
    for t in range(2):
        first, last = load_rank(files[(t, 0)], "megatron"), load_rank(files[(t, 1)], "megatron")
        assert torch.equal(first["embedding.word_embeddings.weight"], last["output_layer.weight"])
    hfnemo.convert(src, tmp_path / "n1", format="nemo1", tp=2)  # PP=1: no output layer at all
    assert not any("output_layer" in k for k in load_rank(rank_files(tmp_path / "n1", "nemo1")[(0, 0)], "nemo1"))
    for d in ("mg", "n1"):
        hfnemo.convert(tmp_path / d, tmp_path / f"back-{d}")
        a, b = load_hf_state(src), load_hf_state(tmp_path / f"back-{d}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_moe_megatron_tp_ep(tmp_path: Path) -> None:
    from tiny_moe_qwen import make_tiny  # noqa: PLC0415

    src = make_tiny(tmp_path / "hf", "mixtral_8x7b")
    hfnemo.convert(src, tmp_path / "mg", format="megatron", tp=2, ep=4)
    names = sorted(p.parent.name for p in (tmp_path / "mg" / "release").glob("*/model_optim_rng.pt"))
    assert names == [f"mp_rank_{t:02d}_{e:03d}" for t in range(2) for e in range(4)]
    sd = load_rank(tmp_path / "mg" / "release" / "mp_rank_01_003" / "model_optim_rng.pt", "megatron")
    experts = {k for k in sd if ".local_experts." in k and not k.endswith("_extra_state")}
    assert {int(k.split(".")[6]) for k in experts} == {0, 1}  # 8 experts / 4 EP ranks, local indices
    assert tuple(sd["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"].shape) == (2 * 448 // 2, 128)
    assert tuple(sd["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"].shape) == (128, 448 // 2)
    hfnemo.convert(tmp_path / "mg", tmp_path / "back")
    a, b = load_hf_state(src), load_hf_state(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UsageError):
        hfnemo.convert(src, tmp_path / "n1", format="nemo1", ep=2)


def test_dict_archive_is_torch_save_byte_for_byte() -> None:
    """A state-dict archive streamed record by record equals torch.save's except the random id."""
    from collections import OrderedDict

    sd = OrderedDict(a=torch.randn(3, 5).to(torch.bfloat16), b=torch.empty(0, dtype=torch.uint8),
                     c=torch.arange(7, dtype=torch.int64))
    obj = {"args": argparse.Namespace(x=1, dt=torch.float16), "checkpoint_version": 3.0, "model": sd}
    ref = io.BytesIO()
    torch.save(obj, ref)
    stubs = OrderedDict((k, torchzip.tensor_stub(BY_TORCH[v.dtype], tuple(v.shape))) for k, v in sd.items())
    pkl, storages = torchzip.state_pickle({**obj, "model": stubs})
    out = io.BytesIO()
    w = torchzip.ArchiveWriter(out.write, pkl, None)
    for (key, n), v in zip(storages, sd.values()):
        w.begin_record(key, n)
        data = v.view(torch.uint8).numpy().tobytes() if v.numel() else b""
        for i in range(0, len(data), 7):
            w.write(data[i:i + 7])
        w.end_record()
    w.finish()
    a, b = ref.getvalue(), out.getvalue()
    assert len(a) == len(b)
    import zipfile
    sid = zipfile.ZipFile(io.BytesIO(a)).getinfo("archive/.data/serialization_id").header_offset
    assert all(i >= sid for i, (x, y) in enumerate(zip(a, b)) if x != y)
    with torch.serialization.safe_globals([argparse.Namespace]):
        back = torch.load(io.BytesIO(b), weights_only=True)
    assert all(torch.equal(back["model"][k], sd[k]) for k in sd)


def test_reader_refuses_code(tmp_path: Path, src: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    out = tmp_path / "n1"
    hfnemo.convert(src, out, format="nemo1")
    sd = torch.load(out / "model_weights.ckpt", weights_only=True)
    buf = io.BytesIO()
    torch.save({**sd, "evil": Evil()}, buf, pickle_protocol=2)
    (out / "model_weights.ckpt").write_bytes(buf.getvalue())
    with pytest.raises(CorruptCheckpoint, match="print"):
        hfnemo.convert(out, tmp_path / "back")
    assert not (tmp_path / "back").exists()
