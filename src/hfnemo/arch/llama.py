"""Llama 1/2/3/3.1/3.2, CodeLlama and Mistral: the dense gated-SiLU RMSNorm family.

Provenance: NeMo nemo/collections/llm/gpt/model/llama.py HFLlamaImporter (name map, merge_qkv,
merge_fc1) and mistral.py; Megatron-Bridge llama_bridge.py has the identical table (spec §4.2).
"""
from hfnemo.arch.config_rules import (ExplicitVocab, Const, Field, HeadDim, MistralWindow, ParamsDType, QueryGroups,
                                      RopeScaling, VocabDivisor)
from hfnemo.arch.rules import DENSE_TE_MODULES, FuseGateUp, FuseQKV, Rename, TiedOutput
from hfnemo.arch.spec import ArchSpec

L = "model.layers.{l}."
N = "decoder.layers.{l}."

RULES = (
    Rename("model.embed_tokens.weight", "embedding.word_embeddings.weight", ("V", "H")),
    Rename(L + "input_layernorm.weight", N + "self_attention.linear_qkv.layer_norm_weight", ("H",)),
    FuseQKV(L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight",
            N + "self_attention.linear_qkv.weight"),
    Rename(L + "self_attn.o_proj.weight", N + "self_attention.linear_proj.weight", ("H", "Q")),
    Rename(L + "post_attention_layernorm.weight", N + "mlp.linear_fc1.layer_norm_weight", ("H",)),
    FuseGateUp(L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight", N + "mlp.linear_fc1.weight"),
    Rename(L + "mlp.down_proj.weight", N + "mlp.linear_fc2.weight", ("H", "F")),
    Rename("model.norm.weight", "decoder.final_layernorm.weight", ("H",)),
    TiedOutput("lm_head.weight", "output_layer.weight"),
)

# Order of the fields in NVIDIA's importer does not matter here: io.json orders them by the
# config dataclass (hfnemo.io.nemo_context).
_COMMON = (
    Field("num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size"),
    Field("intermediate_size", "ffn_hidden_size"),
    Field("num_attention_heads", "num_attention_heads"),
    QueryGroups(),
    HeadDim(),
    Field("initializer_range", "init_method_std", 0.02, 0.02),
    Field("rms_norm_eps", "layernorm_epsilon", 1e-6, 1e-5),
    Field("rope_theta", "rotary_base", 10000.0, 10000.0),
    Field("tie_word_embeddings", "share_embeddings_and_output_weights", False, False),
    ExplicitVocab(),  # NVIDIA: explicit for Llama, left to the tokenizer (null) for Mistral
    VocabDivisor(),
    Const("gated_linear_unit", True, "hidden_act", "silu"),
    ParamsDType(),
)
CONFIG = _COMMON + (
    Field("max_position_embeddings", "seq_length", 2048, 2048),
    RopeScaling(),
    Const("add_bias_linear", False, "mlp_bias", False, emit=False),
    Const("add_qkv_bias", False, "attention_bias", False, emit=False),
)
# MistralConfig (HF) has no bias flags; Megatron's must still be off.
MISTRAL_CONFIG = _COMMON + (
    MistralWindow(),
    Const("add_bias_linear", False, emit=False),
    Const("add_qkv_bias", False, emit=False),
)

_HF_DEFAULTS = {"attention_dropout": 0.0, "pretraining_tp": 1, "use_cache": True}

def _implicit(cfg):
    """transformers LlamaConfig / MistralConfig defaults for fields a config.json may omit."""
    return {"num_key_value_heads": cfg.get("num_attention_heads"),
            "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"], "rope_theta": 10000.0,
            "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}


def _mistral_implicit(cfg):
    return {**_implicit(cfg), "sliding_window": 4096}


LLAMA = ArchSpec(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_model_type="llama",
    nemo_model="nemo.collections.llm.gpt.model.llama.LlamaModel",
    nemo_config="nemo.collections.llm.gpt.model.llama.LlamaConfig",
    rules=RULES,
    config_rules=CONFIG,
    nemo_config_variants=(("scale_factor", "nemo.collections.llm.gpt.model.llama.Llama31Config"),),
    extra_state=DENSE_TE_MODULES,
    hf_defaults=_HF_DEFAULTS,
    hf_implicit=_implicit,
)

MISTRAL = ArchSpec(
    name="mistral",
    hf_architectures=("MistralForCausalLM",),
    hf_model_type="mistral",
    nemo_model="nemo.collections.llm.gpt.model.mistral.MistralModel",
    nemo_config="nemo.collections.llm.gpt.model.mistral.MistralConfig7B",
    rules=RULES,
    config_rules=MISTRAL_CONFIG,
    extra_state=DENSE_TE_MODULES,
    hf_defaults={"attention_dropout": 0.0, "use_cache": True},
    hf_implicit=_mistral_implicit,
)
