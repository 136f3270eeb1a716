"""Planner tests on metadata only: no files are read or written."""
from __future__ import annotations

import json

import pytest

from hfnemo.arch import get_spec
from hfnemo.arch.rules import Dims, FuseGateUp, FuseQKV
from hfnemo.errors import BudgetExceeded, ShapeMismatch, UnmappedTensors, UnsupportedArchitecture
from hfnemo.plan.plan import Segment, SourceTensor
from hfnemo.plan.planner import Budget, budget_plan, layout_hf, layout_nemo, map_tensors

DIMS = Dims(num_layers=2, hidden=64, heads=8, groups=2, head_dim=8, ffn=96, vocab=100, tied=False)


def hf_metas(dims: Dims = DIMS, dtype: str = "bf16", drop: tuple[str, ...] = (), add: dict | None = None) -> dict:
    H, F, V = dims.hidden, dims.ffn, dims.vocab
    q, kv = dims.heads * dims.head_dim, dims.groups * dims.head_dim
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not dims.tied:
        shapes["lm_head.weight"] = (V, H)
    for l in range(dims.num_layers):
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                       p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                       p + "mlp.down_proj.weight": (H, F)})
    shapes.update(add or {})
    return {n: SourceTensor(n, dtype, s, ("safetensors", "model.safetensors", 0)) for n, s in shapes.items()
            if n not in drop}


def test_qkv_segments_interleave_per_group() -> None:
    src = hf_metas()
    [lg] = FuseQKV("q{l}", "k{l}", "v{l}", "qkv{l}").hf_to_nemo(
        DIMS, {"q0": SourceTensor("q0", "bf16", (64, 64), ()),
               "k0": SourceTensor("k0", "bf16", (16, 64), ()), "v0": SourceTensor("v0", "bf16", (16, 64), ())},
        {"l": 0})
    # group g: 4 query heads (32 rows), 1 key head (8 rows), 1 value head (8 rows)
    assert lg.segments == (Segment(0, 32, "q0", 0), Segment(32, 8, "k0", 0), Segment(40, 8, "v0", 0),
                           Segment(48, 32, "q0", 32), Segment(80, 8, "k0", 8), Segment(88, 8, "v0", 8))
    assert lg.shape == (96, 64)


def test_qkv_split_inverts_interleave() -> None:
    rule = FuseQKV("q", "k", "v", "qkv")
    fused = rule.hf_to_nemo(DIMS, {n: SourceTensor(n, "bf16", s, ()) for n, s in
                                   (("q", (64, 64)), ("k", (16, 64)), ("v", (16, 64)))}, {})[0]
    back = rule.nemo_to_hf(DIMS, {"qkv": SourceTensor("qkv", "bf16", fused.shape, ())}, {})
    # compose: every HF row maps through the NeMo row back to itself
    where = {}
    for s in fused.segments:
        for i in range(s.rows):
            where[s.out_row + i] = (s.source, s.src_row + i)
    for lg in back:
        for s in lg.segments:
            for i in range(s.rows):
                assert where[s.src_row + i] == (lg.name, s.out_row + i)


def test_gate_up_two_chunks_per_layer() -> None:
    lg = FuseGateUp("g", "u", "fc1").hf_to_nemo(
        DIMS, {"g": SourceTensor("g", "bf16", (96, 64), ()), "u": SourceTensor("u", "bf16", (96, 64), ())}, {})[0]
    assert lg.row_splits == (96,)
    spec = get_spec("LlamaForCausalLM")
    items, _, _ = layout_nemo(spec, DIMS, map_tensors(spec, DIMS, hf_metas(), "hf_to_nemo", "x"), "auto")
    fc1 = sorted((i.offsets, i.shape) for i in items if i.key.endswith("linear_fc1.weight"))
    assert fc1 == [((0, 0, 0), (1, 96, 64)), ((0, 96, 0), (1, 96, 64)), ((1, 0, 0), (1, 96, 64)),
                   ((1, 96, 0), (1, 96, 64))]


def test_plan_covers_every_tensor_once_and_is_json() -> None:
    spec = get_spec("LlamaForCausalLM")
    src = hf_metas()
    lgs = map_tensors(spec, DIMS, src, "hf_to_nemo", "x")
    items, blobs, files = layout_nemo(spec, DIMS, lgs, "auto")
    used = [s.source for it in items for s in it.segments]
    assert set(used) == set(src)
    assert sum(it.nbytes for it in items) == sum(s.nbytes for s in src.values())
    assert files == ["__0_0.distcp", "__0_1.distcp"] and {it.file for it in items} == set(files)
    assert len(blobs) == 2 * len(spec.extra_state)
    assert all(it.key.startswith("module.") for it in items)
    from hfnemo.plan.plan import Plan
    plan = Plan("hf_to_nemo", "llama", "x", "auto", tuple(src.values()), tuple(items), tuple(blobs), tuple(files),
                budget=budget_plan(items, src, Budget(1 << 30, 300 << 20)))
    assert json.loads(plan.to_json())["items"][0]["segments"]


