"""The NeMo side checked independently of the round trip: against NVIDIA's own importer output
(../shared/reference) and against a plain-torch statement of the mapping."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import load_hf_state
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import hfnemo
from hfnemo.io.dcp import read_index
from hfnemo.io.fileio import pread_into

REF = Path(__file__).resolve().parent / "data" / "nvidia"  # copied from ../shared/reference


def load_dcp(weights: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP directory through torch's own FileSystemReader (no hfnemo code)."""
    reader = FileSystemReader(str(weights))
    md = reader.read_metadata()
    sd = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
          for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    import torch.distributed.checkpoint as dcp
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def assert_dcp_equals(weights: Path, want: dict[str, torch.Tensor]) -> None:
    """The DCP tensors under ``weights`` (read by torch's own reader) are exactly ``want``: same
    keys, dtypes and values."""
    got = load_dcp(weights)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def chunk_table(weights: Path) -> dict[str, tuple]:
    """{fqn: (dtype, global shape, sorted chunks, per-chunk bytes)} read with hfnemo's safe reader
    (NVIDIA's .metadata pickles Megatron classes that torch alone cannot unpickle)."""
    idx = read_index(weights)
    out = {}
    from hfnemo.io.torchzip import locate_tensor
    for fqn, g in idx.tensors.items():
        parts = []
        for c in sorted(g.chunks, key=lambda c: c.offsets):
            fd = os.open(weights / c.file, os.O_RDONLY)
            try:
                st = locate_tensor(fd, c.offset, c.length)
                buf = bytearray(st.nbytes)
                pread_into(fd, memoryview(buf), st.offset)
            finally:
                os.close(fd)
            parts.append((c.offsets, c.sizes, bytes(buf)))
        out[fqn] = (g.dtype.name, g.shape, parts)
    return out


def test_import_equals_nvidia_llama(tmp_path: Path) -> None:
    ours = tmp_path / "nemo"
    hfnemo.convert(REF / "llama" / "hf", ours)
    want, got = chunk_table(REF / "llama" / "nemo" / "weights"), chunk_table(ours / "weights")
    assert want.keys() == got.keys()
    for k in want:
        assert want[k] == got[k], k  # dtype, global shape, chunk layout and every byte
    # Byte blobs: NVIDIA's non-TE run stores linear layers' _extra_state; we also write core_attention's.
    ref_bytes = set(read_index(REF / "llama" / "nemo" / "weights").byte_keys)
    our_bytes = set(read_index(ours / "weights").byte_keys)
    assert ref_bytes <= our_bytes
    assert {k for k in our_bytes - ref_bytes} == {
        f"module.decoder.layers.self_attention.core_attention._extra_state/shard_{l}_2" for l in range(2)}
    # context/: io.json and model.yaml exactly as NVIDIA's importer writes them.
    ctx_ref, ctx = REF / "llama" / "nemo" / "context", ours / "context"
    assert json.loads((ctx / "io.json").read_text()) == json.loads((ctx_ref / "io.json").read_text())
    assert (ctx / "model.yaml").read_text() == (ctx_ref / "model.yaml").read_text()
    assert (ctx / "artifacts/generation_config.json").read_bytes() == \
        (ctx_ref / "artifacts/generation_config.json").read_bytes()
    assert (ours / "weights/metadata.json").read_text() == (REF / "llama/nemo/weights/metadata.json").read_text()
    c_ref = torch.load(REF / "llama/nemo/weights/common.pt", weights_only=True)
    c_ours = torch.load(ours / "weights/common.pt", weights_only=True)
    assert str(c_ref) == str(c_ours)
    # And torch's own reader loads what we wrote, to the same values.
    sd = load_dcp(ours / "weights")
    assert set(sd) == set(want)


def test_export_of_nvidia_llama_gives_original(tmp_path: Path) -> None:
    hfnemo.convert(REF / "llama" / "nemo", tmp_path / "hf")
    a, b = load_hf_state(REF / "llama" / "hf"), load_hf_state(tmp_path / "hf")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    want = json.loads((REF / "llama/hf/config.json").read_text())
    got = json.loads((tmp_path / "hf/config.json").read_text())
    want.pop("transformers_version")
    assert got == want  # rebuilt from model.yaml + generation config alone (no hfnemo sidecar)


