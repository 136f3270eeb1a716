"""Config field rules, each with its inverse: HF config.json ⇄ NeMo (Megatron) model config.

HF configs are first normalised to the transformers-4.x spelling (``rope_theta``,
``rope_scaling``, ``torch_dtype``) by :mod:`hfnemo.io.hf_config`; rules read and write that form.
A rule's ``to_nemo`` fills NeMo fields from HF ones and ``to_hf`` does the reverse; ``hf_keys``
lists the HF keys it consumes, so that the spec can tell which HF fields nothing carries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from hfnemo.errors import ConfigError

REQUIRED = object()


def _get(cfg: Mapping[str, Any], key: str, default: Any, where: str) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is REQUIRED:
        raise ConfigError(f"{where} has no {key!r}, which hfnemo needs", file=where,
                          fix=f"add {key!r} to {where} (see the model card of the original model)")
    return default


class ConfigRule:
    hf_keys: tuple[str, ...] = ()

    def to_nemo(self, hf: Mapping[str, Any], out: dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def to_hf(self, nemo: Mapping[str, Any], out: dict[str, Any], where: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Field(ConfigRule):
    """A field with the same value on both sides; ``default`` applies when HF omits it."""

    hf: str
    nemo: str
    default: Any = REQUIRED
    nemo_default: Any = REQUIRED  # value on export when model.yaml lacks the field (None = Megatron default)

    @property
    def hf_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.hf,)

    def to_nemo(self, hf, out, where):
        out[self.nemo] = _get(hf, self.hf, self.default, where)

    def to_hf(self, nemo, out, where):
        out[self.hf] = _get(nemo, self.nemo, self.nemo_default, where)


@dataclass(frozen=True)
class Const(ConfigRule):
    """A NeMo field this family always sets, and the HF field it implies (e.g. gated SiLU)."""

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
        w = hf.get("sliding_window")
        out["seq_length"] = int(w) if w else None
        out["window_size"] = [int(w), 0] if w else None
        out["cp_comm_type"] = "a2a" if w else None

    def to_hf(self, nemo, out, where):
        ws = nemo.get("window_size")
        out["sliding_window"] = int(ws[0]) if ws else None
        if "max_position_embeddings" not in out:
            out["max_position_embeddings"] = nemo.get("seq_length") or 32768
