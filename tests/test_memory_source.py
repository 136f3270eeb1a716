"""An HF state dict in host memory as a source (hfnemo.exec.memsource): ``hfnemo.iter_tensors(
state_dict, config=..., to="nemo")`` yields exactly the chunks streaming (and importing) the saved
directory gives, for every layout, dtype and architecture shape; bad input is refused naming the
tensor and the fix; the caller's tensors are never written and not counted in the budget. The GPU
pipeline over pinned / pageable state dicts is checked against these bytes in test_gpu_path.py."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import load_hf_state

import hfnemo
from hfnemo.errors import BudgetExceeded, ConversionError, UsageError
from hfnemo.exec import memsource
from hfnemo.exec.memsource import MemoryReader, memory_sources
from hfnemo.memory import current_rss


def _chunks(it):
    return [(k, tuple(o), t) for k, o, t in it]


def _same(a, b) -> None:
    assert [(k, o, tuple(t.shape), t.dtype) for k, o, t in a] == [(k, o, tuple(t.shape), t.dtype) for k, o, t in b]
    for (k, o, x), (_, _, y) in zip(a, b):
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), (k, o)


@pytest.mark.parametrize("shape,tp,pp,ep,dtype", [
    ("llama3_gqa", 1, 1, 1, "auto"), ("llama3_gqa", 2, 1, 1, "fp16"), ("llama2_mha", 4, 2, 1, "auto"),
    ("llama32_tied", 2, 1, 1, "fp32"), ("codellama", 2, 1, 1, "auto"), ("mistral", 2, 2, 1, "bf16")])
def test_state_dict_matches_directory(tiny_hf_factory, shape, tp, pp, ep, dtype):
    src = tiny_hf_factory(shape, dtype=torch.float32 if dtype == "bf16" else torch.bfloat16)
    sd = load_hf_state(src)
    before = {k: v.clone() for k, v in sd.items()}
    want = _chunks(hfnemo.iter_tensors(src, to="nemo", tp=tp, pp=pp, ep=ep, dtype=dtype, chunks=True))
    got = _chunks(hfnemo.iter_tensors(sd, to="nemo", tp=tp, pp=pp, ep=ep, dtype=dtype, chunks=True,
                                      config=src / "config.json"))
    _same(want, got)
    assert all(torch.equal(before[k], sd[k]) for k in sd)  # the caller's tensors are untouched


@pytest.mark.parametrize("shape", ["mixtral_8x7b", "qwen2_05b_tied"])
def test_moe_qwen_state_dict_matches_directory(tmp_path, shape):
    from tiny_moe_qwen import make_tiny

    src = make_tiny(tmp_path / shape, shape)
    sd = load_hf_state(src)
    for tp, ep in ((1, 1), (2, 2 if shape.startswith("mixtral") else 1)):
        want = _chunks(hfnemo.iter_tensors(src, to="nemo", tp=tp, ep=ep, chunks=True))
        got = _chunks(hfnemo.iter_tensors(sd, to="nemo", tp=tp, ep=ep, chunks=True, config=src))
        _same(want, got)


def test_config_forms(tiny_hf_factory):
    """config= as a dict, a transformers config, config.json's path or its directory: one plan."""
    from transformers import AutoConfig

    src = tiny_hf_factory("llama3_gqa")
    sd = load_hf_state(src)
    want = _chunks(hfnemo.iter_tensors(src, to="nemo", chunks=True))
    for cfg in (json.loads((src / "config.json").read_text()), AutoConfig.from_pretrained(src), src,
                src / "config.json"):
        _same(want, _chunks(hfnemo.iter_tensors(sd, to="nemo", chunks=True, config=cfg)))


def test_reader_rows_and_columns(tiny_hf_factory, monkeypatch):
    src = tiny_hf_factory("llama3_gqa", dtype=torch.float32)
    sd = load_hf_state(src)
    name = "model.layers.0.mlp.down_proj.weight"
    srcs = memory_sources(sd)
    reader = MemoryReader(sd)
    t = sd[name]
    out = bytearray(3 * t.shape[1] * 4)
    reader.read_rows(srcs[name], 5, 8, memoryview(out))
    assert bytes(out) == t[5:8].contiguous().view(torch.uint8).numpy().tobytes()
    for native in (True, False):  # the native core's column cut, and torch's without it
        if not native:
            monkeypatch.setattr(memsource, "_C", None)
        cols = torch.empty(4 * 7 * 4, dtype=torch.uint8)  # 4 rows x 7 fp32
        assert reader.read_cols(srcs[name], 2, 6, 9, 7, cols)
        assert torch.equal(cols.view(torch.float32).view(4, 7), t[2:6, 9:16])
        buf = bytearray(4 * 7 * 4)
        assert reader.read_cols(srcs[name], 2, 6, 9, 7, memoryview(buf))
        assert bytes(buf) == t[2:6, 9:16].contiguous().view(torch.uint8).numpy().tobytes()


