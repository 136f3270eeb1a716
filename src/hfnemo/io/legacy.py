"""Legacy per-rank checkpoints: NeMo 1 ``.nemo`` contents and Megatron-LM ``ckpt_format=torch``.

Both hold, per (tp, pp[, ep]) rank, one ``torch.save`` of the rank's LOCAL state dict under
in-memory names, layer indices local to the pipeline stage (spec §6). Resharding them means
explicit splits and concatenations, which the planner expresses as row segments and column
windows (:func:`hfnemo.plan.planner.layout_ranks`) and this module undoes on reading.

Layouts written (``D`` = the output directory):

NeMo 1 (the directory a ``.nemo`` tar holds; packing it into a tar is not done here)::

    D/model_config.yaml                               MegatronGPTModel config, mcore_gpt: true
    D/<md5>_<name>                                    tokenizer files, the HF config.json and
                                                      generation_config.json (artifacts)
    D/model_weights.ckpt                              TP = PP = 1
    D/mp_rank_{tp:02d}/model_weights.ckpt             TP > 1, PP = 1
    D/tp_rank_{tp:02d}_pp_rank_{pp:03d}/model_weights.ckpt   PP > 1

  each ``torch.save(OrderedDict)`` with keys ``model.decoder.layers.{i}.…``; loads with
  ``torch.load(weights_only=True)``. ``--format nemo1-dist`` writes ``D/model_weights/`` instead:
  a torch-dist (DCP) directory laid out as NeMo 2's ``weights/`` with the prefix ``model.``
  (:func:`write_nemo1_dist_extras` adds its metadata.json and common.pt). EP > 1 is refused (NeMo 1 has no legacy EP file naming we
  could confirm).

Megatron-LM::

    D/latest_checkpointed_iteration.txt               "release"
    D/release/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt
    D/tokenizer/…, D/hf_config.json, D/generation_config.json   (hfnemo sidecars, ignored by Megatron)

  each ``torch.save({"args": Namespace, "checkpoint_version": 3.0, "iteration": 0, "model":
  OrderedDict})``, keys without prefix. Megatron's ``read_metadata`` asserts ``iteration > 0 or
  release``, so an iteration-0 checkpoint must be a release one, which lives in ``release/`` (not
  ``iter_0000000/``). Loading needs ``weights_only=False`` or
  ``torch.serialization.add_safe_globals([argparse.Namespace])`` (the args Namespace).

Both: TE ``_extra_state`` entries are empty uint8 tensors (TE >= 2 without FP8); tied embeddings
with PP > 1 put a copy of the embedding rows in ``output_layer.weight`` on the last stage (GPTModel
allocates it there and keeps it equal by an all-reduce).

Reading trusts nothing: each rank file's central directory and data.pkl are parsed with an
unpickler that admits tensors, plain containers, OrderedDict, torch dtypes and, as inert stubs
holding their attributes as data, argparse.Namespace, io.BytesIO (old TE extra state) and
megatron.* classes (enums in args).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from hfnemo.errors import ConfigError, CorruptCheckpoint, UsageError
from hfnemo.io.fileio import FileCache
from hfnemo.io.torchzip import ArchivedTensor, InertObject, read_archive
from hfnemo.plan.plan import SourceTensor
from hfnemo.plan.planner import RankLayout, tp_split_kind

FORMATS = ("nemo2", "nemo1", "nemo1-dist", "megatron")
NEMO1_CONFIG = "model_config.yaml"
NEMO1_WEIGHTS = "model_weights.ckpt"
NEMO1_DIST = "model_weights"  # dist-ckpt models: a torch-dist (DCP) directory instead of rank files
NEMO1_PREFIX = "model."
NEMO1_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
MEGATRON_WEIGHTS = "model_optim_rng.pt"
MEGATRON_RELEASE = "release"
CHECKPOINT_VERSION = 3.0
HF_CONFIG = "hf_config.json"
GENERATION_CONFIG = "generation_config.json"
_ARTIFACT = re.compile(r"^[0-9a-f]{32}_(.+)$")


# ------------------------------------------------------------------------------ file names

def nemo1_file(tp: int, pp: int, ep: int, lay: RankLayout) -> str:
    """nlp_overrides.NLPSaveRestoreConnector's names for legacy (non-dist) weights."""
    if lay.pp > 1:
        return f"tp_rank_{tp:02d}_pp_rank_{pp:03d}/{NEMO1_WEIGHTS}"
    if lay.tp > 1:
        return f"mp_rank_{tp:02d}/{NEMO1_WEIGHTS}"
    return NEMO1_WEIGHTS


