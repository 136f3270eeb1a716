"""ArchSpec: one frozen table per family that drives both directions."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from hfnemo.arch.config_rules import ConfigRule, nemo_vocab
from hfnemo.arch.rules import Dims, ParallelDims, Rule, with_layout
from hfnemo.errors import ConfigError
from hfnemo.io.nemo_configs import ConfigClass, register_config_class


@dataclass(frozen=True)
class ArchSpec:
    name: str
    hf_architectures: tuple[str, ...]
    hf_model_type: str
    nemo_model: str  # dotted class path of the NeMo model NVIDIA's importer builds
    nemo_config: str  # dotted class path of its config
    rules: tuple[Rule, ...]
    config_rules: tuple[ConfigRule, ...]
    # (NeMo config field, config class) pairs: a field's presence selects a config subclass,
    # e.g. scale_factor -> Llama31Config.
    nemo_config_variants: tuple[tuple[str, str], ...] = ()
    # Transformer Engine modules of one layer that carry _extra_state, in state-dict order, and
    # those of one expert (MoE: keys get (layer, expert) offsets).
    extra_state: tuple[str, ...] = ()
    expert_extra_state: tuple[str, ...] = ()
    # HF tensors that hold no weights (buffers some exporters saved); matched by suffix.
    hf_ignore_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    # HF config fields written on export when the checkpoint carries no original config.json.
    hf_defaults: Mapping[str, Any] = field(default_factory=dict)
    # What transformers' config class assumes for a field config.json omits, given the others;
    # export then leaves such fields out when the source config left them out.
    hf_implicit: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    # AutoTokenizer arguments NVIDIA's importer records in io.json/model.yaml (Qwen: trust_remote_code).
    tokenizer_args: tuple[tuple[str, Any], ...] = ()
    # Families whose configs name sizes differently (Falcon, GPT-NeoX) supply their own readers.
    dims_from_hf: Callable[[Mapping[str, Any], str], Dims] | None = None
    dims_from_nemo: Callable[[Mapping[str, Any], str], Dims] | None = None


def _int(cfg: Mapping[str, Any], key: str, where: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{key}={v!r} is missing or not a positive integer", file=where,
                          fix=f"set {key} in {where}")
    return v


def dims_from_hf(cfg: Mapping[str, Any], where: str) -> Dims:
    heads = _int(cfg, "num_attention_heads", where)
    hidden = _int(cfg, "hidden_size", where)
    groups = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    if heads % groups:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}",
                          file=where, fix="fix num_key_value_heads in config.json")
    return Dims(
        num_layers=_int(cfg, "num_hidden_layers", where), hidden=hidden, heads=heads, groups=int(groups),
        head_dim=int(head_dim), ffn=_int(cfg, "intermediate_size", where), vocab=_int(cfg, "vocab_size", where),
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )


def dims_from_nemo(cfg: Mapping[str, Any], where: str) -> Dims:
    heads = _int(cfg, "num_attention_heads", where)
    hidden = _int(cfg, "hidden_size", where)
    groups = cfg.get("num_query_groups") or heads
    head_dim = cfg.get("kv_channels") or hidden // heads
    if heads % groups:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}",
                          file=where, fix="fix num_query_groups in model.yaml")
    # vocab_size: null (left to the tokenizer by some NVIDIA importers): the source config.json
    # hfnemo kept, else the stored embedding's rows (unpadded families only; Mixtral pads).
    vocab = cfg.get("vocab_size") or cfg.get("hf_vocab_size") or cfg.get("embedding_rows")
    if not vocab:
        raise ConfigError("model.yaml has no vocab_size", file=where,
                          fix="set config.vocab_size in context/model.yaml to the tokenizer's model vocab size")
    return Dims(
        num_layers=_int(cfg, "num_layers", where), hidden=hidden, heads=heads, groups=int(groups),
        head_dim=int(head_dim), ffn=_int(cfg, "ffn_hidden_size", where), vocab=int(vocab),
        tied=bool(cfg.get("share_embeddings_and_output_weights", False)),
    )


def dims_from_nemo_any_vocab(cfg: Mapping[str, Any], where: str) -> Dims:
    """dims_from_nemo with nemo_vocab's fallbacks for a null vocab_size (Gemma, Phi-3)."""
    return dims_from_nemo({**cfg, "vocab_size": nemo_vocab(cfg, where)}, where)


# ---- the parallel-block families hfnemo defines itself (Falcon, GPT-NeoX, Phi-2; from falcon.py) ----
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


def hf_to_nemo_config(spec: ArchSpec, hf: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """NeMo config class and the fields NVIDIA's importer sets (plus those it forgets)."""
    args: dict[str, Any] = {}
    for rule in spec.config_rules:
        rule.to_nemo(hf, args, where)
    target = spec.nemo_config
    for key, cls in spec.nemo_config_variants:
        if key in args:
            target = cls
    return target, args


def nemo_to_hf_config(spec: ArchSpec, nemo: Mapping[str, Any], base: Mapping[str, Any] | None,
                      where: str) -> dict[str, Any]:
    """HF config (4.x spelling) from model.yaml's config, on top of the original config if known."""
    out: dict[str, Any] = dict(base) if base else {}
    if not base:
        out.update(spec.hf_defaults)
        out["architectures"] = [spec.hf_architectures[0]]
        out["model_type"] = spec.hf_model_type
    for rule in spec.config_rules:
        rule.to_hf(nemo, out, where)
    if base and spec.hf_implicit is not None:
        # Fields the source config.json left out stay out when the derived value is what
        # transformers assumes for a missing field (Llama-1/2 configs have no head_dim, ...).
        implicit = spec.hf_implicit(out)
        for key in [k for k in out if k not in base and k in implicit and out[k] == implicit[k]]:
            del out[key]
    return out


def hf_dims(spec: ArchSpec, cfg: Mapping[str, Any], where: str) -> Dims:
    return (spec.dims_from_hf or dims_from_hf)(cfg, where)


def nemo_dims(spec: ArchSpec, cfg: Mapping[str, Any], where: str) -> Dims:
    return (spec.dims_from_nemo or dims_from_nemo)(cfg, where)
