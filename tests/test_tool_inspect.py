"""hfnemo inspect / hfnemo list: every format hfnemo knows described from metadata only (with every
weight byte overwritten the description is the same), --json shapes, exit codes; list finds
checkpoints in a tree, newest first, without descending into them."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from legacy_helpers import make_tp4_llama
from tiny_models import load_hf_state

import hfnemo
from hfnemo.cli import main
from hfnemo.errors import UsageError

L, H, F, V, HEADS, GROUPS, D = 2, 128, 512, 1024, 8, 4, 16
TOKENIZER = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _hf_bin(hf: Path, out: Path) -> Path:
    out.mkdir()
    for f in hf.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    torch.save(load_hf_state(hf), out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> dict[str, Path]:
    from test_tool_verify import make_megatron_dist

    root = tmp_path_factory.mktemp("inspect")
    src = make_tp4_llama(root / "hf", num_layers=L)
    out = {"hf": src, "hf-bin": _hf_bin(src, root / "bin")}
    for name, kw in {"nemo": {}, "nemo_tp2": {"tp": 2, "pp": 2}, "nemo1": {"format": "nemo1", "tp": 2},
                     "meg": {"format": "megatron", "tp": 2, "pp": 2}}.items():
        hfnemo.convert(src, root / name, **kw)
        out[name] = root / name
    with tarfile.open(root / "model.nemo", "w:") as tf:
        tf.add(out["nemo1"], arcname=".")
    out["tar"] = root / "model.nemo"
    out["dist"] = make_megatron_dist(
        out["nemo"], root / "dist", num_layers=L, hidden_size=H, ffn_hidden_size=F, num_attention_heads=HEADS,
        num_query_groups=GROUPS, group_query_attention=True, kv_channels=D, vocab_size=V, padded_vocab_size=V,
        tensor_model_parallel_size=4, pipeline_model_parallel_size=1, swiglu=True, normalization="RMSNorm",
        untie_embeddings_and_output_weights=True)
    return out


@pytest.fixture(scope="module")
def params(ck: dict) -> int:
    return sum(t.numel() for t in load_hf_state(ck["hf"]).values())


@pytest.mark.parametrize("key,fmt,tp,pp", [
    ("hf", "hf", 1, 1), ("hf-bin", "hf-bin", 1, 1), ("nemo", "nemo2", 1, 1), ("nemo_tp2", "nemo2", 2, 2),
    ("nemo1", "nemo1", 2, 1), ("tar", "nemo1-tar", 2, 1), ("meg", "megatron", 2, 2), ("dist", "megatron-dist", 4, 1),
])
def test_inspect_every_format(ck: dict, params: int, key: str, fmt: str, tp: int, pp: int) -> None:
    info = hfnemo.inspect(ck[key])
    assert info.format == fmt and info.format_label
    assert (info.num_layers, info.hidden_size, info.ffn_hidden_size) == (L, H, F)
    assert (info.num_attention_heads, info.num_query_groups, info.head_dim) == (HEADS, GROUPS, D)
    assert info.vocab_size == V
    assert (info.tp, info.pp, info.ep) == (tp, pp, 1)
    if key != "dist":  # a foreign torch_dist checkpoint names no HF architecture
        assert info.architecture == "LlamaForCausalLM"
    from hfnemo.io import legacy

    if key == "tar" and not hasattr(legacy, "is_nemo1_tar"):  # read by inspect itself: per rank file
        assert info.parameters > params and "per rank file" in info.notes[0]
    else:
        assert info.parameters == params and info.dtypes == {"bf16": params}, info.notes
    assert info.size_bytes > info.weight_bytes > params * 2 * 0.99 and info.files >= 1
    if key != "dist":
        assert info.tokenizer and set(TOKENIZER) <= set(info.tokenizer_files)
    assert json.loads(json.dumps(info.to_json()))["format"] == fmt


def test_inspect_nemo_tar_read_in_place(ck: dict, params: int) -> None:
    """The .nemo reader of hfnemo.tools.inspect itself (used when hfnemo.io.legacy cannot open tars):
    model_config.yaml and each rank file's data.pkl straight from the tar."""
    from hfnemo.tools import inspect as tool

    info = tool.ModelInfo(str(ck["tar"]), "nemo1-tar", tool.FORMATS["nemo1-tar"])
    tool._inspect_nemo_tar(ck["tar"], info)
    assert (info.num_layers, info.hidden_size, info.num_query_groups, info.vocab_size) == (L, H, GROUPS, V)
    assert (info.tp, info.pp) == (2, 1) and info.architecture == "LlamaForCausalLM" and info.tokenizer
    assert info.parameters > params and "per rank file" in info.notes[0]  # replicated norms count twice


