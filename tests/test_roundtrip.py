"""HF -> NeMo -> HF on every Llama-family shape: bit-exact tensors, same config, same logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import SHAPES, fixed_input_ids, hf_logits, load_hf_state

import hfnemo

CASES = [(shape, dtype, dialect) for shape in SHAPES for dtype in (torch.bfloat16, torch.float32)
         for dialect in ("4", "5")]


@pytest.mark.parametrize("shape,dtype,dialect", CASES,
                         ids=[f"{s}-{str(d)[6:]}-v{x}" for s, d, x in CASES])
def test_roundtrip_bit_exact(tiny_hf_factory, tmp_path: Path, shape: str, dtype: torch.dtype, dialect: str) -> None:
    src = tiny_hf_factory(shape, dtype=dtype, dialect=dialect)
    nemo, back = tmp_path / "nemo", tmp_path / "back"
    r1 = hfnemo.convert(src, nemo, max_memory="4GiB")  # correctness here; the bound: test_memory_bound
    assert r1.direction == "hf_to_nemo" and (nemo / "weights" / ".metadata").is_file()
    r2 = hfnemo.convert(nemo, back, max_memory="4GiB")  # correctness here; the bound: test_memory_bound
    assert r2.direction == "nemo_to_hf"

    a, b = load_hf_state(src), load_hf_state(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k

    # config.json comes back with every field, in the dialect the source used.
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert json.loads((back / "generation_config.json").read_text()) == \
        json.loads((src / "generation_config.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (back / f).read_bytes() == (src / f).read_bytes()

    ids = fixed_input_ids(a["model.embed_tokens.weight"].shape[0])
    assert torch.equal(hf_logits(src, ids), hf_logits(back, ids))


def test_sharded_source_and_output(tiny_hf_factory, tmp_path: Path) -> None:
    """A sharded HF source (index.json) imports, and export re-shards with an index."""
    src = tiny_hf_factory("llama3_gqa", max_shard_size="200KB")
    assert (src / "model.safetensors.index.json").is_file()
    hfnemo.convert(src, tmp_path / "nemo")
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back", max_shard_size="300KB")
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "back" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in load_hf_state(src).values())
    a, b = load_hf_state(src), load_hf_state(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("target", ["bf16", "fp16", "fp32"])
def test_dtype_cast_round_to_nearest_even(tiny_hf_factory, tmp_path: Path, target: str) -> None:
    src = tiny_hf_factory("llama3_gqa", dtype=torch.float32)
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[target]
    hfnemo.convert(src, tmp_path / "nemo", dtype=target)
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    a, b = load_hf_state(src), load_hf_state(tmp_path / "back")
    for k in a:
        assert b[k].dtype == tdt
        assert torch.equal(b[k], a[k].to(tdt)), k  # torch's .to rounds to nearest even
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[target]


def test_tied_model_keeps_tie(tiny_hf_factory, tmp_path: Path) -> None:
    src = tiny_hf_factory("llama32_tied")
    hfnemo.convert(src, tmp_path / "nemo")
    import yaml
    cfg = yaml.safe_load((tmp_path / "nemo" / "context" / "model.yaml").read_text())["config"]
    assert cfg["share_embeddings_and_output_weights"] is True
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(tmp_path / "nemo" / "weights")).read_metadata().state_dict_metadata
    assert "module.output_layer.weight" not in keys
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    assert "lm_head.weight" not in load_hf_state(tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("dialect", ["4", "5"])
def test_linear_rope_scaling(tiny_hf_factory, tmp_path: Path, dialect: str) -> None:
    """rope_scaling {type: linear} (long-context Llama-2 fine-tunes) -> seq_len_interpolation_factor
    in model.yaml (NVIDIA's importer drops it), and back to the same config.json and logits."""
    import shutil

    import yaml
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_factory("llama2_mha", dialect=dialect), src)
    cfg = json.loads((src / "config.json").read_text())
    if dialect == "4":
        cfg["rope_scaling"] = {"factor": 4.0, "rope_type": "linear"}
    else:
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "factor": 4.0, "rope_type": "linear"}
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    hfnemo.convert(src, tmp_path / "nemo")
    conf = yaml.safe_load((tmp_path / "nemo" / "context" / "model.yaml").read_text())["config"]
    assert conf["seq_len_interpolation_factor"] == 4.0
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == cfg
    ids = fixed_input_ids(320)
    assert torch.equal(hf_logits(src, ids), hf_logits(tmp_path / "back", ids))
    # and the sidecar is not what carries it: model.yaml alone gives the same rope_scaling
    (tmp_path / "nemo" / "context" / "artifacts" / "hf_config.json").unlink()
    hfnemo.convert(tmp_path / "nemo", tmp_path / "bare")
    bare = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert bare["rope_scaling"] == {"factor": 4.0, "rope_type": "linear"}


def test_llama1_style_checkpoint(tiny_hf_factory, tmp_path: Path) -> None:
    """Llama 1 era: no num_key_value_heads / rope_theta / head_dim in config.json and rotary
    inv_freq buffers saved with the weights (ignored, as the model recomputes them)."""
    import shutil

    from safetensors.torch import load_file, save_file
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_factory("llama2_mha", tokenizer=False), src)
    cfg = json.loads((src / "config.json").read_text())
    for k in ("num_key_value_heads", "rope_theta", "head_dim", "rope_scaling", "attention_bias", "mlp_bias"):
        cfg.pop(k, None)
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    state = load_file(src / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(16)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    hfnemo.convert(src, tmp_path / "nemo")
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    a, b = load_hf_state(src), load_hf_state(tmp_path / "back")
    a.pop("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == cfg
    ids = fixed_input_ids(320)
    assert torch.equal(hf_logits(src, ids), hf_logits(tmp_path / "back", ids))


def test_mistral_config_without_sliding_window_key(tiny_hf_factory, tmp_path: Path) -> None:
    """No sliding_window key means transformers' default 4096-token window, not full attention."""
    import shutil

    import yaml
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_factory("mistral", tokenizer=False), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("sliding_window")
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    hfnemo.convert(src, tmp_path / "nemo")
    conf = yaml.safe_load((tmp_path / "nemo" / "context" / "model.yaml").read_text())["config"]
    assert conf["window_size"] == [4096, 0]
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == cfg
