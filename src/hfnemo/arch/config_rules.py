"""Config field rules, each with its inverse: HF config.json ⇄ NeMo (Megatron) model config.

HF configs are first normalised to the transformers-4.x spelling (``rope_theta``,
``rope_scaling``, ``torch_dtype``) by :mod:`hfnemo.io.hf_config`; rules read and write that form.
A rule's ``to_nemo`` fills NeMo fields from HF ones and ``to_hf`` does the reverse; ``hf_keys``
lists the HF keys it consumes, so that the spec can tell which HF fields nothing carries.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from hfnemo.errors import ConfigError
from hfnemo.io.nemo_configs import GELU, PyRef

REQUIRED = object()


def _get(cfg: Mapping[str, Any], key: str, default: Any, where: str) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is REQUIRED:
        raise ConfigError(f"{where} has no {key!r}, which hfnemo needs", file=where,
                          fix=f"add {key!r} to {where} (see the model card of the original model)")
    return default


def put_unless_default(out: dict[str, Any], key: str, value: Any, default: Any) -> None:
    """Write an HF field back only where the source config had it or the value is not transformers'
    default: hub configs of older families omit many fields (falcon-7b has no rope_theta, Pythia no
    attention_bias), and config.json must round-trip key for key. An explicit null that meant the
    default stays null. (From falcon.py, where the parallel-block families first needed it.)"""
    if key in out:
        if not (out[key] is None and value == default):
            out[key] = value
    elif value != default:
        out[key] = value


class ConfigRule:
    hf_keys: tuple[str, ...] = ()

    def to_nemo(self, hf: Mapping[str, Any], out: dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def to_hf(self, nemo: Mapping[str, Any], out: dict[str, Any], where: str) -> None:
        raise NotImplementedError


class OneHfKey(ConfigRule):
    """Base of the rules that consume exactly one HF field, named by their ``hf`` attribute."""

    hf: str

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.hf,)


@dataclass(frozen=True)
class Field(OneHfKey):
    """A field with the same value on both sides; ``default`` applies when HF omits it."""

    hf: str
    nemo: str
    default: Any = REQUIRED
    nemo_default: Any = REQUIRED  # value on export when model.yaml lacks the field (None = Megatron default)

    def to_nemo(self, hf, out, where):
        out[self.nemo] = _get(hf, self.hf, self.default, where)

    def to_hf(self, nemo, out, where):
        out[self.hf] = _get(nemo, self.nemo, self.nemo_default, where)


@dataclass(frozen=True)
class SparseField(OneHfKey):
    """hf ⇄ nemo where config.json may omit hf (then transformers' ``default`` applies); a null means
    the default. Unlike Field, export writes hf only where the source had it or it is not the default
    (put_unless_default). Unlike NullableField, a null is not a value. (falcon.py's HfDefault.)"""

    hf: str
    nemo: str
    default: Any

    def to_nemo(self, hf, out, where):
        v = hf.get(self.hf)
        out[self.nemo] = self.default if v is None else v

    def to_hf(self, nemo, out, where):
        v = nemo.get(self.nemo)
        put_unless_default(out, self.hf, self.default if v is None else v, self.default)


@dataclass(frozen=True)
class NullableField(OneHfKey):
    """A field whose null is meaningful (a soft-cap of None is no cap), unlike Field's and
    SparseField's, where null means the default; ``default`` applies only when HF omits the key, and
    export always writes it. (gemma.py's Nullable.)"""

    hf: str
    nemo: str
    default: Any

    def to_nemo(self, hf, out, where):
        out[self.nemo] = hf.get(self.hf, self.default)

    def to_hf(self, nemo, out, where):
        out[self.hf] = nemo.get(self.nemo)


@dataclass(frozen=True)
class Const(ConfigRule):
    """A NeMo field this family always sets, and the HF field it implies (e.g. gated SiLU).

    Export refuses a model.yaml that says otherwise. Limitations: ``value`` is compared with
    model.yaml as it is, so a PyRef value (an activation function) needs a rule of its own (mixtral's
    SiluActivation, Activation); and a null in model.yaml is refused, not read as the default.
    (falcon.py's Emit was this rule with hf=None; its export message differed only in wording.)
    """

    nemo: str
    value: Any
    hf: str | None = None
    hf_value: Any = None
    emit: bool = True  # False: the config class default already says so and NVIDIA's importer omits it

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.hf,) if self.hf else ()

    def to_nemo(self, hf, out, where):
        if self.hf is not None and hf.get(self.hf, self.hf_value) != self.hf_value:
            raise ConfigError(f"{self.hf}={hf.get(self.hf)!r} is not supported for this architecture "
                              f"(hfnemo maps only {self.hf}={self.hf_value!r})", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        if self.emit:
            out[self.nemo] = self.value

    def to_hf(self, nemo, out, where):
        if nemo.get(self.nemo, self.value) != self.value:
            raise ConfigError(f"{self.nemo}={nemo.get(self.nemo)!r} is not supported for this architecture "
                              f"(hfnemo maps only {self.nemo}={self.value!r})", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        if self.hf is not None:
            out[self.hf] = self.hf_value


@dataclass(frozen=True)
class ImportConst(ConfigRule):
    """A NeMo field NVIDIA's importer sets to a fixed value that says nothing about the weights
    (e.g. make_vocab_size_divisible_by=128 next to an explicit vocab_size); export ignores it, so a
    checkpoint trained with another value still exports. (From qwen2.py; Mixtral uses it too.)"""

    nemo: str
    value: Any

    def to_nemo(self, hf, out, where):
        out[self.nemo] = self.value

    def to_hf(self, nemo, out, where):
        pass


@dataclass(frozen=True)
class Allowed(OneHfKey):
    """An HF field that changes the computation, accepted only at ``values`` (include None to accept
    an absent field): other values change the model in a way the family's NeMo layout cannot carry,
    so they are refused instead of dropped. Export writes nothing (transformers assumes the default).
    ``why``, when given, is the refusal's reason. (gemma.py's Allowed and falcon.py's Requires, which
    was Allowed(hf, (None, value), why).)"""

    hf: str
    values: tuple[Any, ...]
    why: str | None = None

    def to_nemo(self, hf, out, where):
        v = hf.get(self.hf)
        if v in self.values:
            return
        if self.why is not None:
            raise ConfigError(f"{self.hf}={v!r} is not supported: {self.why}", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")
        raise ConfigError(f"{self.hf}={v!r} cannot be represented in NeMo's config for this "
                          f"architecture (supported: {', '.join(map(repr, self.values))})", file=where,
                          fix="this model variant needs a spec of its own: please open an issue")

    def to_hf(self, nemo, out, where):
        pass


@dataclass(frozen=True)
class Implicit(ConfigRule):
    """Run ``rule`` but leave ``nemo`` out of the explicit arguments when it equals the value the
    config class implies (``default``, or the value of NeMo field ``default_from``), as NVIDIA's
    importer does. Export reads model.yaml, where every field is present, so nothing is lost.
    (From gemma.py; Phi-3 uses it too.)"""

    rule: ConfigRule
    nemo: str
    default: Any = None
    default_from: str | None = None

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.rule.hf_keys

    def to_nemo(self, hf, out, where):
        tmp: dict[str, Any] = {}
        self.rule.to_nemo(hf, tmp, where)
        implied = out.get(self.default_from) if self.default_from else self.default
        out.update({k: v for k, v in tmp.items() if not (k == self.nemo and v == implied)})

    def to_hf(self, nemo, out, where):
        self.rule.to_hf(nemo, out, where)


@dataclass(frozen=True)
class HeadDim(ConfigRule):
    """head_dim ⇄ kv_channels; HF omits it when it equals hidden/heads, Megatron then uses None."""

    hf_keys = ("head_dim",)

    def to_nemo(self, hf, out, where):
        out["kv_channels"] = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]

    def to_hf(self, nemo, out, where):
        kv = nemo.get("kv_channels")
        out["head_dim"] = kv if kv is not None else nemo["hidden_size"] // nemo["num_attention_heads"]


@dataclass(frozen=True)
class QueryGroups(ConfigRule):
    """num_key_value_heads ⇄ num_query_groups (MHA when absent)."""

    hf_keys = ("num_key_value_heads",)

    def to_nemo(self, hf, out, where):
        out["num_query_groups"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]

    def to_hf(self, nemo, out, where):
        out["num_key_value_heads"] = nemo.get("num_query_groups") or nemo["num_attention_heads"]


@dataclass(frozen=True)
class KvChannels(ConfigRule):
    """kv_channels = hidden/heads, written explicitly; for HF families with no head_dim field
    (Falcon, GPT-NeoX, Phi-2)."""

    def to_nemo(self, hf, out, where):
        out["kv_channels"] = int(hf["hidden_size"]) // int(hf["num_attention_heads"])

    def to_hf(self, nemo, out, where):
        want = int(nemo["hidden_size"]) // int(nemo["num_attention_heads"])
        if nemo.get("kv_channels") not in (None, want):
            raise ConfigError(f"kv_channels={nemo['kv_channels']} differs from hidden_size / heads = "
                              f"{want}, which this HF architecture cannot express", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")


@dataclass(frozen=True)
class SparseQueryGroups(ConfigRule):
    """Key/value heads ⇄ num_query_groups, exported with put_unless_default: ``hf`` names the HF field
    (None: the family is multi-head only, and has no such field). (falcon.py's Groups; QueryGroups
    is the always-written form the NVIDIA-converted families use.)"""

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
            put_unless_default(out, self.hf, groups, nh)
        elif groups != nh:
            raise ConfigError(f"num_query_groups={groups} != num_attention_heads={nh}: this HF architecture "
                              "is multi-head only", file=where,
                              fix="this model variant needs a spec of its own: please open an issue")


@dataclass(frozen=True)
class ExplicitVocab(ConfigRule):
    """vocab_size, always explicit on import (the embedding then never depends on the tokenizer);
    on export nemo_vocab's fallbacks. (From gemma.py; Phi-3 uses it too.)"""

    hf_keys = ("vocab_size",)

    def to_nemo(self, hf, out, where):
        out["vocab_size"] = int(hf["vocab_size"])

    def to_hf(self, nemo, out, where):
        out["vocab_size"] = nemo_vocab(nemo, where)


def nemo_vocab(nemo: Mapping[str, Any], where: str) -> int:
    """vocab_size of a NeMo config, or, when NVIDIA's importer left it to the tokenizer (null), the
    HF vocab_size hfnemo kept, else the embedding's row count (api passes both). That count is the HF
    vocab_size whenever NVIDIA's import succeeded: the embedding is built with the tokenizer's length
    padded to make_vocab_size_divisible_by, which divides the HF vocab_size, and the HF tensor was
    copied into it. (NVIDIA's exporter uses the tokenizer's length instead and drops rows.)"""
    for key in ("vocab_size", "hf_vocab_size", "embedding_rows"):
        if nemo.get(key):
            return int(nemo[key])
    raise ConfigError("model.yaml has no vocab_size and no embedding to take it from", file=where,
                      fix="set config.vocab_size in context/model.yaml to the HF vocab_size")


# transformers ACT2FN name -> the NeMo/Megatron function computing the same formula. "gelu" is erf
# GELU (F.gelu); "gelu_new" is 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))), NeMo's openai_gelu
# (nemo/collections/llm/fn/activation.py; also gelu_pytorch_tanh, Gemma's); "gelu_fast" is the
# 0.7978845608 form, Megatron's fast_gelu (megatron/core/activations.py). gelu_pytorch_tanh has no
# entry here: Activation refuses it (Gemma's TanhGelu maps it on purpose).
OPENAI_GELU = PyRef("nemo.collections.llm.fn.activation", "openai_gelu")
FAST_GELU = PyRef("megatron.core.activations", "fast_gelu")
ACTIVATIONS: Mapping[str, PyRef] = MappingProxyType({
    "gelu": GELU,
    "gelu_new": OPENAI_GELU,
    "gelu_fast": FAST_GELU,
})


@dataclass(frozen=True)
class Activation(OneHfKey):
    """hidden_act / activation ⇄ activation_func, exactly (tanh and erf GELU are different models)."""

    hf: str
    default: str

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
        put_unless_default(out, self.hf, names[0], self.default)


_DTYPES = {"bfloat16": "torch.bfloat16", "float16": "torch.float16", "float32": "torch.float32"}


@dataclass(frozen=True)
class ParamsDType(ConfigRule):
    """torch_dtype ⇄ params_dtype + bf16/fp16 flags (as NVIDIA's importers set them)."""

    hf_keys = ("torch_dtype",)
    with_fp16: bool = True  # the Mixtral importer sets bf16 and params_dtype only

    def to_nemo(self, hf, out, where):
        name = str(hf.get("torch_dtype") or "float32").removeprefix("torch.")
        if name not in _DTYPES:
            raise ConfigError(f"torch_dtype {name!r} is not a floating-point dtype hfnemo converts", file=where,
                              fix="set torch_dtype to bfloat16, float16 or float32")
        if self.with_fp16:
            out["fp16"] = name == "float16"
        out["bf16"] = name == "bfloat16"
        out["params_dtype"] = _DTYPES[name]

    def to_hf(self, nemo, out, where):
        pd = str(nemo.get("params_dtype") or "torch.float32")
        out["torch_dtype"] = pd.removeprefix("torch.")


@dataclass(frozen=True)
class VocabDivisor(ConfigRule):
    """make_vocab_size_divisible_by: the largest power of two ≤ 128 dividing V (NeMo's Llama/Qwen
    importers), so that an explicit vocab_size needs no padding. Nothing to carry back."""

    def to_nemo(self, hf, out, where):
        v = int(hf["vocab_size"])
        base = 128
        while v % base:
            base //= 2
        out["make_vocab_size_divisible_by"] = base

    def to_hf(self, nemo, out, where):
        pass


@dataclass(frozen=True)
class RopeBase(ConfigRule):
    """rotary base ⇄ rotary_base under the family's HF spellings (GPT-NeoX: rotary_emb_base; the
    normalised 5.x dialect: rope_theta), exported with put_unless_default. Export updates every
    spelling the source had."""

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
            put_unless_default(out, k, v, self.default)
        if not present:
            put_unless_default(out, self.keys[0], v, self.default)


@dataclass(frozen=True)
class RotaryPercent(ConfigRule):
    """Partial rotary ⇄ rotary_percent: HF rotates the first int(head_dim*f) dims of each head,
    rotate-half style, and so does Megatron with dim=int(kv_channels*rotary_percent)
    (rotary_pos_embedding.py). 5.x configs keep f in rope_parameters (the normalised rope_scaling
    dict), which transformers reads first; 4.x configs spell it ``keys``. Exported with
    put_unless_default. (From falcon.py; phi3.py's Phi3Rope also refuses rope scaling.)"""

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
                put_unless_default(out, k, v, self.default)
                written = True
        if not written:
            put_unless_default(out, self.keys[0], v, self.default)


@dataclass(frozen=True)
class PlainRope(ConfigRule):
    """Plain RoPE only: these families' NeMo configs carry no rope scaling, so a scaled config is
    refused rather than silently changed; export refuses seq_len_interpolation_factor. ``extra``:
    rope_parameters keys other rules carry. (From falcon.py; GPT-NeoX and Phi-2 use it too.)"""

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


@dataclass(frozen=True)
class NoRopeScaling(ConfigRule):
    """NVIDIA's Qwen2 and Mixtral importers ignore rope_scaling (YaRN etc.); dropping it would change
    the model, so hfnemo refuses instead. Export leaves the field as the source config had it.
    (From qwen2.py. Gemma's GemmaNoRopeScaling differs on a null rope_type and in its message;
    PlainRope also checks the dict's keys and refuses on export.)"""

    hf_keys = ("rope_scaling",)

    def to_nemo(self, hf, out, where):
        rs = hf.get("rope_scaling")
        kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else rs
        if kind not in (None, "default"):
            raise ConfigError(f"rope_scaling {rs!r} cannot be carried: NeMo's config for this family has no "
                              "rope-scaling fields", file=where,
                              fix="remove rope_scaling from config.json only if the model was not trained "
                                  "with it; otherwise this variant needs a spec of its own (please open an "
                                  "issue)")

    def to_hf(self, nemo, out, where):
        pass


# Llama 3.1 rope scaling: Megatron's defaults (megatron/core/models/common/embeddings/rope_utils.py
# apply_rope_scaling; NeMo Llama31Config) are factor 8, low 1, high 4, original context 8192.
_LLAMA3_DEFAULTS = {"scale_factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "old_context_len": 8192}
_LLAMA3_HF = {"scale_factor": "factor", "low_freq_factor": "low_freq_factor",
              "high_freq_factor": "high_freq_factor", "old_context_len": "original_max_position_embeddings"}


@dataclass(frozen=True)
class RopeScaling(ConfigRule):
    """rope_scaling ⇄ Llama31Config's scaling fields (llama3) or seq_len_interpolation_factor (linear).

    NVIDIA's importer passes only the factor for llama3 scaling and ignores linear scaling; we carry
    every field (the defaults are left implicit so standard models match NVIDIA's output exactly).
    """

    hf_keys = ("rope_scaling",)

    def to_nemo(self, hf, out, where):
        rs = hf.get("rope_scaling")
        if not rs:
            return
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            out["scale_factor"] = float(rs.get("factor", 8.0))
            for nemo_key, hf_key in _LLAMA3_HF.items():
                if nemo_key != "scale_factor" and hf_key in rs and rs[hf_key] != _LLAMA3_DEFAULTS[nemo_key]:
                    out[nemo_key] = rs[hf_key]
        elif kind == "linear":
            out["seq_len_interpolation_factor"] = float(rs["factor"])
        elif kind not in (None, "default"):
            raise ConfigError(f"rope_scaling type {kind!r} is not supported yet", file=where,
                              fix="hfnemo carries rope_scaling llama3 and linear; please open an issue")

    def to_hf(self, nemo, out, where):
        if nemo.get("scale_factor") is not None and "Llama31" in str(nemo.get("_target_", "Llama31")):
            vals = {k: nemo.get(k, d) if nemo.get(k) is not None else d for k, d in _LLAMA3_DEFAULTS.items()}
            out["rope_scaling"] = {
                "factor": float(vals["scale_factor"]),
                "high_freq_factor": float(vals["high_freq_factor"]),
                "low_freq_factor": float(vals["low_freq_factor"]),
                "original_max_position_embeddings": int(vals["old_context_len"]),
                "rope_type": "llama3",
            }
        elif nemo.get("seq_len_interpolation_factor"):
            out["rope_scaling"] = {"factor": float(nemo["seq_len_interpolation_factor"]), "rope_type": "linear"}
        else:
            out["rope_scaling"] = None


@dataclass(frozen=True)
class MistralWindow(ConfigRule):
    """NVIDIA's Mistral importer: seq_length=sliding_window, window_size=[w, 0], cp_comm_type='a2a'
    (all None without a window). max_position_embeddings is therefore not in the NeMo config; on
    export it comes from the original config.json when hfnemo wrote the checkpoint, else seq_length."""

    hf_keys = ("sliding_window", "max_position_embeddings")

    def to_nemo(self, hf, out, where):
        # transformers' MistralConfig assumes a 4096-token window when config.json has no key at
        # all; an explicit null (Mistral v0.2 and later) means full attention.
        w = hf["sliding_window"] if "sliding_window" in hf else 4096
        out["seq_length"] = int(w) if w else None
        out["window_size"] = [int(w), 0] if w else None
        out["cp_comm_type"] = "a2a" if w else None

    def to_hf(self, nemo, out, where):
        ws = nemo.get("window_size")
        out["sliding_window"] = int(ws[0]) if ws else None
        if "max_position_embeddings" not in out:
            out["max_position_embeddings"] = nemo.get("seq_length") or 32768