def megatron_file(tp: int, pp: int, ep: int, lay: RankLayout, directory: str = MEGATRON_RELEASE) -> str:
    """megatron/training/checkpointing.py get_checkpoint_name."""
    name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if lay.pp > 1 else "") + (f"_{ep:03d}" if lay.ep > 1 else "")
    return f"{directory}/{name}/{MEGATRON_WEIGHTS}"


def rank_layout(fmt: str, tp: int, pp: int, ep: int) -> RankLayout:
    if fmt == "nemo1" and ep > 1:
        raise UsageError("--format nemo1 with --ep > 1 is not supported (no legacy NeMo 1 file naming for "
                         "expert ranks is confirmed)", fix="use --format megatron or nemo2 for expert parallelism")
    return RankLayout(tp, pp, ep, NEMO1_PREFIX if fmt == "nemo1" else "")


def file_namer(fmt: str, lay: RankLayout):
    return (lambda t, p, e: nemo1_file(t, p, e, lay)) if fmt == "nemo1" else (lambda t, p, e: megatron_file(t, p, e, lay))


def is_nemo1_dir(p: Path) -> bool:
    return (p / NEMO1_CONFIG).is_file()


def is_megatron_dir(p: Path) -> bool:
    return (p / MEGATRON_TRACKER).is_file()


def is_nemo1_tar(p: Path) -> bool:
    """A NeMo 1 ``.nemo`` file (a tar of the NeMo 1 directory; hfnemo.io.nemo_tar)."""
    from hfnemo.io.nemo_tar import is_nemo_tar

    return is_nemo_tar(p)


def nemo1_yaml(data: bytes, where: Path | str) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"model_config.yaml is not plain YAML: {e}", file=where) from None
    if not isinstance(cfg, dict):
        raise CorruptCheckpoint("model_config.yaml is not a mapping", file=where)
    return cfg


def nemo1_layout(cfg: Mapping[str, Any]) -> RankLayout:
    return RankLayout(_int_or(cfg.get("tensor_model_parallel_size")), _int_or(cfg.get("pipeline_model_parallel_size")),
                      1, NEMO1_PREFIX)


# ------------------------------------------------------------------------------ configs written

def _s(v: Any) -> Any:
    """A config value as plain data (PyRef -> dotted string)."""
    return getattr(v, "target", v)


def vocab_divisor(rows: int, tp: int, start: int = 128) -> int:
    """The largest power of two d <= start with d*tp dividing the embedding rows, so that the
    loader's padding formula (ceil(V / (d*tp)) * d*tp, spec §5) reproduces the stored rows."""
    d = max(1, start)
    while d > 1 and rows % (d * tp):
        d //= 2
    return d


def _act(n: Mapping[str, Any]) -> tuple[str, bool]:
    name = str(_s(n.get("activation_func") or "torch.nn.functional.gelu")).rsplit(".", 1)[-1]
    return name, bool(n.get("gated_linear_unit"))


def _precision(n: Mapping[str, Any]) -> tuple[str, Any]:
    dt = str(_s(n.get("params_dtype") or "torch.float32")).rsplit(".", 1)[-1]
    return dt, {"bfloat16": "bf16", "float16": 16, "float32": 32}.get(dt, 32)


