"""GPT-NeoX / Pythia (GPTNeoXForCausalLM): parallel residual (or sequential), partial rotary,
LayerNorm with bias, biases on every linear, untied embed_out.

No NVIDIA converter exists (spec §4.2); the layout is the stock Megatron-Core GPT one with TE's
fused norms (input_layernorm -> linear_qkv.layer_norm_*, post_attention_layernorm ->
linear_fc1.layer_norm_*): each norm feeds exactly the linear it is fused with in both residual
modes, so use_parallel_residual=false is a stock Megatron GPT model and true differs only in the
residual wiring (config field ``parallel_residual``). Provenance: transformers
models/gpt_neox/modeling_gpt_neox.py. ``query_key_value`` rows are per head [q, k, v]
(``qkv.view(..., heads, 3 * head_size)``), which is Megatron's interleave with one head per group,
so weight and bias copy as they are.
"""
from __future__ import annotations

from hfnemo.arch.config_rules import (Activation, Allowed, Const, Field, KvChannels, ParamsDType, PlainRope,
                                      RopeBase, RotaryPercent, SparseField, SparseQueryGroups, VocabDivisor)
from hfnemo.arch.rules import DENSE_TE_MODULES, Rename, TiedOutput
from hfnemo.arch.spec import LAYERNORM_ROPE, ArchSpec, checked_hf_dims, checked_nemo_dims, register
from hfnemo.io.nemo_configs import GELU

L = "gpt_neox.layers.{l}."
N = "decoder.layers.{l}."

RULES = (
    Rename("gpt_neox.embed_in.weight", "embedding.word_embeddings.weight", ("V", "H")),
    Rename(L + "input_layernorm.weight", N + "self_attention.linear_qkv.layer_norm_weight", ("H",)),
    Rename(L + "input_layernorm.bias", N + "self_attention.linear_qkv.layer_norm_bias", ("H",)),
    Rename(L + "attention.query_key_value.weight", N + "self_attention.linear_qkv.weight", ("QKV", "H")),
    Rename(L + "attention.query_key_value.bias", N + "self_attention.linear_qkv.bias", ("QKV",)),
    Rename(L + "attention.dense.weight", N + "self_attention.linear_proj.weight", ("H", "Q")),
    Rename(L + "attention.dense.bias", N + "self_attention.linear_proj.bias", ("H",)),
    Rename(L + "post_attention_layernorm.weight", N + "mlp.linear_fc1.layer_norm_weight", ("H",)),
    Rename(L + "post_attention_layernorm.bias", N + "mlp.linear_fc1.layer_norm_bias", ("H",)),
    Rename(L + "mlp.dense_h_to_4h.weight", N + "mlp.linear_fc1.weight", ("F", "H")),
    Rename(L + "mlp.dense_h_to_4h.bias", N + "mlp.linear_fc1.bias", ("F",)),
    Rename(L + "mlp.dense_4h_to_h.weight", N + "mlp.linear_fc2.weight", ("H", "F")),
    Rename(L + "mlp.dense_4h_to_h.bias", N + "mlp.linear_fc2.bias", ("H",)),
    Rename("gpt_neox.final_layer_norm.weight", "decoder.final_layernorm.weight", ("H",)),
    Rename("gpt_neox.final_layer_norm.bias", "decoder.final_layernorm.bias", ("H",)),
    # transformers 5 calls it lm_head in memory but still saves embed_out (conversion_mapping.py).
    TiedOutput("embed_out.weight", "output_layer.weight"),
)

CONFIG = (
    Field("num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size"),
    Field("intermediate_size", "ffn_hidden_size"),
    Field("num_attention_heads", "num_attention_heads"),
    SparseQueryGroups(),  # multi-head only
    KvChannels(),
    SparseField("layer_norm_eps", "layernorm_epsilon", 1e-5),
    SparseField("initializer_range", "init_method_std", 0.02),
    SparseField("max_position_embeddings", "seq_length", 2048),
    SparseField("hidden_dropout", "hidden_dropout", 0.0),
    SparseField("attention_dropout", "attention_dropout", 0.0),
    SparseField("use_parallel_residual", "parallel_residual", True),
    SparseField("tie_word_embeddings", "share_embeddings_and_output_weights", False),
    Field("vocab_size", "vocab_size"),
    VocabDivisor(),
    Activation("hidden_act", "gelu"),  # Pythia: gelu; GPT-NeoX-20B: gelu_fast
    # GPTNeoXConfig reads rotary_emb_base / rotary_pct (the hub spelling), 5.x writes rope_parameters.
    RopeBase(("rotary_emb_base", "rope_theta")),
    RotaryPercent(("rotary_pct", "partial_rotary_factor"), 0.25),
    PlainRope(extra=("partial_rotary_factor",)),
    # attention_bias=false drops the qkv/dense biases but not the MLP's; Megatron has one flag.
    Allowed("attention_bias", (None, True), "Megatron-Core's add_bias_linear covers attention and MLP alike"),
    Const("add_bias_linear", True),
    Const("add_qkv_bias", True),
    Const("normalization", "LayerNorm"),
    Const("gated_linear_unit", False),
    Const("position_embedding_type", "rope"),
    Const("output_layer_bias", False),
    ParamsDType(),
)

_MODEL, _CONFIG = register("GPTNeoX", {
    **LAYERNORM_ROPE, "activation_func": GELU, "add_bias_linear": True, "add_qkv_bias": True,
    "rotary_percent": 0.25,
    # hfnemo fields (docs/formats.md)
    "parallel_residual": True, "output_layer_bias": False,
})

GPTNEOX = ArchSpec(
    name="gptneox",
    hf_architectures=("GPTNeoXForCausalLM",),
    hf_model_type="gpt_neox",
    nemo_model=_MODEL,
    nemo_config=_CONFIG,
    rules=RULES,
    config_rules=CONFIG,
    extra_state=DENSE_TE_MODULES,
    # Buffers older transformers saved with the weights (causal mask, -1e9 fill, rotary table).
    hf_ignore_suffixes=("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"),
    dims_from_hf=checked_hf_dims(CONFIG, "fused", True),
    dims_from_nemo=checked_nemo_dims(CONFIG, "fused", True),
)
