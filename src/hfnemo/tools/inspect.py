"""``hfnemo inspect PATH`` and ``hfnemo list [DIR]``: what a checkpoint is, from metadata only.

Everything comes from what describes the weights, never from the weights: config.json and
safetensors headers (HF), the data.pkl of torch archives (``.bin``, NeMo 1 / Megatron-LM rank
files: a few KB each), ``context/`` and the DCP ``.metadata`` (NeMo 2, Megatron-LM torch_dist),
model_config.yaml (NeMo 1, also inside a ``.nemo`` tar).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

from hfnemo.errors import ConversionError, CorruptCheckpoint, UsageError

FORMATS = {
    "hf": "HF safetensors",
    "hf-bin": "HF PyTorch .bin (pickle; hfnemo converts safetensors only)",
    "nemo2": "NeMo 2 (context/ + weights/ torch DCP)",
    "nemo1": "NeMo 1 (model_config.yaml + per-rank model_weights.ckpt)",
    "nemo1-tar": "NeMo 1 .nemo tar",
    "megatron": "Megatron-LM (ckpt_format=torch, per-rank model_optim_rng.pt)",
    "megatron-dist": "Megatron-LM (ckpt_format=torch_dist, DCP)",
}
_BIN_INDEX = "pytorch_model.bin.index.json"
_IGNORED = ("_extra_state", "rotary_emb.inv_freq")


@dataclass
class ModelInfo:
    """What ``inspect`` finds; None where the metadata does not say."""

    path: str
    format: str  # a key of FORMATS
    format_label: str
    architecture: str | None = None  # HF class name, e.g. LlamaForCausalLM
    family: str | None = None  # hfnemo spec name (None: hfnemo does not convert this architecture)
    nemo_model: str | None = None  # NeMo model class (NeMo formats)
    model_type: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    embedding_rows: int | None = None  # stored rows (NeMo pads the vocabulary)
    num_experts: int | None = None
    tied_embeddings: bool | None = None
    parameters: int | None = None  # stored elements of every weight tensor
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> parameters stored in it
    tensors: int | None = None
    size_bytes: int = 0  # every file under the path
    weight_bytes: int | None = None  # the weight files
    files: int = 0
    tp: int = 1
    pp: int = 1
    ep: int = 1
    tokenizer: bool = False
    tokenizer_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ detection

def checkpoint_format(p: Path) -> str | None:
    """The FORMATS key of a checkpoint at ``p`` (cheap: file names only), else None."""
    from hfnemo.io import legacy
    from hfnemo.stream import megatron_dist_dir

    try:
        if p.is_file():
            if p.suffix == ".nemo" and tarfile.is_tarfile(p):
                return "nemo1-tar"
            return None
        if not p.is_dir():
            return None
        if megatron_dist_dir(p) is not None:
            return "megatron-dist"
        if legacy.is_megatron_dir(p):
            return "megatron"
        if (p / "weights" / ".metadata").is_file() or ((p / "context").is_dir() and (p / "weights").is_dir()):
            return "nemo2"
        if legacy.is_nemo1_dir(p):
            return "nemo1"
        if (p / "config.json").is_file():
            names = os.listdir(p)
            if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
                return "hf"
            if any(n.endswith(".bin") or n == _BIN_INDEX for n in names):
                return "hf-bin"
    except OSError:
        return None
    return None


def _walk_files(p: Path) -> Iterator[os.stat_result]:
    """stat of every file under p (following file links, as a copy would)."""
    if p.is_file():
        yield p.stat()
        return
    for root, dirs, files in os.walk(p):
        for f in files:
            try:
                yield os.stat(os.path.join(root, f))
            except OSError:
                continue


def _du(p: Path) -> tuple[int, int, float]:
    """(bytes, files, newest mtime) under p."""
    size = n = 0
    newest = 0.0
    for st in _walk_files(p):
        size += st.st_size
        n += 1
        newest = max(newest, st.st_mtime)
    return size, n, newest or p.stat().st_mtime


# ------------------------------------------------------------------------------ torch archives

def _archive_tensors(fd: int, offset: int, length: int, path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of every tensor a torch.save archive's data.pkl holds (nested dicts
    are flattened with dots; Megatron's {"model": ...} and NeMo's {"state_dict": ...} unwrapped)."""
    from hfnemo.io.legacy import _inert
    from hfnemo.io.torchzip import ArchivedTensor, _Archive, _DictUnpickler

    arc = _Archive(fd, offset, length, path, "data.pkl", 1 << 24)
    obj = arc.unpickle(lambda data, p: _DictUnpickler(data, p, _inert), 256 << 20)
    if isinstance(obj, dict):
        for k in ("model", "state_dict"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    out: dict[str, tuple[str, tuple[int, ...]]] = {}

    def walk(o: Any, prefix: str, depth: int) -> None:
        if isinstance(o, ArchivedTensor):
            out[prefix] = (o.dtype.name, tuple(o.shape))
        elif isinstance(o, dict) and depth < 8:
            for k, v in o.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)

    walk(obj, "", 0)
    return out