def nemo1_config(n: Mapping[str, Any], rows: int, lay: RankLayout, artifacts: Mapping[str, str],
                 arch: str) -> dict[str, Any]:
    """NeMo 1 MegatronGPTModel model_config.yaml from a NeMo 2 config (names per
    megatron_gpt_model.py build_transformer_config and the NeMo 1 HF converters' yaml)."""
    act, gated = _act(n)
    activation = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}.get(act, act + "-glu") if gated else act
    norm = str(n.get("normalization") or "LayerNorm")
    norm1 = "rmsnorm" if norm == "RMSNorm" else ("layernorm1p" if n.get("layernorm_zero_centered_gamma") else "layernorm")
    _, precision = _precision(n)
    seq = n.get("seq_length") or 2048
    tok: dict[str, Any] = {"library": "huggingface", "type": None, "use_fast": True}
    for key, fname in (("model", "tokenizer.model"), ("vocab_file", "vocab.json"), ("merge_file", "merges.txt")):
        tok[key] = f"nemo:{artifacts[fname]}" if fname in artifacts else None
    tok["hf_files"] = {k: f"nemo:{v}" for k, v in sorted(artifacts.items()) if k not in (HF_CONFIG, GENERATION_CONFIG)}
    cfg: dict[str, Any] = {
        "mcore_gpt": True, "target": NEMO1_TARGET, "precision": precision, "megatron_amp_O2": False,
        "transformer_engine": True,
        "tensor_model_parallel_size": lay.tp, "pipeline_model_parallel_size": lay.pp,
        "expert_model_parallel_size": lay.ep, "virtual_pipeline_model_parallel_size": None,
        "encoder_seq_length": seq, "max_position_embeddings": seq,
        "num_layers": n["num_layers"], "hidden_size": n["hidden_size"], "ffn_hidden_size": n["ffn_hidden_size"],
        "num_attention_heads": n["num_attention_heads"],
        "num_query_groups": n.get("num_query_groups") or n["num_attention_heads"],
        "kv_channels": n.get("kv_channels"), "init_method_std": n.get("init_method_std", 0.02),
        "layernorm_epsilon": n.get("layernorm_epsilon", 1e-5), "normalization": norm1, "activation": activation,
        "bias": bool(n.get("add_bias_linear", True)), "qkv_bias": bool(n.get("add_qkv_bias", False)),
        "qk_layernorm": bool(n.get("qk_layernorm", False)),
        "position_embedding_type": n.get("position_embedding_type") or "learned_absolute",
        "rotary_base": n.get("rotary_base", 10000), "rotary_percentage": n.get("rotary_percent", 1.0),
        "share_embeddings_and_output_weights": bool(n.get("share_embeddings_and_output_weights")),
        "make_vocab_size_divisible_by": vocab_divisor(rows, lay.tp, int(n.get("make_vocab_size_divisible_by") or 128)),
        "apply_query_key_layer_scaling": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "tokenizer": tok,
        # hfnemo's own keys (NeMo 1 ignores unknown model-config keys): the architecture and the
        # HF config/generation config it came from, for exact export.
        "hfnemo": {"arch": arch, "hf_config": f"nemo:{artifacts[HF_CONFIG]}" if HF_CONFIG in artifacts else None,
                   "generation_config": (f"nemo:{artifacts[GENERATION_CONFIG]}"
                                         if GENERATION_CONFIG in artifacts else None)},
    }
    if n.get("num_moe_experts"):
        cfg.update(num_moe_experts=n["num_moe_experts"], moe_router_topk=n.get("moe_router_topk", 2))
    return cfg


def megatron_args(n: Mapping[str, Any], rows: int, vocab: int, lay: RankLayout, arch: str) -> argparse.Namespace:
    """The args Namespace Megatron-LM pickles into every rank file; the fields its loaders and
    check_checkpoint_args read (megatron/training/arguments.py names)."""
    import torch

    act, gated = _act(n)
    dt, _ = _precision(n)
    heads = n["num_attention_heads"]
    groups = n.get("num_query_groups") or heads
    seq = n.get("seq_length") or 2048
    return argparse.Namespace(
        num_layers=n["num_layers"], hidden_size=n["hidden_size"], ffn_hidden_size=n["ffn_hidden_size"],
        num_attention_heads=heads, num_query_groups=groups, group_query_attention=groups != heads,
        kv_channels=n.get("kv_channels") or n["hidden_size"] // heads,
        tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp,
        expert_model_parallel_size=lay.ep, virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None, world_size=lay.tp * lay.pp * lay.ep, data_parallel_size=1,
        padded_vocab_size=rows, vocab_size=vocab,
        make_vocab_size_divisible_by=vocab_divisor(rows, lay.tp, int(n.get("make_vocab_size_divisible_by") or 128)),
        max_position_embeddings=seq, seq_length=seq,
        position_embedding_type=n.get("position_embedding_type") or "learned_absolute",
        use_rotary_position_embeddings=n.get("position_embedding_type") == "rope",
        rotary_base=n.get("rotary_base", 10000), rotary_percent=n.get("rotary_percent", 1.0),
        swiglu=gated and act == "silu", normalization=str(n.get("normalization") or "LayerNorm"),
        norm_epsilon=n.get("layernorm_epsilon", 1e-5),
        apply_layernorm_1p=bool(n.get("layernorm_zero_centered_gamma")),
        untie_embeddings_and_output_weights=not n.get("share_embeddings_and_output_weights"),
        add_bias_linear=bool(n.get("add_bias_linear", True)), add_qkv_bias=bool(n.get("add_qkv_bias", False)),
        qk_layernorm=bool(n.get("qk_layernorm", False)),
        num_experts=n.get("num_moe_experts") or None, moe_router_topk=n.get("moe_router_topk", 2),
        init_method_std=n.get("init_method_std", 0.02),
        params_dtype=getattr(torch, dt), bf16=dt == "bfloat16", fp16=dt == "float16",
        transformer_impl="transformer_engine", use_mcore_models=True, ckpt_format="torch",
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model="tokenizer",
        iteration=0, consumed_train_samples=0, consumed_valid_samples=0,
        hfnemo_arch=arch,
    )


