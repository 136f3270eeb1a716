"""Phi-3 / Phi-3.5 / Phi-4-mini (Phi3ForCausalLM): Llama with fused qkv_proj and gate_up_proj.

Provenance: NeMo r2.5 nemo/collections/llm/gpt/model/phi3mini.py HFPhi3Importer (_import_qkv splits
qkv_proj = cat(q, k, v) and interleaves it per query group; gate_up_proj = [gate; up] is copied to
linear_fc1 as it is) and HFPhi3Exporter (_export_qkv); spec §4.2.

Beyond NVIDIA's importer, which passes neither num_query_groups (Phi-3-medium is GQA 40:10),
seq_length, rotary_percent (Phi-4-mini: 0.75), window_size nor vocab_size, hfnemo writes those when
they differ from what Phi3Config implies. rope_scaling longrope/su (the 128k models, Phi-3.5,
Phi-4-mini) is refused: Megatron's rotary embedding has no per-frequency short/long factors nor
longrope's attention scale, and NVIDIA's importer drops the field silently, giving a NeMo model
whose logits differ at every position.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hfnemo.arch.config_rules import (ConfigRule, Const, ExplicitVocab, Field, Implicit, ParamsDType, QueryGroups,
                                      VocabDivisor)
from hfnemo.arch.rules import DENSE_TE_MODULES, FusedGateUp, Rename, SplitQKV, TiedOutput
from hfnemo.arch.spec import ArchSpec, dims_from_nemo_any_vocab
from hfnemo.errors import ConfigError
from hfnemo.io.nemo_configs import SILU, ConfigClass, register_config_class

_GPT = "nemo.collections.llm.gpt.model"


# SplitQKV and FusedGateUp (rules.py) take HF's fused qkv_proj and gate_up_proj.
L = "model.layers.{l}."
N = "decoder.layers.{l}."
RULES = (
    Rename("model.embed_tokens.weight", "embedding.word_embeddings.weight", ("V", "H")),
    Rename(L + "input_layernorm.weight", N + "self_attention.linear_qkv.layer_norm_weight", ("H",)),
    SplitQKV(L + "self_attn.qkv_proj.weight", N + "self_attention.linear_qkv.weight"),
    Rename(L + "self_attn.o_proj.weight", N + "self_attention.linear_proj.weight", ("H", "Q")),
    Rename(L + "post_attention_layernorm.weight", N + "mlp.linear_fc1.layer_norm_weight", ("H",)),
    FusedGateUp(L + "mlp.gate_up_proj.weight", N + "mlp.linear_fc1.weight"),
    Rename(L + "mlp.down_proj.weight", N + "mlp.linear_fc2.weight", ("H", "F")),
    Rename("model.norm.weight", "decoder.final_layernorm.weight", ("H",)),
    TiedOutput("lm_head.weight", "output_layer.weight"),  # Phi-4-mini ties
)


# ---- config rules ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phi3Rope(ConfigRule):
    """partial_rotary_factor ⇄ rotary_percent (Megatron rotates the first int(d·pct) dims rotate-half,
    as HF does); any rope_scaling other than none is refused (see the module docstring).

    transformers 4.x writes partial_rotary_factor at the top level, 5.x inside rope_parameters
    (normalised here to rope_scaling={rope_type: default, partial_rotary_factor}); export writes it
    back where the original config had it."""

    hf_keys = ("rope_scaling", "partial_rotary_factor", "original_max_position_embeddings")

    def to_nemo(self, hf, out, where):
        rs = hf.get("rope_scaling") or {}
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind != "default":
            raise ConfigError(
                f"rope_scaling type {kind!r} cannot be represented in NeMo: Megatron's rotary embedding has no "
                "per-frequency short_factor/long_factor and no longrope attention scaling (NVIDIA's Phi-3 "
                "importer drops rope_scaling silently, which changes every logit)", file=where,
                fix="convert a Phi-3 variant without rope_scaling (e.g. the 4k models), or open an issue")
        pct = float(hf.get("partial_rotary_factor") or rs.get("partial_rotary_factor") or 1.0)
        if pct != 1.0:
            out["rotary_percent"] = pct

    def to_hf(self, nemo, out, where):
        pct = float(nemo.get("rotary_percent") or 1.0)
        rs = out.get("rope_scaling")
        if isinstance(rs, dict) and "partial_rotary_factor" in rs:
            out["rope_scaling"] = {**rs, "partial_rotary_factor": pct}
        elif "partial_rotary_factor" in out or pct != 1.0:
            out["partial_rotary_factor"] = pct
        out.setdefault("rope_scaling", None)
        out.setdefault("original_max_position_embeddings", out["max_position_embeddings"])


@dataclass(frozen=True)
class Phi3Window(ConfigRule):
    """sliding_window (Phi-3-mini-4k: 2047) ⇄ window_size=(w, 0), as NVIDIA's Mistral importer maps
    Mistral's; NVIDIA's Phi-3 importer drops it."""

    hf_keys = ("sliding_window",)

    def to_nemo(self, hf, out, where):
        w = hf.get("sliding_window")
        if w:
            out["window_size"] = [int(w), 0]

    def to_hf(self, nemo, out, where):
        ws = nemo.get("window_size")
        out["sliding_window"] = int(ws[0]) if ws else None


@dataclass(frozen=True)
class TokenizerIds(ConfigRule):
    """bos/eos/pad ids on export when neither the original config.json nor a generation config is
    kept (NVIDIA's Phi-3 importer records none): read from context/nemo_tokenizer's
    tokenizer_config.json, as NVIDIA's exporter takes pad_token_id from the tokenizer. Without them
    HF's Phi3Config defaults (32000) would apply whatever the vocabulary."""

    def to_nemo(self, hf, out, where):
        pass

    def to_hf(self, nemo, out, where):
        path = Path(where).parent / "nemo_tokenizer" / "tokenizer_config.json"
        if not path.is_file():
            return
        try:
            tok = json.loads(path.read_text())
            ids = {v["content"]: int(k) for k, v in tok.get("added_tokens_decoder", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # not a tokenizer config we understand: leave the ids to HF's defaults
        for name in ("bos", "eos", "pad"):
            token = tok.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if f"{name}_token_id" not in out and token in ids:
                out[f"{name}_token_id"] = ids[token]


CONFIG = (
    # What HFPhi3Importer.config passes:
    Field("num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size"),
    Field("intermediate_size", "ffn_hidden_size"),
    Field("num_attention_heads", "num_attention_heads"),
    Field("initializer_range", "init_method_std", 0.02, 0.02),
    Field("rms_norm_eps", "layernorm_epsilon", 1e-5, 1e-5),
    Field("rope_theta", "rotary_base", 10000.0, 10000.0),
    Const("gated_linear_unit", True, "hidden_act", "silu"),
    VocabDivisor(),
    Field("tie_word_embeddings", "share_embeddings_and_output_weights", False, False),
    ParamsDType(),
    # What it leaves to Phi3Config's defaults, written only when they would be wrong:
    Implicit(QueryGroups(), "num_query_groups", default_from="num_attention_heads"),
    Implicit(Field("max_position_embeddings", "seq_length", 4096, 4096), "seq_length", 4096),
    Phi3Rope(),
    Phi3Window(),
    ExplicitVocab(),
    Const("normalization", "RMSNorm", emit=False),
    Const("position_embedding_type", "rope", emit=False),
    Const("activation_func", SILU.target, emit=False),
    Const("add_bias_linear", False, emit=False),
    Const("add_qkv_bias", False, emit=False),
    Const("layernorm_zero_centered_gamma", False, emit=False),
    TokenizerIds(),
)

# nemo/collections/llm/gpt/model/phi3mini.py at r2.5.0
for _c in (
    ConfigClass(f"{_GPT}.phi3mini.Phi3Config", f"{_GPT}.phi3mini.Phi3Model", f"{_GPT}.base.GPTConfig", dict(
        normalization="RMSNorm", activation_func=SILU, gated_linear_unit=True, position_embedding_type="rope",
        add_bias_linear=False, seq_length=4096, attention_dropout=0.0, hidden_dropout=0.0,
        share_embeddings_and_output_weights=False)),
    ConfigClass(f"{_GPT}.phi3mini.Phi3ConfigMini", f"{_GPT}.phi3mini.Phi3Model", f"{_GPT}.phi3mini.Phi3Config",
                dict(num_layers=32, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=32,
                     num_query_groups=32, rotary_base=10000.0, vocab_size=32064)),
):
    register_config_class(_c, {"model_transform": None})  # Phi3Model(config, optim, tokenizer, model_transform)

PHI3 = ArchSpec(
    name="phi3",
    hf_architectures=("Phi3ForCausalLM",),
    hf_model_type="phi3",
    nemo_model=f"{_GPT}.phi3mini.Phi3Model",
    nemo_config=f"{_GPT}.phi3mini.Phi3Config",
    rules=RULES,
    config_rules=CONFIG,
    extra_state=DENSE_TE_MODULES,
    # 4.x Phi3Config fields, for an export without the original config.json.
    hf_defaults={"attention_dropout": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "use_cache": True,
                 "partial_rotary_factor": 1.0},
    dims_from_nemo=dims_from_nemo_any_vocab,
)
