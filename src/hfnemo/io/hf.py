"""An HF model directory: config.json in either dialect, index/shards, tokenizer, generation config."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfnemo.errors import ConfigError, CorruptCheckpoint, UnmappedTensors
from hfnemo.io.safetensors import StTensor, read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files a tokenizer consists of (transformers' save_pretrained, sentencepiece and tiktoken variants).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "tokenizer.tiktoken", "vocab.txt")


@dataclass(frozen=True)
class HfConfig:
    """config.json normalised to the transformers-4.x spelling, and which dialect it came in."""

    data: dict[str, Any]
    dialect: str  # "4" (rope_theta, rope_scaling, torch_dtype) or "5" (rope_parameters, dtype)
    path: str


def normalise_config(raw: dict[str, Any], path: str) -> HfConfig:
    cfg = dict(raw)
    dialect = "5" if ("rope_parameters" in cfg or ("dtype" in cfg and "torch_dtype" not in cfg)) else "4"
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    rp = cfg.pop("rope_parameters", None)
    if isinstance(rp, dict):
        rp = dict(rp)
        if "rope_theta" in rp:
            cfg["rope_theta"] = rp.pop("rope_theta")
        kind = rp.get("rope_type", "default")
        cfg["rope_scaling"] = None if kind == "default" and len(rp) <= 1 else rp
    return HfConfig(cfg, dialect, path)


def denormalise_config(cfg: dict[str, Any], dialect: str) -> dict[str, Any]:
    """Back to the dialect the source used."""
    out = dict(cfg)
    if dialect == "5":
        rs = out.pop("rope_scaling", None)
        rp: dict[str, Any] = {"rope_theta": out.pop("rope_theta", 10000.0)}
        rp.update(rs if rs else {"rope_type": "default"})
        out["rope_parameters"] = rp
        if "torch_dtype" in out:
            out["dtype"] = out.pop("torch_dtype")
    return out


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{what} is missing", file=path, fix=f"copy {path.name} into the model directory") from e
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: bad JSON, huge integers
        raise ConfigError(f"{what} is not valid JSON: {str(e)[:200]}", file=path,
                          fix=f"repair or re-download {path.name}") from e
    except OSError as e:  # a symlink loop, a directory, no permission
        raise ConfigError(f"cannot read {what}: {e.strerror}", file=path,
                          fix=f"replace {path.name} with a readable regular file") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what} is not a JSON object", file=path, fix=f"repair or re-download {path.name}")
    return data


def read_config(model_dir: Path) -> HfConfig:
    path = model_dir / "config.json"
    return normalise_config(read_json(path, "config.json"), str(path))


def scan_weights(model_dir: Path) -> dict[str, StTensor]:
    """Every tensor of the checkpoint, from the index (if any) and each shard's header."""
    index_path = model_dir / INDEX
    if index_path.exists():
        index = read_json(index_path, INDEX)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CorruptCheckpoint("index has no weight_map", file=index_path, fix="re-download the index file")
        bad = next((k for k, v in wm.items() if not (isinstance(v, str) and v)), None)
        if bad is not None:
            raise CorruptCheckpoint(f"index weight_map names file {wm[bad]!r}, which is not a string",
                                    file=index_path, tensor=bad, fix="re-download the index file")
        files = sorted(set(wm.values()))
    elif (model_dir / SINGLE).exists():
        wm, files = None, [SINGLE]
    else:
        bins = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = (f" (found {', '.join(bins[:3])}: pickle checkpoints are not read; convert them to safetensors "
                "with transformers' save_pretrained(safe_serialization=True))" if bins else "")
        raise CorruptCheckpoint(f"no {SINGLE} or {INDEX} in the model directory{hint}", file=model_dir,
                                fix="point hfnemo at a directory with safetensors weights")
    tensors: dict[str, StTensor] = {}
    dup: list[str] = []
    for fname in files:
        fpath = model_dir / fname
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise CorruptCheckpoint(f"index names a file outside the model directory: {fname!r}", file=index_path,
                                    fix="repair the index")
        if fpath.is_symlink() and not fpath.exists():
            raise CorruptCheckpoint("shard is a symbolic link that loops or points nowhere", file=fpath,
                                    fix="replace the link with the shard file itself")
        if not fpath.exists():
            raise CorruptCheckpoint("shard named in the index is missing", file=fpath,
                                    fix="download every shard listed in model.safetensors.index.json")
        found, _ = read_header(fpath)
        for name, t in found.items():
            if name in tensors:
                dup.append(f"{name} ({tensors[name].file} and {fpath})")
            tensors[name] = t
    if dup:
        raise UnmappedTensors(f"tensors stored twice: {'; '.join(dup)}", file=model_dir, tensor=dup[0].split(" ")[0],
                              fix="remove the stale shard or repair the index")
    if wm is not None:
        problems = []
        for name, fname in wm.items():
            t = tensors.get(name)
            if t is None:
                problems.append(f"{name} listed in the index but missing from {fname}")
            elif os.path.basename(t.file) != fname:
                problems.append(f"{name} listed in {fname} but stored in {os.path.basename(t.file)}")
        extra = sorted(set(tensors) - set(wm))
        problems += [f"{name} stored in a shard but not listed in the index" for name in extra]
        if problems:
            raise CorruptCheckpoint("index and shards disagree: " + "; ".join(problems[:20]), file=index_path,
                                    tensor=problems[0].split(" ")[0], fix="re-download the index and shards")
    return tensors


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files (and chat template) byte for byte; returns the names copied."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
