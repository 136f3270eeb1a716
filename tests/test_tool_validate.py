"""``hfnemo validate HF_DIR NEMO``: both models run in transformers (the NeMo one through hfnemo's
in-memory export), logits compared bit-exactly by default; a corrupted conversion exits 1."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import hfnemo
from hfnemo.cli import main
from hfnemo.io.dcp import ChunkLocator, read_index
from hfnemo.tools.validate import validate


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    from tiny_models import make_tiny_hf

    root = tmp_path_factory.mktemp("validate")
    src = make_tiny_hf(root / "hf", "llama3_gqa", num_layers=2)
    hfnemo.convert(src, root / "nemo")
    return src, root / "nemo"


def _perturb(nemo: Path, fqn: str, how: str) -> None:
    """Change the stored bytes of one layer's chunk of ``fqn`` in place."""
    index = read_index(nemo / "weights")
    g = index.tensors[fqn]
    chunk = g.chunks[-1]
    path = nemo / "weights" / chunk.file
    fd = os.open(path, os.O_RDWR)
    try:
        st = ChunkLocator(index).locate(fd, fqn, chunk)
        data = bytearray(os.pread(fd, st.nbytes, st.offset))
        t = torch.frombuffer(data, dtype=g.dtype.torch)
        if how == "flip":
            t.neg_()  # every element's sign
        else:
            t.view(torch.int16)[0] += 1  # one element by one unit in the last place
        os.pwrite(fd, bytes(data), st.offset)
    finally:
        os.close(fd)


def test_faithful_conversion_is_bit_exact(models, capsys) -> None:
    src, nemo = models
    assert main(["validate", str(src), str(nemo), "--json", "--max-new-tokens", "4"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["max_abs_diff"] == 0.0 and rep["problems"] == []
    assert rep["hf_params"] == rep["nemo_params"] == rep["nemo_stored_params"] > 0
    assert rep["tokenizer"] == str(src) and len(rep["prompts"]) == 2
    for p in rep["prompts"]:
        assert p["logits_equal"] and p["top1_agreement"] == 1.0 and p["topk_agreement"] == 1.0
        assert p["generation_match"] and len(p["hf_generated"]) == 4 and p["hf_text"] == p["nemo_text"]
    assert main(["validate", str(src), str(nemo), "--prompt", "hello world", "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert "bit-identical" in text and "OK: the models agree bit-exactly" in text and "'hello world'" in text


@pytest.mark.parametrize("how", ["flip", "ulp"])
def test_corrupted_conversion_exits_1(models, tmp_path: Path, capsys, how: str) -> None:
    src, nemo = models
    bad = tmp_path / "bad"
    shutil.copytree(nemo, bad)
    _perturb(bad, "module.decoder.layers.mlp.linear_fc2.weight", how)
    assert main(["validate", str(src), str(bad), "--max-new-tokens", "2"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "logits differ" in out
    if how == "ulp":  # a tolerance makes the same one-ulp difference acceptable
        assert main(["validate", str(src), str(bad), "--max-new-tokens", "2", "--atol", "1"]) == 0


def test_nemo_file_without_tokenizer_uses_token_ids(tmp_path: Path) -> None:
    from tiny_models import make_tiny_hf

    src = make_tiny_hf(tmp_path / "hf", "mistral", num_layers=2, tokenizer=False)
    hfnemo.convert(src, tmp_path / "m.nemo", tp=2)
    v = validate(src, tmp_path / "m.nemo", max_new_tokens=3)
    assert v.ok and v.tokenizer is None and v.prompts[0].prompt is None and v.prompts[0].hf_text is None
    v = validate(src, tmp_path / "m.nemo", ids=[[5, 6, 7], [9]], max_new_tokens=3, dtype="fp32")
    assert v.ok and [p.input_ids for p in v.prompts] == [[5, 6, 7], [9]]
    assert main(["validate", str(src), str(tmp_path / "m.nemo"), "--prompt", "hi"]) == 2  # text needs a tokenizer
    assert main(["validate", str(src), str(tmp_path / "m.nemo"), "--ids", "1 99999"]) == 2  # outside the vocabulary


def test_tokenizer_from_the_nemo_side(models, tmp_path: Path) -> None:
    src, nemo = models
    bare = tmp_path / "hf"
    bare.mkdir()
    for f in src.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copyfile(f, bare / f.name)
    v = validate(bare, nemo, prompts=["the quick brown fox"], max_new_tokens=2)
    assert v.ok and v.tokenizer == "the NeMo checkpoint" and v.prompts[0].hf_text is not None
