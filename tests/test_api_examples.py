"""The Python API: README.md's python blocks run as written (in a scratch directory holding a tiny
Llama saved as ``Meta-Llama-3-8B``), and hfnemo.iter_tensors streams exactly what a conversion
would write."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from legacy_helpers import make_tp4_llama
from test_reference import load_dcp
from tiny_models import load_hf_state

import hfnemo
from hfnemo.errors import BudgetExceeded, UsageError

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_examples_run(tiny_hf_factory, tmp_path: Path, monkeypatch, capsys) -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3 and any("hfnemo.verify" in b for b in blocks) and any("iter_tensors" in b for b in blocks)
    shutil.copytree(tiny_hf_factory("llama3_gqa"), tmp_path / "Meta-Llama-3-8B")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)  # noqa: S102
    out = capsys.readouterr().out
    assert ns["diff"].equal and ns["info"].format == "nemo2" and ns["info"].architecture == "LlamaForCausalLM"
    assert Path(ns["copy"].backup).parent == tmp_path / "backups"
    want = load_hf_state(tmp_path / "Meta-Llama-3-8B")
    got = {n: p.detach() for n, p in ns["model"].named_parameters()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].float()) for k in want)
    assert "module.decoder.layers.self_attention.linear_qkv.weight (1, 0, 0)" in out
    assert "nemo2" in out and "hf" in out  # list_checkpoints printed both
    # the in-memory state dict block streamed the model's own tensors (on the GPU when there is one)
    assert ns["fqn"].startswith("module.") and ns["chunk"].device.type == ("cuda" if ns["gpu"] else "cpu")


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    src = make_tp4_llama(root / "hf", num_layers=2)
    out = {"hf": src}
    for name, kw in {"nemo_tp2": {"tp": 2}, "nemo1": {"format": "nemo1", "tp": 2, "pp": 2},
                     "meg": {"format": "megatron", "tp": 4}}.items():
        hfnemo.convert(src, root / name, **kw)
        out[name] = root / name
    return out


@pytest.mark.parametrize("src", ["hf", "nemo_tp2", "nemo1", "meg"])
@pytest.mark.parametrize("dtype", ["auto", "fp32"])
def test_iter_tensors_to_hf(ck: dict, src: str, dtype: str) -> None:
    want = load_hf_state(ck["hf"])
    got = list(hfnemo.iter_tensors(ck[src], to="hf", dtype=dtype, max_memory="4GiB"))
    assert len(got) == len(want) and {n for n, _ in got} == set(want)
    for name, t in got:
        w = want[name] if dtype == "auto" else want[name].float()
        assert t.dtype == w.dtype and torch.equal(t, w), name


@pytest.mark.parametrize("src", ["hf", "nemo1", "meg"])
def test_iter_tensors_to_nemo(ck: dict, tmp_path: Path, src: str) -> None:
    """The chunks re-assemble to the DCP tensors an import writes; each chunk is the stored one."""
    want = load_dcp(ck["nemo_tp2"] / "weights")
    seen: dict[str, torch.Tensor] = {}
    n = 0
    for fqn, offsets, chunk in hfnemo.iter_tensors(ck[src], to="nemo", tp=2, chunks=True):
        g = seen.setdefault(fqn, torch.full_like(want[fqn], float("nan")))
        g[tuple(slice(o, o + s) for o, s in zip(offsets, chunk.shape))] = chunk
        n += 1
    assert seen.keys() == want.keys()
    assert all(torch.equal(seen[k], want[k]) for k in want)
    assert n == len(hfnemo.plan(ck["hf"], tp=2).items)
    names = [name for name, _ in hfnemo.iter_tensors(ck[src], to="nemo", tp=2)]
    assert len(names) == n and set(names) == set(want)


def test_iter_tensors_refuses(ck: dict) -> None:
    with pytest.raises(UsageError):
        next(hfnemo.iter_tensors(ck["hf"], to="gguf"))
    from hfnemo.memory import current_rss

    with pytest.raises(BudgetExceeded, match="raise --max-memory"):
        next(hfnemo.iter_tensors(ck["hf"], to="hf", max_memory=current_rss() + (8 << 20)))