def megatron_wrap(args: argparse.Namespace):
    def wrap(fname: str, sd: Any) -> dict[str, Any]:
        return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0, "model": sd}
    return wrap


def _artifact_name(path: Path, name: str) -> str:
    return f"{hashlib.md5(path.read_bytes()).hexdigest()}_{name}"


def write_nemo1_extras(out: Path, n: Mapping[str, Any], rows: int, lay: RankLayout, arch: str,
                       side_files: Mapping[str, Path], dist: bool = False) -> None:
    """model_config.yaml plus artifacts ``<md5>_<name>`` (NeMo uses uuid4 hex; md5 of the content
    keeps reruns byte-identical). ``dist``: the weights are a dist-ckpt ``model_weights/``."""
    artifacts = {}
    for name, path in side_files.items():
        artifacts[name] = _artifact_name(path, name)
        shutil.copyfile(path, out / artifacts[name])
    cfg = nemo1_config(n, rows, lay, artifacts, arch)
    if dist:
        cfg["dist_ckpt_format"] = "torch_dist"
    (out / NEMO1_CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))


def write_nemo1_dist_extras(out: Path, n: Mapping[str, Any], rows: int, lay: RankLayout, arch: str,
                            side_files: Mapping[str, Path]) -> None:
    """A dist-ckpt NeMo 1 model's files besides the DCP chunks: model_config.yaml (with
    ``dist_ckpt_format: torch_dist``) and the artifacts, plus ``model_weights/metadata.json`` and
    ``model_weights/common.pt`` as megatron.core.dist_checkpointing saves them (its loader checks
    the first and reads the second; a model-only sharded state dict leaves the common state empty)."""
    from hfnemo import torchside

    write_nemo1_extras(out, n, rows, lay, arch, side_files, dist=True)
    weights = out / NEMO1_DIST
    weights.mkdir(exist_ok=True)
    (weights / "metadata.json").write_text(json.dumps({
        "sharded_backend": "torch_dist", "sharded_backend_version": 1,
        "common_backend": "torch", "common_backend_version": 1}))
    torchside.run("hfnemo.io.legacy", "save_empty", os.path.abspath(weights / "common.pt"))


def save_empty(path: str) -> None:
    """torch.save({}, path)."""
    import torch

    torch.save({}, path)


def write_megatron_extras(out: Path, side_files: Mapping[str, Path]) -> None:
    (out / MEGATRON_TRACKER).write_text(MEGATRON_RELEASE)
    for name, path in side_files.items():
        dst = out / name if name in (HF_CONFIG, GENERATION_CONFIG) else out / "tokenizer" / name
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, dst)


# ------------------------------------------------------------------------------ reading

def _inert(module: str, name: str) -> bool:
    return ((module, name) in {("argparse", "Namespace"), ("_io", "BytesIO"), ("types", "SimpleNamespace")}
            or module.split(".")[0] in ("megatron", "nemo"))


@dataclass
class LegacyCheckpoint:
    fmt: str
    root: Path
    layout: RankLayout
    files: dict[tuple[int, int, int], Path]
    config: dict[str, Any]  # model_config.yaml, or Megatron's args as a dict
    side_files: dict[str, Path] = field(default_factory=dict)  # tokenizer files, hf_config, generation_config
    # a .nemo tar: rank files are hfnemo.io.nemo_tar.Member byte ranges of it; holding it keeps the
    # scratch directory of its extracted artifacts alive
    tar: Any = field(default=None, repr=False)
    # a dist-ckpt model (NeMo >= 1.23 mcore): no rank files, the torch-dist (DCP) index of model_weights/
    dist: Any = field(default=None, repr=False)

    @property
    def arch(self) -> str | None:
        if self.fmt == "nemo1":
            return (self.config.get("hfnemo") or {}).get("arch")
        return self.config.get("hfnemo_arch")


def _int_or(v: Any, d: int = 1) -> int:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else d