def _member_size(f: Any) -> int:
    """Size of a rank file, or of a .nemo member (hfnemo.io.nemo_tar.Member: a byte range of the tar)."""
    size = getattr(f, "size", None)
    return size if isinstance(size, int) else os.stat(f).st_size


def _file_tensors(path: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _archive_tensors(fd, getattr(path, "offset", 0), _member_size(path), str(path))
    finally:
        os.close(fd)


def _count(info: ModelInfo, tensors: Any) -> None:
    """parameters / dtypes / tensors from (name, dtype, shape) triples."""
    params = n = 0
    dtypes: dict[str, int] = {}
    for name, dtype, shape in tensors:
        if any(s in name for s in _IGNORED):
            continue
        k = 1
        for s in shape:
            k *= s
        params += k
        n += 1
        dtypes[dtype] = dtypes.get(dtype, 0) + k
    info.parameters, info.tensors = params, n
    info.dtypes = dict(sorted(dtypes.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------ configs

def _from_nemo_config(info: ModelInfo, n: dict[str, Any]) -> None:
    """Model sizes from a NeMo 2-style config (model.yaml, or NeMo 1 / Megatron args mapped to it)."""
    def i(key: str) -> int | None:
        v = n.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    info.num_layers = info.num_layers or i("num_layers")
    info.hidden_size = info.hidden_size or i("hidden_size")
    info.ffn_hidden_size = info.ffn_hidden_size or i("ffn_hidden_size")
    info.num_attention_heads = info.num_attention_heads or i("num_attention_heads")
    info.num_query_groups = info.num_query_groups or i("num_query_groups") or info.num_attention_heads
    heads, hidden = info.num_attention_heads, info.hidden_size
    info.head_dim = info.head_dim or i("kv_channels") or (hidden // heads if heads and hidden else None)
    info.vocab_size = info.vocab_size or i("vocab_size")
    info.num_experts = info.num_experts or i("num_moe_experts")
    if info.tied_embeddings is None and "share_embeddings_and_output_weights" in n:
        info.tied_embeddings = bool(n["share_embeddings_and_output_weights"])
    for short, key in (("tp", "tensor_model_parallel_size"), ("pp", "pipeline_model_parallel_size"),
                       ("ep", "expert_model_parallel_size")):
        if i(key):
            setattr(info, short, i(key))


def _from_dims(info: ModelInfo, dims: Any) -> None:
    info.num_layers, info.hidden_size, info.ffn_hidden_size = dims.num_layers, dims.hidden, dims.ffn
    info.num_attention_heads, info.num_query_groups, info.head_dim = dims.heads, dims.groups, dims.head_dim
    info.vocab_size, info.tied_embeddings = dims.vocab, dims.tied
    info.num_experts = dims.experts or None


def _from_hf_config(info: ModelInfo, cfg: dict[str, Any], where: str) -> None:
    from hfnemo.arch import ARCH_TABLE, get_spec
    from hfnemo.arch.spec import hf_dims

    info.architecture = (cfg.get("architectures") or [None])[0]
    info.model_type = cfg.get("model_type")
    if info.architecture in ARCH_TABLE:
        spec = get_spec(info.architecture)
        info.family = spec.name
        try:
            _from_dims(info, hf_dims(spec, cfg, where))
            return
        except ConversionError as e:
            info.notes.append(f"config.json does not give hfnemo's {spec.name} sizes: {e.message}")
    elif info.architecture:
        info.notes.append(f"{info.architecture} is not an architecture hfnemo converts (see `hfnemo archs`)")
    g = cfg.get
    info.num_layers = g("num_hidden_layers") or g("n_layer") or g("num_layers")
    info.hidden_size = g("hidden_size") or g("n_embd") or g("d_model")
    info.ffn_hidden_size = g("intermediate_size") or g("ffn_hidden_size") or g("n_inner")
    info.num_attention_heads = g("num_attention_heads") or g("n_head")
    info.num_query_groups = g("num_key_value_heads") or g("num_kv_heads") or info.num_attention_heads
    hidden, heads = info.hidden_size, info.num_attention_heads
    derived = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
    info.head_dim = g("head_dim") or derived
    info.vocab_size = g("vocab_size")
    info.num_experts = g("num_local_experts") or g("num_experts") or None
    info.tied_embeddings = g("tie_word_embeddings")


def _tokenizer(info: ModelInfo, *dirs: Path | None) -> None:
    from hfnemo.io.hf import TOKENIZER_FILES

    for d in dirs:
        if d is not None and d.is_dir():
            info.tokenizer_files += [n for n in TOKENIZER_FILES if (d / n).is_file()]
    info.tokenizer_files = sorted(set(info.tokenizer_files))
    info.tokenizer = bool(info.tokenizer_files)


def _embedding_rows(info: ModelInfo, shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if name.endswith(("embedding.word_embeddings.weight", "embed_tokens.weight", "word_embeddings.weight",
                          "wte.weight", "embed_in.weight")) and shape:
            info.embedding_rows = shape[-2] if len(shape) > 1 else shape[0]
            return


# ------------------------------------------------------------------------------ per format

def _inspect_hf(p: Path, info: ModelInfo) -> None:
    from hfnemo.io import hf as hfio

    cfg = hfio.read_config(p)
    _from_hf_config(info, cfg.data, cfg.path)
    tensors = hfio.scan_weights(p)
    _count(info, ((n, t.dtype.name, t.shape) for n, t in tensors.items()))
    _embedding_rows(info, {n: t.shape for n, t in tensors.items()})
    files = {t.file for t in tensors.values()}
    info.weight_bytes = sum(os.stat(f).st_size for f in files)
    _tokenizer(info, p)


def _inspect_hf_bin(p: Path, info: ModelInfo) -> None:
    from hfnemo.io import hf as hfio

    cfg = hfio.read_config(p)
    _from_hf_config(info, cfg.data, cfg.path)
    if (p / _BIN_INDEX).is_file():
        wm = hfio.read_json(p / _BIN_INDEX, _BIN_INDEX).get("weight_map") or {}
        files = sorted({p / f for f in wm.values() if isinstance(f, str) and "/" not in f})
    else:
        files = sorted(p.glob("*.bin"))
    info.weight_bytes = sum(f.stat().st_size for f in files if f.is_file())
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        try:
            found.update(_file_tensors(f))
        except (ConversionError, OSError) as e:
            why = getattr(e, "message", e)
            info.notes.append(f"{f.name}: tensor shapes not readable from metadata ({why}); a pre-1.6 pickle "
                              "is not a zip archive")
            found = {}
            break
    if found:
        _count(info, ((n, d, s) for n, (d, s) in found.items()))
        _embedding_rows(info, {n: s for n, (_, s) in found.items()})
    info.notes.append("pickle weights: hfnemo reads safetensors; re-save with "
                      "save_pretrained(safe_serialization=True)")
    _tokenizer(info, p)


def _dcp_count(info: ModelInfo, index: Any) -> None:
    from hfnemo.exec.sources import strip_prefix

    pre = strip_prefix(list(index.tensors))
    _count(info, ((k, g.dtype.name, g.shape) for k, g in index.tensors.items()))
    _embedding_rows(info, {k[len(pre):]: g.shape for k, g in index.tensors.items()})
    info.weight_bytes = sum(f.stat().st_size for f in index.root.glob("*.distcp"))


def _inspect_nemo2(p: Path, info: ModelInfo) -> None:
    from hfnemo import api
    from hfnemo.arch import spec_for_nemo_model
    from hfnemo.io.dcp import read_index
    from hfnemo.io.nemo_context import read_context

    try:
        ck = api._open_nemo(p)
        ctx, spec, index = ck.ctx, ck.spec, ck.index
        _from_dims(info, ck.dims)
        info.family = spec.name
    except ConversionError as e:
        info.notes.append(f"hfnemo cannot convert this checkpoint: {e.message}")
        ctx, spec = read_context(p / "context"), None
        try:
            spec = spec_for_nemo_model(ctx.model_target)
            info.family = spec.name
        except ConversionError:
            pass
        index = read_index(p / "weights") if (p / "weights" / ".metadata").is_file() else None
    info.nemo_model = ctx.model_target
    _from_nemo_config(info, {**ctx.config, "vocab_size": ctx.config.get("vocab_size") or info.vocab_size})
    sidecar = p / "context" / "artifacts" / "hf_config.json"
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
            info.architecture = (data.get("architectures") or [None])[0]
            info.model_type = data.get("model_type")
        except (OSError, ValueError, AttributeError):
            pass
    if not info.architecture and spec is not None:
        info.architecture, info.model_type = spec.hf_architectures[0], spec.hf_model_type
    if index is not None:
        _dcp_count(info, index)
    _tokenizer(info, ctx.tokenizer_dir)


def _legacy_weight_bytes(ckpt) -> int:
    """Bytes of the weights: the rank files, or a dist-ckpt model's chunks (no rank files)."""
    if getattr(ckpt, "dist", None) is not None:
        return sum(c.length for t in ckpt.dist.tensors.values() for c in t.chunks)
    return sum(_member_size(f) for f in ckpt.files.values())


def _inspect_legacy(p: Path, info: ModelInfo) -> None:
    from hfnemo import api
    from hfnemo.io import legacy

    try:
        m = api._legacy_model(p)
    except ConversionError as e:
        info.notes.append(f"hfnemo cannot convert this checkpoint: {e.message}")
        ckpt = legacy.open_legacy(p)
        _from_nemo_config(info, legacy.nemo2_config(ckpt))
        lay = ckpt.layout
        info.tp, info.pp, info.ep = lay.tp, lay.pp, lay.ep
        shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
        for rank, f in ckpt.files.items():
            for k, v in _file_tensors(f).items():
                shapes[f"{rank}/{k}"] = v
        info.notes.append("parameters counted per rank file (TP shards not re-assembled)")
        _count(info, ((n, d, s) for n, (d, s) in shapes.items()))
        info.weight_bytes = _legacy_weight_bytes(ckpt)
        side = ckpt.side_files
    else:
        ckpt, spec = m["ckpt"], m["spec"]
        _from_dims(info, m["dims"])
        info.family = spec.name
        info.architecture, info.model_type = spec.hf_architectures[0], spec.hf_model_type
        raw = legacy._hf_side(ckpt)
        if raw:
            info.architecture = (raw.get("architectures") or [info.architecture])[0]
            info.model_type = raw.get("model_type", info.model_type)
        lay = ckpt.layout
        info.tp, info.pp, info.ep = lay.tp, lay.pp, lay.ep
        srcs = m["sources"]
        _count(info, ((n, s.dtype, s.shape) for n, s in srcs.items()))
        _embedding_rows(info, {n: s.shape for n, s in srcs.items()})
        info.weight_bytes = _legacy_weight_bytes(ckpt)
        side = ckpt.side_files
    close = getattr(getattr(ckpt, "tar", None), "close", None)
    if close is not None:  # a .nemo's extracted artifacts
        close()
    if ckpt.fmt == "nemo1":
        info.nemo_model = ckpt.config.get("target") if isinstance(ckpt.config.get("target"), str) else None
    if getattr(ckpt, "dist", None) is not None:  # the dist-ckpt layout: no rank files
        info.format_label = info.format_label.replace("per-rank model_weights.ckpt",
                                                      "model_weights/ torch-dist, dist-ckpt")
        if "dist-ckpt" not in info.format_label:
            info.format_label += " (dist-ckpt: model_weights/ torch-dist)"
    from hfnemo.io.hf import TOKENIZER_FILES

    info.tokenizer_files = sorted(n for n in side if n in TOKENIZER_FILES)
    info.tokenizer = bool(info.tokenizer_files)


def _megatron_args(common: Path) -> dict[str, Any]:
    """The args Namespace Megatron pickles into common.pt, as a dict (read inertly)."""
    from hfnemo.io.legacy import _inert
    from hfnemo.io.torchzip import read_archive

    fd = os.open(common, os.O_RDONLY)
    try:
        obj, _ = read_archive(fd, os.fstat(fd).st_size, path=str(common), inert=_inert)
    finally:
        os.close(fd)
    args = obj.get("args") if isinstance(obj, dict) else None
    return {k: v for k, v in vars(args).items() if k != "args"} if args is not None else {}


def _inspect_megatron_dist(p: Path, info: ModelInfo) -> None:
    from hfnemo.io import legacy
    from hfnemo.io.dcp import read_index
    from hfnemo.stream import megatron_dist_dir

    it = megatron_dist_dir(p)
    index = read_index(it)
    if (it / "common.pt").is_file():
        args = _megatron_args(it / "common.pt")
        n = legacy.nemo2_config(SimpleNamespace(fmt="megatron", config=args))
        _from_nemo_config(info, {**n, **{k: args.get(k) for k in ("tensor_model_parallel_size",
                                                                     "pipeline_model_parallel_size",
                                                                     "expert_model_parallel_size")}})
        arch = args.get("hfnemo_arch")
        if isinstance(arch, str):
            info.architecture = arch
    else:
        info.notes.append("no common.pt: model sizes unknown")
    _dcp_count(info, index)
    _tokenizer(info, p / "tokenizer")
    info.notes.append(f"iteration directory {it.name}; hfnemo compares its tensors (verify) but does not "
                      "convert it")


def _inspect_nemo_tar(p: Path, info: ModelInfo) -> None:
    """A .nemo tar: model_config.yaml and the rank files' data.pkl, read in place from the tar."""
    import yaml

    from hfnemo.io import legacy

    with tarfile.open(p, "r:*") as tf:
        members = {m.name.removeprefix("./"): m for m in tf.getmembers() if m.isfile()}
        cfg_m = members.get(legacy.NEMO1_CONFIG)
        if cfg_m is None:
            raise CorruptCheckpoint(f".nemo tar has no {legacy.NEMO1_CONFIG}", file=p,
                                    fix="the archive is incomplete or not a NeMo 1 model")
        cfg = yaml.safe_load(tf.extractfile(cfg_m).read())
        hf_cfg = next((m for n, m in members.items() if n.endswith("_" + legacy.HF_CONFIG) and "/" not in n
                       and m.size < (1 << 20)), None)
        try:
            hf = json.loads(tf.extractfile(hf_cfg).read()) if hf_cfg is not None else {}
        except ValueError:
            hf = {}
    if not isinstance(cfg, dict):
        raise CorruptCheckpoint("model_config.yaml is not a mapping", file=p)
    _from_nemo_config(info, legacy.nemo2_config(SimpleNamespace(fmt="nemo1", config=cfg)))
    info.tp = cfg.get("tensor_model_parallel_size") or 1
    info.pp = cfg.get("pipeline_model_parallel_size") or 1
    arch = (cfg.get("hfnemo") or {}).get("arch") if isinstance(cfg.get("hfnemo"), dict) else None
    info.architecture = arch or (hf.get("architectures") or [None])[0] if isinstance(hf, dict) else arch
    if isinstance(hf, dict) and isinstance(hf.get("vocab_size"), int):
        info.vocab_size = info.vocab_size or hf["vocab_size"]  # model_config.yaml leaves it to the tokenizer
    info.nemo_model = cfg.get("target") if isinstance(cfg.get("target"), str) else None
    weights = {n: m for n, m in members.items() if n.endswith(legacy.NEMO1_WEIGHTS)}
    info.weight_bytes = sum(m.size for m in weights.values())
    compressed = _is_gzip(p)  # members of a compressed tar have no offsets to read in place
    if weights and not compressed:
        fd = os.open(p, os.O_RDONLY)
        try:
            shapes = {}
            for n, m in weights.items():
                for k, v in _archive_tensors(fd, m.offset_data, m.size, f"{p}:{n}").items():
                    shapes[f"{n}:{k}"] = v
        finally:
            os.close(fd)
        _count(info, ((n, d, s) for n, (d, s) in shapes.items()))
        if len(weights) > 1:
            info.notes.append("parameters counted per rank file (TP shards not re-assembled)")
    from hfnemo.io.hf import TOKENIZER_FILES

    tok = sorted({legacy._ARTIFACT.sub(r"\1", Path(n).name) for n in members} & set(TOKENIZER_FILES))
    info.tokenizer_files, info.tokenizer = tok, bool(tok)


def _is_gzip(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def inspect(path: str | Path) -> ModelInfo:
    """Describe a checkpoint from its metadata (no weights are read).

    Args:
        path: HF directory (safetensors or .bin), NeMo 2 checkpoint, NeMo 1 directory or .nemo
            tar, Megatron-LM checkpoint (torch or torch_dist).

    Returns:
        A ModelInfo: format, architecture, sizes, parameters and dtypes, size on disk, TP/PP/EP
        layout, tokenizer.

    Example:
        >>> info = hfnemo.inspect("llama3-nemo")
        >>> info.architecture, info.num_layers, info.parameters, info.tp
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{p} does not exist", file=p, fix="check the path")
    fmt = checkpoint_format(p)
    if fmt is None:
        if p.is_dir() and (p / "checkpoints").is_dir():
            raise UsageError(f"{p} is a training run, not a checkpoint", file=p,
                             fix=f"run `hfnemo list {p}` to see its checkpoints")
        raise UsageError(f"{p} is not a checkpoint hfnemo recognises", file=p,
                         fix="pass an HF model directory, a NeMo 2 / NeMo 1 checkpoint (or .nemo file) or a "
                             "Megatron-LM checkpoint; `hfnemo list DIR` finds them")
    info = ModelInfo(str(p), fmt, FORMATS[fmt])
    from hfnemo.io import legacy

    # .nemo tars: hfnemo.io.legacy reads them in place when it can (is_nemo1_tar), else the
    # config and rank headers are read here straight from the tar
    tar = _inspect_legacy if hasattr(legacy, "is_nemo1_tar") else _inspect_nemo_tar
    {"hf": _inspect_hf, "hf-bin": _inspect_hf_bin, "nemo2": _inspect_nemo2, "nemo1": _inspect_legacy,
     "megatron": _inspect_legacy, "megatron-dist": _inspect_megatron_dist, "nemo1-tar": tar}[fmt](p, info)
    info.size_bytes, info.files, _ = _du(p)
    return info


# ------------------------------------------------------------------------------ list

@dataclass(frozen=True)
class CheckpointEntry:
    path: str
    format: str
    size_bytes: int
    mtime: float  # newest file inside
    modified: str  # the same, local time
    architecture: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _quick_arch(p: Path, fmt: str) -> str | None:
    """The architecture when one small file says it (config.json, hf_config.json, model.yaml)."""
    try:
        for f in (p / "config.json", p / "context" / "artifacts" / "hf_config.json", p / "hf_config.json"):
            if f.is_file() and f.stat().st_size < (1 << 20):
                a = json.loads(f.read_text()).get("architectures")
                if a:
                    return a[0]
        if fmt == "nemo1":
            for f in p.glob("*_hf_config.json"):
                a = json.loads(f.read_text()).get("architectures")
                if a:
                    return a[0]
        if fmt == "nemo2" and (p / "context" / "model.yaml").is_file():
            for line in (p / "context" / "model.yaml").read_text().splitlines():
                if line.startswith("_target_:"):
                    return line.split(":", 1)[1].strip().rsplit(".", 1)[-1]
    except (OSError, ValueError, AttributeError):
        return None
    return None


def list_checkpoints(root: str | Path = ".", *, depth: int = 4) -> list[CheckpointEntry]:
    """Every checkpoint under ``root`` (not descending into one found), newest first.

    Args:
        root: directory to search.
        depth: directory levels below root to search (hidden directories are skipped).
    """
    r = Path(root).expanduser()
    if not r.is_dir():
        raise UsageError(f"{r} is not a directory", file=r, fix="pass the directory to search")
    found: list[CheckpointEntry] = []

    def visit(p: Path, level: int) -> None:
        fmt = checkpoint_format(p)
        if fmt is not None:
            size, _, mtime = _du(p)
            found.append(CheckpointEntry(str(p), fmt, size, mtime,
                                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime)),
                                         _quick_arch(p, fmt)))
            return
        if not p.is_dir() or level >= depth:
            return
        try:
            children = sorted(os.scandir(p), key=lambda e: e.name)
        except OSError:
            return
        for e in children:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir() or (e.is_file() and e.name.endswith(".nemo")):
                    visit(Path(e.path), level + 1)
            except OSError:
                continue

    visit(r, 0)
    return sorted(found, key=lambda c: (-c.mtime, c.path))


# ------------------------------------------------------------------------------ CLI

def _human(n: float, unit: str = "B") -> str:
    for u in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or u == "T":
            return f"{n:.1f} {u}{unit}" if u else f"{int(n)} {unit}"
        n /= 1000
    return f"{n} {unit}"


def _count_h(n: int | None) -> str:
    if n is None:
        return "?"
    for div, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {u} ({n:,})"
    return str(n)


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect(args.path)
    if args.json:
        print(json.dumps(info.to_json()))
        return 0
    w = sys.stdout.write
    v = lambda x: "?" if x is None else x  # noqa: E731
    arch = info.architecture or "?"
    extra = ", ".join(x for x in (info.family and f"hfnemo family {info.family}", info.nemo_model) if x)
    w(f"path:          {info.path}\n")
    w(f"format:        {info.format_label}\n")
    w(f"architecture:  {arch}{f' ({extra})' if extra else ''}\n")
    w(f"layers:        {v(info.num_layers)}   hidden {v(info.hidden_size)}   ffn {v(info.ffn_hidden_size)}\n")
    w(f"attention:     {v(info.num_attention_heads)} heads, {v(info.num_query_groups)} query groups, "
      f"head dim {v(info.head_dim)}\n")
    padded = info.embedding_rows and info.embedding_rows != info.vocab_size
    rows = f" ({info.embedding_rows} embedding rows)" if padded else ""
    tied = {True: ", tied embeddings", False: "", None: ""}[info.tied_embeddings]
    w(f"vocabulary:    {v(info.vocab_size)}{rows}{tied}\n")
    if info.num_experts:
        w(f"experts:       {info.num_experts}\n")
    dts = ", ".join(f"{d} {_count_h(n).split(' (')[0]}" for d, n in info.dtypes.items())
    dts = f" [{dts}]" if dts else ""
    w(f"parameters:    {_count_h(info.parameters)}{dts} in {v(info.tensors)} tensors\n")
    wb = f" (weights {_human(info.weight_bytes)})" if info.weight_bytes is not None else ""
    w(f"size on disk:  {_human(info.size_bytes)}{wb}, {info.files} files\n")
    w(f"layout:        TP {info.tp}, PP {info.pp}, EP {info.ep}\n")
    w(f"tokenizer:     {'yes (' + ', '.join(info.tokenizer_files) + ')' if info.tokenizer else 'no'}\n")
    for note in info.notes:
        w(f"note:          {note}\n")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    rows = list_checkpoints(args.dir, depth=args.depth)
    if args.json:
        print(json.dumps([r.to_json() for r in rows]))
        return 0
    if not rows:
        print(f"no checkpoints under {args.dir}", file=sys.stderr)
        return 0
    for r in rows:
        arch = r.architecture or "-"
        print(f"{r.modified}  {_human(r.size_bytes):>10s}  {r.format:13s}  {arch:24s}  {r.path}")
    return 0


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("inspect", help="format, architecture, sizes, parameters, dtypes, layout and "
                                       "tokenizer of a checkpoint, from metadata only")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(tool=_cmd_inspect)
    p = sub.add_parser("list", help="NeMo and HF checkpoints under a directory, newest first")
    p.add_argument("dir", nargs="?", default=".")
    p.add_argument("--depth", type=int, default=4, help="directory levels to search (default 4)")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(tool=_cmd_list)
