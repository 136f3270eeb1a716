"""Falcon (FalconForCausalLM): 7B multi-query parallel attention, 40B/180B (and Falcon2-11B) new
decoder architecture, and the sequential multi-head variant. ALiBi models (falcon-rw-*) are refused.

NeMo 2 has no Falcon; hfnemo writes NeMo 1's Falcon layout (docs/formats.md), i.e. separate TENorm
modules instead of the fused ``linear_qkv.layer_norm_weight``. Provenance: NVIDIA/NeMo
scripts/checkpoint_converters/convert_falcon_hf_to_nemo.py (name map, config) and
nemo/collections/nlp/models/language_modeling/megatron/falcon/falcon_decoder_layer.py (which norms
exist per variant); transformers models/falcon/modeling_falcon.py (FalconAttention._split_heads,
FalconDecoderLayer). ``query_key_value`` is copied as is in every variant: HF's fused rows already
are Megatron's per-group [q x heads/groups, k, v] interleave (spec §4.2; tests check it against an
interleave of what _split_heads returns).

What Falcon shares with gptneox.py and phi2.py, the three parallel-block families hfnemo defines
itself (ParallelDims, When, SparseField, Activation, PlainRope, checked dims, register, ...), lives in
rules.py, config_rules.py and spec.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from hfnemo.arch.config_rules import (Activation, Allowed, ConfigRule, Const, Field, KvChannels, ParamsDType,
                                      PlainRope, RopeBase, SparseField, VocabDivisor, put_unless_default)
from hfnemo.arch.rules import DENSE_TE_MODULES, ParallelDims, Rename, Rule, TiedOutput, When, with_layout
from hfnemo.arch.spec import LAYERNORM_ROPE, ArchSpec, dims_from_hf, dims_from_nemo, register
from hfnemo.errors import ConfigError, UnsupportedArchitecture
from hfnemo.io.nemo_configs import GELU


def _norms(new: bool, parallel: bool, num_ln: int | None, where: str) -> str:
    """Which norms a layer has, as transformers' FalconDecoderLayer builds and uses them."""
    if new:
        if not parallel:
            raise ConfigError("new_decoder_architecture=true with parallel_attn=false: transformers' "
                              "FalconDecoderLayer builds no ln_attn for it and cannot run it", file=where,
                              fix="set parallel_attn=true (every new-architecture Falcon uses it)")
        n = 2 if num_ln is None else num_ln
    elif parallel:
        n = 1 if num_ln is None else num_ln
        if n == 2:
            raise ConfigError("num_ln_in_parallel_attn=2 without new_decoder_architecture: transformers "
                              "builds ln_attn/ln_mlp but runs input_layernorm, so the model cannot run",
                              file=where,
                              fix="fix num_ln_in_parallel_attn or new_decoder_architecture")
    else:
        return "sequential"
    if n not in (1, 2):
        raise ConfigError(f"num_ln_in_parallel_attn={num_ln!r} is not 1 or 2", file=where,
                          fix="set num_ln_in_parallel_attn to 1, 2 or null")
    return "shared" if n == 1 else "two"


def _flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    v = cfg.get(key)
    return default if v is None else bool(v)


def _hf_groups(hf: Mapping[str, Any], where: str) -> int:
    """Key/value heads as FalconAttention uses them: num_kv_heads (new architecture), 1 (multi-query)
    or num_attention_heads; the multi-head path views qkv as [heads, 3, d], so other values break it."""
    nh = int(hf["num_attention_heads"])
    if _flag(hf, "new_decoder_architecture", False):
        return int(hf.get("num_kv_heads") or nh)
    if _flag(hf, "multi_query", True):
        return 1
    if hf.get("num_kv_heads") not in (None, nh):
        raise ConfigError(f"num_kv_heads={hf['num_kv_heads']} with multi_query=false and the old decoder "
                          "architecture: transformers' Falcon splits qkv as one k/v per head", file=where,
                          fix="set num_kv_heads to num_attention_heads, or new_decoder_architecture=true")
    return nh