def open_legacy(root: Path) -> LegacyCheckpoint:
    """Find the rank files and the config of a NeMo 1 directory or ``.nemo`` file, or a Megatron-LM
    checkpoint."""
    if not root.is_dir() and is_nemo1_tar(root):
        from hfnemo.io.nemo_tar import open_nemo1_tar

        return open_nemo1_tar(root)
    if is_nemo1_dir(root):
        cfg = nemo1_yaml((root / NEMO1_CONFIG).read_bytes(), root / NEMO1_CONFIG)
        lay = nemo1_layout(cfg)
        files = {(t, p, e): root / nemo1_file(t, p, e, lay) for t, p, e in lay.ranks()}
        side = {}
        for f in sorted(root.iterdir()):
            m = _ARTIFACT.match(f.name)
            if m and f.is_file():
                side[m.group(1)] = f
        dist = None
        if not any(f.is_file() for f in files.values()) and (root / NEMO1_DIST / ".metadata").is_file():
            from hfnemo.io.dcp import read_index

            dist, files = read_index(root / NEMO1_DIST), {}
        ckpt = LegacyCheckpoint("nemo1", root, lay, files, cfg, side, dist=dist)
    elif is_megatron_dir(root):
        text = (root / MEGATRON_TRACKER).read_text().strip()
        if text == MEGATRON_RELEASE:
            directory = MEGATRON_RELEASE
        elif text.isdigit():
            directory = f"iter_{int(text):07d}"
        else:
            raise CorruptCheckpoint(f"{MEGATRON_TRACKER} holds {text!r}", file=root / MEGATRON_TRACKER,
                                    fix="it must hold an iteration number or 'release'")
        first = sorted((root / directory).glob(f"mp_rank_00*/{MEGATRON_WEIGHTS}"))
        if not first:
            raise CorruptCheckpoint(f"no mp_rank_00*/{MEGATRON_WEIGHTS} under {directory}/", file=root / directory)
        obj = _load_rank(first[0])[0]
        if not isinstance(obj, dict) or not isinstance(obj.get("args"), InertObject):
            raise CorruptCheckpoint("rank file holds no Megatron args", file=first[0])
        args = {k: v for k, v in vars(obj["args"]).items() if k != "args"}
        lay = RankLayout(_int_or(args.get("tensor_model_parallel_size")),
                         _int_or(args.get("pipeline_model_parallel_size")),
                         _int_or(args.get("expert_model_parallel_size")), "")
        files = {(t, p, e): root / megatron_file(t, p, e, lay, directory) for t, p, e in lay.ranks()}
        side = {f.name: f for f in sorted((root / "tokenizer").glob("*")) if f.is_file()}
        for name in (HF_CONFIG, GENERATION_CONFIG):
            if (root / name).is_file():
                side[name] = root / name
        ckpt = LegacyCheckpoint("megatron", root, lay, files, args, side)
    else:
        raise UsageError(f"{root} is not a NeMo 1 ({NEMO1_CONFIG}) or Megatron-LM ({MEGATRON_TRACKER}) checkpoint",
                         file=root, fix="check the path")
    missing = [str(p) for p in ckpt.files.values() if not p.is_file()]
    if missing:
        raise CorruptCheckpoint(f"{len(missing)} rank file(s) missing for layout tp={ckpt.layout.tp} "
                                f"pp={ckpt.layout.pp} ep={ckpt.layout.ep}: {', '.join(missing[:4])}",
                                file=missing[0], fix="copy every rank file of the checkpoint")
    return ckpt


def _load_rank(path: Path, tensors: bool = False):
    """The unpickled object of a rank file; with ``tensors``, also ``{key: StoredTensor}`` of its
    state dict's tensors (the file stays open only while locating them)."""
    fd = os.open(path, os.O_RDONLY)  # a nemo_tar.Member opens its tar and names its byte range
    try:
        size = getattr(path, "size", None)
        obj, locate = read_archive(fd, os.fstat(fd).st_size if size is None else size, path=str(path),
                                   inert=_inert, offset=getattr(path, "offset", 0))
        if not tensors:
            return obj, {}
        sd = obj.get("model") if isinstance(obj, dict) and "model" in obj and "args" in obj else obj
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CorruptCheckpoint("rank file holds no state dict", file=path)
        return obj, {k: locate(v) for k, v in sd.items() if isinstance(v, ArchivedTensor) and "_extra_state" not in k}
    finally:
        os.close(fd)


