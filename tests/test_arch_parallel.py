"""Falcon, GPT-NeoX and Phi-2 (the parallel-block families whose NeMo layout hfnemo defines):
HF -> NeMo -> HF bit-exact with the same config and logits, the NeMo side against a plain-torch
statement of the mapping, the config flags, and every refusal."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from test_reference import assert_dcp_equals, load_dcp
from tiny_models import fixed_input_ids, hf_logits, load_hf_state
from tiny_parallel import SHAPES, make_tiny_parallel
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

import hfnemo
from hfnemo.errors import ConfigError, ConversionError, UnsupportedArchitecture
from hfnemo.io.nemo_context import read_context

FAMILY = {"FalconForCausalLM": "falcon", "GPTNeoXForCausalLM": "gptneox", "PhiForCausalLM": "phi2"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny(shape, dtype=bf16, dialect="4", **config_overrides)``, built once per module; read-only."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cache: dict[tuple, Path] = {}

    def factory(shape: str, dtype: torch.dtype = torch.bfloat16, dialect: str = "4", **kw: Any) -> Path:
        key = (shape, dtype, dialect, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{shape}-{str(dtype)[6:]}-d{dialect}")
            cache[key] = make_tiny_parallel(out, shape, dtype=dtype, dialect=dialect, **kw)
        return cache[key]

    return factory


def _same_state(a_dir: Path, b_dir: Path) -> None:
    a, b = load_hf_state(a_dir), load_hf_state(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _same_logits(a_dir: Path, b_dir: Path, shape: str) -> None:
    ids = fixed_input_ids(SHAPES[shape]["vocab_size"])
    assert torch.equal(hf_logits(a_dir, ids), hf_logits(b_dir, ids))


CASES = [(s, d, x) for s in SHAPES for d in (torch.bfloat16, torch.float32) for x in ("4", "5")]


@pytest.mark.parametrize("shape,dtype,dialect", CASES, ids=[f"{s}-{str(d)[6:]}-v{x}" for s, d, x in CASES])
def test_roundtrip_bit_exact(tiny, tmp_path: Path, shape: str, dtype: torch.dtype, dialect: str) -> None:
    src = tiny(shape, dtype, dialect)
    r = hfnemo.convert(src, tmp_path / "nemo")
    assert r.arch == FAMILY[SHAPES[shape]["arch"]]
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    _same_state(src, tmp_path / "back")
    back_cfg = json.loads((tmp_path / "back/config.json").read_text())
    assert back_cfg == json.loads((src / "config.json").read_text())
    assert json.loads((tmp_path / "back/generation_config.json").read_text()) == \
        json.loads((src / "generation_config.json").read_text())
    _same_logits(src, tmp_path / "back", shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_hub_spelling_is_the_same_model(tiny, shape: str) -> None:
    """The dialect-4 (hub) configs of tiny_parallel mean what the 5.x ones mean, so the round trips
    above cover the hub spellings (rotary_pct, rotary_emb_base, omitted Falcon defaults) for real."""
    _same_logits(tiny(shape, torch.float32, "4"), tiny(shape, torch.float32, "5"), shape)


# ------------------------------------------------------------------ the NeMo side, in plain torch

def _interleave(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ng: int) -> torch.Tensor:
    """Megatron's fused qkv rows (spec §4.1): per group, its query heads, then its key and value head."""
    tail = q.shape[1:]
    parts = [t.reshape(ng, -1, *tail) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def _falcon_split(cfg, ng: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """q/k/v rows of query_key_value as transformers' own FalconAttention reads them.

    transformers up to 5.24 has FalconAttention._split_heads; 5.25 moved the split into forward(), so
    there the fused rows go through forward() itself (identity input, ALiBi so no rotary) and an
    attention function registered for the test captures the q/k/v it is handed.
    """
    import copy

    from transformers.models.falcon.modeling_falcon import FalconAttention

    if hasattr(FalconAttention, "_split_heads"):
        attn = FalconAttention(cfg, layer_idx=0)

        def heads(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return attn._split_heads(x)  # [1, in, heads, d]; new arch broadcasts k/v to every head

    else:
        from transformers import AttentionInterface

        seen: list[torch.Tensor] = []

        def capture(module, q, k, v, mask, **kw):  # [1, heads, seq, d] each
            seen[:] = [q, k, v]
            return torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype), None

        AttentionInterface.register("hfnemo_capture", capture)
        c = copy.deepcopy(cfg)
        c.alibi = True  # q/k/v reach the attention function unrotated
        c._attn_implementation = "hfnemo_capture"
        attn = FalconAttention(c, layer_idx=0).eval()

        def heads(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            n = x.shape[1]  # x: [1, n, out] = the fused projection's output
            lin = attn.query_key_value
            with torch.no_grad():
                # n == hidden: x^T as the weight, identity input -> output x exactly; a bias row
                # (n == 1): zero weight, the row as the bias -> output the row exactly.
                if n == cfg.hidden_size:
                    lin.weight.copy_(x[0].T)
                    if lin.bias is not None:
                        lin.bias.zero_()
                    inp = torch.eye(n, dtype=x.dtype)[None]
                else:
                    lin.weight.zero_()
                    lin.bias.copy_(x[0, 0])
                    inp = torch.zeros(1, 1, cfg.hidden_size, dtype=x.dtype)
                attn(inp, None)
            return tuple(y.transpose(1, 2) for y in seen)  # [1, n, heads (k/v: kv heads), d]

    def split(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = t.T[None] if t.dim() == 2 else t[None, None]  # [1, in, out], as activations arrive
        q, k, v = heads(x)
        step = k.shape[2] // ng
        k, v = k[:, :, ::step], v[:, :, ::step]
        rows = [y[0].permute(1, 2, 0).reshape(-1, x.shape[1]) for y in (q, k, v)]  # [heads*d, in]
        return tuple(r if t.dim() == 2 else r[:, 0] for r in rows)

    return split


def reference_nemo(hf: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """NeMo tensors (with the module. prefix) from HF tensors; cfg is the transformers config object."""
    L, H, nh = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    kind = cfg.model_type

    def stack(fn: Callable[[int], torch.Tensor]) -> torch.Tensor:
        return torch.stack([fn(l) for l in range(L)])

    def layers(nemo: str, hf_fmt: str) -> dict[str, torch.Tensor]:
        return {"decoder.layers." + nemo: stack(lambda l: hf[hf_fmt.format(l=l)])}

    out: dict[str, torch.Tensor] = {}
    if kind == "falcon":
        new, mq = cfg.new_decoder_architecture, cfg.multi_query
        ng = cfg.num_kv_heads if new else (1 if mq else nh)
        split = _falcon_split(cfg, ng)
        t = "transformer.h.{l}."
        out["embedding.word_embeddings.weight"] = hf["transformer.word_embeddings.weight"]
        parts = ["weight", "bias"] if cfg.bias else ["weight"]
        for p in parts:
            fused = [hf[f"transformer.h.{l}.self_attention.query_key_value.{p}"] for l in range(L)]
            qkv = stack(lambda l: _interleave(*split(fused[l]), ng))
            # HF's fused rows already are this interleave: the NeMo tensor is a plain copy.
            assert torch.equal(qkv, torch.stack(fused))
            out[f"decoder.layers.self_attention.linear_qkv.{p}"] = qkv
            out |= layers(f"self_attention.linear_proj.{p}", t + f"self_attention.dense.{p}")
            out |= layers(f"mlp.linear_fc1.{p}", t + f"mlp.dense_h_to_4h.{p}")
            out |= layers(f"mlp.linear_fc2.{p}", t + f"mlp.dense_4h_to_h.{p}")
        two = new and cfg.num_ln_in_parallel_attn in (None, 2)
        for p in ("weight", "bias"):
            out |= layers(f"input_layernorm.{p}", t + (f"ln_attn.{p}" if two else f"input_layernorm.{p}"))
            if two:
                out |= layers(f"pre_mlp_layernorm.{p}", t + f"ln_mlp.{p}")
            if not cfg.parallel_attn:
                out |= layers(f"post_self_attn_layernorm.{p}", t + f"post_attention_layernorm.{p}")
            out[f"decoder.final_layernorm.{p}"] = hf[f"transformer.ln_f.{p}"]
        if not cfg.tie_word_embeddings:
            out["output_layer.weight"] = hf["lm_head.weight"]
    elif kind == "gpt_neox":
        d, t = H // nh, "gpt_neox.layers.{l}."
        out["embedding.word_embeddings.weight"] = hf["gpt_neox.embed_in.weight"]
        for p in ("weight", "bias"):
            def qkv(l: int, p: str = p) -> torch.Tensor:  # HF: qkv.view(..., heads, 3 * head_size)
                w = hf[f"gpt_neox.layers.{l}.attention.query_key_value.{p}"]
                w4 = w.reshape(nh, 3, d, *w.shape[1:])
                return _interleave(*(w4[:, i].reshape(nh * d, *w.shape[1:]) for i in range(3)), nh)
            out[f"decoder.layers.self_attention.linear_qkv.{p}"] = stack(qkv)
            out |= layers(f"self_attention.linear_qkv.layer_norm_{p}", t + f"input_layernorm.{p}")
            out |= layers(f"self_attention.linear_proj.{p}", t + f"attention.dense.{p}")
            out |= layers(f"mlp.linear_fc1.layer_norm_{p}", t + f"post_attention_layernorm.{p}")
            out |= layers(f"mlp.linear_fc1.{p}", t + f"mlp.dense_h_to_4h.{p}")
            out |= layers(f"mlp.linear_fc2.{p}", t + f"mlp.dense_4h_to_h.{p}")
            out[f"decoder.final_layernorm.{p}"] = hf[f"gpt_neox.final_layer_norm.{p}"]
        out["output_layer.weight"] = hf["embed_out.weight"]
    else:
        ng, t = cfg.num_key_value_heads or nh, "model.layers.{l}."
        out["embedding.word_embeddings.weight"] = hf["model.embed_tokens.weight"]
        for p in ("weight", "bias"):
            out[f"decoder.layers.self_attention.linear_qkv.{p}"] = stack(lambda l, p=p: _interleave(
                *(hf[f"model.layers.{l}.self_attn.{x}_proj.{p}"] for x in "qkv"), ng))
            out |= layers(f"input_layernorm.{p}", t + f"input_layernorm.{p}")
            out |= layers(f"self_attention.linear_proj.{p}", t + f"self_attn.dense.{p}")
            out |= layers(f"mlp.linear_fc1.{p}", t + f"mlp.fc1.{p}")
            out |= layers(f"mlp.linear_fc2.{p}", t + f"mlp.fc2.{p}")
            out[f"decoder.final_layernorm.{p}"] = hf[f"model.final_layernorm.{p}"]
        out["output_layer.bias"] = hf["lm_head.bias"]
        if not cfg.tie_word_embeddings:
            out["output_layer.weight"] = hf["lm_head.weight"]
    return {"module." + k: v for k, v in out.items()}


@pytest.mark.parametrize("shape", SHAPES)
def test_dcp_equals_plain_torch_mapping(tiny, tmp_path: Path, shape: str) -> None:
    import transformers

    src = tiny(shape, torch.float32, "5")
    hfnemo.convert(src, tmp_path / "nemo")
    cfg = transformers.AutoConfig.from_pretrained(src)
    want = reference_nemo(load_hf_state(src), cfg)
    assert_dcp_equals(tmp_path / "nemo" / "weights", want)
    md = FileSystemReader(str(tmp_path / "nemo" / "weights")).read_metadata().state_dict_metadata
    L = cfg.num_hidden_layers
    for k in want:  # stacked keys: one [1, ...] chunk per layer at offset (l, 0, ...)
        if ".decoder.layers." in k:
            assert sorted(c.offsets[0] for c in md[k].chunks) == list(range(L)), k
    mods = ("self_attention.core_attention", "self_attention.linear_proj", "self_attention.linear_qkv",
            "mlp.linear_fc1", "mlp.linear_fc2")
    assert {k for k, v in md.items() if isinstance(v, BytesStorageMetadata)} == {
        f"module.decoder.layers.{m}._extra_state/shard_{l}_{L}" for m in mods for l in range(L)}


# ------------------------------------------------------------------ NeMo config

# What model.yaml must say for each shape (beyond sizes): the flags a loader builds the layer from.
FLAGS: dict[str, dict[str, Any]] = {
    "falcon7b": dict(new_decoder_architecture=False, parallel_attention=True, multi_query=True,
                     num_query_groups=1, num_ln_in_parallel_attn=None, add_bias_linear=False,
                     add_qkv_bias=False, share_embeddings_and_output_weights=True, rotary_percent=1.0),
    "falcon40b": dict(new_decoder_architecture=True, parallel_attention=True, num_query_groups=2,
                      num_ln_in_parallel_attn=None, share_embeddings_and_output_weights=True),
    "falcon11b": dict(new_decoder_architecture=True, num_ln_in_parallel_attn=1, num_query_groups=2,
                      rotary_base=500042.0, seq_length=8192, share_embeddings_and_output_weights=False),
    "falcon_seq": dict(new_decoder_architecture=False, parallel_attention=False, multi_query=False,
                       num_query_groups=4, add_bias_linear=True, add_qkv_bias=True),
    "pythia": dict(parallel_residual=True, rotary_percent=0.25, rotary_base=10000, add_bias_linear=True,
                   add_qkv_bias=True, num_query_groups=8, share_embeddings_and_output_weights=False),
    "neox_seq": dict(parallel_residual=False, rotary_percent=0.5,
                     activation_func={"_call_": False, "_target_": "megatron.core.activations.fast_gelu"}),
    "phi2": dict(parallel_attention=True, output_layer_bias=True, rotary_percent=0.4, hidden_dropout=0.1,
                 embedding_dropout=0.0, num_query_groups=2, kv_channels=80,
                 activation_func={"_call_": False,
                                  "_target_": "nemo.collections.llm.fn.activation.openai_gelu"}),
    "phi_gqa": dict(num_query_groups=2, kv_channels=16, rotary_percent=0.5),
}
COMMON_FLAGS = dict(normalization="LayerNorm", gated_linear_unit=False, position_embedding_type="rope",
                    layernorm_epsilon=1e-5, seq_len_interpolation_factor=None, rotary_interleaved=False)
TARGETS = {"falcon": "Falcon", "gptneox": "GPTNeoX", "phi2": "Phi2"}


@pytest.mark.parametrize("shape", SHAPES)
def test_model_yaml_and_io_json_carry_the_flags(tiny, tmp_path: Path, shape: str) -> None:
    src = tiny(shape, torch.bfloat16, "4")
    hfnemo.convert(src, tmp_path / "nemo")
    ctx_dir = tmp_path / "nemo" / "context"
    doc = yaml.safe_load((ctx_dir / "model.yaml").read_text())
    name = TARGETS[FAMILY[SHAPES[shape]["arch"]]]
    assert doc["_target_"] == f"hfnemo.nemo.{name}Model"
    assert doc["config"]["_target_"] == f"hfnemo.nemo.{name}Config"
    conf = doc["config"]
    for k, v in {**COMMON_FLAGS, **FLAGS[shape]}.items():
        assert conf[k] == v, k
    assert conf["params_dtype"]["_target_"] == "torch.bfloat16" and conf["bf16"] is True
    assert conf["vocab_size"] == SHAPES[shape]["vocab_size"]
    # io.json alone gives the same config (what read_context falls back to without model.yaml).
    from_yaml = read_context(ctx_dir).config
    (ctx_dir / "model.yaml").unlink()
    assert read_context(ctx_dir).config == from_yaml
    sidecar = json.loads((ctx_dir / "artifacts/hf_config.json").read_text())
    assert sidecar == json.loads((src / "config.json").read_text())


@pytest.mark.parametrize("shape", SHAPES)
def test_export_from_model_yaml_alone(tiny, tmp_path: Path, shape: str) -> None:
    """Without hfnemo's hf_config.json sidecar the HF config is rebuilt from model.yaml: same
    tensors, same logits, and no field written that transformers would not default the same way."""
    src = tiny(shape, torch.float32, "4")
    hfnemo.convert(src, tmp_path / "nemo")
    (tmp_path / "nemo/context/artifacts/hf_config.json").unlink()
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    _same_state(src, tmp_path / "back")
    _same_logits(src, tmp_path / "back", shape)
    got, want = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "back", src))
    assert {k: v for k, v in got.items() if want.get(k) != v} == {}, "fields the source lacks, or changed"


def test_tied_phi_keeps_its_lm_head_bias(tiny, tmp_path: Path) -> None:
    src = tiny("phi2", torch.float32, "5", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_hf_state(src) and "lm_head.bias" in load_hf_state(src)
    hfnemo.convert(src, tmp_path / "nemo")
    keys = load_dcp(tmp_path / "nemo" / "weights")
    assert "module.output_layer.bias" in keys and "module.output_layer.weight" not in keys
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    _same_state(src, tmp_path / "back")
    _same_logits(src, tmp_path / "back", "phi2")


def test_neox_skips_saved_buffers(tiny, tmp_path: Path) -> None:
    """Older transformers saved attention.bias / masked_bias / rotary_emb.inv_freq with Pythia."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(tiny("pythia", torch.float32, "4"), src)
    state = load_hf_state(src)
    for l in range(2):
        p = f"gpt_neox.layers.{l}.attention."
        state[p + "bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
        state[p + "masked_bias"] = torch.tensor(-1e9)
        state[p + "rotary_emb.inv_freq"] = torch.ones(2)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    hfnemo.convert(src, tmp_path / "nemo")
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    _same_state(tiny("pythia", torch.float32, "4"), tmp_path / "back")


# ------------------------------------------------------------------ refusals

def _with_config(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


REFUSED = [
    ("falcon_seq", dict(alibi=True), UnsupportedArchitecture, "alibi"),
    ("falcon40b", dict(parallel_attn=False), ConfigError, "parallel_attn"),
    ("falcon7b", dict(num_ln_in_parallel_attn=2), ConfigError, "num_ln_in_parallel_attn"),
    ("falcon_seq", dict(num_kv_heads=2), ConfigError, "num_kv_heads"),
    ("falcon7b", dict(activation="relu"), ConfigError, "activation"),
    ("falcon7b", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), ConfigError, "rope scaling"),
    ("pythia", dict(attention_bias=False), ConfigError, "attention_bias"),
    ("pythia", dict(hidden_act="gelu_pytorch_tanh"), ConfigError, "hidden_act"),
    ("phi2", dict(qk_layernorm=True), ConfigError, "qk_layernorm"),
    ("phi2", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), ConfigError, "rope scaling"),
]


@pytest.mark.parametrize("shape,changes,error,needle", REFUSED, ids=[f"{s}-{n}" for s, _, _, n in REFUSED])
def test_unsupported_config_is_refused_by_name(tiny, tmp_path: Path, shape: str, changes: dict, error: type,
                                               needle: str) -> None:
    src = _with_config(tiny(shape, torch.float32, "4"), tmp_path / "src", **changes)
    with pytest.raises(error) as e:
        hfnemo.plan(src)
    assert needle in str(e.value) and "config.json" in str(e.value)
    assert not (tmp_path / "out").exists()


EXPORT_REFUSED = [
    ("phi2", {"output_layer_bias": False}, "output_layer_bias"),
    ("falcon7b", {"num_query_groups": 4}, "num_query_groups"),
    ("falcon_seq", {"add_qkv_bias": False}, "add_qkv_bias"),
    ("pythia", {"activation_func": {"_call_": False, "_target_": "torch.nn.functional.silu"}},
     "activation_func"),
    ("neox_seq", {"gated_linear_unit": True}, "gated_linear_unit"),
]


@pytest.mark.parametrize("shape,changes,needle", EXPORT_REFUSED,
                         ids=[f"{s}-{n}" for s, _, n in EXPORT_REFUSED])
def test_export_refuses_a_contradicting_model_yaml(tiny, tmp_path: Path, shape: str, changes: dict,
                                                   needle: str) -> None:
    hfnemo.convert(tiny(shape, torch.float32, "4"), tmp_path / "nemo")
    path = tmp_path / "nemo/context/model.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["config"].update(changes)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConversionError) as e:
        hfnemo.plan(tmp_path / "nemo")
    assert needle in str(e.value) and "model.yaml" in str(e.value)