@dataclass(frozen=True)
class FalconLayout(ConfigRule):
    """The variant flags, carried verbatim (NeMo 1's mcore_customization_config names
    new_decoder_architecture / parallel_attention), plus num_query_groups from them."""

    hf_keys = ("new_decoder_architecture", "parallel_attn", "multi_query", "num_kv_heads",
               "num_ln_in_parallel_attn")

    def to_nemo(self, hf, out, where):
        new, par = _flag(hf, "new_decoder_architecture", False), _flag(hf, "parallel_attn", True)
        _norms(new, par, hf.get("num_ln_in_parallel_attn"), where)
        out.update(new_decoder_architecture=new, parallel_attention=par,
                   multi_query=_flag(hf, "multi_query", True),
                   num_ln_in_parallel_attn=hf.get("num_ln_in_parallel_attn"),
                   num_query_groups=_hf_groups(hf, where))

    def to_hf(self, nemo, out, where):
        new, par = _flag(nemo, "new_decoder_architecture", False), _flag(nemo, "parallel_attention", True)
        mq, num_ln = _flag(nemo, "multi_query", True), nemo.get("num_ln_in_parallel_attn")
        _norms(new, par, num_ln, where)
        nh = int(nemo["num_attention_heads"])
        groups = int(nemo.get("num_query_groups") or nh)
        want = groups if new else (1 if mq else nh)
        if groups != want:
            raise ConfigError(f"num_query_groups={groups} contradicts new_decoder_architecture={new}, "
                              f"multi_query={mq} (Falcon then has {want} key/value heads)", file=where,
                              fix="fix num_query_groups or the Falcon flags in model.yaml")
        put_unless_default(out, "new_decoder_architecture", new, False)
        put_unless_default(out, "parallel_attn", par, True)
        put_unless_default(out, "multi_query", mq, True)
        put_unless_default(out, "num_ln_in_parallel_attn", num_ln, None)
        if new:  # elsewhere FalconAttention ignores num_kv_heads; the source's value stays
            put_unless_default(out, "num_kv_heads", groups, nh)


@dataclass(frozen=True)
class FalconFfn(ConfigRule):
    """ffn_hidden_size, which FalconConfig defaults to 4 x hidden_size."""

    hf_keys = ("ffn_hidden_size",)

    def to_nemo(self, hf, out, where):
        out["ffn_hidden_size"] = hf.get("ffn_hidden_size") or 4 * int(hf["hidden_size"])

    def to_hf(self, nemo, out, where):
        put_unless_default(out, "ffn_hidden_size", nemo["ffn_hidden_size"], 4 * int(nemo["hidden_size"]))


