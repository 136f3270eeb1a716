"""NeMo 1 dist-ckpt models written (``--format nemo1-dist``): model_config.yaml, the artifacts and
``model_weights/`` a torch-dist (DCP) directory with MegatronGPTModel's sharded-state-dict keys
(``model.decoder.layers.…``, layers stacked), as a directory and as a ``.nemo`` tar; read back by
torch.distributed.checkpoint itself and by hfnemo, bit-exact."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from legacy_helpers import make_tp4_llama
from test_reference import load_dcp
from tiny_models import load_hf_state

import hfnemo
from hfnemo.cli import main
from hfnemo.errors import UsageError


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_tp4_llama(tmp_path_factory.mktemp("hf"), num_layers=2)


@pytest.fixture(scope="module")
def hf_state(src: Path) -> dict[str, torch.Tensor]:
    return load_hf_state(src)


@pytest.fixture(scope="module")
def nemo2_tp1(src: Path, tmp_path_factory) -> dict[str, torch.Tensor]:
    """hfnemo's NeMo 2 weights of the same model, through torch's reader (keys ``module.…``)."""
    out = tmp_path_factory.mktemp("nemo2") / "ckpt"
    hfnemo.convert(src, out)
    return load_dcp(out / "weights")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _check_dir(d: Path, tp: int, nemo2: dict[str, torch.Tensor]) -> None:
    assert (d / "model_config.yaml").is_file() and not (d / "model_weights.ckpt").exists()
    assert not list(d.glob("mp_rank_*"))
    cfg = yaml.safe_load((d / "model_config.yaml").read_text())
    assert cfg["mcore_gpt"] is True and cfg["dist_ckpt_format"] == "torch_dist"
    assert cfg["tensor_model_parallel_size"] == tp
    w = d / "model_weights"
    assert (w / ".metadata").is_file() and sorted(p.name for p in w.glob("__0_*.distcp"))
    assert json.loads((w / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert torch.load(w / "common.pt", weights_only=True) == {}
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(w)).read_metadata()
    keys = {k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    # exactly NeMo 2's keys with MegatronGPTModel's prefix ("model." for the Lightning "module.")
    assert keys == {"model." + k.removeprefix("module.") for k in nemo2}
    assert all(k.startswith("model.") for k in md.state_dict_metadata)
    assert any(k.startswith("model.decoder.layers.") and "_extra_state" in k for k in md.state_dict_metadata)
    if tp > 1:  # the TP cuts: a column-parallel weight has tp chunks per layer
        qkv = md.state_dict_metadata["model.decoder.layers.self_attention.linear_qkv.weight"]
        assert len(qkv.chunks) == 2 * tp
    got = load_dcp(w)  # torch's own reader: the same tensors as NeMo 2's, renamed
    assert _same(got, {"model." + k.removeprefix("module."): v for k, v in nemo2.items()})


@pytest.mark.parametrize("tp", [1, 2])
def test_dist_dir_round_trip(src: Path, hf_state: dict, nemo2_tp1: dict, tmp_path: Path, tp: int) -> None:
    out = tmp_path / "dist"
    hfnemo.convert(src, out, format="nemo1-dist", tp=tp)
    _check_dir(out, tp, nemo2_tp1)
    back = tmp_path / "back"
    hfnemo.convert(out, back)
    assert _same(load_hf_state(back), hf_state)
    info = hfnemo.inspect(out)
    assert info.format == "nemo1" and info.tp == tp and info.num_layers == 2
    chunk_bytes = sum(t.numel() * t.element_size() for t in hf_state.values())
    assert info.weight_bytes >= chunk_bytes > 0


@pytest.mark.parametrize("tp", [1, 2])
def test_dist_nemo_tar_round_trip(src: Path, hf_state: dict, nemo2_tp1: dict, tmp_path: Path, tp: int) -> None:
    out = tmp_path / "model.nemo"
    report = hfnemo.convert(src, out, format="nemo1-dist", tp=tp)
    assert out.is_file() and report.output == str(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    with tarfile.open(out, "r:") as tf:
        names = tf.getnames()
        tf.extractall(tmp_path / "x", filter="data")
    assert names[0] == "." and "./model_config.yaml" in names and "./model_weights/.metadata" in names
    assert "./model_weights" in names and not any(n.endswith("model_weights.ckpt") for n in names)
    _check_dir(tmp_path / "x", tp, nemo2_tp1)
    # the tar holds the directory hfnemo writes (.metadata aside: its checkpoint_id names the path)
    directory = tmp_path / "dir"
    hfnemo.convert(src, directory, format="nemo1-dist", tp=tp)
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (".metadata",
                                                                                         "hfnemo-manifest.json")):
        rel = f.relative_to(directory)
        assert (tmp_path / "x" / rel).read_bytes() == f.read_bytes(), rel
    back = tmp_path / "back"
    hfnemo.convert(out, back)
    assert _same(load_hf_state(back), hf_state)
    info = hfnemo.inspect(out)
    assert info.format == "nemo1-tar" and info.weight_bytes >= sum(t.numel() * t.element_size()
                                                                   for t in hf_state.values())


def test_cli_and_reshard(src: Path, hf_state: dict, tmp_path: Path, capsys) -> None:
    d, t = tmp_path / "d", tmp_path / "t.nemo"
    assert main(["import", str(src), str(d), "--format", "nemo1-dist", "--tp", "2", "--quiet"]) == 0
    assert main(["import", str(src), str(t), "--format", "nemo1-dist", "--quiet"]) == 0
    assert (d / "model_weights" / ".metadata").is_file()
    with tarfile.open(t, "r:") as tf:
        assert "./model_weights/.metadata" in tf.getnames()
    capsys.readouterr()
    assert main(["inspect", str(d)]) == 0
    assert "NeMo 1" in capsys.readouterr().out
    # reshard: per-rank NeMo 1 -> dist-ckpt (dir and .nemo), and back
    for dst in (tmp_path / "r", tmp_path / "rt.nemo"):
        hfnemo.reshard(d, dst, tp=1, format="nemo1-dist")
        hfnemo.convert(dst, tmp_path / f"hf-{dst.stem}")
        assert _same(load_hf_state(tmp_path / f"hf-{dst.stem}"), hf_state)
    with pytest.raises(UsageError):
        hfnemo.convert(src, tmp_path / "m.nemo", format="megatron")
