"""Tiny random Mixtral and Qwen2 checkpoints shaped like the public models, built offline.

Same conventions as tiny_models.py (whose tokenizer, dialect translation and logits helpers are
reused): norms ``1 + 0.1*randn``, biases ``0.02*randn``, a 300-token tokenizer that never equals
vocab_size, config.json in the 4.x (Hub) or 5.x dialect. Kept out of tiny_models.SHAPES so that
the Llama-family parametrizations there stay as they are.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tiny_models import BOS_ID, EOS_ID, PAD_ID, save_tiny

_COMMON: dict[str, Any] = dict(hidden_act="silu", initializer_range=0.02, bos_token_id=BOS_ID,
                               eos_token_id=EOS_ID, pad_token_id=PAD_ID)

# Ratios follow the real model named in each comment (heads : kv heads, ffn / hidden, experts, tying).
SHAPES: dict[str, dict[str, Any]] = {
    # Mixtral-8x7B: 8 experts top-2, GQA 4:1, ffn 14336/4096 = 3.5, theta 1e6; vocab 1000 pads to 1024.
    "mixtral_8x7b": dict(arch="MixtralForCausalLM", vocab_size=1000, hidden_size=128, intermediate_size=448,
                         num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                         num_experts_per_tok=2,
                         rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=512,
                         tie_word_embeddings=False),
    # Mixtral-8x22B-like GQA 6:1 with a non-power-of-two expert count (6, top-3), explicit head_dim
    # 32 != 96 / 6, a sliding window shorter than the test prompt, and vocab 1024 (no padding).
    "mixtral_6e": dict(arch="MixtralForCausalLM", vocab_size=1024, hidden_size=96, intermediate_size=256,
                       num_attention_heads=6, num_key_value_heads=1, head_dim=32, num_local_experts=6,
                       num_experts_per_tok=3, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=512,
                       sliding_window=8, tie_word_embeddings=False),
    # Qwen2-7B: GQA 7:1 (28/4), ffn 18944/3584 ~ 5.3, untied, theta 1e6.
    "qwen2_7b": dict(arch="Qwen2ForCausalLM", vocab_size=1000, hidden_size=224, intermediate_size=1184,
                     num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                     max_position_embeddings=512, tie_word_embeddings=False),
    # Qwen2-0.5B: tied embeddings, GQA 7:1 (14/2), ffn 4864/896 ~ 5.4.
    "qwen2_05b_tied": dict(arch="Qwen2ForCausalLM", vocab_size=1024, hidden_size=112, intermediate_size=608,
                           num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                           max_position_embeddings=512, tie_word_embeddings=True),
    # Qwen1.5-7B: MHA, ffn 11008/4096 = 2.6875; its Hub config.json names a sliding window that is
    # switched off and has no layer_types (written before transformers had them): "_json" edits the
    # saved config.json so.
    "qwen15_mha": dict(arch="Qwen2ForCausalLM", vocab_size=1000, hidden_size=128, intermediate_size=344,
                       num_attention_heads=4, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=512, use_sliding_window=False, max_window_layers=28,
                       tie_word_embeddings=False, _json={"sliding_window": 32768, "layer_types": None}),
}


def shape_config(shape: str, num_layers: int = 2) -> "transformers.PretrainedConfig":  # noqa: F821
    import transformers

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    spec.pop("_json", None)
    rope = {"rope_type": "default", "rope_theta": spec.pop("rope_theta")}
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return cls(**_COMMON, **spec, rope_parameters=rope, num_hidden_layers=num_layers, architectures=[arch])


def make_tiny(out_dir: Path, shape: str, *, dtype: torch.dtype = torch.bfloat16, dialect: str = "4",
              seed: int = 0, num_layers: int = 2) -> Path:
    """Build, randomize and save a tiny checkpoint of ``shape``; returns ``out_dir``."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = shape_config(shape, num_layers)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight"):  # a sharper router, so that top-k choices differ per token
                p.copy_(torch.randn(p.shape, generator=g))
    def edit(cfg: dict) -> dict:
        for k, v in SHAPES[shape].get("_json", {}).items():
            if v is None:  # None deletes the field
                cfg.pop(k, None)
            else:
                cfg[k] = v
        return cfg

    return save_tiny(model, out_dir, dtype=dtype, dialect=dialect, edit_config=edit)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
