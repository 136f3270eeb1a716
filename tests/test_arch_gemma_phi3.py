"""Gemma, Gemma 2 and Phi-3: round trips, a plain-torch statement of each mapping, NVIDIA's own
importer output (tests/data/nvidia/{gemma,phi3}), and the variants NeMo cannot represent."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from test_reference import assert_dcp_equals, chunk_table, load_dcp
from tiny_gemma_phi3 import make_tiny
from tiny_models import fixed_input_ids, hf_logits, load_hf_state
from torch.distributed.checkpoint import FileSystemReader

import hfnemo
from hfnemo.errors import ConfigError
from hfnemo.io.dcp import read_index

REF = Path(__file__).resolve().parent / "data" / "nvidia"
ROUNDTRIP = ["gemma_2b_mqa", "gemma_7b_mha", "gemma2_2b", "phi3_mini", "phi3_medium_gqa", "phi4_mini_partial"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny(shape, dtype=bf16, dialect="4")``: built once per module; treat as read-only."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cache: dict[tuple, Path] = {}

    def factory(shape: str, dtype: torch.dtype = torch.bfloat16, dialect: str = "4") -> Path:
        key = (shape, dtype, dialect)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{shape}-{str(dtype)[6:]}-d{dialect}")
            cache[key] = make_tiny(out, shape, dtype=dtype, dialect=dialect)
        return cache[key]

    return factory


# ---- HF -> NeMo -> HF --------------------------------------------------------------------------
CASES = [(s, torch.bfloat16, d) for s in ROUNDTRIP for d in ("4", "5")] + \
        [(s, torch.float32, "4") for s in ("gemma_7b_mha", "gemma2_2b", "phi3_medium_gqa")]


@pytest.mark.parametrize("shape,dtype,dialect", CASES, ids=[f"{s}-{str(t)[6:]}-v{d}" for s, t, d in CASES])
def test_roundtrip_bit_exact(tiny, tmp_path: Path, shape: str, dtype: torch.dtype, dialect: str) -> None:
    src = tiny(shape, dtype, dialect)
    hfnemo.convert(src, tmp_path / "nemo")
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    a, b = load_hf_state(src), load_hf_state(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "back/config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (tmp_path / "back/tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    ids = fixed_input_ids(a["model.embed_tokens.weight"].shape[0])
    assert torch.equal(hf_logits(src, ids), hf_logits(tmp_path / "back", ids))


@pytest.mark.parametrize("shape", ROUNDTRIP)
def test_export_without_sidecar(tiny, tmp_path: Path, shape: str) -> None:
    """The HF config rebuilt from model.yaml alone (as for a checkpoint NeMo trained) is the original."""
    src = tiny(shape)
    hfnemo.convert(src, tmp_path / "nemo")
    (tmp_path / "nemo/context/artifacts/hf_config.json").unlink()
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    a, b = load_hf_state(src), load_hf_state(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    want = json.loads((src / "config.json").read_text())
    want.pop("transformers_version")
    assert json.loads((tmp_path / "back/config.json").read_text()) == want


# ---- the NeMo side against a plain-torch statement of each mapping ------------------------------
def reference_mapping(hf: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """NeMo tensors from HF tensors, written from NVIDIA's gemma.py / gemma2.py / phi3mini.py."""
    L, nh, H = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    ng = cfg.get("num_key_value_heads") or nh
    d = cfg.get("head_dim") or H // nh
    phi3 = cfg["model_type"] == "phi3"

    def w(l: int, name: str) -> torch.Tensor:
        return hf[f"model.layers.{l}.{name}"]

    def qkv(l: int) -> torch.Tensor:
        if phi3:  # fused HF qkv_proj = cat(q, k, v)
            q, k, v = w(l, "self_attn.qkv_proj.weight").split([nh * d, ng * d, ng * d])
        else:
            q, k, v = (w(l, f"self_attn.{x}_proj.weight") for x in "qkv")
        return torch.cat([q.reshape(ng, nh // ng * d, H), k.reshape(ng, d, H), v.reshape(ng, d, H)], 1).reshape(-1, H)

    def fc1(l: int) -> torch.Tensor:
        if phi3:
            return w(l, "mlp.gate_up_proj.weight")
        return torch.cat([w(l, "mlp.gate_proj.weight"), w(l, "mlp.up_proj.weight")])

    def stack(fn: Callable[[int], torch.Tensor]) -> torch.Tensor:
        return torch.stack([fn(l) for l in range(L)])

    m, dl = "module.", "module.decoder.layers."
    out = {
        m + "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        m + "decoder.final_layernorm.weight": hf["model.norm.weight"],  # Gemma: as is (zero-centred gamma)
        dl + "self_attention.linear_qkv.weight": stack(qkv),
        dl + "self_attention.linear_qkv.layer_norm_weight": stack(lambda l: w(l, "input_layernorm.weight")),
        dl + "self_attention.linear_proj.weight": stack(lambda l: w(l, "self_attn.o_proj.weight")),
        dl + "mlp.linear_fc1.weight": stack(fc1),
        dl + "mlp.linear_fc2.weight": stack(lambda l: w(l, "mlp.down_proj.weight")),
    }
    if cfg["model_type"] == "gemma2":
        out[dl + "mlp.linear_fc1.layer_norm_weight"] = stack(lambda l: w(l, "pre_feedforward_layernorm.weight"))
        out[dl + "self_attention.linear_proj.post_layernorm.weight"] = \
            stack(lambda l: w(l, "post_attention_layernorm.weight"))
        out[dl + "mlp.linear_fc2.post_layernorm.weight"] = stack(lambda l: w(l, "post_feedforward_layernorm.weight"))
    else:
        out[dl + "mlp.linear_fc1.layer_norm_weight"] = stack(lambda l: w(l, "post_attention_layernorm.weight"))
    if not cfg.get("tie_word_embeddings", cfg["model_type"] != "phi3"):
        out[m + "output_layer.weight"] = hf["lm_head.weight"]
    return out


@pytest.mark.parametrize("shape", ROUNDTRIP)
def test_dcp_equals_plain_torch_mapping(tiny, tmp_path: Path, shape: str) -> None:
    src = tiny(shape, torch.float32)
    hfnemo.convert(src, tmp_path / "nemo")
    cfg = json.loads((src / "config.json").read_text())
    assert_dcp_equals(tmp_path / "nemo" / "weights", reference_mapping(load_hf_state(src), cfg))
    md = FileSystemReader(str(tmp_path / "nemo" / "weights")).read_metadata().state_dict_metadata
    L = cfg["num_hidden_layers"]
    assert len(md["module.decoder.layers.self_attention.linear_qkv.weight"].chunks) == L
    assert len(md["module.decoder.layers.mlp.linear_fc1.weight"].chunks) == 2 * L  # gate rows, up rows
    blobs = {k.split("._extra_state")[0] for k in md if "_extra_state" in k}
    if shape.startswith("gemma2"):  # TENorm post norms carry TE extra state; the core attention is not TE
        assert "module.decoder.layers.mlp.linear_fc2.post_layernorm" in blobs
        assert "module.decoder.layers.self_attention.core_attention" not in blobs


def _nemo_config(tiny, tmp_path: Path, shape: str) -> dict[str, Any]:
    out = tmp_path / shape
    hfnemo.convert(tiny(shape), out)
    doc = yaml.safe_load((out / "context" / "model.yaml").read_text())
    return {**doc["config"], "_model": doc["_target_"]}


def test_model_yaml_fields(tiny, tmp_path: Path) -> None:
    c = _nemo_config(tiny, tmp_path, "gemma_2b_mqa")
    assert c["_target_"].endswith("gemma.GemmaConfig") and c["_model"].endswith("gemma.GemmaModel")
    assert c["layernorm_zero_centered_gamma"] and c["share_embeddings_and_output_weights"]
    assert c["num_query_groups"] == 1 and c["kv_channels"] == 256 and c["gated_linear_unit"]
    assert c["activation_func"]["_target_"] == "nemo.collections.llm.fn.activation.openai_gelu"
    c = _nemo_config(tiny, tmp_path, "gemma_7b_mha")  # head_dim 48 and 256 positions reach NeMo
    assert (c["kv_channels"], c["seq_length"], c["num_query_groups"], c["vocab_size"]) == (48, 256, 3, 336)
    c = _nemo_config(tiny, tmp_path, "gemma2_2b")
    assert c["_target_"].endswith("gemma2.Gemma2Config") and c["_model"].endswith("gemma2.Gemma2Model")
    assert (c["window_size"], c["query_pre_attn_scalar"], c["kv_channels"]) == ([8, 0], 32, 32)
    assert (c["attn_logit_softcapping"], c["final_logit_softcapping"]) == (50.0, 30.0)
    assert c["transformer_layer_spec"]["_target_"].endswith("gemma2.gemma2_layer_spec")
    c = _nemo_config(tiny, tmp_path, "phi3_medium_gqa")
    assert c["_target_"].endswith("phi3mini.Phi3Config") and c["_model"].endswith("phi3mini.Phi3Model")
    assert (c["num_query_groups"], c["window_size"], c["seq_length"]) == (2, [8, 0], 256)
    c = _nemo_config(tiny, tmp_path, "phi4_mini_partial")
    assert c["rotary_percent"] == 0.75 and c["share_embeddings_and_output_weights"] is True
    keys = FileSystemReader(str(tmp_path / "phi4_mini_partial" / "weights")).read_metadata().state_dict_metadata
    assert "module.output_layer.weight" not in keys


# ---- what NeMo cannot represent is refused, naming the field and the file ------------------------
def _edited(tiny, tmp_path: Path, shape: str, dialect: str = "4", **changes: Any) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny(shape, dialect=dialect), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("dialect", ["4", "5"])
def test_phi3_longrope_is_refused(tiny, tmp_path: Path, dialect: str) -> None:
    src = tiny("phi3_128k_longrope", dialect=dialect)
    with pytest.raises(ConfigError, match="rope_scaling type 'longrope' cannot be represented") as e:
        hfnemo.convert(src, tmp_path / "nemo")
    assert e.value.file == str(src / "config.json") and not (tmp_path / "nemo").exists()


def test_phi3_su_rope_is_refused(tiny, tmp_path: Path) -> None:
    src = _edited(tiny, tmp_path, "phi3_mini", rope_scaling={"type": "su", "short_factor": [1.0] * 16,
                                                             "long_factor": [2.0] * 16})
    with pytest.raises(ConfigError, match="rope_scaling type 'su'"):
        hfnemo.convert(src, tmp_path / "nemo")


@pytest.mark.parametrize("shape,changes,match", [
    ("gemma2_2b", {"layer_types": ["full_attention", "full_attention"]}, "layer_types"),
    ("gemma_7b_mha", {"hidden_act": "silu"}, "activation 'silu'"),
    ("gemma2_2b", {"hidden_activation": "gelu"}, "activation 'gelu'"),
    ("gemma_7b_mha", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ("gemma_7b_mha", {"attention_bias": True}, "attention_bias"),
])
def test_unrepresentable_gemma_variants(tiny, tmp_path: Path, shape: str, changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        hfnemo.convert(_edited(tiny, tmp_path, shape, **changes), tmp_path / "nemo")


def test_gemma_legacy_gelu_spelling_is_tanh(tiny, tmp_path: Path) -> None:
    """Hub Gemma 1 configs say hidden_act="gelu", which transformers runs as the tanh GELU."""
    src = _edited(tiny, tmp_path, "gemma_7b_mha", hidden_act="gelu", hidden_activation="gelu_pytorch_tanh")
    hfnemo.convert(src, tmp_path / "nemo")
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    assert json.loads((tmp_path / "back/config.json").read_text())["hidden_act"] == "gelu"


# ---- NVIDIA's importer output (NeMo 2.5.3 on CPU; see data/nvidia/README.md) ---------------------
def _canon(doc: dict[str, Any]) -> Any:
    """io.json as plain data: every fiddle Config becomes {"__fn__": target, **arguments} (checked
    against its argument_names), refs resolved, fiddle's paths/keys dropped. Independent of hfnemo."""
    objects = doc["objects"]

    def val(v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        if v.get("type") == "leaf":
            return v["value"]
        if v.get("type") == "pyref":
            return f"{v['module']}.{v['name']}"
        if v.get("type") != "ref":
            raise AssertionError(v)
        o = objects[v["key"]]
        kind = val(o["type"])
        items = [(label, val(x)) for label, x in o["items"]]
        if kind == "fiddle._src.config.Config":
            md = dict(val(o["metadata"]))
            args = {label[len("Attr(name='"):-2]: x for label, x in items}
            assert list(args) == list(md["argument_names"])
            return {"__fn__": md["fn_or_cls"], **args}
        if kind == "fiddle._src.config.BuildableTraverserMetadata":
            return [(label[len("Attr(name='"):-2], x) for label, x in items]
        if kind == "builtins.dict":
            return {label[len("Key(key='"):-2]: x for label, x in items}
        return [x for _, x in items]

    return val(doc["root"])


# Fields hfnemo's import writes beyond NVIDIA's, and why (see the arch modules' docstrings):
#   vocab_size: explicit, so the embedding never depends on the tokenizer's length (NVIDIA: null).
#   generation_config: the HF generation_config.json, which NVIDIA's Phi-3 importer does not record.
EXTRA = {"gemma": {"vocab_size": 320}, "phi3": {"vocab_size": 320, "generation_config": {
    "__fn__": "nemo.lightning.io.artifact.hf_auto.from_pretrained",
    "auto_cls": "transformers.generation.configuration_utils.GenerationConfig",
    "pretrained_model_name_or_path": "./artifacts"}}}


@pytest.mark.parametrize("family", ["gemma", "phi3"])
def test_import_equals_nvidia(tmp_path: Path, family: str) -> None:
    ref, ours = REF / family, tmp_path / "nemo"
    hfnemo.convert(ref / "hf", ours)
    want, got = chunk_table(ref / "nemo" / "weights"), chunk_table(ours / "weights")
    assert want.keys() == got.keys()
    for k in want:
        assert want[k] == got[k], k  # dtype, global shape, chunk layout, every byte
    # Byte blobs: NVIDIA's non-TE run lacks core_attention's (TE's DotProductAttention has one).
    ref_bytes, our_bytes = set(read_index(ref / "nemo/weights").byte_keys), set(read_index(ours / "weights").byte_keys)
    assert ref_bytes <= our_bytes
    assert our_bytes - ref_bytes == {
        f"module.decoder.layers.self_attention.core_attention._extra_state/shard_{l}_2" for l in range(2)}
    # io.json and model.yaml: NVIDIA's, plus EXTRA.
    a = _canon(json.loads((ref / "nemo/context/io.json").read_text()))
    b = _canon(json.loads((ours / "context/io.json").read_text()))
    config = b["model"]["config"]
    for k, v in EXTRA[family].items():
        assert config.pop(k) == v, k
    assert a == b
    ya = yaml.safe_load((ref / "nemo/context/model.yaml").read_text())
    yb = yaml.safe_load((ours / "context/model.yaml").read_text())
    assert yb["config"].pop("vocab_size") == 320 and ya["config"].pop("vocab_size") is None
    if family == "phi3":
        assert ya["config"].pop("generation_config") is None
        assert yb["config"].pop("generation_config")["pretrained_model_name_or_path"] == "./artifacts"
    assert ya == yb
    for f in ("weights/metadata.json",) + (("context/artifacts/generation_config.json",) if family == "gemma" else ()):
        assert (ours / f).read_bytes() == (ref / "nemo" / f).read_bytes(), f
    assert str(torch.load(ours / "weights/common.pt", weights_only=True)) == \
        str(torch.load(ref / "nemo/weights/common.pt", weights_only=True))
    assert set(load_dcp(ours / "weights")) == set(want)  # torch's own reader loads what we wrote


@pytest.mark.parametrize("family", ["gemma", "phi3"])
def test_export_of_nvidia_gives_original(tmp_path: Path, family: str) -> None:
    hfnemo.convert(REF / family / "nemo", tmp_path / "hf")
    a, b = load_hf_state(REF / family / "hf"), load_hf_state(tmp_path / "hf")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    want = json.loads((REF / family / "hf/config.json").read_text())
    got = json.loads((tmp_path / "hf/config.json").read_text())
    want.pop("transformers_version")
    # Rebuilt from model.yaml alone, plus the embedding's rows (vocab_size: null) and, for Phi-3 whose
    # NVIDIA import keeps no generation config, the token ids of nemo_tokenizer/tokenizer_config.json.
    assert got == want
    ids = fixed_input_ids(a["model.embed_tokens.weight"].shape[0])
    assert torch.equal(hf_logits(REF / family / "hf", ids), hf_logits(tmp_path / "hf", ids))