@dataclass(frozen=True)
class FalconBias(ConfigRule):
    """bias switches every Falcon linear's bias, qkv included (FalconLinear(..., bias=config.bias))."""

    hf_keys = ("bias",)

    def to_nemo(self, hf, out, where):
        out["add_bias_linear"] = out["add_qkv_bias"] = _flag(hf, "bias", False)

    def to_hf(self, nemo, out, where):
        b = _flag(nemo, "add_bias_linear", False)
        if _flag(nemo, "add_qkv_bias", False) != b:
            raise ConfigError(f"add_qkv_bias={nemo.get('add_qkv_bias')} differs from add_bias_linear={b}; "
                              "Falcon has one bias flag for all linears", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        put_unless_default(out, "bias", b, False)


T = "transformer.h.{l}."
N = "decoder.layers.{l}."


def _linear(hf: str, nemo: str, shape: tuple[str, str]) -> tuple[Rule, ...]:
    """weight, and bias when config.bias."""
    return (Rename(hf + ".weight", nemo + ".weight", shape),
            When("bias", (True,), Rename(hf + ".bias", nemo + ".bias", shape[:1])))


def _norm(hf: str, nemo: str, norms: tuple[str, ...]) -> tuple[Rule, ...]:
    return tuple(When("norms", norms, Rename(f"{hf}.{p}", f"{nemo}.{p}", ("H",))) for p in ("weight", "bias"))


RULES = (
    Rename("transformer.word_embeddings.weight", "embedding.word_embeddings.weight", ("V", "H")),
    # Norms by variant (NeMo 1 convert_falcon_hf_to_nemo.py get_new_key; falcon_decoder_layer.py).
    *_norm(T + "input_layernorm", N + "input_layernorm", ("shared", "sequential")),
    *_norm(T + "ln_attn", N + "input_layernorm", ("two",)),
    *_norm(T + "ln_mlp", N + "pre_mlp_layernorm", ("two",)),
    *_norm(T + "post_attention_layernorm", N + "post_self_attn_layernorm", ("sequential",)),
    *_linear(T + "self_attention.query_key_value", N + "self_attention.linear_qkv", ("QKV", "H")),
    *_linear(T + "self_attention.dense", N + "self_attention.linear_proj", ("H", "Q")),
    *_linear(T + "mlp.dense_h_to_4h", N + "mlp.linear_fc1", ("F", "H")),
    *_linear(T + "mlp.dense_4h_to_h", N + "mlp.linear_fc2", ("H", "F")),
    Rename("transformer.ln_f.weight", "decoder.final_layernorm.weight", ("H",)),
    Rename("transformer.ln_f.bias", "decoder.final_layernorm.bias", ("H",)),
    TiedOutput("lm_head.weight", "output_layer.weight"),
)

CONFIG = (
    Allowed("alibi", (None, False), "ALiBi attention (falcon-rw-*) has no Megatron-Core position embedding"),
    Field("num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size"),
    FalconFfn(),
    Field("num_attention_heads", "num_attention_heads"),
    FalconLayout(),
    KvChannels(),
    FalconBias(),
    SparseField("layer_norm_epsilon", "layernorm_epsilon", 1e-5),
    SparseField("initializer_range", "init_method_std", 0.02),
    SparseField("max_position_embeddings", "seq_length", 2048),
    SparseField("hidden_dropout", "hidden_dropout", 0.0),
    SparseField("attention_dropout", "attention_dropout", 0.0),
    # FalconConfig ties by default (falcon-7b/40b configs do not say)
    SparseField("tie_word_embeddings", "share_embeddings_and_output_weights", True),
    Field("vocab_size", "vocab_size"),
    VocabDivisor(),
    Activation("activation", "gelu"),
    RopeBase(("rope_theta",)),
    Const("rotary_percent", 1.0),
    PlainRope(),
    Const("normalization", "LayerNorm"),
    Const("gated_linear_unit", False),
    Const("position_embedding_type", "rope"),
    Const("output_layer_bias", False),
    ParamsDType(),
)


def _falcon_hf_dims(cfg: Mapping[str, Any], where: str) -> ParallelDims:
    if cfg.get("alibi"):
        raise UnsupportedArchitecture("Falcon with alibi=true (falcon-rw-1b/7b) is not supported: "
                                      "Megatron-Core has no ALiBi position embedding", file=where,
                                      fix="convert a RoPE Falcon (alibi=false)")
    for rule in CONFIG:  # unsupported fields are reported by name before any tensor is matched
        rule.to_nemo(cfg, {}, where)
    new, par = _flag(cfg, "new_decoder_architecture", False), _flag(cfg, "parallel_attn", True)
    hidden = cfg.get("hidden_size")
    sizes = {"num_attention_heads": cfg.get("num_attention_heads"), "hidden_size": hidden,
             "num_key_value_heads": _hf_groups(cfg, where), "num_hidden_layers": cfg.get("num_hidden_layers"),
             "intermediate_size": cfg.get("ffn_hidden_size") or 4 * int(hidden or 0),
             "vocab_size": cfg.get("vocab_size"),
             "tie_word_embeddings": _flag(cfg, "tie_word_embeddings", True)}
    norms = _norms(new, par, cfg.get("num_ln_in_parallel_attn"), where)
    return with_layout(dims_from_hf(sizes, where), norms, _flag(cfg, "bias", False))


def _falcon_nemo_dims(cfg: Mapping[str, Any], where: str) -> ParallelDims:
    for rule in CONFIG:
        rule.to_hf(cfg, {}, where)
    norms = _norms(_flag(cfg, "new_decoder_architecture", False), _flag(cfg, "parallel_attention", True),
                   cfg.get("num_ln_in_parallel_attn"), where)
    return with_layout(dims_from_nemo(cfg, where), norms, _flag(cfg, "add_bias_linear", False))


_MODEL, _CONFIG = register("Falcon", {
    **LAYERNORM_ROPE, "activation_func": GELU, "add_bias_linear": False, "add_qkv_bias": False,
    "share_embeddings_and_output_weights": True,
    # hfnemo fields (docs/formats.md): NeMo 1 Falcon's mcore_customization_config, then HF's own flags
    "new_decoder_architecture": False, "parallel_attention": True, "multi_query": True,
    "num_ln_in_parallel_attn": None, "output_layer_bias": False,
})


FALCON = ArchSpec(
    name="falcon",
    hf_architectures=("FalconForCausalLM",),
    hf_model_type="falcon",
    nemo_model=_MODEL,
    nemo_config=_CONFIG,
    rules=RULES,
    config_rules=CONFIG,
    # The Llama spec's five. Whether NeMo 1's TENorm norms carry one too depends on the TE version
    # (spec §3.4); loaders then use log_all strictness.
    extra_state=DENSE_TE_MODULES,
    dims_from_hf=_falcon_hf_dims,
    dims_from_nemo=_falcon_nemo_dims,
)
