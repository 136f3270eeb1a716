"""Shared helpers for the legacy-format tests: a TP-4-friendly tiny Llama, plain-torch loading and
re-assembly of per-rank files (no hfnemo code on the checking side)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

RANK = re.compile(r"(?:mp_rank_(\d+)(?:_(\d+))?|tp_rank_(\d+)_pp_rank_(\d+))/")


def make_tp4_llama(out: Path, num_layers: int = 4, **overrides) -> Path:
    """Llama with 4 kv heads, ffn 512 and vocab 1024 so that TP 1, 2, 4 and PP 1, 2 all divide it."""
    from tiny_models import SHAPES, make_tiny_hf

    SHAPES["llama_tp4"] = dict(SHAPES["llama3_gqa"], num_attention_heads=8, num_key_value_heads=4,
                               hidden_size=128, intermediate_size=512, vocab_size=1024, **overrides)
    try:
        return make_tiny_hf(out, "llama_tp4", dtype=torch.bfloat16, num_layers=num_layers)
    finally:
        SHAPES.pop("llama_tp4")


def load_rank(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """The local state dict of one rank file, through torch.load."""
    if fmt == "nemo1":
        return torch.load(path, weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, weights_only=True)
    assert obj["checkpoint_version"] == 3.0 and obj["iteration"] == 0
    assert isinstance(obj["args"], argparse.Namespace)
    return obj["model"]


def rank_files(root: Path, fmt: str) -> dict[tuple[int, int], Path]:
    """{(tp, pp): file} of a dense checkpoint."""
    name = "model_weights.ckpt" if fmt == "nemo1" else "model_optim_rng.pt"
    out = {}
    for p in sorted(root.rglob(name)):
        rel = p.relative_to(root).as_posix()
        m = RANK.match(rel.split("/", 1)[1] if fmt == "megatron" else rel)
        if m is None:
            out[(0, 0)] = p
        elif m.group(3) is not None:
            out[(int(m.group(3)), int(m.group(4)))] = p
        else:
            out[(int(m.group(1)), int(m.group(2) or 0))] = p
    return out


def reassemble(root: Path, fmt: str, tp: int, pp: int, num_layers: int) -> dict[str, torch.Tensor]:
    """Global per-layer tensors from the local shards: cat column-parallel rows (fc1 per GLU half),
    row-parallel columns and vocab rows; take rank 0 of replicated tensors."""
    files = rank_files(root, fmt)
    assert sorted(files) == [(t, p) for t in range(tp) for p in range(pp)]
    per_stage = num_layers // pp
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for (t, p), path in files.items():
        for k, v in load_rank(path, fmt).items():
            k = k.removeprefix("model.")
            if "_extra_state" in k:
                assert v.dtype == torch.uint8 and v.numel() == 0
                continue
            m = re.match(r"decoder\.layers\.(\d+)\.(.+)", k)
            if m:
                k = f"decoder.layers.{p * per_stage + int(m.group(1))}.{m.group(2)}"
            shards.setdefault(k, {})[t] = v
    out = {}
    for k, by in shards.items():
        parts = [by[t] for t in range(tp)] if len(by) == tp else [by[0]]
        if re.search(r"linear_fc1\.weight$", k):
            h = parts[0].shape[0] // 2
            out[k] = torch.cat([x[:h] for x in parts] + [x[h:] for x in parts])
        elif re.search(r"(linear_qkv\.weight|word_embeddings\.weight|output_layer\.weight)$", k):
            out[k] = torch.cat(parts)
        elif re.search(r"linear_(proj|fc2)\.weight$", k):
            out[k] = torch.cat(parts, dim=1)
        else:
            assert all(torch.equal(x, parts[0]) for x in [by[t] for t in by]), k
            out[k] = parts[0]
    return out


def unstack(dcp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NeMo 2 stacked DCP tensors -> per-layer names (no prefix)."""
    out = {}
    for k, v in dcp.items():
        k = k.removeprefix("module.")
        if k.startswith("decoder.layers."):
            for l in range(v.shape[0]):
                out[f"decoder.layers.{l}.{k[len('decoder.layers.'):]}"] = v[l]
        else:
            out[k] = v
    return out