def reference_mapping(hf: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """NeMo 2 tensors from HF tensors, written from the spec (§4.1) in plain torch."""
    L, nh = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    ng = cfg.get("num_key_value_heads") or nh
    d = cfg.get("head_dim") or cfg["hidden_size"] // nh
    H = cfg["hidden_size"]

    def qkv(l: int) -> torch.Tensor:
        p = f"model.layers.{l}.self_attn."
        q = hf[p + "q_proj.weight"].reshape(ng, nh // ng * d, H)
        k = hf[p + "k_proj.weight"].reshape(ng, d, H)
        v = hf[p + "v_proj.weight"].reshape(ng, d, H)
        return torch.cat([q, k, v], dim=1).reshape(-1, H)

    def stack(fn) -> torch.Tensor:
        return torch.stack([fn(l) for l in range(L)])

    m = "module."
    out = {
        m + "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        m + "decoder.final_layernorm.weight": hf["model.norm.weight"],
        m + "decoder.layers.self_attention.linear_qkv.weight": stack(qkv),
        m + "decoder.layers.self_attention.linear_qkv.layer_norm_weight":
            stack(lambda l: hf[f"model.layers.{l}.input_layernorm.weight"]),
        m + "decoder.layers.self_attention.linear_proj.weight": stack(lambda l: hf[f"model.layers.{l}.self_attn.o_proj.weight"]),
        m + "decoder.layers.mlp.linear_fc1.layer_norm_weight":
            stack(lambda l: hf[f"model.layers.{l}.post_attention_layernorm.weight"]),
        m + "decoder.layers.mlp.linear_fc1.weight": stack(lambda l: torch.cat(
            [hf[f"model.layers.{l}.mlp.gate_proj.weight"], hf[f"model.layers.{l}.mlp.up_proj.weight"]])),
        m + "decoder.layers.mlp.linear_fc2.weight": stack(lambda l: hf[f"model.layers.{l}.mlp.down_proj.weight"]),
    }
    if not cfg.get("tie_word_embeddings"):
        out[m + "output_layer.weight"] = hf["lm_head.weight"]
    return out


@pytest.mark.parametrize("shape", ["llama2_mha", "llama3_gqa", "llama32_tied", "codellama", "mistral"])
def test_dcp_equals_plain_torch_mapping(tiny_hf_factory, tmp_path: Path, shape: str) -> None:
    src = tiny_hf_factory(shape, dtype=torch.float32)
    hfnemo.convert(src, tmp_path / "nemo")
    cfg = json.loads((src / "config.json").read_text())
    want = reference_mapping(load_hf_state(src), cfg)
    assert_dcp_equals(tmp_path / "nemo" / "weights", want)
    # One chunk per layer (two for fc1: gate rows, up rows), as Megatron writes them.
    md = FileSystemReader(str(tmp_path / "nemo" / "weights")).read_metadata().state_dict_metadata
    L = cfg["num_hidden_layers"]
    assert len(md["module.decoder.layers.self_attention.linear_qkv.weight"].chunks) == L
    assert len(md["module.decoder.layers.mlp.linear_fc1.weight"].chunks) == 2 * L


def test_model_yaml_config_fields(tiny_hf_factory, tmp_path: Path) -> None:
    """Rope scaling, theta, window and head_dim reach the NeMo config."""
    def conf(shape: str) -> dict:
        out = tmp_path / shape
        hfnemo.convert(tiny_hf_factory(shape), out)
        y = yaml.safe_load((out / "context" / "model.yaml").read_text())
        return {**y["config"], "_model": y["_target_"]}

    c = conf("llama32_tied")
    assert c["scale_factor"] == 32.0 and c["kv_channels"] == 32 and c["share_embeddings_and_output_weights"]
    c = conf("codellama")
    assert c["rotary_base"] == 1e6 and c["num_query_groups"] == 2 and c["_target_"].endswith(".LlamaConfig")
    c = conf("mistral")
    assert c["_model"].endswith("MistralModel") and c["window_size"] == [64, 0]
    c = conf("llama31_rope")
    assert c["_target_"].endswith("Llama31Config") and c["scale_factor"] == 8.0 and c["rotary_base"] == 500000.0
    assert c["vocab_size"] == 1031 and c["make_vocab_size_divisible_by"] == 1  # 1031 is prime: no padding


@pytest.mark.parametrize("model", ["gemma", "phi3", "llama"])
def test_export_with_io_json_only(tmp_path: Path, model: str) -> None:
    """A checkpoint whose context/ lost model.yaml exports from io.json alone (fresh process, so the
    family's config classes are registered on demand, not by an earlier test's import)."""
    import shutil
    import subprocess
    import sys
    nemo = tmp_path / "nemo"
    shutil.copytree(REF / model / "nemo", nemo)
    (nemo / "context" / "model.yaml").unlink()
    r = subprocess.run([sys.executable, "-m", "hfnemo", "export", str(nemo), str(tmp_path / "hf"), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    a, b = load_hf_state(REF / model / "hf"), load_hf_state(tmp_path / "hf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_equals_nvidia_mistral(tmp_path: Path) -> None:
    ours = tmp_path / "nemo"
    hfnemo.convert(REF / "mistral" / "hf", ours)
    want, got = chunk_table(REF / "mistral" / "nemo" / "weights"), chunk_table(ours / "weights")
    assert want.keys() == got.keys() and all(want[k] == got[k] for k in want)
    ref_cfg = yaml.safe_load((REF / "mistral/nemo/context/model.yaml").read_text())
    our_cfg = yaml.safe_load((ours / "context/model.yaml").read_text())
    # The one deliberate difference: hfnemo states vocab_size instead of leaving it to the tokenizer.
    assert ref_cfg["config"].pop("vocab_size") is None and our_cfg["config"].pop("vocab_size") == 320
    assert ref_cfg == our_cfg
    hfnemo.convert(REF / "mistral" / "nemo", tmp_path / "hf")
    a, b = load_hf_state(REF / "mistral" / "hf"), load_hf_state(tmp_path / "hf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
