"""Peak memory of the whole process tree stays under --max-memory, even when the largest tensor
is bigger than the budget (it is streamed in row blocks)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from hfnemo.dtypes import BY_NAME
from hfnemo.io.safetensors import ShardWriter
from hfnemo.memwatch import run_and_measure

BUDGET = 512 << 20
VOCAB, HIDDEN, FFN = 140_000, 1024, 256  # embedding: 140000 x 1024 x fp32 = 573 MB > budget


def build_big_embedding_model(d: Path) -> None:
    """A 1-layer tied Llama whose embedding alone exceeds the budget, written without holding it."""
    d.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
           "intermediate_size": FFN, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
           "num_hidden_layers": 1, "vocab_size": VOCAB, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "rope_scaling": None, "max_position_embeddings": 2048, "hidden_act": "silu",
           "torch_dtype": "float32", "initializer_range": 0.02}
    (d / "config.json").write_text(json.dumps(cfg))
    p = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
              p + "self_attn.q_proj.weight": (1024, HIDDEN), p + "self_attn.k_proj.weight": (256, HIDDEN),
              p + "self_attn.v_proj.weight": (256, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, 1024),
              p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
              p + "mlp.down_proj.weight": (HIDDEN, FFN)}
    names = sorted(shapes)
    w = ShardWriter(d / "model.safetensors", [(n, BY_NAME["fp32"], shapes[n]) for n in names], {"format": "pt"})
    g = torch.Generator().manual_seed(0)
    for n in names:
        rows, rest = shapes[n][0], shapes[n][1:] or ()
        step = max(1, (16 << 20) // (4 * (rest[0] if rest else 1)))
        for r in range(0, rows, step):
            block = torch.randn((min(step, rows - r), *rest), generator=g)
            w.write(memoryview(block.numpy()).cast("B"))
    w.close()


def file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_peak_memory_under_budget_with_tensor_larger_than_budget(tmp_path: Path, dtype: str) -> None:
    src = tmp_path / "hf"
    build_big_embedding_model(src)
    assert (src / "model.safetensors").stat().st_size > BUDGET
    cli = [sys.executable, "-m", "hfnemo"]
    m = run_and_measure(cli + ["import", str(src), str(tmp_path / "nemo"), "--max-memory", str(BUDGET), "--quiet",
                               "--dtype", dtype])
    assert m.returncode == 0, m.stderr
    assert m.peak_pss_bytes <= BUDGET, (m.peak_pss_bytes, BUDGET)
    assert m.peak_rss_hwm_bytes <= BUDGET, (m.peak_rss_hwm_bytes, BUDGET)
    m2 = run_and_measure(cli + ["export", str(tmp_path / "nemo"), str(tmp_path / "back"), "--max-memory",
                                str(BUDGET), "--quiet", "--dtype", "fp32"])
    assert m2.returncode == 0, m2.stderr
    assert m2.peak_pss_bytes <= BUDGET, (m2.peak_pss_bytes, BUDGET)
    assert m2.peak_rss_hwm_bytes <= BUDGET, (m2.peak_rss_hwm_bytes, BUDGET)
    if dtype == "auto":
        # Same tensors, same order, same header: the exported file is the source, byte for byte.
        assert file_digest(tmp_path / "back" / "model.safetensors") == file_digest(src / "model.safetensors")
    else:
        from safetensors import safe_open
        with safe_open(tmp_path / "back" / "model.safetensors", "pt") as a, \
                safe_open(src / "model.safetensors", "pt") as b:
            for name in ("model.layers.0.self_attn.k_proj.weight", "model.norm.weight"):
                assert torch.equal(a.get_tensor(name), b.get_tensor(name).to(torch.bfloat16).float())
            ea = a.get_slice("model.embed_tokens.weight")[VOCAB - 7:VOCAB]
            eb = b.get_slice("model.embed_tokens.weight")[VOCAB - 7:VOCAB]
            assert torch.equal(ea, eb.to(torch.bfloat16).float())