_LOCAL_EXPERT = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_GLU_FC1 = re.compile(r"(^|\.)linear_fc1\.(weight|bias)$")


def legacy_sources(ckpt: LegacyCheckpoint, num_layers: int, experts: int, gated: bool,
                   tied: bool) -> dict[str, SourceTensor]:
    """Global logical tensors (per-layer NeMo names) re-assembled from every rank's local shards.

    Each source's location is ``("legacy", pieces)``; a piece maps local rows of one rank file's
    tensor to global rows (and, for row-parallel shards, a column window): ``(path, byte_offset,
    local_row0, rows, global_row0, col, cols, local_row_bytes)``."""
    if ckpt.dist is not None:
        return dist_sources(ckpt.dist, tied)
    lay = ckpt.layout
    if num_layers % lay.pp or (experts and experts % lay.ep):
        raise CorruptCheckpoint(f"layout tp={lay.tp} pp={lay.pp} ep={lay.ep} does not divide the model",
                                file=ckpt.root)
    per_stage, per_ep = num_layers // lay.pp, (experts // lay.ep if experts else 0)
    shards: dict[str, dict[int, tuple[Path, Any]]] = {}
    for (t, p, e), path in ckpt.files.items():
        _, stored = _load_rank(path, tensors=True)
        for key, val in stored.items():
            local = key
            for pre in ("model.module.", "model.", "module."):
                if local.startswith(pre):
                    local = local[len(pre):]
                    break
            m = _LOCAL_EXPERT.match(local)
            ml = _LOCAL_LAYER.match(local)
            if m:
                name = (f"decoder.layers.{p * per_stage + int(m.group(1))}.mlp.experts.local_experts."
                        f"{e * per_ep + int(m.group(2))}.{m.group(3)}")
            elif ml:
                if e:  # dense layer tensors are replicated over EP ranks
                    continue
                name = f"decoder.layers.{p * per_stage + int(ml.group(1))}.{ml.group(2)}"
            else:
                if e:
                    continue
                name = local
            if tied and name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            got = shards.setdefault(name, {})
            if t in got:
                raise CorruptCheckpoint(f"{name} appears twice for tensor-parallel rank {t}", file=path, tensor=key)
            got[t] = (path, val)
    out: dict[str, SourceTensor] = {}
    for name, by_rank in shards.items():
        kind = tp_split_kind(name) if lay.tp > 1 else None
        ranks = sorted(by_rank) if kind else [min(by_rank)]
        if kind and ranks != list(range(lay.tp)):
            raise CorruptCheckpoint(f"{name}: shards of tensor-parallel ranks {ranks}, expected 0..{lay.tp - 1}",
                                    file=ckpt.root, tensor=name, fix="copy every rank file")
        sts = [by_rank[r][1] for r in ranks]
        dtype, shape = sts[0].dtype, sts[0].shape
        if any(st.dtype != dtype or st.shape != shape for st in sts):
            raise CorruptCheckpoint(f"{name}: ranks disagree on dtype/shape", file=ckpt.root, tensor=name)
        rows = shape[0] if shape else 1
        row_bytes = dtype.itemsize
        for s in shape[1:]:
            row_bytes *= s
        pieces = []
        if kind == "cols":
            if len(shape) != 2:
                raise CorruptCheckpoint(f"{name}: a row-parallel shard must be 2-D, got {shape}", file=ckpt.root)
            gshape = (rows, shape[1] * lay.tp)
            for r in ranks:
                pieces.append((os.fspath(by_rank[r][0]), sts[r].offset, 0, rows, 0, r * shape[1], shape[1], row_bytes))
        elif kind == "rows":
            gshape = (rows * lay.tp, *shape[1:])
            halves = 2 if gated and _GLU_FC1.search(name) else 1
            if rows % halves:
                raise CorruptCheckpoint(f"{name}: a GLU shard has an odd row count {rows}", file=ckpt.root)
            h = rows // halves
            for r in ranks:
                for k in range(halves):  # local = cat(gate_r, up_r): half k of rank r
                    pieces.append((os.fspath(by_rank[r][0]), sts[r].offset, k * h, h, k * h * lay.tp + r * h, 0, 0,
                                   row_bytes))
        else:
            gshape = shape
            pieces.append((os.fspath(by_rank[ranks[0]][0]), sts[0].offset, 0, rows, 0, 0, 0, row_bytes))
        out[name] = SourceTensor(name, dtype.name, tuple(gshape), ("legacy", tuple(pieces)))
    return out