def test_inspect_reads_no_weight_bytes(ck: dict, tmp_path: Path, params: int) -> None:
    """Every weight byte zeroed (headers intact): inspect says the same."""
    from hfnemo.io.dcp import read_index
    from hfnemo.io.hf import scan_weights
    from hfnemo.io.torchzip import locate_tensor

    hf = shutil.copytree(ck["hf"], tmp_path / "hf")
    for t in scan_weights(hf).values():
        with open(t.file, "r+b") as f:
            f.seek(t.offset)
            f.write(b"\xff" * t.nbytes)
    nemo = shutil.copytree(ck["nemo_tp2"], tmp_path / "nemo")
    idx = read_index(nemo / "weights")
    for g in idx.tensors.values():
        for c in g.chunks:
            fd = os.open(idx.root / c.file, os.O_RDWR)
            try:
                st = locate_tensor(fd, c.offset, c.length)
                os.pwrite(fd, b"\xff" * st.nbytes, st.offset)
            finally:
                os.close(fd)
    for a, b in ((ck["hf"], hf), (ck["nemo_tp2"], nemo)):
        x, y = hfnemo.inspect(a).to_json(), hfnemo.inspect(b).to_json()
        x.pop("path"), y.pop("path")
        assert x == y
    assert not hfnemo.verify(ck["hf"], hf).equal  # the bytes did change


def test_inspect_moe_and_padding(tmp_path: Path) -> None:
    from tiny_moe_qwen import make_tiny

    src = make_tiny(tmp_path / "hf", "mixtral_8x7b")
    hfnemo.convert(src, tmp_path / "nemo", tp=2, ep=2)
    a, b = hfnemo.inspect(src), hfnemo.inspect(tmp_path / "nemo")
    assert a.num_experts == b.num_experts == 8 and (b.tp, b.ep) == (2, 2)
    assert a.vocab_size == b.vocab_size == 1000 and a.embedding_rows == 1000
    assert b.embedding_rows >= 1000  # NeMo pads the vocabulary for Mixtral
    assert a.architecture == b.architecture == "MixtralForCausalLM" and b.family == "mixtral"


def test_inspect_cli_text_json_and_errors(ck: dict, tmp_path: Path, capsys) -> None:
    rc, out, _ = run(capsys, "inspect", str(ck["nemo_tp2"]))
    assert rc == 0
    assert "format:        NeMo 2" in out and "architecture:  LlamaForCausalLM" in out
    assert f"attention:     {HEADS} heads, {GROUPS} query groups, head dim {D}" in out
    assert "layout:        TP 2, PP 2, EP 1" in out and "tokenizer:     yes" in out
    rc, out, _ = run(capsys, "inspect", str(ck["meg"]), "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["format"] == "megatron" and doc["tp"] == 2 and doc["pp"] == 2
    assert set(doc) >= {"path", "format", "architecture", "num_layers", "hidden_size", "num_attention_heads",
                        "num_query_groups", "vocab_size", "parameters", "dtypes", "size_bytes", "tp", "pp", "ep",
                        "tokenizer"}
    rc, _, err = run(capsys, "inspect", str(tmp_path / "missing"))
    assert rc == 2 and "does not exist" in err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    rc, out, err = run(capsys, "inspect", str(tmp_path / "run"), "--json")
    assert rc == 2 and "training run" in err and "hfnemo list" in json.loads(out)["fix"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="not a checkpoint"):
        hfnemo.inspect(tmp_path / "plain")


def _touch_tree(p: Path, t: float) -> None:
    for f in [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]:
        os.utime(f, (t, t))


def test_list(ck: dict, tmp_path: Path, capsys) -> None:
    root = tmp_path / "root"
    layout = {  # path under root -> checkpoint, in order oldest first
        "models/hf": ck["hf"], "models/bin": ck["hf-bin"], "archive/model.nemo": ck["tar"],
        "runs/exp1/checkpoints/model-step=10-last": ck["nemo"], "legacy/meg": ck["meg"], "legacy/nemo1": ck["nemo1"],
        "dist": ck["dist"],
    }
    t0 = 1_700_000_000
    for i, (rel, src) in enumerate(layout.items()):
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
        _touch_tree(dst, t0 + 100 * i)
    # not checkpoints, or inside one: never listed
    inside = root / "runs" / "exp1" / "checkpoints" / "model-step=10-last"
    shutil.copytree(ck["hf"], inside / "hf_inside")
    _touch_tree(inside, t0 + 300)
    shutil.copytree(ck["hf"], root / ".cache" / "hf")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("hi")
    rows = hfnemo.list_checkpoints(root)
    assert [Path(r.path).relative_to(root).as_posix() for r in rows] == list(reversed(layout))
    assert [r.format for r in rows] == ["megatron-dist", "nemo1", "megatron", "nemo2", "nemo1-tar", "hf-bin", "hf"]
    assert rows[-1].architecture == "LlamaForCausalLM" and rows[-1].mtime == t0
    assert all(r.size_bytes > 0 for r in rows)
    rc, out, _ = run(capsys, "list", str(root), "--json")
    doc = json.loads(out)
    assert rc == 0 and len(doc) == 7
    assert set(doc[0]) == {"path", "format", "size_bytes", "mtime", "modified", "architecture"}
    rc, out, _ = run(capsys, "list", str(root), "--depth", "2")
    assert rc == 0 and "model-step=10-last" not in out and "models/hf" in out
    rc, _, err = run(capsys, "list", str(root / "notes" / "readme.txt"))
    assert rc == 2 and "not a directory" in err
