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

The first section (dims, the When rule, config rules) is shared with gptneox.py and phi2.py, the
three parallel-block families hfnemo defines itself; it lives here because Falcon is the one with
a NeMo precedent.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping

from hfnemo.arch.config_rules import ConfigRule, Field, ParamsDType, VocabDivisor
from hfnemo.arch.rules import Dims, Rename, Rule, TiedOutput
from hfnemo.arch.spec import ArchSpec, dims_from_hf, dims_from_nemo
from hfnemo.errors import ConfigError, UnsupportedArchitecture
from hfnemo.io.nemo_configs import GELU, ConfigClass, PyRef, register_config_class

# ------------------------------------------------------------------ shared by the parallel-block families


@dataclass(frozen=True)
class ParallelDims(Dims):
    """Dims plus what selects tensors in these families: which norms a layer has, and linear biases."""

    norms: str = "shared"  # "shared": one input norm; "two": attention + MLP norms; "sequential"
    bias: bool = True


def with_layout(base: Dims, norms: str, bias: bool) -> ParallelDims:
    return ParallelDims(**{f.name: getattr(base, f.name) for f in fields(base)}, norms=norms, bias=bias)


@dataclass(frozen=True)
class When(Rule):
    """``rule`` for the variants whose ``dims.<attr>`` is in ``values``; no tensors otherwise.
    (ArchSpec.rules is one static table, but Falcon's norms and biases depend on the config.)"""

    attr: str
    values: tuple[Any, ...]
    rule: Rule

    def _on(self, dims: Dims) -> bool:
        return getattr(dims, self.attr) in self.values

    def hf_names(self, dims):
        return self.rule.hf_names(dims) if self._on(dims) else ()

    def nemo_names(self, dims):
        return self.rule.nemo_names(dims) if self._on(dims) else ()

    def hf_to_nemo(self, dims, src, fmt):
        return self.rule.hf_to_nemo(dims, src, fmt) if self._on(dims) else []

    def nemo_to_hf(self, dims, src, fmt):
        return self.rule.nemo_to_hf(dims, src, fmt) if self._on(dims) else []

    @property
    def per_layer(self) -> bool:  # the wrapped rule's names carry {l}, not this wrapper's strings
        return self.rule.per_layer

    @property
    def per_expert(self) -> bool:
        return self.rule.per_expert


def _put(out: dict[str, Any], key: str, value: Any, default: Any) -> None:
    """Write an HF field back only where the source config had it or the value is not transformers'
    default: hub configs of these older families omit many fields (falcon-7b has no rope_theta,
    Pythia no attention_bias), and config.json must round-trip key for key. An explicit null that
    meant the default stays null."""
    if key in out:
        if not (out[key] is None and value == default):
            out[key] = value
    elif value != default:
        out[key] = value


@dataclass(frozen=True)
class HfDefault(ConfigRule):
    """hf ⇄ nemo where config.json may omit hf (then transformers' ``default`` applies)."""

    hf: str
    nemo: str
    default: Any

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.hf,)

    def to_nemo(self, hf, out, where):
        v = hf.get(self.hf)
        out[self.nemo] = self.default if v is None else v

    def to_hf(self, nemo, out, where):
        v = nemo.get(self.nemo)
        _put(out, self.hf, self.default if v is None else v, self.default)