def test_unmapped_missing_and_extra_are_all_named() -> None:
    spec = get_spec("LlamaForCausalLM")
    src = hf_metas(drop=("model.layers.1.mlp.up_proj.weight", "model.norm.weight"),
                   add={"model.layers.2.mlp.up_proj.weight": (96, 64), "vision_tower.w": (3,)})
    with pytest.raises(UnmappedTensors) as e:
        map_tensors(spec, DIMS, src, "hf_to_nemo", "ckpt")
    msg = str(e.value)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight", "model.layers.2.mlp.up_proj.weight",
                 "vision_tower.w"):
        assert name in msg
    # buffers some exporters save are ignored, not reported
    map_tensors(spec, DIMS, hf_metas(add={"model.layers.0.self_attn.rotary_emb.inv_freq": (4,)}), "hf_to_nemo", "x")


def test_shape_mismatch_names_tensor_and_fix() -> None:
    spec = get_spec("LlamaForCausalLM")
    src = hf_metas(add={"model.layers.0.self_attn.k_proj.weight": (24, 64)})
    with pytest.raises(ShapeMismatch) as e:
        map_tensors(spec, DIMS, src, "hf_to_nemo", "x")
    assert e.value.tensor == "model.layers.0.self_attn.k_proj.weight" and "config" in e.value.fix


def test_tied_plan_has_no_output_layer_and_accepts_stray_lm_head() -> None:
    spec = get_spec("LlamaForCausalLM")
    tied = Dims(**{**DIMS.__dict__, "tied": True})
    for src in (hf_metas(tied), hf_metas(tied, add={"lm_head.weight": (100, 64)})):
        items, _, _ = layout_nemo(spec, tied, map_tensors(spec, tied, src, "hf_to_nemo", "x"), "auto")
        assert not any("output_layer" in it.key for it in items)


def test_export_layout_shards_and_names() -> None:
    spec = get_spec("LlamaForCausalLM")
    lgs = map_tensors(spec, DIMS, hf_metas(), "hf_to_nemo", "x")
    # pretend the NeMo logicals are sources and map back
    nemo_src = {lg.name: SourceTensor(lg.name, lg.dtype, lg.shape, ("dcp", "k", ())) for lg in lgs}
    back = map_tensors(spec, DIMS, nemo_src, "nemo_to_hf", "x")
    assert {lg.name for lg in back} == set(hf_metas())
    items, files = layout_hf(back, "auto", max_shard_size=20_000)
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    one, [single] = layout_hf(back, "auto", max_shard_size=10**12)
    assert single == "model.safetensors"


def test_budget_blocks_and_too_small() -> None:
    src = hf_metas(dtype="fp32")
    spec = get_spec("LlamaForCausalLM")
    items, _, _ = layout_nemo(spec, DIMS, map_tensors(spec, DIMS, src, "hf_to_nemo", "x"), "bf16")
    b = budget_plan(items, src, Budget(max_memory=1 << 30, baseline=300 << 20))
    assert b["buffers_per_slot"] == 2  # casting needs staging
    assert b["peak_estimate"] <= 1 << 30
    with pytest.raises(BudgetExceeded) as e:
        budget_plan(items, src, Budget(max_memory=310 << 20, baseline=300 << 20))
    assert "MiB" in e.value.fix


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(UnsupportedArchitecture) as e:
        get_spec("GPT2LMHeadModel")
    assert "LlamaForCausalLM" in str(e.value) and "MistralForCausalLM" in str(e.value)


def test_budget_counts_device_buffers_and_pinned_rounding() -> None:
    """--device cuda: device staging buffers count against the budget too, and pinned host blocks
    are powers of two (torch's pinned allocator rounds up to one)."""
    spec = get_spec("LlamaForCausalLM")
    big = Dims(**{**DIMS.__dict__, "vocab": 100_000, "hidden": 1024, "heads": 8, "groups": 2, "head_dim": 128,
                  "ffn": 2048, "num_layers": 1})
    src = hf_metas(big, dtype="fp32")
    items, _, _ = layout_nemo(spec, big, map_tensors(spec, big, src, "hf_to_nemo", "x"), "bf16")
    host = budget_plan(items, src, Budget(max_memory=700 << 20, baseline=300 << 20))
    dev = budget_plan(items, src, Budget(max_memory=700 << 20, baseline=300 << 20, device=True))
    assert host["device_buffers_per_slot"] == 0 and dev["device_buffers_per_slot"] == dev["buffers_per_slot"] == 2
    assert dev["block_bytes"] & (dev["block_bytes"] - 1) == 0
    assert dev["peak_estimate"] <= 700 << 20 and host["peak_estimate"] <= 700 << 20
    assert dev["buffer_bytes"] == dev["depth"] * 4 * dev["block_bytes"]
