"""Config overrides on import: ``hfnemo import --set KEY=VALUE``, ``hfnemo.convert(..., overrides=)``
and the guide's ``hfnemo llm import ... model_config.KEY=VALUE``.

The rule (docs/formats.md §4):

* ``KEY`` is a field of the NeMo model config: a key of ``config:`` in ``context/model.yaml``
  (``num_layers``, ``seq_length``, ``rotary_base``, ``make_vocab_size_divisible_by``, ...). The
  guide's spellings ``model_config.KEY``, ``model.config.KEY`` and ``config.KEY`` mean the same.
* ``hf.KEY`` is a field of the source ``config.json``, in the transformers-4.x spelling that
  hfnemo normalises to (``rope_theta``, ``rope_scaling``, ``torch_dtype``); dots reach into
  objects (``hf.rope_scaling.factor=16``).
* A NeMo field that the architecture derives from ``config.json`` (``num_layers`` from
  ``num_hidden_layers``, ``seq_length`` from ``max_position_embeddings``, ``rotary_base`` from
  ``rope_theta``, ...) is overridden by changing that HF field through the architecture's own
  config rules, so ``model.yaml`` and the kept ``hf_config.json`` agree and an export carries the
  override back into ``config.json``. A NeMo field with no HF counterpart is written into
  ``model.yaml`` as given.
* Every override is checked against the weights before anything is written: one that changes a
  size the tensors fix (layers, hidden size, heads, query groups, head dim, FFN size, vocabulary,
  tying, experts, the vocabulary padding) must agree with the tensors, or the import stops with a
  ShapeMismatch naming the key, the value, the tensor that contradicts it and the fix. Fields
  that no tensor depends on (``seq_length``, ``rotary_base``, dropouts, fusions...) are written.
* Refused: unknown fields, the parallel sizes (``--tp/--pp/--ep`` cut the chunks), the dtype
  fields (``--dtype`` casts the tensors).
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from hfnemo.arch.spec import ArchSpec, hf_dims, hf_to_nemo_config, nemo_to_hf_config
from hfnemo.errors import ConversionError, ShapeMismatch, UnmappedTensors, UsageError
from hfnemo.io.hf import HfConfig
from hfnemo.plan.plan import SourceTensor

NEMO_PREFIXES = ("model_config.", "model.config.", "config.")
HF_PREFIX = "hf."
_LAYOUT = {"tensor_model_parallel_size": "--tp", "pipeline_model_parallel_size": "--pp",
           "expert_model_parallel_size": "--ep", "virtual_pipeline_model_parallel_size": "--pp",
           "context_parallel_size": "--tp", "sequence_parallel": "--tp"}
_DTYPE = ("params_dtype", "bf16", "fp16", "pipeline_dtype", "autocast_dtype", "torch_dtype", "dtype")
# Dims field -> the override keys (NeMo and HF spellings) that change it: which key to blame.
_DIM_KEYS = {
    "num_layers": ("num_layers", "num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd"),
    "heads": ("num_attention_heads", "n_head"),
    "groups": ("num_query_groups", "num_key_value_heads", "num_kv_heads", "multi_query", "multi_head_attention"),
    "head_dim": ("kv_channels", "head_dim"),
    "ffn": ("ffn_hidden_size", "intermediate_size", "ffn_hidden_size", "n_inner"),
    "vocab": ("vocab_size",),
    "tied": ("share_embeddings_and_output_weights", "tie_word_embeddings"),
    "experts": ("num_moe_experts", "num_local_experts"),
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def parse_value(text: str) -> Any:
    """A command-line value as YAML-ish data: true/false, null/None, integers, floats (1e6 too),
    JSON lists/objects; anything else stays a string (quotes stripped)."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if t[:1] in "[{":
        try:
            return json.loads(t)
        except ValueError:
            pass
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    return t


def parse_overrides(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` (values parsed by :func:`parse_value`) or a mapping (values kept)."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return {str(k).strip(): v for k, v in items.items()}
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"override {it!r} is not KEY=VALUE", fix="write e.g. --set seq_length=8192")
        k, v = it.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def _split(key: str) -> tuple[str, str]:
    """("nemo" | "hf", field) of an override key."""
    if key.startswith(HF_PREFIX):
        return "hf", key[len(HF_PREFIX):]
    for p in NEMO_PREFIXES:
        if key.startswith(p):
            return "nemo", key[len(p):]
    return "nemo", key


def _set_path(cfg: dict[str, Any], path: str, value: Any, key: str) -> None:
    parts = path.split(".")
    node = cfg
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise UsageError(f"override {key}: config.json's {p!r} is not an object", fix=f"set hf.{p} itself")
        node = nxt
    node[parts[-1]] = value


def _plain(v: Any) -> Any:
    return getattr(v, "target", v)  # PyRef -> "torch.nn.functional.silu"


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _check_type(key: str, value: Any, default: Any) -> None:
    """Refuse a value of the wrong kind for a field whose default says what it holds."""
    if default is None or value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = number and float(value).is_integer()
    elif isinstance(default, float):
        ok = number
    else:
        ok = True
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), type(default).__name__)
        raise UsageError(f"override {key}={value!r}: the field holds {kind} (default {default!r})",
                         fix=f"give {key} {kind}")


@dataclass(frozen=True)
class Applied:
    """Overrides resolved against one import."""

    hf: HfConfig  # config.json with every override that has an HF spelling (the kept hf_config.json)
    nemo: dict[str, Any]  # NeMo fields with no HF counterpart, written into model.yaml as given
    changed_hf: bool  # whether hf differs from the source config.json


def apply_overrides(spec: ArchSpec, cfg: HfConfig, overrides: Mapping[str, Any],
                    sources: Mapping[str, SourceTensor], tp: int = 1) -> Applied:
    """Resolve ``overrides`` for an import of ``cfg`` (normalised config.json) and check them
    against the weights ``sources``; raises UsageError / ShapeMismatch before anything is written."""
    from hfnemo.io.nemo_configs import config_fields

    where = cfg.path
    hf_over: dict[str, tuple[str, Any]] = {}
    nemo_over: dict[str, tuple[str, Any]] = {}
    for key, value in overrides.items():
        side, name = _split(key)
        if not name:
            raise UsageError(f"override {key!r} names no field", fix="write e.g. --set seq_length=8192")
        base = name.split(".")[0]
        if base in _LAYOUT:
            raise UsageError(f"override {key}: the parallel layout is not a config override",
                             fix=f"pass {_LAYOUT[base]} N instead (it also cuts the chunks for that layout)")
        if base in _DTYPE:
            raise UsageError(f"override {key}: the dtype is not a config override",
                             fix="pass --dtype bf16|fp16|fp32 instead (it also casts the tensors)")
        (hf_over if side == "hf" else nemo_over)[name] = (key, value)

    hf1 = copy.deepcopy(cfg.data)
    for name, (key, value) in hf_over.items():
        _set_path(hf1, name, value, key)
    target1, args1 = _rules(spec, hf1, where, list(hf_over.values()))

    try:
        known = config_fields(target1)
    except KeyError:
        known = {}
    for name, (key, value) in nemo_over.items():
        if name not in known and name not in args1:
            cls = target1.rsplit('.', 1)[-1]
            if name.split(".")[0] in hf1:
                raise UsageError(f"override {key}: {name!r} is a config.json field, not a field of {cls}",
                                 fix=f"write hf.{name}={value!r} to change config.json (or the NeMo field it maps to)")
            close = difflib.get_close_matches(name, sorted(set(known) | set(args1)), n=3)
            raise UsageError(f"override {key}: {name!r} is not a field of {cls}",
                             fix=(f"did you mean {', '.join(close)}? " if close else "")
                             + "NeMo fields are the keys of config: in context/model.yaml; "
                               "use hf.FIELD for a config.json field")
        _check_type(key, value, known.get(name, args1.get(name)))

    # NeMo fields the architecture's rules carry from config.json: set them by their HF spelling.
    hf_final = hf1
    if nemo_over:
        wanted = {**args1, **{n: v for n, (_, v) in nemo_over.items()}}
        keys = list(nemo_over.values())
        rt = _to_hf(spec, args1, hf1, where, keys)
        hf2 = _to_hf(spec, wanted, hf1, where, keys)
        hf_final = copy.deepcopy(hf1)
        for k in set(rt) | set(hf2):
            if k not in hf2:
                hf_final.pop(k, None)
            elif k not in rt or not _same(rt[k], hf2[k]) or type(rt[k]) is not type(hf2[k]):
                hf_final[k] = hf2[k]
    _, args3 = _rules(spec, hf_final, where, list(overrides.items()))
    nemo_only = {n: v for n, (_, v) in nemo_over.items() if not _same(args3.get(n), v)}

    _check_weights(spec, cfg, hf_final, overrides, sources, where)
    if "make_vocab_size_divisible_by" in nemo_only:
        _check_padding(spec, hf_final, nemo_only, nemo_over["make_vocab_size_divisible_by"][0], sources, tp, where)
    return Applied(HfConfig(hf_final, cfg.dialect, cfg.path), nemo_only, hf_final != cfg.data)


def _rules(spec: ArchSpec, hf: dict[str, Any], where: str, keys: list) -> tuple[str, dict[str, Any]]:
    try:
        return hf_to_nemo_config(spec, hf, where)
    except ConversionError as e:
        raise type(e)(f"with the override(s) {_named(keys)}: {e.message}", file=e.file, tensor=e.tensor,
                      fix=e.fix) from None


def _to_hf(spec: ArchSpec, nemo: dict[str, Any], base: dict[str, Any], where: str, keys: list) -> dict[str, Any]:
    try:
        return nemo_to_hf_config(spec, nemo, base, where)
    except ConversionError as e:
        raise UsageError(f"the override(s) {_named(keys)} contradict the {spec.name} architecture: {e.message}",
                         file=e.file, fix="drop the override: this architecture fixes that field") from None


def _named(keys: list) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in keys)


def _layers_in(sources: Mapping[str, SourceTensor]) -> int:
    idx = {int(m.group(1)) for n in sources for m in [_LAYER.search(n)] if m}
    return max(idx) + 1 if idx else 0


def _check_weights(spec: ArchSpec, cfg: HfConfig, hf_final: dict[str, Any], overrides: Mapping[str, Any],
                   sources: Mapping[str, SourceTensor], where: str) -> None:
    """The overridden config must still describe the tensors (the planner's own coverage and shape
    checks); blame the override keys that changed the sizes which do not fit."""
    from hfnemo.plan.planner import map_tensors

    try:
        new = hf_dims(spec, hf_final, where)
    except ConversionError as e:
        raise UsageError(f"with the override(s) {_named(list(overrides.items()))}: {e.message}", file=e.file,
                         fix=e.fix) from None
    try:
        old = hf_dims(spec, cfg.data, where)
    except ConversionError:
        old = None
    try:
        map_tensors(spec, new, sources, "hf_to_nemo", where)
    except (ShapeMismatch, UnmappedTensors) as e:
        err = e
    else:
        if new.tied and old is not None and not old.tied:
            _check_untied(spec, overrides, sources)
        return
    changed = [f.name for f in fields(new) if old is None or getattr(old, f.name) != getattr(new, f.name)]
    blamed = [(k, v) for k, v in overrides.items()
              if any(_split(k)[1] in _DIM_KEYS.get(c, ()) for c in changed)] or list(overrides.items())
    key, value = blamed[0]
    name = _split(key)[1]
    detail = err.message
    if "num_layers" in changed and name in _DIM_KEYS["num_layers"]:
        n = _layers_in(sources)
        detail = (f"the weights have {n} layers (layer indices 0..{n - 1}), the override asks for {new.num_layers}"
                  + (f": {err.tensor} is {'missing' if new.num_layers > n else 'left over'}" if err.tensor else ""))
    have = _current(cfg, spec, name, where)
    fix = f"drop {key}" + (f", or set it to {have!r} as the weights have it" if have is not None else "") \
        + "; or convert the checkpoint these weights belong to"
    raise ShapeMismatch(f"override {_named(blamed)} contradicts the weights: {detail}", file=err.file,
                        tensor=err.tensor, fix=fix)


def _check_untied(spec: ArchSpec, overrides: Mapping[str, Any], sources: Mapping[str, SourceTensor]) -> None:
    """Tying the embeddings of a checkpoint that has its own output layer would drop that layer."""
    from hfnemo.arch.rules import TiedOutput

    for rule in spec.rules:
        if isinstance(rule, TiedOutput) and rule.hf in sources:
            keys = [(k, v) for k, v in overrides.items() if _split(k)[1] in _DIM_KEYS["tied"]]
            raise ShapeMismatch(f"override {_named(keys or list(overrides.items()))} contradicts the weights: they "
                                f"hold an output layer of their own, which tied embeddings would drop",
                                file=str(sources[rule.hf].location[1]), tensor=rule.hf,
                                fix="drop the override (the checkpoint is untied)")


def _current(cfg: HfConfig, spec: ArchSpec, name: str, where: str) -> Any:
    """The source config's value of a field (NeMo or HF spelling), when the source is consistent."""
    if name in cfg.data:
        return cfg.data[name]
    try:
        _, args = hf_to_nemo_config(spec, cfg.data, where)
    except ConversionError:
        return None
    return _plain(args.get(name))


def _check_padding(spec: ArchSpec, hf: dict[str, Any], nemo_only: dict[str, Any], key: str,
                   sources: Mapping[str, SourceTensor], tp: int, where: str) -> None:
    """make_vocab_size_divisible_by: Megatron pads the vocabulary to a multiple of d * TP at load
    time; the stored embedding must have exactly that many rows."""
    d = nemo_only["make_vocab_size_divisible_by"]
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise UsageError(f"override {key}={d!r} is not a positive integer", fix=f"set {key} to a power of two")
    dims = hf_dims(spec, hf, where)
    emb = next((s for n, s in sources.items() if s.shape and s.shape[0] == dims.nemo_vocab
                and len(s.shape) == 2 and "embed" in n), None)
    rows = emb.shape[0] if emb is not None else dims.nemo_vocab
    padded = math.ceil(dims.vocab / (d * tp)) * d * tp
    if padded != rows:
        best = 128
        while best > 1 and rows % (best * tp):
            best //= 2
        raise ShapeMismatch(f"override {key}={d}: Megatron pads vocab_size {dims.vocab} to a multiple of "
                            f"{d} x TP {tp} = {padded} rows, but the embedding has {rows}",
                            file=where, tensor=emb.name if emb is not None else None,
                            fix=f"drop {key} (hfnemo picks the divisor that needs no padding) or use {best}")
