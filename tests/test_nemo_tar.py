"""NeMo 1 ``.nemo`` files: written as a streamed tar (the NeMo 1 directory, member for member and
byte for byte), read in place without extracting the weights, and read when python's tarfile
packed them (uncompressed and gzip, as NeMo >= 1.7 and older NeMo write them)."""
from __future__ import annotations

import filecmp
import io
import os
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from legacy_helpers import load_rank, make_tp4_llama
from tiny_models import load_hf_state

import hfnemo
from hfnemo.cli import main
from hfnemo.errors import CorruptCheckpoint, OutputExists, UsageError
from hfnemo.io import nemo_tar

LAYOUTS = [(1, 1), (2, 1), (2, 2)]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_tp4_llama(tmp_path_factory.mktemp("hf"), num_layers=2)


@pytest.fixture(scope="module")
def hf_state(src: Path) -> dict[str, torch.Tensor]:
    return load_hf_state(src)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _tree(root: Path) -> list[str]:
    """Files of an output, less hfnemo's completeness manifest (directory outputs only)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != "hfnemo-manifest.json")


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_nemo_file_round_trip(src: Path, hf_state: dict, tmp_path: Path, tp: int, pp: int) -> None:
    out = tmp_path / "model.nemo"
    report = hfnemo.convert(src, out, tp=tp, pp=pp)
    assert out.is_file() and report.output == str(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    with tarfile.open(out, "r:") as tf:  # NeMo reads "r:" first (save_restore_connector)
        names = tf.getnames()
        extracted = tmp_path / "x"
        tf.extractall(extracted, filter="data")
    want = (["./model_weights.ckpt"] if tp == pp == 1 else
            [f"./mp_rank_{t:02d}/model_weights.ckpt" for t in range(tp)] if pp == 1 else
            [f"./tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt" for t in range(tp) for p in range(pp)])
    assert names[0] == "." and "./model_config.yaml" in names and set(want) <= set(names)
    # the tar holds exactly the NeMo 1 directory hfnemo writes, byte for byte
    directory = tmp_path / "dir"
    hfnemo.convert(src, directory, format="nemo1", tp=tp, pp=pp)
    assert _tree(extracted) == _tree(directory)
    assert all(filecmp.cmp(extracted / f, directory / f, shallow=False) for f in _tree(directory))
    for rel in want:  # torch.load reads every member (weights_only)
        assert load_rank(extracted / rel, "nemo1")
    back = tmp_path / "back"
    hfnemo.convert(out, back)
    assert _same(load_hf_state(back), hf_state)


def test_rerun_is_byte_identical_and_cli_spellings(src: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.nemo", tmp_path / "b.nemo"
    assert main(["import", str(src), str(a), "--format", "nemo1", "--quiet"]) == 0
    assert main(["import", str(src), str(b), "--quiet"]) == 0  # the .nemo suffix alone means NeMo 1
    assert a.read_bytes() == b.read_bytes()
    assert main(["import", str(src), str(a), "--quiet"]) == 2  # exists
    assert main(["import", str(src), str(a), "--quiet", "--overwrite"]) == 0
    assert main(["import", str(src), str(tmp_path / "c.nemo"), "--format", "megatron", "--quiet"]) == 2
    with pytest.raises(OutputExists):
        hfnemo.convert(src, a)


@pytest.mark.parametrize("mode", ["w:", "w:gz"])
def test_reads_nemo_packed_by_tarfile(src: Path, hf_state: dict, tmp_path: Path, mode: str) -> None:
    """An independent writer: python's tarfile packs the directory hfnemo wrote, as NeMo's
    _make_nemo_file_from_folder does (arcname "."); export gives the same tensors."""
    directory = tmp_path / "dir"
    hfnemo.convert(src, directory, format="nemo1", tp=2)
    packed = tmp_path / "packed.nemo"
    with tarfile.open(packed, mode) as tf:
        tf.add(directory, arcname=".")
    from_dir, from_tar = tmp_path / "from_dir", tmp_path / "from_tar"
    hfnemo.convert(directory, from_dir)
    hfnemo.convert(packed, from_tar)
    assert _same(load_hf_state(from_tar), load_hf_state(from_dir))
    assert _same(load_hf_state(from_tar), hf_state)
    assert _tree(from_tar) == _tree(from_dir)  # tokenizer, configs too
    assert sorted(os.listdir(tmp_path)) == ["dir", "from_dir", "from_tar", "packed.nemo"]  # nothing extracted here


def test_weights_are_read_in_place(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.nemo"
    hfnemo.convert(src, out, tp=2)
    ckpt = nemo_tar.open_nemo1_tar(out)
    try:
        for member in ckpt.files.values():
            assert isinstance(member, nemo_tar.Member) and os.fspath(member) == str(out) and member.offset % 512 == 0
        scratch = ckpt.tar.scratch_dir()
        extracted = [p for p in scratch.rglob("*") if p.is_file()]
        assert extracted and all("model_weights" not in p.name for p in extracted)
        assert sum(p.stat().st_size for p in extracted) < out.stat().st_size / 20
    finally:
        ckpt.tar.close()
    assert not scratch.exists()


def test_reshard_to_and_from_nemo_file(src: Path, hf_state: dict, tmp_path: Path) -> None:
    nemo2 = tmp_path / "nemo2"
    hfnemo.convert(src, nemo2)
    packed = tmp_path / "tp2.nemo"
    hfnemo.reshard(nemo2, packed, tp=2)
    assert "./mp_rank_01/model_weights.ckpt" in tarfile.open(packed).getnames()
    again = tmp_path / "again"
    hfnemo.reshard(packed, again, format="nemo2")
    assert _same(load_hf_state(_export(again, tmp_path / "h1")), hf_state)
    with pytest.raises(UsageError, match="reshard"):
        hfnemo.convert(nemo2, tmp_path / "x.nemo")


def _export(src: Path, out: Path) -> Path:
    hfnemo.convert(src, out)
    return out


def _members(data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tf:
        for name, payload in data.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def test_broken_nemo_files_are_clear_errors(src: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.nemo"
    hfnemo.convert(src, good, tp=2)
    truncated = tmp_path / "truncated.nemo"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptCheckpoint):
        hfnemo.convert(truncated, tmp_path / "o1")
    no_config = tmp_path / "noconfig.nemo"
    no_config.write_bytes(_members({"./model_weights.ckpt": b"x"}))
    with pytest.raises(CorruptCheckpoint, match="model_config.yaml"):
        hfnemo.convert(no_config, tmp_path / "o2")
    cfg = tarfile.open(good).extractfile("./model_config.yaml").read()
    missing = tmp_path / "missing.nemo"
    missing.write_bytes(_members({"./model_config.yaml": cfg, "./mp_rank_00/model_weights.ckpt": b"x"}))
    with pytest.raises(CorruptCheckpoint, match="mp_rank_01"):
        hfnemo.convert(missing, tmp_path / "o3")
    dist = tmp_path / "dist.nemo"
    dist.write_bytes(_members({"./model_config.yaml": cfg, "./model_weights/.metadata": b"x"}))
    with pytest.raises(CorruptCheckpoint, match=".metadata"):
        hfnemo.convert(dist, tmp_path / "o4")
    assert main(["export", str(truncated), str(tmp_path / "o5"), "--quiet"]) == 2
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_tar_writer_long_names_and_huge_sizes(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    long_name = "./" + "d" * 120 + "/model_weights.ckpt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    w = nemo_tar.TarWriter(fd)
    w.add_dir(".")
    w.begin(long_name)
    w.write(b"abc")
    w.write(memoryview(b"defg"))
    w.end()
    w.close()
    os.close(fd)
    with tarfile.open(path) as tf:
        assert tf.extractfile(long_name).read() == b"abcdefg"
    members = nemo_tar.open_tar(path).members
    assert members[long_name[2:]].size == 7
    # a member over 8 GiB: base-256 size in the same 512-byte header (its length never changes)
    head = nemo_tar.TarWriter._header("./model_weights.ckpt", 9 << 30, tarfile.REGTYPE, 0o644)
    assert len(head) == 512 and tarfile.TarInfo.frombuf(head, "utf-8", "strict").size == 9 << 30


# ------------------------------------------------------------------------------ dist-ckpt models

def _nemo1_dist_dir(src: Path, tmp_path: Path, tp: int) -> Path:
    """A NeMo 1 dist-ckpt directory: model_config.yaml and artifacts as hfnemo writes them, and
    model_weights/ a torch-dist checkpoint of Megatron's sharded state dict (keys ``model.…``, layers
    stacked). TP 1: written by torch.distributed.checkpoint itself (one chunk per tensor); TP 2:
    hfnemo's NeMo 2 chunks (one per layer, TP cuts) with the keys renamed in .metadata."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from test_reference import load_dcp

    nemo2, out = tmp_path / f"nemo2-tp{tp}", tmp_path / f"nemo1-dist-tp{tp}"
    hfnemo.convert(src, nemo2, tp=tp)
    hfnemo.convert(src, out, format="nemo1")
    (out / "model_weights.ckpt").unlink()
    if tp == 1:
        sd = {"model." + k.removeprefix("module."): v for k, v in load_dcp(nemo2 / "weights").items()}
        with warnings.catch_warnings():  # "torch.distributed is disabled ... a single process": intended
            warnings.simplefilter("ignore")
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(out / "model_weights")), no_dist=True)
    else:
        import dataclasses

        shutil.copytree(nemo2 / "weights", out / "model_weights")
        mpath = out / "model_weights" / ".metadata"
        md = pickle.loads(mpath.read_bytes())
        md.state_dict_metadata = {"model." + k.removeprefix("module."): v for k, v in md.state_dict_metadata.items()}
        md.storage_data = {dataclasses.replace(k, fqn="model." + k.fqn.removeprefix("module.")): v
                           for k, v in md.storage_data.items()}
        mpath.write_bytes(pickle.dumps(md))
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_reads_dist_ckpt_models(src: Path, hf_state: dict, tmp_path: Path, tp: int) -> None:
    directory = _nemo1_dist_dir(src, tmp_path, tp)
    packed = tmp_path / "dist.nemo"
    with tarfile.open(packed, "w:") as tf:
        tf.add(directory, arcname=".")
    for source, out in ((directory, tmp_path / "from_dir"), (packed, tmp_path / "from_tar")):
        hfnemo.convert(source, out)
        assert _same(load_hf_state(out), hf_state)
    for source in (directory, packed):  # inspect counts the dist-ckpt chunks as the weights
        info = hfnemo.inspect(source)
        chunk_bytes = sum(t.numel() * t.element_size() for t in hf_state.values())
        assert info.weight_bytes >= chunk_bytes > 0, (source, info.weight_bytes)
        assert "dist-ckpt" in info.format_label, info.format_label
    again = tmp_path / "again.nemo"  # reshard a dist-ckpt .nemo into a per-rank one
    hfnemo.reshard(packed, again, tp=2)
    hfnemo.convert(again, tmp_path / "from_again")
    assert _same(load_hf_state(tmp_path / "from_again"), hf_state)
