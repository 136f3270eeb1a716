"""hfnemo reshard: change the parallel layout (and format) of a NeMo 2 / NeMo 1 / Megatron-LM
checkpoint directly, streaming, without going through HF."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from legacy_helpers import make_tp4_llama, reassemble, unstack
from test_parallel_layout import _chunks
from test_reference import load_dcp
from tiny_models import load_hf_state

import hfnemo
from hfnemo.api import reshard
from hfnemo.cli import main

L = 4


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_tp4_llama(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def nemo(src: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nemo") / "tp1"
    hfnemo.convert(src, out)
    return out


def _same_hf(src: Path, out: Path) -> None:
    a, b = load_hf_state(src), load_hf_state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nemo2_round_trip_tp1_4_2_1(nemo: Path, tmp_path: Path) -> None:
    ref = load_dcp(nemo / "weights")
    prev = nemo
    for tp in (4, 2, 1):
        out = tmp_path / f"tp{tp}"
        reshard(prev, out, tp=tp)
        got = load_dcp(out / "weights")  # torch's FileSystemReader assembles the chunks
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        cfg = yaml.safe_load((out / "context" / "model.yaml").read_text())["config"]
        assert cfg["tensor_model_parallel_size"] == tp
        io_json = (out / "context" / "io.json").read_text()
        assert f'"Attr(name=\'tensor_model_parallel_size\')", {{"type": "leaf", "value": {tp}' in io_json
        n_qkv = len(_chunks(out / "weights")["module.decoder.layers.self_attention.linear_qkv.weight"])
        assert n_qkv == L * tp
        prev = out
    # back at TP 1: the very same files as the direct import
    for name in ("__0_0.distcp", "__0_1.distcp", "common.pt", "metadata.json"):
        assert (prev / "weights" / name).read_bytes() == (nemo / "weights" / name).read_bytes(), name
    assert (prev / "context" / "model.yaml").read_bytes() == (nemo / "context" / "model.yaml").read_bytes()


def test_nemo2_megatron_nemo1_chain(src: Path, nemo: Path, tmp_path: Path) -> None:
    ref = load_dcp(nemo / "weights")
    flat = unstack(ref)
    reshard(nemo, tmp_path / "mg", format="megatron", tp=2, pp=2)
    got = reassemble(tmp_path / "mg", "megatron", 2, 2, L)
    assert got.keys() == flat.keys() and all(torch.equal(got[k], flat[k]) for k in flat)
    assert (tmp_path / "mg" / "tokenizer" / "tokenizer.json").is_file()

    reshard(tmp_path / "mg", tmp_path / "n1", format="nemo1", tp=4, pp=1)
    got = reassemble(tmp_path / "n1", "nemo1", 4, 1, L)
    assert all(torch.equal(got[k], flat[k]) for k in flat)
    cfg = yaml.safe_load((tmp_path / "n1" / "model_config.yaml").read_text())
    assert cfg["tensor_model_parallel_size"] == 4 and cfg["pipeline_model_parallel_size"] == 1

    reshard(tmp_path / "n1", tmp_path / "mg2", tp=1, pp=2)  # format stays nemo1
    assert (tmp_path / "mg2" / "tp_rank_00_pp_rank_001" / "model_weights.ckpt").is_file()

    reshard(tmp_path / "mg2", tmp_path / "back", format="nemo2", tp=2)
    got = load_dcp(tmp_path / "back" / "weights")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert yaml.safe_load((tmp_path / "back" / "context" / "model.yaml").read_text())["config"][
        "tensor_model_parallel_size"] == 2
    for d in ("mg", "n1", "mg2", "back"):
        hfnemo.convert(tmp_path / d, tmp_path / f"hf-{d}")
        _same_hf(src, tmp_path / f"hf-{d}")


def test_cli_reshard_and_format(src: Path, nemo: Path, tmp_path: Path, capsys) -> None:
    assert main(["import", str(src), str(tmp_path / "mg"), "--format", "megatron", "--tp", "2", "--quiet"]) == 0
    assert (tmp_path / "mg" / "release" / "mp_rank_01" / "model_optim_rng.pt").is_file()
    assert main(["reshard", str(tmp_path / "mg"), str(tmp_path / "n2"), "--tp", "4", "--format", "nemo2",
                 "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["direction"] == "reshard"
    got, ref = load_dcp(tmp_path / "n2" / "weights"), load_dcp(nemo / "weights")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert main(["reshard", str(nemo), str(tmp_path / "bad"), "--tp", "3", "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()
    assert main(["reshard", str(src), str(tmp_path / "bad"), "--quiet"]) == 2
