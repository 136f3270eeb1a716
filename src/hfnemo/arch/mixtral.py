"""Mixtral (MixtralForCausalLM): Llama attention, a top-k softmax router and SwiGLU experts.

Provenance: NeMo r2.5.0 nemo/collections/llm/gpt/model/mixtral.py HFMixtralImporter (name map,
_import_moe_w1_w3, _import_embedding/_import_lm_head padding, config kwargs) and the io.json
NeMo 2.5.3 wrote for tests/data/nvidia/mixtral; HFMixtralExporter for the way back (rows cut to
the tokenizer's length). transformers 4.x and 5.x both save the per-expert w1/w2/w3 layout.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hfnemo.arch.config_rules import Const, ConfigRule, Field, ImportConst, NoRopeScaling, ParamsDType, QueryGroups
from hfnemo.arch.rules import ATTENTION_TE_MODULES, Dims, FuseGateUp, FuseQKV, Rename, VocabRename
from hfnemo.arch.spec import ArchSpec, _int, dims_from_hf, dims_from_nemo
from hfnemo.errors import ConfigError
from hfnemo.io.nemo_configs import SILU

L = "model.layers.{l}."
N = "decoder.layers.{l}."
E = L + "block_sparse_moe.experts.{e}."  # HF expert e of layer l
X = N + "mlp.experts.local_experts.{e}."  # Megatron SequentialMLP expert; stacked [L, E, ...] on disk
VOCAB_DIVISOR = 128  # HFMixtralImporter: make_vocab_size_divisible_by=128, vocab_size left None


RULES = (
    # Embedding and output rows are padded to a multiple of 128 (zero rows) and pruned on export.
    VocabRename("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    Rename(L + "input_layernorm.weight", N + "self_attention.linear_qkv.layer_norm_weight", ("H",)),
    FuseQKV(L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight",
            N + "self_attention.linear_qkv.weight"),
    Rename(L + "self_attn.o_proj.weight", N + "self_attention.linear_proj.weight", ("H", "Q")),
    # MoE layers have no fused LayerNorm-linear: the MLP norm is a module of its own.
    Rename(L + "post_attention_layernorm.weight", N + "pre_mlp_layernorm.weight", ("H",)),
    Rename(L + "block_sparse_moe.gate.weight", N + "mlp.router.weight", ("E", "H")),  # num_local_experts
    # w1 = gate, w3 = up: fc1 = cat(w1, w3), stored as two chunks per (layer, expert) like Megatron.
    FuseGateUp(E + "w1.weight", E + "w3.weight", X + "linear_fc1.weight"),
    Rename(E + "w2.weight", X + "linear_fc2.weight", ("H", "F")),
    Rename("model.norm.weight", "decoder.final_layernorm.weight", ("H",)),
    VocabRename("lm_head.weight", "output_layer.weight"),
)


def _tokenizer_length(ctx_dir: Path) -> int | None:
    """len(tokenizer) from nemo_tokenizer/tokenizer.json: distinct ids of the vocab and added tokens."""
    path = ctx_dir / "nemo_tokenizer" / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        vocab = tok["model"]["vocab"]
        ids = set(vocab.values() if isinstance(vocab, dict) else range(len(vocab)))  # BPE dict / Unigram list
        ids.update(int(a["id"]) for a in tok.get("added_tokens") or ())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot count the tokens of tokenizer.json: {e!r}", file=path,
                          fix="repair context/nemo_tokenizer/tokenizer.json") from None
    return len(ids) or None


def export_vocab_size(cfg: Mapping[str, Any], where: str) -> int:
    """The HF vocab_size on export. model.yaml has vocab_size: null (NVIDIA's convention), so: the
    source config.json hfnemo kept (``hf_vocab_size``), else config.vocab_size, else the tokenizer's
    length (what HFMixtralExporter uses), else an error."""
    for v in (cfg.get("hf_vocab_size"), cfg.get("vocab_size")):
        if v:
            return int(v)
    v = _tokenizer_length(Path(where).parent)
    if v:
        return v
    raise ConfigError("the HF vocab size is unknown: model.yaml has vocab_size: null, there is no "
                      "context/artifacts/hf_config.json and no context/nemo_tokenizer/tokenizer.json",
                      file=where,
                      fix="set config.vocab_size in context/model.yaml to the number of real (unpadded) "
                          "tokens")


def _dims_from_hf(cfg: Mapping[str, Any], where: str) -> Dims:
    dims = dims_from_hf(cfg, where)
    return dataclasses.replace(dims, experts=_int(cfg, "num_local_experts", where),
                               vocab_padded=-(-dims.vocab // VOCAB_DIVISOR) * VOCAB_DIVISOR)


def _dims_from_nemo(cfg: Mapping[str, Any], where: str) -> Dims:
    vocab = export_vocab_size(cfg, where)
    dims = dims_from_nemo({**cfg, "vocab_size": vocab}, where)
    div = int(cfg.get("make_vocab_size_divisible_by") or VOCAB_DIVISOR)
    return dataclasses.replace(dims, experts=_int(cfg, "num_moe_experts", where),
                               vocab_padded=-(-vocab // div) * div)


@dataclass(frozen=True)
class ExportVocab(ConfigRule):
    """vocab_size: not in the NeMo config (padding comes from make_vocab_size_divisible_by); on
    export the same precedence as the weights (export_vocab_size)."""

    hf_keys = ("vocab_size",)

    def to_nemo(self, hf, out, where):
        pass

    def to_hf(self, nemo, out, where):
        # out holds the source config.json's vocab_size when hfnemo kept it
        out["vocab_size"] = export_vocab_size({**nemo, "hf_vocab_size": out.get("vocab_size")}, where)


@dataclass(frozen=True)
class MixtralHeadDim(ConfigRule):
    """head_dim ⇄ kv_channels as NVIDIA passes it: ``getattr(config, 'head_dim', ...)``, i.e. None
    when config.json has head_dim null (Megatron then uses hidden/heads)."""

    hf_keys = ("head_dim",)

    def to_nemo(self, hf, out, where):
        out["kv_channels"] = hf.get("head_dim")

    def to_hf(self, nemo, out, where):
        if nemo.get("kv_channels") is not None:
            out["head_dim"] = nemo["kv_channels"]  # else: the source's value, or hf_defaults' null


@dataclass(frozen=True)
class SeqLength(ConfigRule):
    """seq_length = max_position_embeddings (the importer sets both); export reads the latter."""

    hf_keys = ("max_position_embeddings",)

    def to_nemo(self, hf, out, where):
        out["seq_length"] = hf.get("max_position_embeddings", 131072)

    def to_hf(self, nemo, out, where):
        pass


@dataclass(frozen=True)
class SiluActivation(ConfigRule):
    """activation_func=F.silu, which io.json stores as a pyref (a plain Const would store a string)."""

    hf_keys = ("hidden_act",)

    def to_nemo(self, hf, out, where):
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf.get('hidden_act')!r} is not supported for Mixtral (only silu)",
                              file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        out["activation_func"] = SILU

    def to_hf(self, nemo, out, where):
        if nemo.get("activation_func") not in (None, SILU.target):
            raise ConfigError(f"activation_func={nemo.get('activation_func')!r} is not supported for Mixtral "
                              "(only torch.nn.functional.silu)", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        out["hidden_act"] = "silu"


@dataclass(frozen=True)
class MixtralWindow(ConfigRule):
    """sliding_window ⇄ window_size=[w, 0]. NVIDIA's importer drops the window (released Mixtrals
    have none); hfnemo carries it like Mistral's so that a windowed model keeps its meaning."""

    hf_keys = ("sliding_window",)

    def to_nemo(self, hf, out, where):
        if hf.get("sliding_window"):
            out["window_size"] = [int(hf["sliding_window"]), 0]

    def to_hf(self, nemo, out, where):
        ws = nemo.get("window_size")
        if ws and ws[1] not in (0, -1):
            raise ConfigError(f"window_size={ws!r} has a right-hand window HF Mixtral cannot express",
                              file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        out["sliding_window"] = int(ws[0]) if ws else None


# The kwargs HFMixtralImporter.config passes (r2.5.0), plus the window; constructor order is
# restored by the io.json writer.
CONFIG = (
    ParamsDType(with_fp16=False),  # bf16 + params_dtype, no fp16 flag
    SiluActivation(),
    Field("num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size"),
    Field("intermediate_size", "ffn_hidden_size"),
    MixtralHeadDim(),
    Field("max_position_embeddings", "max_position_embeddings", 131072, 4096),
    SeqLength(),
    Const("position_embedding_type", "rope"),
    Field("rope_theta", "rotary_base", 1000000.0, 1000000.0),
    NoRopeScaling(),
    Field("num_attention_heads", "num_attention_heads"),
    QueryGroups(),
    Field("num_local_experts", "num_moe_experts"),
    Field("num_experts_per_tok", "moe_router_topk", 2, 2),
    # top-k then softmax over the k logits = HF's softmax, top-k, renormalise. pre_softmax=True
    # (softmax over all experts, no renormalisation) would be another model, so export refuses it.
    Const("moe_router_pre_softmax", False),
    Const("normalization", "RMSNorm"),
    Field("rms_norm_eps", "layernorm_epsilon", 1e-5, 1e-5),
    Field("initializer_range", "init_method_std", 0.02, 0.02),
    Const("gated_linear_unit", True),
    ImportConst("make_vocab_size_divisible_by", VOCAB_DIVISOR),
    ImportConst("use_cpu_initialization", True),
    ImportConst("perform_initialization", False),
    ExportVocab(),
    MixtralWindow(),
    # MixtralConfig's defaults: untied, no biases. A tied Mixtral would need an output rule of its own.
    Const("share_embeddings_and_output_weights", False, "tie_word_embeddings", False, emit=False),
    Const("add_bias_linear", False, emit=False),
    Const("add_qkv_bias", False, emit=False),
)

# Written on export only when the checkpoint has no source config.json: MixtralConfig's defaults
# for fields Megatron does not have (router loss/jitter only matter for training).
_HF_DEFAULTS = {"attention_dropout": 0.0, "use_cache": True, "head_dim": None, "output_router_logits": False,
                "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0}

MIXTRAL = ArchSpec(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    hf_model_type="mixtral",
    nemo_model="nemo.collections.llm.gpt.model.mixtral.MixtralModel",
    # NVIDIA picks MixtralConfig8x22B only when the source *path* contains "8x22b"; every field that
    # differs is passed explicitly, so the class changes nothing but the name.
    nemo_config="nemo.collections.llm.gpt.model.mixtral.MixtralConfig8x7B",
    rules=RULES,
    config_rules=CONFIG,
    extra_state=ATTENTION_TE_MODULES,
    expert_extra_state=("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2"),
    hf_defaults=_HF_DEFAULTS,
    dims_from_hf=_dims_from_hf,
    dims_from_nemo=_dims_from_nemo,
)
