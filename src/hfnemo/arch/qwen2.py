"""Qwen2 / Qwen2.5 and Qwen1.5 (all Qwen2ForCausalLM): the Llama map plus q/k/v biases.

Provenance: NeMo r2.5.0 nemo/collections/llm/gpt/model/qwen2.py HFQwen2Importer (name map,
_import_qkv, _import_qkv_bias, _import_linear_fc1, config kwargs) and the io.json NeMo 2.5.3 wrote
for tests/data/nvidia/qwen2; Megatron-Bridge qwen2_bridge.py has the same table (spec §4.2).
Deliberate difference: NVIDIA forces share_embeddings_and_output_weights=False and duplicates a
tied lm_head; hfnemo keeps the tie both ways (no output_layer on the NeMo side).
"""
from __future__ import annotations

from dataclasses import dataclass

from hfnemo.arch.config_rules import Const, ConfigRule, Field, ImportConst, NoRopeScaling, ParamsDType, QueryGroups
from hfnemo.arch.rules import DENSE_TE_MODULES, FuseGateUp, FuseQKV, Rename, TiedOutput
from hfnemo.arch.spec import ArchSpec
from hfnemo.errors import ConfigError

L = "model.layers.{l}."
N = "decoder.layers.{l}."

RULES = (
    Rename("model.embed_tokens.weight", "embedding.word_embeddings.weight", ("V", "H")),
    Rename(L + "input_layernorm.weight", N + "self_attention.linear_qkv.layer_norm_weight", ("H",)),
    FuseQKV(L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight",
            N + "self_attention.linear_qkv.weight"),
    # Biases interleave per query group exactly like the weight rows (NeMo _import_qkv_bias).
    FuseQKV(L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias",
            N + "self_attention.linear_qkv.bias", trailing=()),
    Rename(L + "self_attn.o_proj.weight", N + "self_attention.linear_proj.weight", ("H", "Q")),
    Rename(L + "post_attention_layernorm.weight", N + "mlp.linear_fc1.layer_norm_weight", ("H",)),
    FuseGateUp(L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight", N + "mlp.linear_fc1.weight"),
    Rename(L + "mlp.down_proj.weight", N + "mlp.linear_fc2.weight", ("H", "F")),
    Rename("model.norm.weight", "decoder.final_layernorm.weight", ("H",)),
    TiedOutput("lm_head.weight", "output_layer.weight"),
)


@dataclass(frozen=True)
class OptionalHeadDim(ConfigRule):
    """head_dim ⇄ kv_channels, written only where it differs from hidden/heads: NVIDIA's Qwen2
    importer passes no kv_channels, and Qwen2 configs normally have no head_dim."""

    hf_keys = ("head_dim",)

    def to_nemo(self, hf, out, where):
        hd = hf.get("head_dim")
        if hd and hd != hf["hidden_size"] // hf["num_attention_heads"]:
            out["kv_channels"] = hd

    def to_hf(self, nemo, out, where):
        if nemo.get("kv_channels") is not None:
            out["head_dim"] = nemo["kv_channels"]


@dataclass(frozen=True)
class Qwen2Window(ConfigRule):
    """use_sliding_window / sliding_window / max_window_layers / layer_types are carried verbatim
    (config.json sidecar) as long as every layer uses full attention, which is what Megatron's
    Qwen2Config computes. HF's sliding window applies only to layers >= max_window_layers; a
    per-layer window has no NeMo field, so such a config is refused rather than silently changed."""

    hf_keys = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")

    def to_nemo(self, hf, out, where):
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        if not window:
            return
        kinds = hf.get("layer_types")
        if kinds is None:  # transformers' rule (Qwen2Config.__init__) when layer_types is absent
            first = int(hf.get("max_window_layers", 28))
            kinds = ["sliding_attention" if i >= first else "full_attention"
                     for i in range(int(hf["num_hidden_layers"]))]
        sliding = [i for i, k in enumerate(kinds) if k == "sliding_attention"]
        if sliding:
            raise ConfigError(f"use_sliding_window=true makes layers {sliding} use a {window}-token sliding "
                              "window, which NeMo's Qwen2Config cannot express per layer", file=where,
                              fix="set use_sliding_window=false if the model was trained with full attention "
                                  "(all released Qwen2/2.5 models were); otherwise please open an issue")

    def to_hf(self, nemo, out, where):
        if nemo.get("window_size"):
            raise ConfigError(f"window_size={nemo['window_size']!r} is not supported for Qwen2 export",
                              file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        # None is the placeholder hf_defaults put there: no source config.json to take it from
        if "layer_types" in out and out["layer_types"] is None:
            out["layer_types"] = ["full_attention"] * int(nemo["num_layers"])


# Fields as HFQwen2Importer.config passes them (r2.5.0); io.json orders them by the config class.
CONFIG = (
    Field("num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size"),
    Field("intermediate_size", "ffn_hidden_size"),
    Field("num_attention_heads", "num_attention_heads"),
    QueryGroups(),
    OptionalHeadDim(),
    Field("initializer_range", "init_method_std", 0.02, 0.02),
    Field("rms_norm_eps", "layernorm_epsilon", 1e-6, 1e-6),
    Const("gated_linear_unit", True, "hidden_act", "silu"),
    ImportConst("make_vocab_size_divisible_by", 128),  # vocab_size is explicit, so nothing is padded
    Field("rope_theta", "rotary_base", 10000.0, 1000000.0),
    NoRopeScaling(),
    # NVIDIA passes False unconditionally; we carry the tie (Qwen2-0.5B/1.5B, Qwen2.5-0.5B..3B are tied).
    Field("tie_word_embeddings", "share_embeddings_and_output_weights", False, False),
    Field("vocab_size", "vocab_size"),
    Field("max_position_embeddings", "seq_length", 32768, 4096),
    ParamsDType(),
    Qwen2Window(),
    # Qwen2 attention always has q/k/v biases and nothing else; Qwen2Config's defaults say so.
    Const("add_qkv_bias", True, emit=False),
    Const("add_bias_linear", False, emit=False),
)

# Written on export only when the checkpoint carries no source config.json (NVIDIA-written ones).
# layer_types None is a placeholder that Qwen2Window fills per layer.
_HF_DEFAULTS = {"attention_dropout": 0.0, "use_cache": True, "rope_scaling": None,
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
                "layer_types": None}


QWEN2 = ArchSpec(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_type="qwen2",
    nemo_model="nemo.collections.llm.gpt.model.qwen2.Qwen2Model",
    nemo_config="nemo.collections.llm.gpt.model.qwen2.Qwen2Config",
    rules=RULES,
    config_rules=CONFIG,
    extra_state=DENSE_TE_MODULES,
    hf_defaults=_HF_DEFAULTS,
    tokenizer_args=(("trust_remote_code", True),),
)