def dist_sources(index: Any, tied: bool) -> dict[str, SourceTensor]:
    """Logical per-layer tensors of a NeMo 1 dist-ckpt ``model_weights/`` (torch-dist DCP, keys
    ``model.…``, layers stacked on a leading axis as Megatron's sharded state dict stacks them), as
    ``("legacy", pieces)`` sources: each DCP chunk holding part of a layer's tensor is one piece
    (rows of it, and a column window when tensor parallelism cut the columns), located once here,
    so rows are then read like those of rank files (read_legacy_rows)."""
    from hfnemo.exec.sources import dcp_sources
    from hfnemo.io.dcp import ChunkLocator

    logical, _prefix = dcp_sources(index)
    locator = ChunkLocator(index)
    out: dict[str, SourceTensor] = {}
    with FileCache() as files:
        for name, src in logical.items():
            if "_extra_state" in name or (tied and name == "output_layer.weight"):
                continue
            _, fqn, prefix = src.location
            g = index.tensors[fqn]
            p, item = len(prefix), g.dtype.itemsize
            pieces = []
            for chunk in g.chunks:
                o, s = chunk.offsets, chunk.sizes
                if any(not (o[i] <= prefix[i] < o[i] + s[i]) for i in range(p)):
                    continue
                if any(o[j] or s[j] != g.shape[j] for j in range(p + 2, len(g.shape))):
                    raise CorruptCheckpoint(f"a chunk cuts dimension 3 or later of {fqn} (offsets {o})",
                                            file=index.root / chunk.file, tensor=fqn,
                                            fix="hfnemo reads chunks cut along rows and columns only")
                path = str(index.root / chunk.file)
                st = locator.locate(files.fd(path), fqn, chunk)
                strides = [1] * len(s)
                for j in range(len(s) - 2, -1, -1):
                    strides[j] = strides[j + 1] * s[j + 1]
                start = st.offset + sum((prefix[i] - o[i]) * strides[i] for i in range(p)) * item
                if not src.shape:  # a 0-d logical tensor: one element
                    pieces.append((path, start, 0, 1, 0, 0, 0, item))
                    continue
                col, cols = (o[p + 1], s[p + 1]) if len(s) > p + 1 and s[p + 1] != g.shape[p + 1] else (0, 0)
                if cols and len(s) > p + 2:
                    raise CorruptCheckpoint(f"a chunk cuts the columns of the {len(s) - p}-d tensor {fqn}",
                                            file=path, tensor=fqn, fix="hfnemo reads 2-d column cuts only")
                pieces.append((path, start, 0, s[p], o[p], col, cols, strides[p] * item))
            out[name] = SourceTensor(name, src.dtype, src.shape, ("legacy", tuple(pieces)))
    return out


def read_legacy_rows(files: FileCache, src: SourceTensor, r0: int, r1: int, dest: memoryview) -> None:
    """Rows [r0, r1) of a re-assembled legacy tensor into ``dest`` (row-major, global row width)."""
    import torch

    from hfnemo.dtypes import BY_NAME
    from hfnemo.io.fileio import pread_into

    itemsize = BY_NAME[src.dtype].itemsize
    row_bytes = itemsize
    for s in src.shape[1:]:
        row_bytes *= s
    covered = 0
    for path, off, lr0, n, gr0, col, cols, lrb in src.location[1]:
        a, b = max(r0, gr0), min(r1, gr0 + n)
        if a >= b:
            continue
        fd = files.fd(path)
        start = off + (lr0 + a - gr0) * lrb
        if not cols:
            pread_into(fd, dest[(a - r0) * row_bytes:(b - r0) * row_bytes], start, path=path)
        else:
            tmp = torch.empty((b - a) * lrb, dtype=torch.uint8)
            pread_into(fd, memoryview(tmp.numpy()), start, path=path)
            out = torch.frombuffer(dest, dtype=torch.uint8)[(a - r0) * row_bytes:(b - r0) * row_bytes]
            out.view(b - a, row_bytes)[:, col * itemsize:(col + cols) * itemsize].copy_(tmp.view(b - a, lrb))
        covered += (b - a) * lrb
    if covered != (r1 - r0) * row_bytes:
        raise CorruptCheckpoint(f"rank shards cover {covered} of the {(r1 - r0) * row_bytes} bytes of rows "
                                f"{r0}..{r1}", tensor=src.name, fix="the checkpoint is incomplete: copy every rank file")


# ------------------------------------------------------------------------------ config read back

