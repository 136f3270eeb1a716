"""Golden tests: context/ as NVIDIA's importer (NeMo 2.5.3) wrote it for the reference checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hfnemo.errors import CorruptCheckpoint
from hfnemo.io.nemo_configs import BF16, CONFIG_CLASSES, SILU, STRATEGY_CONFIG_ARGS, config_fields
from hfnemo.io.nemo_context import PyRef, _snake, read_context, write_context

REF = Path(__file__).resolve().parent / "data" / "nvidia"  # copied from ../shared/reference
_GPT = "nemo.collections.llm.gpt.model"

# The importer's kwargs for each reference hf/config.json, in the importer's own order (write_context
# puts them in constructor order). Comments: the HF expression NeMo r2.5.0 uses.
IMPORTS: dict[str, dict] = {
    "llama": {  # llama.py HFLlamaImporter.config; rope_scaling None -> LlamaConfig
        "model": PyRef(f"{_GPT}.llama", "LlamaModel"), "config": PyRef(f"{_GPT}.llama", "LlamaConfig"),
        "tokenizer_args": None,
        "args": [
            ("num_layers", 2),  # num_hidden_layers
            ("hidden_size", 256),
            ("ffn_hidden_size", 688),  # intermediate_size
            ("num_attention_heads", 8),
            ("init_method_std", 0.02),  # initializer_range
            ("layernorm_epsilon", 1e-05),  # rms_norm_eps
            ("num_query_groups", 2),  # num_key_value_heads
            ("seq_length", 2048),  # max_position_embeddings
            ("rotary_base", 500000.0),  # rope_theta
            ("gated_linear_unit", True),
            ("make_vocab_size_divisible_by", 128),  # largest power of two <= 128 dividing vocab_size
            ("share_embeddings_and_output_weights", False),  # tie_word_embeddings
            ("fp16", False), ("bf16", True), ("params_dtype", BF16),  # torch_dtype
            ("vocab_size", 1024),
            ("kv_channels", 32),  # head_dim
        ]},
    "qwen2": {  # qwen2.py HFQwen2Importer.config
        "model": PyRef(f"{_GPT}.qwen2", "Qwen2Model"), "config": PyRef(f"{_GPT}.qwen2", "Qwen2Config"),
        "tokenizer_args": [("trust_remote_code", True)],
        "args": [
            ("num_layers", 2), ("hidden_size", 256), ("ffn_hidden_size", 688), ("num_attention_heads", 8),
            ("num_query_groups", 2), ("init_method_std", 0.02), ("layernorm_epsilon", 1e-06),
            ("gated_linear_unit", True), ("make_vocab_size_divisible_by", 128), ("rotary_base", 1000000.0),
            ("share_embeddings_and_output_weights", False), ("vocab_size", 1024), ("seq_length", 2048),
            ("fp16", False), ("bf16", True), ("params_dtype", BF16),
        ]},
    "mixtral": {  # mixtral.py HFMixtralImporter.config
        "model": PyRef(f"{_GPT}.mixtral", "MixtralModel"),
        "config": PyRef(f"{_GPT}.mixtral", "MixtralConfig8x7B"),
        "tokenizer_args": None,
        "args": [
            ("bf16", True), ("activation_func", SILU), ("num_layers", 2), ("hidden_size", 256),
            ("ffn_hidden_size", 512), ("kv_channels", None),  # head_dim (null in config.json)
            ("max_position_embeddings", 2048), ("seq_length", 2048), ("position_embedding_type", "rope"),
            ("rotary_base", 1000000.0), ("num_attention_heads", 8), ("num_query_groups", 2),
            ("num_moe_experts", 4), ("moe_router_topk", 2), ("moe_router_pre_softmax", False),
            ("normalization", "RMSNorm"), ("layernorm_epsilon", 1e-05), ("init_method_std", 0.02),
            ("gated_linear_unit", True), ("make_vocab_size_divisible_by", 128),
            ("use_cpu_initialization", True), ("perform_initialization", False), ("params_dtype", BF16),
        ]},
}
MODELS = sorted(IMPORTS)


def _write(model: str, out: Path) -> Path:
    spec, hf = IMPORTS[model], REF / model / "hf"
    write_context(
        out, model_target=spec["model"], config_target=spec["config"],
        config_args=[*STRATEGY_CONFIG_ARGS, *spec["args"]], tokenizer_dir=hf,
        generation_config=json.loads((hf / "generation_config.json").read_text()),
        tokenizer_args=spec["tokenizer_args"])
    return out


@pytest.fixture(scope="module", params=MODELS)
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, _write(request.param, tmp_path_factory.mktemp(request.param) / "context")


def test_io_json_matches_reference(written: tuple[str, Path]) -> None:
    model, ctx = written
    ref = REF / model / "nemo" / "context" / "io.json"
    assert json.loads((ctx / "io.json").read_text()) == json.loads(ref.read_text())
    assert (ctx / "io.json").read_bytes() == ref.read_bytes()  # same key order and separators, too


def test_model_yaml_matches_reference(written: tuple[str, Path]) -> None:
    model, ctx = written
    ref = REF / model / "nemo" / "context" / "model.yaml"
    assert yaml.safe_load((ctx / "model.yaml").read_text()) == yaml.safe_load(ref.read_text())
    assert (ctx / "model.yaml").read_text() == ref.read_text()


def test_artifacts_copied(written: tuple[str, Path]) -> None:
    model, ctx = written
    hf, ref = REF / model / "hf", REF / model / "nemo" / "context"
    gen = "artifacts/generation_config.json"
    assert (ctx / gen).read_bytes() == (ref / gen).read_bytes()
    assert (ctx / gen).read_bytes() == (hf / "generation_config.json").read_bytes()
    names = sorted(p.name for p in (ctx / "nemo_tokenizer").iterdir())
    assert names == sorted(p.name for p in (ref / "nemo_tokenizer").iterdir())
    for name in names:  # copied as-is (NeMo re-saves them; only special_tokens_map.json then differs)
        assert (ctx / "nemo_tokenizer" / name).read_bytes() == (hf / name).read_bytes()


def test_read_context_roundtrip(written: tuple[str, Path]) -> None:
    model, ctx = written
    ref_ctx = REF / model / "nemo" / "context"
    got = read_context(ctx)
    ref = read_context(ref_ctx)
    assert (got.model_target, got.config_target, got.config, got.generation_config) == \
        (ref.model_target, ref.config_target, ref.config, ref.generation_config)
    assert got.tokenizer_dir == ctx / "nemo_tokenizer"
    assert got.model_target == IMPORTS[model]["model"].target
    raw = yaml.safe_load((ref_ctx / "model.yaml").read_text())["config"]
    assert set(got.config) == set(raw) - {"_target_"}
    for name, value in got.config.items():
        want = raw[name]
        if isinstance(want, dict) and set(want) == {"_target_", "_call_"}:
            want = want["_target_"]
        elif name == "generation_config":
            want = {**want, "auto_cls": want["auto_cls"]["_target_"]}
        assert value == want, name
    assert got.config["params_dtype"] == "torch.bfloat16"
    assert got.config["activation_func"] == "torch.nn.functional.silu"
    assert got.generation_config == json.loads((REF / model / "hf" / "generation_config.json").read_text())


def test_read_context_from_io_json_only(written: tuple[str, Path], tmp_path: Path) -> None:
    model, ctx = written
    shutil.copytree(REF / model / "nemo" / "context", tmp_path / "context")
    (tmp_path / "context" / "model.yaml").unlink()
    assert read_context(tmp_path / "context").config == read_context(ctx).config


@pytest.mark.parametrize("payload", [
    "!!python/object/apply:os.system ['echo pwned']\n",
    "_target_: x\nconfig: !!python/name:os.system\n",
    "config: [1, 2]\n",
    "just a string\n",
])
def test_hostile_model_yaml_rejected(tmp_path: Path, payload: str) -> None:
    (tmp_path / "model.yaml").write_text(payload)
    with pytest.raises(CorruptCheckpoint):
        read_context(tmp_path)


@pytest.mark.parametrize("payload", ['{"root": 1}', "[]", "not json",
                                     ('{"root": {"type": "ref", "key": "a"}, "objects": {"a": '
                                     '{"items": [["Attr(name=\'model\')", {"type": "ref", "key": "a"}]]}}}')])
def test_corrupt_io_json_rejected(tmp_path: Path, payload: str) -> None:
    (tmp_path / "io.json").write_text(payload)
    with pytest.raises(CorruptCheckpoint):
        read_context(tmp_path)


def test_empty_context_rejected(tmp_path: Path) -> None:
    with pytest.raises(CorruptCheckpoint):
        read_context(tmp_path)


def test_mistral_sliding_window_and_fp32_aliasing(tmp_path: Path) -> None:
    """Lists become fiddle list objects; a dtype shared with the optimizer lists every path."""
    mistral = PyRef(f"{_GPT}.mistral", "MistralConfig7B")
    fp32 = PyRef("torch", "float32")
    write_context(tmp_path, model_target=PyRef(f"{_GPT}.mistral", "MistralModel"), config_target=mistral,
                  config_args=[*STRATEGY_CONFIG_ARGS, ("seq_length", 4096), ("window_size", [4096, 0]),
                               ("cp_comm_type", "a2a"), ("params_dtype", fp32), ("generation_config", None)],
                  tokenizer_dir=None, generation_config=None)
    io = json.loads((tmp_path / "io.json").read_text())
    lst = io["objects"]["list_1"]
    assert [v["value"] for _, v in lst["items"]] == [4096, 0]
    assert lst["paths"] == ["<root>.model.config.window_size"]
    dtype = dict(io["objects"]["mistral_config7_b_1"]["items"])["Attr(name='params_dtype')"]
    assert dtype["paths"][0] == "<root>.model.config.params_dtype" and len(dtype["paths"]) == 6
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "nemo_tokenizer").exists()
    from_yaml = read_context(tmp_path)
    assert from_yaml.config["window_size"] == [4096, 0] and from_yaml.tokenizer_dir is None
    (tmp_path / "model.yaml").unlink()
    assert read_context(tmp_path).config == from_yaml.config


def test_write_rejects_unknown_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_context(tmp_path, model_target=IMPORTS["llama"]["model"],
                      config_target=IMPORTS["llama"]["config"], config_args=[("no_such_field", 1)],
                      tokenizer_dir=None, generation_config=None)


def test_tables() -> None:
    assert _snake("MixtralConfig8x7B") == "mixtral_config8x7_b" and _snake("LlamaConfig") == "llama_config"
    llama31 = config_fields(f"{_GPT}.llama.Llama31Config")
    assert list(llama31)[-4:] == ["scale_factor", "low_freq_factor", "high_freq_factor", "old_context_len"]
    assert llama31["init_method_std"] == 0.02 and llama31["rotary_percent"] == 1.0
    for target, cls in CONFIG_CLASSES.items():  # every class resolves, overrides name real fields
        fields = config_fields(target)
        assert cls.model_target.rsplit(".", 1)[1].endswith("Model") and len(fields) >= 210
