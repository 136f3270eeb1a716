"""Tiny random Gemma, Gemma2 and Phi-3 checkpoints shaped like the public models, built offline.

Same conventions as tiny_models.py (whose tokenizer and helpers are reused): non-trivial norms
(Gemma's are zero-centred, so ``0.1*randn``; Phi-3's ``1 + 0.1*randn``), a 300-token tokenizer whose
length differs from vocab_size, transformers-4.x ("4") or 5.x ("5") config dialect.

The "oracle" shapes are what NVIDIA's importer (NeMo 2.5.3) can take: its Gemma importer never sets
kv_channels (GemmaConfig's default, 256, is used), its Phi-3 importer never sets num_query_groups
(MHA is assumed), neither sets vocab_size (the tokenizer's length padded to
make_vocab_size_divisible_by is used: 300 -> 320) nor seq_length (class defaults 8192 / 4096).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tiny_models import BOS_ID, EOS_ID, HF4_VERSION, PAD_ID, save_tiny

_IDS = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=0.02)
_LONGROPE_SHORT = [1.0, 1.05, 1.1, 1.25, 1.5, 1.8, 2.2, 2.6]  # head_dim 32 -> 16 factors in the model
_LONGROPE_LONG = [1.1, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0]

SHAPES: dict[str, dict[str, Any]] = {
    # Gemma-2B: MQA (1 kv head), head_dim 256 (= kv_channels NVIDIA assumes), ffn 8x hidden.
    "gemma_2b_mqa": dict(arch="GemmaForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, rope_theta=1e4,
                         max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    # Gemma-7B: MHA, ffn 8x hidden; head_dim 48 != 96 // 3 = 32 (explicit head_dim, != 256).
    "gemma_7b_mha": dict(arch="GemmaForCausalLM", vocab_size=336, hidden_size=96, intermediate_size=768,
                         num_attention_heads=3, num_key_value_heads=3, head_dim=48, rope_theta=1e4,
                         max_position_embeddings=256, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    # Gemma-2-2B: GQA 2:1, head_dim 32 != 64 // 4, sliding window 8 (< the 16-token test input, so it
    # matters), both soft-caps, query_pre_attn_scalar = head_dim.
    "gemma2_2b": dict(arch="Gemma2ForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=256,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e4,
                      max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                      query_pre_attn_scalar=32, sliding_window=8, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0),
    # Phi-3-mini-4k (without its 2047 window, which NVIDIA's importer drops): MHA, ffn 8192/3072.
    "phi3_mini": dict(arch="Phi3ForCausalLM", vocab_size=320, hidden_size=128, intermediate_size=352,
                      num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=4096,
                      original_max_position_embeddings=4096, sliding_window=None, rms_norm_eps=1e-5,
                      tie_word_embeddings=False),
    # Phi-3-medium-4k: GQA 4:1 (40:10), sliding window (2047 there; 8 here so that it matters).
    "phi3_medium_gqa": dict(arch="Phi3ForCausalLM", vocab_size=336, hidden_size=128, intermediate_size=448,
                            num_attention_heads=8, num_key_value_heads=2, rope_theta=1e4,
                            max_position_embeddings=256, original_max_position_embeddings=256,
                            sliding_window=8, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Phi-4-mini-like: partial rotary 0.75, tied embeddings, GQA 3:1 (its longrope left out).
    "phi4_mini_partial": dict(arch="Phi3ForCausalLM", vocab_size=320, hidden_size=96, intermediate_size=256,
                              num_attention_heads=6, num_key_value_heads=2, rope_theta=1e4,
                              partial_rotary_factor=0.75, max_position_embeddings=256,
                              original_max_position_embeddings=256, sliding_window=None, rms_norm_eps=1e-5,
                              tie_word_embeddings=True),
    # Phi-3-mini-128k: longrope (short/long factors per rotary frequency) that Megatron cannot express.
    "phi3_128k_longrope": dict(arch="Phi3ForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4,
                               rope_scaling={"rope_type": "longrope", "short_factor": _LONGROPE_SHORT,
                                             "long_factor": _LONGROPE_LONG},
                               max_position_embeddings=131072, original_max_position_embeddings=4096,
                               sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def shape_config(shape: str, num_layers: int = 2) -> "transformers.PretrainedConfig":  # noqa: F821
    import transformers

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    rope = {**(spec.pop("rope_scaling", None) or {"rope_type": "default"}), "rope_theta": spec.pop("rope_theta")}
    if "partial_rotary_factor" in spec:
        rope["partial_rotary_factor"] = spec.pop("partial_rotary_factor")
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return cls(**_IDS, **spec, rope_parameters=rope, num_hidden_layers=num_layers, architectures=[arch])


def config_to_v4(cfg: dict[str, Any]) -> dict[str, Any]:
    """5.x config.json -> what transformers 4.53 writes for these models: rope_theta/rope_scaling,
    torch_dtype, and Phi-3's partial_rotary_factor at the top level."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = float(rope.pop("rope_theta", 10000.0))
    if cfg.get("model_type") == "phi3":
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor", 1.0)
    kind = rope.pop("rope_type", "default")
    # 4.x Phi-3 spells the type `type` and keeps original_max_position_embeddings outside.
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if cfg.get("model_type") == "gemma":
        cfg.setdefault("hidden_activation", None)  # 4.x GemmaConfig always writes it
    if cfg.get("model_type", "").startswith("gemma"):
        if cfg.get("rope_scaling") is None:
            cfg.pop("rope_scaling")  # 4.x Gemma configs have no rope_scaling
        if cfg.get("use_bidirectional_attention") is None:
            cfg.pop("use_bidirectional_attention", None)  # a 5.x field
    cfg["transformers_version"] = HF4_VERSION
    return cfg


def make_tiny(out_dir: Path, shape: str, *, dtype: torch.dtype = torch.bfloat16, dialect: str = "4",
              seed: int = 0, num_layers: int = 2, tokenizer: bool = True) -> Path:
    """Build, randomize and save a tiny checkpoint of a named shape; returns ``out_dir``."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = shape_config(shape, num_layers)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    zero_centred = config.model_type.startswith("gemma")  # Gemma norms compute x * (1 + w)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if zero_centred else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
    return save_tiny(model, out_dir, dtype=dtype, dialect=dialect, tokenizer=tokenizer, to_v4=config_to_v4)


if __name__ == "__main__":  # python tests/tiny_gemma_phi3.py SHAPE OUT_DIR: a 4.x-dialect bf16 checkpoint
    import sys

    make_tiny(Path(sys.argv[2]), sys.argv[1])