def _hf_side(ckpt: LegacyCheckpoint) -> dict[str, Any] | None:
    p = ckpt.side_files.get(HF_CONFIG) or ckpt.side_files.get("config.json")
    if p is None:
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise CorruptCheckpoint(f"hf config sidecar is not JSON: {e}", file=p) from None


def nemo2_config(ckpt: LegacyCheckpoint) -> dict[str, Any]:
    """The NeMo 2 config fields hfnemo's specs read, from model_config.yaml / Megatron args (used
    when the checkpoint has no HF config sidecar, e.g. one NeMo or Megatron wrote)."""
    c = ckpt.config
    if ckpt.fmt == "nemo1":
        act = str(c.get("activation") or "gelu")
        gated = act.endswith("glu")
        base = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}.get(act, act)
        norm = {"rmsnorm": "RMSNorm"}.get(str(c.get("normalization")), "LayerNorm")
        out = dict(num_layers=c.get("num_layers"), hidden_size=c.get("hidden_size"),
                   ffn_hidden_size=c.get("ffn_hidden_size"), num_attention_heads=c.get("num_attention_heads"),
                   num_query_groups=c.get("num_query_groups"), kv_channels=c.get("kv_channels"),
                   layernorm_epsilon=c.get("layernorm_epsilon"), rotary_base=c.get("rotary_base"),
                   rotary_percent=c.get("rotary_percentage"), seq_length=c.get("encoder_seq_length"),
                   share_embeddings_and_output_weights=bool(c.get("share_embeddings_and_output_weights")),
                   make_vocab_size_divisible_by=c.get("make_vocab_size_divisible_by"),
                   add_bias_linear=bool(c.get("bias", True)), add_qkv_bias=bool(c.get("qkv_bias", False)),
                   normalization=norm, gated_linear_unit=gated, activation_func=f"torch.nn.functional.{base}",
                   position_embedding_type=c.get("position_embedding_type"),
                   num_moe_experts=c.get("num_moe_experts"), moe_router_topk=c.get("moe_router_topk"),
                   init_method_std=c.get("init_method_std"), qk_layernorm=bool(c.get("qk_layernorm", False)))
    else:
        dt = getattr(c.get("params_dtype"), "__repr__", lambda: "torch.float32")()
        out = dict(num_layers=c.get("num_layers"), hidden_size=c.get("hidden_size"),
                   ffn_hidden_size=c.get("ffn_hidden_size"), num_attention_heads=c.get("num_attention_heads"),
                   num_query_groups=c.get("num_query_groups") if c.get("group_query_attention") else None,
                   kv_channels=c.get("kv_channels"), layernorm_epsilon=c.get("norm_epsilon"),
                   rotary_base=c.get("rotary_base"), rotary_percent=c.get("rotary_percent"),
                   seq_length=c.get("seq_length"),
                   share_embeddings_and_output_weights=not c.get("untie_embeddings_and_output_weights", False),
                   make_vocab_size_divisible_by=c.get("make_vocab_size_divisible_by"),
                   add_bias_linear=bool(c.get("add_bias_linear", True)), add_qkv_bias=bool(c.get("add_qkv_bias")),
                   normalization=c.get("normalization") or "LayerNorm", gated_linear_unit=bool(c.get("swiglu")),
                   activation_func="torch.nn.functional.silu" if c.get("swiglu") else "torch.nn.functional.gelu",
                   position_embedding_type=c.get("position_embedding_type"),
                   num_moe_experts=c.get("num_experts"), moe_router_topk=c.get("moe_router_topk"),
                   init_method_std=c.get("init_method_std"), qk_layernorm=bool(c.get("qk_layernorm", False)),
                   params_dtype=dt, vocab_size=c.get("vocab_size"))
    return {k: v for k, v in out.items() if v is not None}


def guess_arch(n: Mapping[str, Any]) -> str:
    """An HF architecture for a foreign legacy checkpoint without hfnemo's sidecar (best effort)."""
    if n.get("num_moe_experts"):
        return "MixtralForCausalLM"
    if n.get("add_qkv_bias") and not n.get("add_bias_linear"):
        return "Qwen2ForCausalLM"
    if n.get("normalization") == "RMSNorm" and n.get("gated_linear_unit"):
        return "LlamaForCausalLM"
    raise ConfigError("cannot tell the architecture of this legacy checkpoint (no hf_config sidecar)",
                      fix="only Llama-, Qwen2- and Mixtral-like legacy checkpoints are recognised without one")
