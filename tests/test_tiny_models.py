"""Tests of the tiny-checkpoint factories themselves (tests/tiny_models.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import (SHAPES, TOKENIZER_VOCAB, fixed_input_ids, hf_logits, load_hf_state, make_tiny_hf,
                         saved_dtype)

DTYPES = [torch.float32, torch.bfloat16]


def _cfg(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dialect", ["4", "5"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_builds(tiny_hf_factory, shape: str, dialect: str, dtype: torch.dtype) -> None:
    d = tiny_hf_factory(shape, dtype=dtype, dialect=dialect)
    cfg, spec = _cfg(d), SHAPES[shape]
    assert cfg["architectures"] == [spec["arch"]] and cfg["num_hidden_layers"] == 2
    assert saved_dtype(d) == dtype
    if dialect == "4":
        assert "rope_parameters" not in cfg and "dtype" not in cfg
        assert cfg["rope_theta"] == spec["rope_theta"] and cfg["rope_scaling"] == spec["rope_scaling"]
        assert cfg["torch_dtype"] == str(dtype).removeprefix("torch.")
        assert cfg["transformers_version"] == "4.53.3"
    else:
        assert not {"rope_theta", "rope_scaling", "torch_dtype"} & cfg.keys()
        assert cfg["rope_parameters"]["rope_theta"] == spec["rope_theta"]
        assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    state = load_hf_state(d)
    assert all(t.dtype == dtype for t in state.values())
    norms = {k: v for k, v in state.items() if "norm" in k}
    assert len(norms) == 2 * 2 + 1
    assert all(not torch.all(v == 1) for v in norms.values())
    assert ("lm_head.weight" in state) is (not spec["tie_word_embeddings"])
    assert state["model.embed_tokens.weight"].shape == (spec["vocab_size"], spec["hidden_size"])
    head_dim = spec.get("head_dim", spec["hidden_size"] // spec["num_attention_heads"])
    assert state["model.layers.0.self_attn.q_proj.weight"].shape[0] == spec["num_attention_heads"] * head_dim
    assert state["model.layers.0.self_attn.k_proj.weight"].shape[0] == spec["num_key_value_heads"] * head_dim
    gen = json.loads((d / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 3)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_dialects_load_equivalently(tiny_hf_factory, shape: str) -> None:
    from transformers import AutoConfig

    d4, d5 = tiny_hf_factory(shape, dialect="4"), tiny_hf_factory(shape, dialect="5")
    c4, c5 = AutoConfig.from_pretrained(d4), AutoConfig.from_pretrained(d5)
    assert c4.rope_parameters == c5.rope_parameters and c4.dtype == c5.dtype == torch.bfloat16
    assert c4.head_dim == c5.head_dim and c4.tie_word_embeddings == c5.tie_word_embeddings
    ids = fixed_input_ids(c4.vocab_size)
    torch.testing.assert_close(hf_logits(d4, ids), hf_logits(d5, ids), rtol=0, atol=0)


@pytest.mark.parametrize("dialect", ["4", "5"])
def test_tokenizer(tiny_hf_factory, dialect: str) -> None:
    from transformers import AutoTokenizer

    d = tiny_hf_factory("llama31_rope", dialect=dialect)
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == TOKENIZER_VOCAB != _cfg(d)["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<s>")
    assert tok.decode(tok("hello world").input_ids) == "hello world"
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    if dialect == "4":
        assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in tcfg
        assert (d / "special_tokens_map.json").exists() and not (d / "chat_template.jinja").exists()
    else:
        assert (d / "chat_template.jinja").exists()


def test_no_tokenizer(tmp_path: Path) -> None:
    d = make_tiny_hf(tmp_path, "llama2_mha", tokenizer=False, num_layers=1)
    assert not (d / "tokenizer.json").exists() and _cfg(d)["num_hidden_layers"] == 1


def test_sharded(tiny_hf_factory) -> None:
    d = tiny_hf_factory("llama3_gqa", max_shard_size="200KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and files == {p.name for p in d.glob("*.safetensors")}
    state = load_hf_state(d)
    assert set(index["weight_map"]) == set(state)
    ref = load_hf_state(tiny_hf_factory("llama3_gqa"))
    assert all(torch.equal(state[k], ref[k]) for k in ref)  # sharding does not change the tensors


def test_logits_finite_and_reproducible(tiny_hf_factory) -> None:
    d = tiny_hf_factory("mistral", dtype=torch.float32)
    ids = fixed_input_ids(_cfg(d)["vocab_size"])
    a, b = hf_logits(d, ids), hf_logits(d, ids)
    assert a.dtype == torch.float32 and a.shape == (1, 16, 320) and torch.isfinite(a).all()
    assert torch.equal(a, b) and a.std() > 0


def test_seed_reproducible(tmp_path: Path) -> None:
    a = load_hf_state(make_tiny_hf(tmp_path / "a", "llama32_tied", tokenizer=False))
    b = load_hf_state(make_tiny_hf(tmp_path / "b", "llama32_tied", tokenizer=False))
    c = load_hf_state(make_tiny_hf(tmp_path / "c", "llama32_tied", tokenizer=False, seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_bias_shape(tmp_path: Path) -> None:
    state = load_hf_state(make_tiny_hf(tmp_path, "llama_bias", tokenizer=False))
    biases = [v for k, v in state.items() if k.endswith(".bias")]
    assert len(biases) == 2 * 7 and all(v.abs().sum() > 0 for v in biases)


def test_fixed_input_ids() -> None:
    a = fixed_input_ids(1031, n=32, seed=3)
    assert a.shape == (1, 32) and a.dtype == torch.long and int(a.min()) >= 4 and int(a.max()) < 1031
    assert torch.equal(a, fixed_input_ids(1031, n=32, seed=3))
