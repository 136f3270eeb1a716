"""Gemma (1), CodeGemma and Gemma 2: tied, GeGLU, zero-centred RMSNorm, head_dim 256.

Provenance: NeMo r2.5 nemo/collections/llm/gpt/model/gemma.py HFGemmaImporter/HFGemmaExporter and
gemma2.py (Megatron-Bridge gemma_bridge.py has the same Gemma table); spec §4.2. Norm weights are
copied as they are: Megatron's layernorm_zero_centered_gamma computes x * (1 + w) like HF Gemma.
The sqrt(hidden) embedding scale and Gemma 2's soft-capping are runtime code in NeMo (gemma2.py
EmbeddingScalingMixin, Gemma2OutputLayer, Gemma2DotProductAttention), not weight transforms.

Where NVIDIA's importer leaves a field to a config-class default that is wrong for the checkpoint
(kv_channels=256 whatever head_dim is; seq_length=8192 whatever max_position_embeddings is; no
vocab_size, i.e. the tokenizer's length padded), hfnemo writes the field explicitly; for the public
models the values coincide, so only vocab_size appears in io.json beyond NVIDIA's arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hfnemo.arch.config_rules import (OPENAI_GELU, Allowed, ConfigRule, Const, ExplicitVocab, Field, HeadDim,
                                      Implicit, NullableField, ParamsDType, QueryGroups, VocabDivisor)
from hfnemo.arch.rules import DENSE_TE_MODULES, FuseGateUp, FuseQKV, Rename, TiedOutput
from hfnemo.arch.spec import ArchSpec, dims_from_nemo_any_vocab
from hfnemo.errors import ConfigError
from hfnemo.io.nemo_configs import ConfigClass, PyCall, PyRef, register_config_class

_GPT = "nemo.collections.llm.gpt.model"


# ---- config rules of Gemma's own (the shared ones are in config_rules.py) -------------------
@dataclass(frozen=True)
class TanhGelu(ConfigRule):
    """HF's activation must be the tanh GELU Megatron's openai_gelu computes. Gemma 1 configs on the
    Hub say hidden_act="gelu", a legacy spelling transformers maps to the tanh form (#29402; 5.x
    GemmaConfig rewrites it); hidden_activation, where present, takes precedence."""

    fields: tuple[str, ...]  # HF keys in precedence order; the last is written on export
    legacy_ok: bool = True

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.fields

    def to_nemo(self, hf, out, where):
        act = next((hf[k] for k in self.fields if hf.get(k) is not None), "gelu_pytorch_tanh")
        ok = ("gelu_pytorch_tanh", "gelu") if self.legacy_ok else ("gelu_pytorch_tanh",)
        if act not in ok:
            raise ConfigError(f"activation {act!r} is not supported for this architecture (NeMo's config computes "
                              "the tanh GELU, gelu_pytorch_tanh)", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        out["gated_linear_unit"] = True

    def to_hf(self, nemo, out, where):
        act = nemo.get("activation_func", OPENAI_GELU.target)
        if act != OPENAI_GELU.target or not nemo.get("gated_linear_unit", True):
            raise ConfigError(f"activation_func={act!r} (gated={nemo.get('gated_linear_unit')}) is not the "
                              "gated tanh GELU of Gemma", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        if not any(out.get(k) is not None for k in self.fields):
            out[self.fields[-1]] = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class AlternatingWindow(ConfigRule):
    """Gemma 2: sliding_window ⇄ window_size=(w, 0), which NeMo applies to every other layer
    (gemma2.py Gemma2DotProductAttention). Any other layer_types pattern cannot be expressed.

    Note: NeMo windows layers with an even 1-based layer_number (HF indices 1, 3, ...), HF the
    even 0-based indices (0, 2, ...); outputs differ only past `sliding_window` tokens. That is
    NeMo's runtime, reproduced here as NVIDIA's importer writes it."""

    hf_keys = ("sliding_window", "layer_types")

    def to_nemo(self, hf, out, where):
        layer_types = hf.get("layer_types")
        n = int(hf["num_hidden_layers"])
        alternating = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        if layer_types is not None and list(layer_types) != alternating:
            raise ConfigError(f"layer_types {layer_types} is not Gemma 2's alternating sliding/full pattern, the "
                              "only one NeMo's Gemma2 attention implements", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        w = hf.get("sliding_window")
        out["window_size"] = [int(w), 0] if w else None

    def to_hf(self, nemo, out, where):
        ws = nemo.get("window_size")
        out["sliding_window"] = int(ws[0]) if ws else None
        n = int(nemo["num_layers"])  # transformers >= 4.53 writes layer_types; older ones ignore it
        out["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]


@dataclass(frozen=True)
class GemmaNoRopeScaling(ConfigRule):
    """Gemma has plain RoPE; a rope_scaling NeMo's Gemma configs cannot apply is refused. (Not
    config_rules.NoRopeScaling: this one also refuses rope_type null, and names Gemma's config.)"""

    hf_keys = ("rope_scaling",)

    def to_nemo(self, hf, out, where):
        rs = hf.get("rope_scaling")
        kind = (rs or {}).get("rope_type", (rs or {}).get("type", "default"))
        if kind != "default":
            raise ConfigError(f"rope_scaling {rs} cannot be represented in NeMo's Gemma config", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")

    def to_hf(self, nemo, out, where):
        pass


# ---- tensors -----------------------------------------------------------------------------------
L = "model.layers.{l}."
N = "decoder.layers.{l}."
_ATTN_AND_MLP = (
    FuseQKV(L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight",
            N + "self_attention.linear_qkv.weight"),
    Rename(L + "self_attn.o_proj.weight", N + "self_attention.linear_proj.weight", ("H", "Q")),
    FuseGateUp(L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight", N + "mlp.linear_fc1.weight"),
    Rename(L + "mlp.down_proj.weight", N + "mlp.linear_fc2.weight", ("H", "F")),
)
_ENDS = (
    Rename("model.embed_tokens.weight", "embedding.word_embeddings.weight", ("V", "H")),
    Rename("model.norm.weight", "decoder.final_layernorm.weight", ("H",)),
    # Gemma ties; an untied checkpoint (tie_word_embeddings=false) keeps its lm_head.
    TiedOutput("lm_head.weight", "output_layer.weight"),
)
RULES = _ENDS + _ATTN_AND_MLP + (
    Rename(L + "input_layernorm.weight", N + "self_attention.linear_qkv.layer_norm_weight", ("H",)),
    Rename(L + "post_attention_layernorm.weight", N + "mlp.linear_fc1.layer_norm_weight", ("H",)),
)
# Gemma 2 (gemma2.py convert_state): four norms per layer; the post-attention and post-MLP ones live
# in NeMo's custom TERowParallelLinearLayerNorm as `post_layernorm`.
GEMMA2_RULES = _ENDS + _ATTN_AND_MLP + (
    Rename(L + "input_layernorm.weight", N + "self_attention.linear_qkv.layer_norm_weight", ("H",)),
    Rename(L + "post_attention_layernorm.weight", N + "self_attention.linear_proj.post_layernorm.weight", ("H",)),
    Rename(L + "pre_feedforward_layernorm.weight", N + "mlp.linear_fc1.layer_norm_weight", ("H",)),
    Rename(L + "post_feedforward_layernorm.weight", N + "mlp.linear_fc2.post_layernorm.weight", ("H",)),
)

# ---- config ------------------------------------------------------------------------------------
# The fields HFGemmaImporter.config passes (explicit in io.json), then hfnemo's additions.
_COMMON = (
    Field("num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size"),
    Field("intermediate_size", "ffn_hidden_size"),
    Field("num_attention_heads", "num_attention_heads"),
    Field("initializer_range", "init_method_std", 0.02, 0.02),
    Field("rms_norm_eps", "layernorm_epsilon", 1e-6, 1e-6),
    QueryGroups(),
    Field("rope_theta", "rotary_base", 10000.0, 10000.0),
    VocabDivisor(),
    Field("tie_word_embeddings", "share_embeddings_and_output_weights", True, True),
    ParamsDType(),
    ExplicitVocab(),
    Implicit(HeadDim(), "kv_channels", 256),  # GemmaConfig/Gemma2Config: kv_channels=256
    Implicit(Field("max_position_embeddings", "seq_length", 8192, 8192), "seq_length", 8192),
    GemmaNoRopeScaling(),
    Const("layernorm_zero_centered_gamma", True, emit=False),
    Const("normalization", "RMSNorm", emit=False),
    Const("position_embedding_type", "rope", emit=False),
    Const("add_bias_linear", False, emit=False),
    Const("add_qkv_bias", False, "attention_bias", False, emit=False),
)
CONFIG = _COMMON + (
    TanhGelu(("hidden_activation", "hidden_act")),  # hidden_activation wins when set
    Const("gated_linear_unit", True, emit=False),
    Const("window_size", None, emit=False),
    Allowed("use_bidirectional_attention", (None, False)),  # 5.x: bidirectional (embedding) variants
)
GEMMA2_CONFIG = _COMMON + (
    TanhGelu(("hidden_activation",), legacy_ok=False),
    Allowed("use_bidirectional_attention", (None, False)),
    Field("query_pre_attn_scalar", "query_pre_attn_scalar", 256, 256),
    NullableField("attn_logit_softcapping", "attn_logit_softcapping", 50.0),
    NullableField("final_logit_softcapping", "final_logit_softcapping", 30.0),
    AlternatingWindow(),
    Const("gated_linear_unit", True, emit=False),
)

# ---- NeMo config classes (nemo/collections/llm/gpt/model/gemma.py, gemma2.py at r2.5.0) --------
_GEMMA_BASE = dict(
    normalization="RMSNorm", activation_func=OPENAI_GELU, gated_linear_unit=True, position_embedding_type="rope",
    add_bias_linear=False, seq_length=8192, kv_channels=256, attention_dropout=0.0, hidden_dropout=0.0,
    share_embeddings_and_output_weights=True, layernorm_zero_centered_gamma=True,
)
# The YAML writer renders an AttnBackend member as its class, called (as for GPTConfig's auto).
_ATTN_BACKEND = PyCall("megatron.core.transformer.enums", "AttnBackend")
_GEMMA2_SPEC = PyRef(f"{_GPT}.gemma2", "gemma2_layer_spec")


def _cls(module: str, name: str, parent: str, model: str, **overrides: Any) -> ConfigClass:
    return ConfigClass(f"{_GPT}.{module}.{name}", f"{_GPT}.{module}.{model}", parent, overrides)


for _c in (
    _cls("gemma", "GemmaConfig", f"{_GPT}.base.GPTConfig", "GemmaModel", **_GEMMA_BASE,
         attention_backend=_ATTN_BACKEND),
    _cls("gemma", "GemmaConfig2B", f"{_GPT}.gemma.GemmaConfig", "GemmaModel",
         num_layers=18, hidden_size=2048, num_attention_heads=8, num_query_groups=1, ffn_hidden_size=16384),
    _cls("gemma", "GemmaConfig7B", f"{_GPT}.gemma.GemmaConfig", "GemmaModel",
         num_layers=28, hidden_size=3072, num_attention_heads=16, num_query_groups=16, ffn_hidden_size=24576),
    _cls("gemma", "CodeGemmaConfig2B", f"{_GPT}.gemma.GemmaConfig2B", "GemmaModel"),
    _cls("gemma", "CodeGemmaConfig7B", f"{_GPT}.gemma.GemmaConfig7B", "GemmaModel"),
    _cls("gemma2", "Gemma2Config", f"{_GPT}.base.GPTConfig", "Gemma2Model", **_GEMMA_BASE,
         layernorm_epsilon=1e-6, rotary_base=10000, window_size=(4096, 0), vocab_size=256000,
         gradient_accumulation_fusion=False, transformer_layer_spec=_GEMMA2_SPEC, query_pre_attn_scalar=224,
         attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    _cls("gemma2", "Gemma2Config2B", f"{_GPT}.gemma2.Gemma2Config", "Gemma2Model",
         num_layers=26, hidden_size=2304, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=9216,
         query_pre_attn_scalar=256),
    _cls("gemma2", "Gemma2Config9B", f"{_GPT}.gemma2.Gemma2Config", "Gemma2Model",
         num_layers=42, hidden_size=3584, num_attention_heads=16, num_query_groups=8, ffn_hidden_size=14336,
         query_pre_attn_scalar=256),
    _cls("gemma2", "Gemma2Config27B", f"{_GPT}.gemma2.Gemma2Config", "Gemma2Model",
         num_layers=46, hidden_size=4608, num_attention_heads=32, num_query_groups=16, ffn_hidden_size=36864,
         query_pre_attn_scalar=144),
):
    # GemmaModel / Gemma2Model take (config, optim, tokenizer, model_transform).
    register_config_class(_c, {"model_transform": None})

# Layer modules with Transformer Engine _extra_state, state-dict order. Gemma: as Llama
# (DENSE_TE_MODULES). Gemma 2: its core attention is a plain MegatronModule (none), the post norms
# are TENorm (TE ops carry one).
_GEMMA2_TE_MODULES = ("self_attention.linear_proj", "self_attention.linear_proj.post_layernorm",
                      "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2",
                      "mlp.linear_fc2.post_layernorm")
# HF fields written on export when the checkpoint has no original config.json (4.x GemmaConfig).
_HF_DEFAULTS = {"attention_dropout": 0.0, "use_cache": True, "hidden_activation": None}

GEMMA = ArchSpec(
    name="gemma",
    hf_architectures=("GemmaForCausalLM",),
    hf_model_type="gemma",
    nemo_model=f"{_GPT}.gemma.GemmaModel",
    nemo_config=f"{_GPT}.gemma.GemmaConfig",
    rules=RULES,
    config_rules=CONFIG,
    extra_state=DENSE_TE_MODULES,
    hf_defaults=_HF_DEFAULTS,
    dims_from_nemo=dims_from_nemo_any_vocab,
)

GEMMA2 = ArchSpec(
    name="gemma2",
    hf_architectures=("Gemma2ForCausalLM",),
    hf_model_type="gemma2",
    nemo_model=f"{_GPT}.gemma2.Gemma2Model",
    nemo_config=f"{_GPT}.gemma2.Gemma2Config",
    rules=GEMMA2_RULES,
    config_rules=GEMMA2_CONFIG,
    extra_state=_GEMMA2_TE_MODULES,
    hf_defaults={"attention_dropout": 0.0, "use_cache": True},
    dims_from_nemo=dims_from_nemo_any_vocab,
)