@dataclass(frozen=True)
class Requires(ConfigRule):
    """An HF field that must keep its transformers default: other values change the model in a way
    the family's NeMo layout cannot carry, so they are refused instead of dropped."""

    hf: str
    value: Any
    why: str

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.hf,)

    def to_nemo(self, hf, out, where):
        v = hf.get(self.hf)
        if v is not None and v != self.value:
            raise ConfigError(f"{self.hf}={v!r} is not supported: {self.why}", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")

    def to_hf(self, nemo, out, where):
        pass  # the default is what transformers assumes when the field is absent


@dataclass(frozen=True)
class Emit(ConfigRule):
    """A NeMo field that is fixed for the family; export refuses a checkpoint that says otherwise."""

    nemo: str
    value: Any

    def to_nemo(self, hf, out, where):
        out[self.nemo] = self.value

    def to_hf(self, nemo, out, where):
        v = nemo.get(self.nemo, self.value)
        if v != self.value:
            raise ConfigError(f"{self.nemo}={v!r} cannot be exported to this HF architecture "
                              f"(it has {self.nemo}={self.value!r} only)", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")


@dataclass(frozen=True)
class KvChannels(ConfigRule):
    """kv_channels = hidden/heads, written explicitly; these HF families have no head_dim field."""

    def to_nemo(self, hf, out, where):
        out["kv_channels"] = int(hf["hidden_size"]) // int(hf["num_attention_heads"])

    def to_hf(self, nemo, out, where):
        want = int(nemo["hidden_size"]) // int(nemo["num_attention_heads"])
        if nemo.get("kv_channels") not in (None, want):
            raise ConfigError(f"kv_channels={nemo['kv_channels']} differs from hidden_size / heads = "
                              f"{want}, which this HF architecture cannot express", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")


@dataclass(frozen=True)
class Groups(ConfigRule):
    """Key/value heads ⇄ num_query_groups: ``hf`` names the HF field (None: the family is
    multi-head only, and has no such field)."""

    hf: str | None = None

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.hf,) if self.hf else ()

    def to_nemo(self, hf, out, where):
        out["num_query_groups"] = (hf.get(self.hf) if self.hf else None) or int(hf["num_attention_heads"])

    def to_hf(self, nemo, out, where):
        nh = int(nemo["num_attention_heads"])
        groups = int(nemo.get("num_query_groups") or nh)
        if self.hf:
            _put(out, self.hf, groups, nh)
        elif groups != nh:
            raise ConfigError(f"num_query_groups={groups} != num_attention_heads={nh}: this HF architecture "
                              "is multi-head only", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")


# transformers ACT2FN name -> the NeMo/Megatron function computing the same formula. "gelu" is erf
# GELU (F.gelu); "gelu_new" is 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))), NeMo's openai_gelu
# (nemo/collections/llm/fn/activation.py); "gelu_fast" is the 0.7978845608 form, Megatron's
# fast_gelu (megatron/core/activations.py). gelu_pytorch_tanh has no NeMo counterpart: refused.
ACTIVATIONS: Mapping[str, PyRef] = MappingProxyType({
    "gelu": GELU,
    "gelu_new": PyRef("nemo.collections.llm.fn.activation", "openai_gelu"),
    "gelu_fast": PyRef("megatron.core.activations", "fast_gelu"),
})


@dataclass(frozen=True)
class Activation(ConfigRule):
    """hidden_act / activation ⇄ activation_func, exactly (tanh and erf GELU are different models)."""

    hf: str
    default: str

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.hf,)

    def to_nemo(self, hf, out, where):
        name = hf.get(self.hf) or self.default
        if name not in ACTIVATIONS:
            raise ConfigError(f"{self.hf}={name!r} has no NeMo activation hfnemo maps exactly "
                              f"(supported: {', '.join(ACTIVATIONS)})", file=where,
                              fix="please open an issue with the model name")
        out["activation_func"] = ACTIVATIONS[name]

    def to_hf(self, nemo, out, where):
        target = getattr(nemo.get("activation_func"), "target", nemo.get("activation_func"))
        names = [n for n, ref in ACTIVATIONS.items() if ref.target == target]
        if not names:
            raise ConfigError(f"activation_func={target!r} has no HF {self.hf} name hfnemo maps", file=where,
                              fix=f"supported: {', '.join(r.target for r in ACTIVATIONS.values())}")
        _put(out, self.hf, names[0], self.default)


@dataclass(frozen=True)
class RopeBase(ConfigRule):
    """rotary base ⇄ rotary_base under the family's HF spellings (GPT-NeoX: rotary_emb_base; the
    normalised 5.x dialect: rope_theta). Export updates every spelling the source had."""

    keys: tuple[str, ...]
    default: float = 10000.0

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.keys

    def to_nemo(self, hf, out, where):
        out["rotary_base"] = next((hf[k] for k in self.keys if hf.get(k) is not None), self.default)

    def to_hf(self, nemo, out, where):
        v = nemo.get("rotary_base")
        v = self.default if v is None else v
        present = [k for k in self.keys if k in out]
        for k in present:
            _put(out, k, v, self.default)
        if not present:
            _put(out, self.keys[0], v, self.default)


@dataclass(frozen=True)
class RotaryPercent(ConfigRule):
    """Partial rotary ⇄ rotary_percent: HF rotates the first int(head_dim*f) dims of each head,
    rotate-half style, and so does Megatron with dim=int(kv_channels*rotary_percent)
    (rotary_pos_embedding.py). 5.x configs keep f in rope_parameters (the normalised rope_scaling
    dict), which transformers reads first; 4.x configs spell it ``keys``."""

    keys: tuple[str, ...]
    default: float

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.keys

    def to_nemo(self, hf, out, where):
        rs = hf.get("rope_scaling")
        if isinstance(rs, dict) and rs.get("partial_rotary_factor") is not None:
            out["rotary_percent"] = rs["partial_rotary_factor"]
            return
        out["rotary_percent"] = next((hf[k] for k in self.keys if hf.get(k) is not None), self.default)

    def to_hf(self, nemo, out, where):
        v = nemo.get("rotary_percent")
        v = 1.0 if v is None else v
        written = False
        rs = out.get("rope_scaling")
        if isinstance(rs, dict) and "partial_rotary_factor" in rs:
            out["rope_scaling"] = {**rs, "partial_rotary_factor": v}
            written = True
        for k in self.keys:
            if k in out:
                _put(out, k, v, self.default)
                written = True
        if not written:
            _put(out, self.keys[0], v, self.default)


@dataclass(frozen=True)
class PlainRope(ConfigRule):
    """Plain RoPE only: these families' NeMo configs carry no rope scaling, so a scaled config is
    refused rather than silently changed. ``extra``: rope_parameters keys other rules carry."""

    extra: tuple[str, ...] = ()
    hf_keys = ("rope_scaling",)

    def to_nemo(self, hf, out, where):
        rs = hf.get("rope_scaling")
        if not rs:
            return
        kind = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else rs
        known = {"rope_type", "type", "rope_theta", *self.extra}
        unknown = sorted(set(rs) - known) if isinstance(rs, dict) else []
        if kind != "default" or unknown:
            raise ConfigError(f"rope scaling {rs!r} cannot be carried (hfnemo maps plain RoPE for this "
                              "family)", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")

    def to_hf(self, nemo, out, where):
        if nemo.get("seq_len_interpolation_factor") not in (None, 1, 1.0):
            raise ConfigError(f"seq_len_interpolation_factor={nemo['seq_len_interpolation_factor']!r} "
                              "cannot be exported for this family", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")


def checked_hf_dims(config_rules: tuple[ConfigRule, ...], norms: str, bias: bool):
    """A dims_from_hf that first runs the config rules, so that an unsupported field is reported by
    name before tensors are matched (else it would surface as missing or unclaimed tensors)."""

    def dims(cfg: Mapping[str, Any], where: str) -> ParallelDims:
        for rule in config_rules:
            rule.to_nemo(cfg, {}, where)
        return with_layout(dims_from_hf(cfg, where), norms, bias)

    return dims


def checked_nemo_dims(config_rules: tuple[ConfigRule, ...], norms: str, bias: bool):
    """The export counterpart of checked_hf_dims (e.g. output_layer_bias=false for Phi-2)."""

    def dims(cfg: Mapping[str, Any], where: str) -> ParallelDims:
        for rule in config_rules:
            rule.to_hf(cfg, {}, where)
        return with_layout(dims_from_nemo(cfg, where), norms, bias)

    return dims


def register(name: str, parent_overrides: Mapping[str, Any]) -> tuple[str, str]:
    """Register hfnemo.nemo.<name>Config (parent GPTConfig) for io.json / model.yaml; returns the
    (model, config) targets. NeMo cannot import these: they name layouts hfnemo defines."""
    model, config = f"hfnemo.nemo.{name}Model", f"hfnemo.nemo.{name}Config"
    register_config_class(ConfigClass(config, model, "nemo.collections.llm.gpt.model.base.GPTConfig",
                                      MappingProxyType(dict(parent_overrides))),
                          {"model_transform": None, "model_context_managers": ()})
    return model, config


# Field values every parallel family shares in its config class (model.yaml states them all).
LAYERNORM_ROPE = {
    "normalization": "LayerNorm", "gated_linear_unit": False, "position_embedding_type": "rope",
    "hidden_dropout": 0.0, "attention_dropout": 0.0, "share_embeddings_and_output_weights": False,
    "seq_length": 2048, "bias_activation_fusion": False, "bias_dropout_fusion": False,
}

# ------------------------------------------------------------------ Falcon


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
        _put(out, "new_decoder_architecture", new, False)
        _put(out, "parallel_attn", par, True)
        _put(out, "multi_query", mq, True)
        _put(out, "num_ln_in_parallel_attn", num_ln, None)
        if new:  # elsewhere FalconAttention ignores num_kv_heads; the source's value stays
            _put(out, "num_kv_heads", groups, nh)


@dataclass(frozen=True)
class FalconFfn(ConfigRule):
    """ffn_hidden_size, which FalconConfig defaults to 4 x hidden_size."""

    hf_keys = ("ffn_hidden_size",)

    def to_nemo(self, hf, out, where):
        out["ffn_hidden_size"] = hf.get("ffn_hidden_size") or 4 * int(hf["hidden_size"])

    def to_hf(self, nemo, out, where):
        _put(out, "ffn_hidden_size", nemo["ffn_hidden_size"], 4 * int(nemo["hidden_size"]))


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
        _put(out, "bias", b, False)


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
    Requires("alibi", False, "ALiBi attention (falcon-rw-*) has no Megatron-Core position embedding"),
    Field("num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size"),
    FalconFfn(),
    Field("num_attention_heads", "num_attention_heads"),
    FalconLayout(),
    KvChannels(),
    FalconBias(),
    HfDefault("layer_norm_epsilon", "layernorm_epsilon", 1e-5),
    HfDefault("initializer_range", "init_method_std", 0.02),
    HfDefault("max_position_embeddings", "seq_length", 2048),
    HfDefault("hidden_dropout", "hidden_dropout", 0.0),
    HfDefault("attention_dropout", "attention_dropout", 0.0),
    # FalconConfig ties by default (falcon-7b/40b configs do not say)
    HfDefault("tie_word_embeddings", "share_embeddings_and_output_weights", True),
    Field("vocab_size", "vocab_size"),
    VocabDivisor(),
    Activation("activation", "gelu"),
    RopeBase(("rope_theta",)),
    Emit("rotary_percent", 1.0),
    PlainRope(),
    Emit("normalization", "LayerNorm"),
    Emit("gated_linear_unit", False),
    Emit("position_embedding_type", "rope"),
    Emit("output_layer_bias", False),
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

# Transformer Engine modules with _extra_state: the Llama spec's five. Whether NeMo 1's TENorm
# norms carry one too depends on the TE version (spec §3.4); loaders then use log_all strictness.
EXTRA_STATE = ("self_attention.core_attention", "self_attention.linear_proj", "self_attention.linear_qkv",
               "mlp.linear_fc1", "mlp.linear_fc2")

FALCON = ArchSpec(
    name="falcon",
    hf_architectures=("FalconForCausalLM",),
    hf_model_type="falcon",
    nemo_model=_MODEL,
    nemo_config=_CONFIG,
    rules=RULES,
    config_rules=CONFIG,
    extra_state=EXTRA_STATE,
    dims_from_hf=_falcon_hf_dims,
    dims_from_nemo=_falcon_nemo_dims,
)