def test_refusals_name_tensor_and_fix(tiny_hf_factory):
    src = tiny_hf_factory("llama3_gqa")
    sd = load_hf_state(src)
    cfg = src / "config.json"
    name = "model.layers.1.self_attn.q_proj.weight"

    def refused(state, exc=UsageError, **kw):
        with pytest.raises(exc) as e:
            next(hfnemo.iter_tensors(state, **{"to": "nemo", "config": cfg, **kw}))
        assert e.value.fix
        return e.value

    e = refused({**sd, name: sd[name].t()})
    assert e.tensor == name and "contiguous" in e.fix
    e = refused({**sd, name: sd[name].to(torch.complex64)})
    assert e.tensor == name and "dtype" in e.message
    e = refused({**sd, name: sd[name].to(torch.int32)}, exc=ConversionError)  # fused with bf16 k, v
    assert name in e.tensor
    e = refused({**sd, name: "weights"})
    assert e.tensor == name
    assert refused(sd, config=None).file == "<state dict>"
    refused(sd, to="hf")
    refused({})
    # a tensor missing or of the wrong shape: the mapping's own errors, naming it
    missing = dict(sd)
    del missing[name]
    assert refused(missing, exc=ConversionError).tensor == name
    short = {**sd, name: sd[name][:-8].contiguous()}
    assert name in str(refused(short, exc=ConversionError))
    # config= is for a state dict only
    with pytest.raises(UsageError):
        next(hfnemo.iter_tensors(src, to="nemo", config=cfg))
    with pytest.raises(UsageError):
        next(hfnemo.iter_tensors(sd, to="nemo", config=cfg, device="tpu"))


def test_state_dict_changed_mid_stream(tiny_hf_factory):
    src = tiny_hf_factory("llama3_gqa")
    sd = load_hf_state(src)
    gen = hfnemo.iter_tensors(sd, to="nemo", config=src)
    next(gen)
    for k in list(sd):
        sd[k].resize_(1)  # the caller changes its tensors in place while the stream runs
    with pytest.raises(UsageError) as e:
        list(gen)
    assert "changed" in str(e.value) and e.value.tensor


def test_budget_leaves_out_the_callers_tensors(tiny_hf_factory):
    """A state dict larger than max_memory streams: hfnemo's own buffers are counted, not the
    caller's tensors (here 256 MiB of embeddings against a budget below what the process holds)."""
    src = tiny_hf_factory("llama3_gqa")
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = 262144
    sd = load_hf_state(src)
    hidden = cfg["hidden_size"]
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.full((cfg["vocab_size"], hidden), 0.5, dtype=torch.bfloat16)  # resident: 128 MiB each
    limit = current_rss() - (32 << 20)
    n = 0
    for _fqn, chunk in hfnemo.iter_tensors(sd, to="nemo", tp=2, max_memory=limit, config=cfg):
        n += 1
        del chunk
    assert n > 8
    with pytest.raises(BudgetExceeded):  # but what hfnemo allocates is: two 64 MiB chunks cannot fit
        next(hfnemo.iter_tensors(sd, to="nemo", tp=2, config=cfg,
                                 max_memory=current_rss() - sum(v.nbytes for v in sd.values()) + (16 << 20)))


def test_overrides_with_state_dict_and_directory(tiny_hf_factory):
    """overrides= are checked against the weights for both sources (a config-only override leaves
    the tensors as they are; one the weights contradict is refused)."""
    src = tiny_hf_factory("llama3_gqa")
    sd = load_hf_state(src)
    want = _chunks(hfnemo.iter_tensors(src, to="nemo", chunks=True))
    _same(want, _chunks(hfnemo.iter_tensors(sd, to="nemo", chunks=True, config=src, overrides={"seq_length": 8192})))
    _same(want, _chunks(hfnemo.iter_tensors(src, to="nemo", chunks=True, overrides=["seq_length=8192"])))
    with pytest.raises(ConversionError):
        next(hfnemo.iter_tensors(sd, to="nemo", config=src, overrides={"hf.num_key_value_heads": 4}))
    with pytest.raises(UsageError):
        next(hfnemo.iter_tensors(src, to="hf", overrides={"seq_length": 8192}))
