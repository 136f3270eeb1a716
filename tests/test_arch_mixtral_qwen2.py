"""Mixtral and Qwen2: round trips, the NeMo side against plain torch, and NVIDIA's own output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from test_reference import assert_dcp_equals, chunk_table, load_dcp
from tiny_models import TOKENIZER_VOCAB, fixed_input_ids, hf_logits, load_hf_state
from tiny_moe_qwen import SHAPES, make_tiny
from torch.distributed.checkpoint import FileSystemReader

import hfnemo
from hfnemo.errors import ConfigError
from hfnemo.io.dcp import read_index

REF = Path(__file__).resolve().parent / "data" / "nvidia"  # copied from ../shared/reference
M = "module."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny(shape, dtype=bf16, dialect="4") -> Path``, each built once per module (read-only)."""
    cache: dict[tuple, Path] = {}

    def factory(shape: str, dtype: torch.dtype = torch.bfloat16, dialect: str = "4") -> Path:
        key = (shape, dtype, dialect)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{shape}-{str(dtype)[6:]}-d{dialect}")
            cache[key] = make_tiny(out, shape, dtype=dtype, dialect=dialect)
        return cache[key]

    return factory


def _yaml_config(nemo: Path) -> dict:
    return yaml.safe_load((nemo / "context" / "model.yaml").read_text())["config"]


# ------------------------------------------------------------------------------ round trips

CASES = [(s, d, x) for s in SHAPES for d in (torch.bfloat16, torch.float32) for x in ("4", "5")]


