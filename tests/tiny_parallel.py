"""Tiny random Falcon / GPT-NeoX / Phi checkpoints shaped like the public models, built offline.

Dialect "5" is what transformers 5.x save_pretrained writes. Dialect "4" is the hub spelling of
each family, fields omitted where the hub configs omit them, so that export must not invent keys:
* Falcon (tiiuae/falcon-7b, -40b, config of transformers 4.27): no rope_theta, ffn_hidden_size,
  num_kv_heads (old architecture), num_ln_in_parallel_attn, tie_word_embeddings, activation,
  max_position_embeddings; plus apply_residual_connection_post_layernorm=false (ignored by HF).
* GPT-NeoX (EleutherAI/pythia-*, transformers 4.24): rotary_emb_base / rotary_pct, no
  attention_bias, dropouts, classifier_dropout or is_decoder.
* Phi (microsoft/phi-2, transformers 4.37): rope_theta, partial_rotary_factor and rope_scaling=null
  at top level.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tiny_models import BOS_ID, EOS_ID, HF4_VERSION, PAD_ID, save_tiny

# Named configs (5.x kwargs); ratios follow the real model (heads:kv heads, ffn/hidden, rotary, tying).
SHAPES: dict[str, dict[str, Any]] = {
    # falcon-7b: multi-query, parallel attention with one shared input_layernorm, no biases, tied.
    "falcon7b": dict(arch="FalconForCausalLM", vocab_size=384, hidden_size=128, num_attention_heads=4,
                     multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False),
    # falcon-40b/180b: new decoder architecture, 128:8 heads -> 8:2, ln_attn + ln_mlp.
    "falcon40b": dict(arch="FalconForCausalLM", vocab_size=384, hidden_size=128, num_attention_heads=8,
                      num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True, bias=False),
    # Falcon2-11B: new architecture with one norm (num_ln_in_parallel_attn=1), theta 500042, untied.
    "falcon11b": dict(arch="FalconForCausalLM", vocab_size=320, hidden_size=128, num_attention_heads=8,
                      num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True,
                      num_ln_in_parallel_attn=1, bias=False, rope_theta=500042.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    # The sequential multi-head variant (input + post_attention_layernorm) with all biases, untied.
    "falcon_seq": dict(arch="FalconForCausalLM", vocab_size=320, hidden_size=128, num_attention_heads=4,
                       multi_query=False, new_decoder_architecture=False, parallel_attn=False, bias=True,
                       tie_word_embeddings=False),
    # pythia-*: parallel residual, rotary_pct 0.25, 4x MLP, untied embed_out, 8 heads.
    "pythia": dict(arch="GPTNeoXForCausalLM", vocab_size=384, hidden_size=128, num_attention_heads=8,
                   intermediate_size=512, use_parallel_residual=True, partial_rotary_factor=0.25,
                   rope_theta=10000.0, hidden_act="gelu"),
    # Sequential residual (use_parallel_residual=false), GPT-NeoX-20B's gelu_fast, rotary 0.5.
    "neox_seq": dict(arch="GPTNeoXForCausalLM", vocab_size=320, hidden_size=128, num_attention_heads=4,
                     intermediate_size=512, use_parallel_residual=False, partial_rotary_factor=0.5,
                     rope_theta=10000.0, hidden_act="gelu_fast"),
    # phi-2: 2560 hidden / 32 heads (d=80) -> 160 / 2, partial_rotary_factor 0.4 (32 of 80 dims), gelu_new.
    "phi2": dict(arch="PhiForCausalLM", vocab_size=384, hidden_size=160, num_attention_heads=2,
                 num_key_value_heads=2, intermediate_size=640, partial_rotary_factor=0.4, rope_theta=10000.0,
                 hidden_act="gelu_new", resid_pdrop=0.1),
    # Phi with grouped-query attention (PhiConfig supports it): exercises the q/k/v interleave.
    "phi_gqa": dict(arch="PhiForCausalLM", vocab_size=320, hidden_size=128, num_attention_heads=8,
                    num_key_value_heads=2, intermediate_size=512, partial_rotary_factor=0.5,
                    rope_theta=10000.0, hidden_act="gelu_new"),
}


def shape_config(shape: str, num_layers: int = 2,
                 **overrides: Any) -> "transformers.PretrainedConfig":  # noqa: F821
    import transformers

    spec = {**SHAPES[shape], **overrides}
    arch = spec.pop("arch")
    rope = {"rope_type": "default", "rope_theta": spec.pop("rope_theta", 10000.0)}
    if "partial_rotary_factor" in spec:
        rope["partial_rotary_factor"] = spec.pop("partial_rotary_factor")
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return cls(**spec, rope_parameters=rope, num_hidden_layers=num_layers, bos_token_id=BOS_ID,
               eos_token_id=EOS_ID, pad_token_id=PAD_ID, architectures=[arch])


def config_to_hub(cfg: dict[str, Any]) -> dict[str, Any]:
    """A 5.x config.json dict in the family's 4.x hub spelling (see the module docstring)."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = HF4_VERSION
    theta, pct = rope.get("rope_theta", 10000.0), rope.get("partial_rotary_factor")
    kind = cfg["model_type"]
    if kind == "falcon":
        if theta != 10000.0:  # Falcon2-11B states it, falcon-7b/40b do not
            cfg["rope_theta"] = theta
        new = cfg["new_decoder_architecture"]
        for key, default in (("tie_word_embeddings", True), ("activation", "gelu"),
                             ("max_position_embeddings", 2048), ("ffn_hidden_size", 4 * cfg["hidden_size"])):
            if cfg.get(key) == default:
                del cfg[key]
        if not new:
            del cfg["num_kv_heads"]
        if cfg.get("num_ln_in_parallel_attn") in (None, 2):
            cfg.pop("num_ln_in_parallel_attn", None)
        cfg["apply_residual_connection_post_layernorm"] = False
    elif kind == "gpt_neox":
        cfg["rotary_emb_base"] = int(theta)
        cfg["rotary_pct"] = pct
        for key in ("attention_bias", "is_decoder", "classifier_dropout", "hidden_dropout",
                    "attention_dropout"):
            cfg.pop(key, None)
    elif kind == "phi":
        cfg.update(rope_theta=theta, partial_rotary_factor=pct, rope_scaling=None)
    return cfg


def make_tiny_parallel(out_dir: Path, shape: str, *, dtype: torch.dtype = torch.bfloat16, dialect: str = "4",
                       seed: int = 0, num_layers: int = 2, tokenizer: bool = True, **overrides: Any) -> Path:
    """Build, randomize and save a tiny checkpoint of ``shape``; returns ``out_dir``.

    Norm weights become 1 + 0.1*randn, norm biases 0.1*randn and linear biases 0.02*randn, so that a
    dropped or swapped norm or bias shows in the logits (Falcon's norms are ln_attn/ln_mlp/ln_f).
    """
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = shape_config(shape, num_layers, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            if is_norm and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_((0.1 if is_norm else 0.02) * torch.randn(p.shape, generator=g))
    return save_tiny(model, out_dir, dtype=dtype, dialect=dialect, tokenizer=tokenizer, to_v4=config_to_hub)
