"""Phi-2 / Phi-1.5 (PhiForCausalLM): parallel attention and MLP behind one LayerNorm, separate
q/k/v with biases, partial rotary (0.4 for Phi-2), gelu_new, and an lm_head with a bias.

No NVIDIA converter exists (spec §4.2). The layout is NeMo 1's Falcon-7B one (one shared
``input_layernorm``, ``linear_qkv`` without a fused norm) plus ``output_layer.bias``; q/k/v fuse
into ``linear_qkv`` with Megatron's per-group interleave (spec §4.1), weights and biases alike.
Provenance: transformers models/phi/modeling_phi.py (PhiDecoderLayer, PhiAttention, PhiForCausalLM).
"""
from __future__ import annotations

from hfnemo.arch.config_rules import (OPENAI_GELU, Activation, Allowed, Const, Field, KvChannels, ParamsDType,
                                      PlainRope, RopeBase, RotaryPercent, SparseField, SparseQueryGroups,
                                      VocabDivisor)
from hfnemo.arch.rules import DENSE_TE_MODULES, FuseQKV, Rename, TiedOutput
from hfnemo.arch.spec import LAYERNORM_ROPE, ArchSpec, checked_hf_dims, checked_nemo_dims, register

L = "model.layers.{l}."
A = L + "self_attn."
N = "decoder.layers.{l}."

RULES = (
    Rename("model.embed_tokens.weight", "embedding.word_embeddings.weight", ("V", "H")),
    Rename(L + "input_layernorm.weight", N + "input_layernorm.weight", ("H",)),
    Rename(L + "input_layernorm.bias", N + "input_layernorm.bias", ("H",)),
    FuseQKV(A + "q_proj.weight", A + "k_proj.weight", A + "v_proj.weight",
            N + "self_attention.linear_qkv.weight"),
    FuseQKV(A + "q_proj.bias", A + "k_proj.bias", A + "v_proj.bias", N + "self_attention.linear_qkv.bias",
            trailing=()),
    Rename(A + "dense.weight", N + "self_attention.linear_proj.weight", ("H", "Q")),
    Rename(A + "dense.bias", N + "self_attention.linear_proj.bias", ("H",)),
    Rename(L + "mlp.fc1.weight", N + "mlp.linear_fc1.weight", ("F", "H")),
    Rename(L + "mlp.fc1.bias", N + "mlp.linear_fc1.bias", ("F",)),
    Rename(L + "mlp.fc2.weight", N + "mlp.linear_fc2.weight", ("H", "F")),
    Rename(L + "mlp.fc2.bias", N + "mlp.linear_fc2.bias", ("H",)),
    Rename("model.final_layernorm.weight", "decoder.final_layernorm.weight", ("H",)),
    Rename("model.final_layernorm.bias", "decoder.final_layernorm.bias", ("H",)),
    TiedOutput("lm_head.weight", "output_layer.weight"),
    Rename("lm_head.bias", "output_layer.bias", ("V",)),  # kept when the weight is tied
)

CONFIG = (
    Field("num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size"),
    Field("intermediate_size", "ffn_hidden_size"),
    Field("num_attention_heads", "num_attention_heads"),
    SparseQueryGroups("num_key_value_heads"),  # phi-1.5 writes null, Phi-2 32
    KvChannels(),
    SparseField("layer_norm_eps", "layernorm_epsilon", 1e-5),
    SparseField("initializer_range", "init_method_std", 0.02),
    SparseField("max_position_embeddings", "seq_length", 2048),
    SparseField("resid_pdrop", "hidden_dropout", 0.0),
    SparseField("attention_dropout", "attention_dropout", 0.0),
    # Megatron drops embeddings with hidden_dropout; Phi has a separate rate (hfnemo field).
    SparseField("embd_pdrop", "embedding_dropout", 0.0),
    SparseField("tie_word_embeddings", "share_embeddings_and_output_weights", False),
    Field("vocab_size", "vocab_size"),
    VocabDivisor(),
    Activation("hidden_act", "gelu_new"),
    RopeBase(("rope_theta",)),
    RotaryPercent(("partial_rotary_factor",), 0.5),  # PhiConfig's default; Phi-2 sets 0.4
    PlainRope(extra=("partial_rotary_factor",)),
    Allowed("qk_layernorm", (None, False),
            "per-head q/k LayerNorms (with biases) have no mapping in hfnemo's Phi layout"),
    Const("add_bias_linear", True),
    Const("add_qkv_bias", True),
    Const("normalization", "LayerNorm"),
    Const("gated_linear_unit", False),
    Const("position_embedding_type", "rope"),
    Const("parallel_attention", True),
    Const("output_layer_bias", True),
    ParamsDType(),
)

_MODEL, _CONFIG = register("Phi2", {
    **LAYERNORM_ROPE, "activation_func": OPENAI_GELU,
    "add_bias_linear": True, "add_qkv_bias": True, "rotary_percent": 0.4, "hidden_dropout": 0.1,
    # hfnemo fields (docs/formats.md)
    "parallel_attention": True, "output_layer_bias": True, "embedding_dropout": 0.0,
})


PHI2 = ArchSpec(
    name="phi2",
    hf_architectures=("PhiForCausalLM",),
    hf_model_type="phi",
    nemo_model=_MODEL,
    nemo_config=_CONFIG,
    rules=RULES,
    config_rules=CONFIG,
    extra_state=DENSE_TE_MODULES,
    dims_from_hf=checked_hf_dims(CONFIG, "shared", True),
    dims_from_nemo=checked_nemo_dims(CONFIG, "shared", True),
)