@pytest.mark.parametrize("shape,dtype,dialect", CASES, ids=[f"{s}-{str(d)[6:]}-v{x}" for s, d, x in CASES])
def test_roundtrip_bit_exact(tiny, tmp_path: Path, shape: str, dtype: torch.dtype, dialect: str) -> None:
    src = tiny(shape, dtype, dialect)
    nemo, back = tmp_path / "nemo", tmp_path / "back"
    hfnemo.convert(src, nemo, max_memory="4GiB")  # correctness here; the bound: test_memory_bound
    hfnemo.convert(nemo, back, max_memory="4GiB")  # correctness here; the bound: test_memory_bound
    a, b = load_hf_state(src), load_hf_state(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert json.loads((back / "generation_config.json").read_text()) == \
        json.loads((src / "generation_config.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (back / f).read_bytes() == (src / f).read_bytes()
    ids = fixed_input_ids(a["model.embed_tokens.weight"].shape[0])
    assert torch.equal(hf_logits(src, ids), hf_logits(back, ids))


# ------------------------------------------------------------------------------ NeMo side in plain torch

def plain_mapping(hf: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """NeMo 2 tensors from HF tensors (Mixtral, Qwen2), written from the spec (§3.5, §4) in plain torch."""
    L, nh, H = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    ng = cfg.get("num_key_value_heads") or nh
    d = cfg.get("head_dim") or H // nh
    moe = "num_local_experts" in cfg

    def interleave(l: int, kind: str) -> torch.Tensor:  # per group: its query heads, its key, its value
        p = f"model.layers.{l}.self_attn."
        q, k, v = (hf[p + f"{n}_proj.{kind}"] for n in "qkv")
        tail = q.shape[1:]
        return torch.cat([q.reshape(ng, nh // ng * d, *tail), k.reshape(ng, d, *tail),
                          v.reshape(ng, d, *tail)], dim=1).reshape(-1, *tail)

    def stack(fn) -> torch.Tensor:
        return torch.stack([fn(l) for l in range(L)])

    def padded(t: torch.Tensor) -> torch.Tensor:  # Mixtral: rows to a multiple of 128, zero filled
        if not moe:
            return t
        rows = -(-t.shape[0] // 128) * 128
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])

    lay = M + "decoder.layers."
    out = {
        M + "embedding.word_embeddings.weight": padded(hf["model.embed_tokens.weight"]),
        M + "decoder.final_layernorm.weight": hf["model.norm.weight"],
        lay + "self_attention.linear_qkv.weight": stack(lambda l: interleave(l, "weight")),
        lay + "self_attention.linear_qkv.layer_norm_weight":
            stack(lambda l: hf[f"model.layers.{l}.input_layernorm.weight"]),
        lay + "self_attention.linear_proj.weight":
            stack(lambda l: hf[f"model.layers.{l}.self_attn.o_proj.weight"]),
    }
    if moe:
        E = cfg["num_local_experts"]

        def experts(fn) -> torch.Tensor:
            return stack(lambda l: torch.stack([fn(l, f"model.layers.{l}.block_sparse_moe.experts.{e}.")
                                                for e in range(E)]))
        out[lay + "pre_mlp_layernorm.weight"] = \
            stack(lambda l: hf[f"model.layers.{l}.post_attention_layernorm.weight"])
        out[lay + "mlp.router.weight"] = stack(lambda l: hf[f"model.layers.{l}.block_sparse_moe.gate.weight"])
        out[lay + "mlp.experts.experts.linear_fc1.weight"] = experts(
            lambda l, p: torch.cat([hf[p + "w1.weight"], hf[p + "w3.weight"]]))
        out[lay + "mlp.experts.experts.linear_fc2.weight"] = experts(lambda l, p: hf[p + "w2.weight"])
    else:
        out[lay + "self_attention.linear_qkv.bias"] = stack(lambda l: interleave(l, "bias"))
        out[lay + "mlp.linear_fc1.layer_norm_weight"] = \
            stack(lambda l: hf[f"model.layers.{l}.post_attention_layernorm.weight"])
        out[lay + "mlp.linear_fc1.weight"] = stack(lambda l: torch.cat(
            [hf[f"model.layers.{l}.mlp.gate_proj.weight"], hf[f"model.layers.{l}.mlp.up_proj.weight"]]))
        out[lay + "mlp.linear_fc2.weight"] = stack(lambda l: hf[f"model.layers.{l}.mlp.down_proj.weight"])
    if not cfg.get("tie_word_embeddings"):
        out[M + "output_layer.weight"] = padded(hf["lm_head.weight"])
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
def test_dcp_equals_plain_torch_mapping(tiny, tmp_path: Path, shape: str) -> None:
    src = tiny(shape, torch.float32)
    hfnemo.convert(src, tmp_path / "nemo")
    cfg = json.loads((src / "config.json").read_text())
    want = plain_mapping(load_hf_state(src), cfg)
    assert_dcp_equals(tmp_path / "nemo" / "weights", want)
    # Chunk layout as Megatron writes it: one per layer, fc1 halves apart, experts one by one.
    md = FileSystemReader(str(tmp_path / "nemo" / "weights")).read_metadata().state_dict_metadata
    L, lay = cfg["num_hidden_layers"], M + "decoder.layers."
    assert len(md[lay + "self_attention.linear_qkv.weight"].chunks) == L
    if "num_local_experts" in cfg:
        E, F = cfg["num_local_experts"], cfg["intermediate_size"]
        fc1 = sorted(tuple(c.offsets) for c in md[lay + "mlp.experts.experts.linear_fc1.weight"].chunks)
        assert fc1 == sorted((l, e, r, 0) for l in range(L) for e in range(E) for r in (0, F))
        assert len(md[lay + "mlp.experts.experts.linear_fc2.weight"].chunks) == L * E
        assert len(md[lay + "mlp.router.weight"].chunks) == L
        bytes_keys = set(read_index(tmp_path / "nemo" / "weights").byte_keys)
        assert {f"{lay}mlp.experts.experts.linear_fc2._extra_state/shard_{l}.{e}_{L}.{E}"
                for l in range(L) for e in range(E)} <= bytes_keys
    else:
        assert len(md[lay + "self_attention.linear_qkv.bias"].chunks) == L
        assert len(md[lay + "mlp.linear_fc1.weight"].chunks) == 2 * L


def test_mixtral_vocab_padding_rows_are_zero(tiny, tmp_path: Path) -> None:
    """1000 rows -> 1024 on the NeMo side (pad rows zero, NVIDIA's importer leaves them unset),
    vocab_size null and divisor 128 in model.yaml, and 1000 rows again on export."""
    src = tiny("mixtral_8x7b")
    hfnemo.convert(src, tmp_path / "nemo")
    sd = load_dcp(tmp_path / "nemo" / "weights")
    for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert sd[M + k].shape == (1024, 128)
        assert not sd[M + k][1000:].any()
    cfg = _yaml_config(tmp_path / "nemo")
    assert cfg["vocab_size"] is None and cfg["make_vocab_size_divisible_by"] == 128
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    assert load_hf_state(tmp_path / "back")["lm_head.weight"].shape == (1000, 128)


def test_config_fields_reach_model_yaml(tiny, tmp_path: Path) -> None:
    def conf(shape: str) -> dict:
        out = tmp_path / shape
        hfnemo.convert(tiny(shape), out)
        y = yaml.safe_load((out / "context" / "model.yaml").read_text())
        return {**y["config"], "_model": y["_target_"]}

    c = conf("mixtral_6e")
    assert c["_model"].endswith("mixtral.MixtralModel") and c["_target_"].endswith("MixtralConfig8x7B")
    assert (c["num_moe_experts"], c["moe_router_topk"], c["moe_router_pre_softmax"]) == (6, 3, False)
    assert (c["kv_channels"], c["num_query_groups"], c["window_size"]) == (32, 1, [8, 0])
    assert (c["seq_length"], c["max_position_embeddings"], c["rotary_base"]) == (512, 512, 1e6)
    assert c["activation_func"] == {"_call_": False, "_target_": "torch.nn.functional.silu"}
    c = conf("mixtral_8x7b")
    assert c["kv_channels"] is None and c["window_size"] is None  # head_dim / sliding_window null
    c = conf("qwen2_05b_tied")
    assert c["_model"].endswith("qwen2.Qwen2Model") and c["_target_"].endswith("qwen2.Qwen2Config")
    assert c["share_embeddings_and_output_weights"] is True and c["add_qkv_bias"] is True
    assert (c["num_attention_heads"], c["num_query_groups"], c["vocab_size"]) == (14, 2, 1024)
    assert (c["layernorm_epsilon"], c["rotary_base"], c["seq_length"]) == (1e-6, 1e6, 512)
    assert c["kv_channels"] is None and c["make_vocab_size_divisible_by"] == 128


def test_qwen2_tied_keeps_tie(tiny, tmp_path: Path) -> None:
    src = tiny("qwen2_05b_tied")
    assert "lm_head.weight" not in load_hf_state(src)
    hfnemo.convert(src, tmp_path / "nemo")
    keys = FileSystemReader(str(tmp_path / "nemo" / "weights")).read_metadata().state_dict_metadata
    assert M + "output_layer.weight" not in keys
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    assert "lm_head.weight" not in load_hf_state(tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is True


# ------------------------------------------------------------------------------ export without the sidecar

def _without_sidecar(tiny, tmp_path: Path, shape: str) -> Path:
    hfnemo.convert(tiny(shape), tmp_path / "nemo")
    (tmp_path / "nemo" / "context" / "artifacts" / "hf_config.json").unlink()
    return tmp_path / "nemo"


def test_mixtral_export_vocab_from_tokenizer(tiny, tmp_path: Path) -> None:
    """No hf_config.json and vocab_size null: rows are cut to the tokenizer's length, as
    HFMixtralExporter does (here 300 of the 1000 embedding rows)."""
    nemo = _without_sidecar(tiny, tmp_path, "mixtral_8x7b")
    hfnemo.convert(nemo, tmp_path / "back")
    src, back = load_hf_state(tiny("mixtral_8x7b")), load_hf_state(tmp_path / "back")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(back[k], src[k][:TOKENIZER_VOCAB])
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"] == TOKENIZER_VOCAB


def test_mixtral_export_vocab_from_model_yaml(tiny, tmp_path: Path) -> None:
    nemo = _without_sidecar(tiny, tmp_path, "mixtral_8x7b")
    y = nemo / "context" / "model.yaml"
    y.write_text(y.read_text().replace("  vocab_size: null\n", "  vocab_size: 1000\n"))
    hfnemo.convert(nemo, tmp_path / "back")
    a, b = load_hf_state(tiny("mixtral_8x7b")), load_hf_state(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"] == 1000


def test_mixtral_export_vocab_unknown_is_an_error(tiny, tmp_path: Path) -> None:
    nemo = _without_sidecar(tiny, tmp_path, "mixtral_8x7b")
    shutil.rmtree(nemo / "context" / "nemo_tokenizer")
    with pytest.raises(ConfigError, match="vocab_size"):
        hfnemo.convert(nemo, tmp_path / "back")


# ------------------------------------------------------------------------------ refusals

def _edited(tiny, tmp_path: Path, shape: str, **fields) -> Path:
    out = tmp_path / "src"
    shutil.copytree(tiny(shape), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(fields)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("shape,fields,match", [
    ("qwen2_7b", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                  "layer_types": None}, "sliding"),
    ("qwen2_7b", {"use_sliding_window": True, "sliding_window": 8,
                  "layer_types": ["full_attention", "sliding_attention"]}, "sliding"),
    ("qwen2_7b", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 128}}, "rope_scaling"),
    ("mixtral_8x7b", {"tie_word_embeddings": True}, "tie_word_embeddings"),
    ("mixtral_8x7b", {"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_config_is_an_error(tiny, tmp_path: Path, shape: str, fields: dict, match: str) -> None:
    src = _edited(tiny, tmp_path, shape, **fields)
    with pytest.raises(ConfigError, match=match):
        hfnemo.convert(src, tmp_path / "nemo")


def test_qwen2_window_switched_off_for_every_layer_is_carried(tiny, tmp_path: Path) -> None:
    """use_sliding_window with max_window_layers >= num_layers: every layer is full attention."""
    src = _edited(tiny, tmp_path, "qwen2_7b", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    src_cfg = json.loads((src / "config.json").read_text())
    src_cfg.pop("layer_types")
    (src / "config.json").write_text(json.dumps(src_cfg))
    hfnemo.convert(src, tmp_path / "nemo")
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == src_cfg


def test_mixtral_pre_softmax_router_refused_on_export(tiny, tmp_path: Path) -> None:
    hfnemo.convert(tiny("mixtral_8x7b"), tmp_path / "nemo")
    y = tmp_path / "nemo" / "context" / "model.yaml"
    y.write_text(y.read_text().replace("moe_router_pre_softmax: false", "moe_router_pre_softmax: true"))
    with pytest.raises(ConfigError, match="moe_router_pre_softmax"):
        hfnemo.convert(tmp_path / "nemo", tmp_path / "back")


# ------------------------------------------------------------------------------ NVIDIA's own output

def _assert_weights_equal_nvidia(model: str, ours: Path) -> None:
    want, got = chunk_table(REF / model / "nemo" / "weights"), chunk_table(ours / "weights")
    assert want.keys() == got.keys()
    for k in want:
        assert want[k] == got[k], k  # dtype, global shape, chunk layout and every byte
    # NVIDIA's non-TE run stores linear layers' _extra_state; we also write core_attention's.
    ref_bytes = set(read_index(REF / model / "nemo" / "weights").byte_keys)
    our_bytes = set(read_index(ours / "weights").byte_keys)
    assert ref_bytes <= our_bytes
    assert our_bytes - ref_bytes == {
        f"{M}decoder.layers.self_attention.core_attention._extra_state/shard_{l}_2" for l in range(2)}
    assert set(load_dcp(ours / "weights")) == set(want)  # torch's own reader reads it


def test_import_equals_nvidia_mixtral(tmp_path: Path) -> None:
    ours = tmp_path / "nemo"
    hfnemo.convert(REF / "mixtral" / "hf", ours)
    _assert_weights_equal_nvidia("mixtral", ours)
    ctx_ref, ctx = REF / "mixtral" / "nemo" / "context", ours / "context"
    assert json.loads((ctx / "io.json").read_text()) == json.loads((ctx_ref / "io.json").read_text())
    assert (ctx / "model.yaml").read_text() == (ctx_ref / "model.yaml").read_text()
    assert (ctx / "artifacts/generation_config.json").read_bytes() == \
        (ctx_ref / "artifacts/generation_config.json").read_bytes()


def _qwen2_import(tmp_path: Path) -> Path:
    ours = tmp_path / "nemo"
    hfnemo.convert(REF / "qwen2" / "hf", ours)
    return ours


def test_import_equals_nvidia_qwen2(tmp_path: Path) -> None:
    ours = _qwen2_import(tmp_path)
    _assert_weights_equal_nvidia("qwen2", ours)
    ctx_ref, ctx = REF / "qwen2" / "nemo" / "context", ours / "context"
    assert (ctx / "model.yaml").read_text() == (ctx_ref / "model.yaml").read_text()
    assert (ctx / "artifacts/generation_config.json").read_bytes() == \
        (ctx_ref / "artifacts/generation_config.json").read_bytes()


def test_qwen2_io_json_equals_nvidia(tmp_path: Path) -> None:
    ctx_ref, ctx = REF / "qwen2" / "nemo" / "context", _qwen2_import(tmp_path) / "context"
    assert json.loads((ctx / "io.json").read_text()) == json.loads((ctx_ref / "io.json").read_text())
    assert (ctx / "model.yaml").read_text() == (ctx_ref / "model.yaml").read_text()


@pytest.mark.parametrize("model", ["mixtral", "qwen2"])
def test_export_of_nvidia_gives_original(tmp_path: Path, model: str) -> None:
    hfnemo.convert(REF / model / "nemo", tmp_path / "hf")
    a, b = load_hf_state(REF / model / "hf"), load_hf_state(tmp_path / "hf")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    want = json.loads((REF / model / "hf" / "config.json").read_text())
    want.pop("transformers_version")
    # Rebuilt from model.yaml, the generation config and (Mixtral's vocab) the tokenizer alone.
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == want
    ids = fixed_input_ids(want["vocab_size"])
    assert torch.equal(hf_logits(REF / model / "hf", ids), hf_logits(tmp_path / "hf", ids))
