"""Config overrides on import (``--set KEY=VALUE``, ``overrides=``, the guide's
``model_config.KEY=VALUE``): written where they are harmless, refused with the key, the value, the
contradicting tensor and the fix where the weights say otherwise."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import load_hf_state

import hfnemo
from hfnemo.cli import main
from hfnemo.errors import ShapeMismatch, UsageError
from hfnemo.overrides import parse_overrides, parse_value


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_hf

    return make_tiny_hf(tmp_path_factory.mktemp("hf"), "llama3_gqa", num_layers=2)


def _model_yaml(out: Path) -> dict:
    return yaml.safe_load((out / "context" / "model.yaml").read_text())["config"]


def test_parse_values() -> None:
    assert [parse_value(v) for v in ("32", "1e6", "0.5", "true", "False", "null", "[4096, 0]", "'x'", "silu")] == \
        [32, 1e6, 0.5, True, False, None, [4096, 0], "x", "silu"]
    assert parse_overrides(["a=1", "model_config.b = x=y"]) == {"a": 1, "model_config.b": "x=y"}
    assert parse_overrides({"seq_length": 8192}) == {"seq_length": 8192}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_overrides(["seq_length"])


def test_harmless_fields_are_written_and_exported_back(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "nemo"
    hfnemo.convert(src, out, overrides={"model_config.seq_length": 8192, "rotary_base": 1e6,
                                        "apply_rope_fusion": False, "hf.use_cache": False})
    cfg = _model_yaml(out)
    assert cfg["seq_length"] == 8192 and cfg["rotary_base"] == 1e6 and cfg["apply_rope_fusion"] is False
    io_json = (out / "context" / "io.json").read_text()
    assert "apply_rope_fusion" in io_json
    kept = json.loads((out / "context" / "artifacts" / "hf_config.json").read_text())
    assert kept["max_position_embeddings"] == 8192 and kept["rope_theta"] == 1e6 and kept["use_cache"] is False
    back = tmp_path / "hf"
    hfnemo.convert(out, back)
    exported = json.loads((back / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert exported["max_position_embeddings"] == 8192 and exported["rope_theta"] == 1e6
    assert exported["use_cache"] is False
    assert {k: v for k, v in exported.items() if k not in ("max_position_embeddings", "rope_theta", "use_cache")} \
        == {k: v for k, v in original.items() if k not in ("max_position_embeddings", "rope_theta", "use_cache")}
    a, b = load_hf_state(src), load_hf_state(back)  # tensors untouched
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_override_keeps_the_source_config_byte_for_byte(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "nemo"
    hfnemo.convert(src, out, overrides={})
    assert (out / "context" / "artifacts" / "hf_config.json").read_bytes() == (src / "config.json").read_bytes()


def test_nemo1_output_carries_overrides(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.nemo"
    hfnemo.convert(src, out, overrides=["seq_length=1024"])
    back = tmp_path / "hf"
    hfnemo.convert(out, back)
    assert json.loads((back / "config.json").read_text())["max_position_embeddings"] == 1024


CONTRADICTIONS = [
    # (override, error, tensor named, words in the message)
    ({"model_config.num_layers": 32}, ShapeMismatch, "model.layers.2.input_layernorm.weight",
     ["model_config.num_layers=32", "2 layers", "set it to 2"]),
    ({"num_layers": 1}, ShapeMismatch, "model.layers.1.input_layernorm.weight", ["num_layers=1", "left over"]),
    ({"hidden_size": 4096}, ShapeMismatch, "model.embed_tokens.weight", ["hidden_size=4096", "set it to 256"]),
    ({"num_query_groups": 4}, ShapeMismatch, "model.layers.0.self_attn.k_proj.weight", ["num_query_groups=4"]),
    ({"kv_channels": 64}, ShapeMismatch, "model.layers.0.self_attn.q_proj.weight", ["kv_channels=64"]),
    ({"ffn_hidden_size": 1024}, ShapeMismatch, "model.layers.0.mlp.gate_proj.weight", ["ffn_hidden_size=1024"]),
    ({"vocab_size": 1024}, ShapeMismatch, "model.embed_tokens.weight", ["vocab_size=1024", "set it to 1000"]),
    ({"hf.num_hidden_layers": 3}, ShapeMismatch, "model.layers.2.input_layernorm.weight", ["hf.num_hidden_layers=3"]),
    ({"hf.tie_word_embeddings": True}, ShapeMismatch, "lm_head.weight", ["output layer of their own"]),
    ({"make_vocab_size_divisible_by": 256}, ShapeMismatch, "model.embed_tokens.weight",
     ["make_vocab_size_divisible_by=256", "1024 rows", "use 8"]),
]


@pytest.mark.parametrize("override,error,tensor,words", CONTRADICTIONS, ids=[next(iter(c[0])) for c in CONTRADICTIONS])
def test_contradicting_overrides_are_refused(src: Path, tmp_path: Path, override, error, tensor, words) -> None:
    with pytest.raises(error) as info:
        hfnemo.convert(src, tmp_path / "out", overrides=override)
    e = info.value
    assert e.tensor == tensor and e.fix
    for w in words:
        assert w in str(e)
    assert not (tmp_path / "out").exists()


REFUSED = [
    ({"num_layer": 2}, "did you mean num_layers"),
    ({"tie_word_embeddings": True}, "hf.tie_word_embeddings"),
    ({"seq_length": "long"}, "an integer"),
    ({"tensor_model_parallel_size": 2}, "--tp"),
    ({"params_dtype": "torch.float16"}, "--dtype"),
    ({"gated_linear_unit": False}, "llama architecture"),
]


@pytest.mark.parametrize("override,words", REFUSED, ids=[next(iter(c[0])) for c in REFUSED])
def test_bad_overrides_are_usage_errors(src: Path, override, words) -> None:
    with pytest.raises(UsageError, match=words.replace(".", r"\.")):
        hfnemo.plan(src, overrides=override)


def test_good_padding_divisor_is_written(src: Path) -> None:
    assert hfnemo.plan(src, overrides={"make_vocab_size_divisible_by": 4}).config["make_vocab_size_divisible_by"] == 4


def test_cli_set_and_errors(src: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nemo"
    assert main(["import", str(src), str(out), "--quiet", "--set", "seq_length=2048", "--set",
                 "model_config.init_method_std=0.01"]) == 0
    cfg = _model_yaml(out)
    assert cfg["seq_length"] == 2048 and cfg["init_method_std"] == 0.01
    capsys.readouterr()
    assert main(["import", str(src), str(tmp_path / "bad"), "--quiet", "--set", "model_config.num_layers=32"]) == 2
    err = capsys.readouterr().err
    assert "model_config.num_layers=32" in err and "tensor: model.layers.2" in err and "fix:" in err
    assert main(["export", str(out), str(tmp_path / "h"), "--quiet", "--set", "seq_length=1"]) == 2
    assert "apply to an import" in capsys.readouterr().err
    assert main(["plan", str(src), "--json", "--set", "seq_length=4096"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["seq_length"] == 4096


def test_guide_llm_import_syntax(src: Path, tmp_path: Path, monkeypatch) -> None:
    import hfnemo.api

    seen = {}
    real = hfnemo.api.convert

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(hfnemo.api, "convert", spy)
    out = tmp_path / "out"
    assert main(["llm", "import", "-y", "model=llama3_8b", f"source=hf://{src}", f"output_path={out}",
                 "model_config.seq_length=1024", "model.config.rotary_base=500000", "trainer.devices=0",
                 "--quiet"]) == 0
    assert seen["device"] == "cpu"
    assert sorted(seen["overrides"]) == ["model.config.rotary_base=500000", "model_config.seq_length=1024"]
    assert _model_yaml(out)["seq_length"] == 1024
    assert main(["llm", "import", "-y", f"source=hf://{src}", f"output_path={tmp_path / 'bad'}",
                 "model_config.num_layers=32", "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()
