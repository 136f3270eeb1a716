"""The command line: NVIDIA's guide command lines verbatim, exit codes, JSON, clear errors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import load_hf_state


def hfnemo(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfnemo", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_guide_command_lines_verbatim(tiny_hf_factory, tmp_path: Path) -> None:
    src = tiny_hf_factory("llama3_gqa")
    out, back = tmp_path / "llama3_8b_nemo", tmp_path / "hf_out"
    r = hfnemo("llm", "import", "-y", "model=llama3_8b", f"source=hf://{src}", f"output_path={out}")
    assert r.returncode == 0, r.stderr
    r = hfnemo("llm", "export", "-y", f"path={out}", f"output_path={back}", "target=hf")
    assert r.returncode == 0, r.stderr
    a, b = load_hf_state(src), load_hf_state(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_export_json_and_quiet(tiny_hf_factory, tmp_path: Path) -> None:
    src = tiny_hf_factory("mistral")
    r = hfnemo("import", str(src), str(tmp_path / "n"), "--json", "--quiet", "--max-memory", "1GiB")
    assert r.returncode == 0 and r.stderr == ""
    rep = json.loads(r.stdout)
    assert rep["direction"] == "hf_to_nemo" and rep["arch"] == "mistral" and rep["bytes_written"] > 0
    assert rep["peak_rss_bytes"] <= rep["max_memory_bytes"]
    r = hfnemo("export", str(tmp_path / "n"), str(tmp_path / "h"), "--json", "--quiet", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["direction"] == "nemo_to_hf"
    assert all(t.dtype == torch.float32 for t in load_hf_state(tmp_path / "h").values())


def test_plan_is_a_dry_run(tiny_hf_factory, tmp_path: Path) -> None:
    src = tiny_hf_factory("llama3_gqa")
    before = tree_hash(src)
    r = hfnemo("plan", str(src), "--json", "--max-memory", "1GiB")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["direction"] == "hf_to_nemo" and p["read_bytes"] == p["write_bytes"]
    assert p["peak_memory_bytes"] <= 1 << 30 and p["free_disk_bytes"] > 0 and p["disk_ok"]
    qkv = [i for i in p["items"] if i["key"].endswith("linear_qkv.weight")]
    assert qkv and qkv[0]["transform"] == "qkv_interleave" and len(qkv[0]["sources"]) == 3
    r = hfnemo("plan", str(src), "--tensors")
    assert r.returncode == 0 and "qkv_interleave" in r.stdout and "memory:" in r.stdout and "disk:" in r.stdout
    assert tree_hash(src) == before
    assert not any(tmp_path.iterdir())


def test_export_latest_training_run(tiny_hf_factory, tmp_path: Path) -> None:
    import time
    src = tiny_hf_factory("llama2_mha")
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    assert hfnemo("import", str(src), str(run / "model--step=10-last")).returncode == 0
    time.sleep(0.05)
    assert hfnemo("import", str(src), str(run / "model--step=20-last")).returncode == 0
    shutil.copytree(run / "model--step=20-last", run / "model--step=20")  # not a *-last: ignored
    r = hfnemo("latest", str(tmp_path / "run"))
    assert r.returncode == 0 and r.stdout.strip().endswith("model--step=20-last")
    r = hfnemo("export", "--latest", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert load_hf_state(tmp_path / "hf").keys() == load_hf_state(src).keys()
    r = hfnemo("export", str(tmp_path / "run"), str(tmp_path / "hf2"))
    assert r.returncode == 2 and "--latest" in r.stderr


def test_archs_lists_supported() -> None:
    r = hfnemo("archs")
    assert r.returncode == 0 and "LlamaForCausalLM" in r.stdout and "MistralForCausalLM" in r.stdout


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


BAD_INPUTS = {
    # name: (mutation, expected words in the message)
    "unsupported_arch": (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]), ["GPT2LMHeadModel",
                                                                                         "LlamaForCausalLM"]),
    "missing_config": (lambda d: (d / "config.json").unlink(), ["config.json", "missing"]),
    "bad_json_config": (lambda d: (d / "config.json").write_text("{nope"), ["config.json", "JSON"]),
    "missing_field": (lambda d: _edit_config(d, hidden_size=None), ["hidden_size"]),
    "wrong_layers": (lambda d: _edit_config(d, num_hidden_layers=3), ["model.layers.2", "missing"]),
    "wrong_heads": (lambda d: _edit_config(d, num_key_value_heads=4), ["k_proj", "shape"]),
    "truncated_shard": (lambda d: _truncate(d / "model.safetensors", 100), ["model.safetensors"]),
    "header_too_long": (lambda d: _patch(d / "model.safetensors", 0, (10**9).to_bytes(8, "little")),
                        ["header length"]),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), ["model.safetensors"]),
}


def _edit_config(d: Path, **kv) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in kv.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(p: Path, n: int) -> None:
    os.truncate(p, p.stat().st_size - n)


def _patch(p: Path, at: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(at)
        f.write(data)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exit_2_clear_message_nothing_written(tiny_hf_factory, tmp_path: Path, case: str) -> None:
    src = _copy(tiny_hf_factory("llama3_gqa"), tmp_path / "src")
    mutate, words = BAD_INPUTS[case]
    mutate(src)
    before = tree_hash(src)
    out = tmp_path / "out"
    r = hfnemo("import", str(src), str(out))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "fix:" in r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    assert tree_hash(src) == before
    rv = hfnemo("import", str(src), str(out), "-v")
    assert rv.returncode == 2 and "Traceback" in rv.stderr


def test_existing_output_needs_overwrite_and_input_never_inside_output(tiny_hf_factory, tmp_path: Path) -> None:
    src = tiny_hf_factory("llama2_mha")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    r = hfnemo("import", str(src), str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr and (out / "keep").exists()
    assert hfnemo("import", str(src), str(out), "--overwrite").returncode == 0
    assert not (out / "keep").exists() and (out / "weights" / ".metadata").exists()
    r = hfnemo("import", str(src), str(src.parent), "--overwrite")
    assert r.returncode == 2 and "inside" in r.stderr
    r = hfnemo("import", str(src), str(src / "sub"))
    assert r.returncode == 2 and "inside" in r.stderr


def test_bad_sizes_are_usage_errors(tiny_hf_factory, tmp_path: Path) -> None:
    src = tiny_hf_factory("llama2_mha")
    r = hfnemo("import", str(src), str(tmp_path / "o"), "--max-memory", "lots")
    assert r.returncode == 2 and "max-memory" in r.stderr
    r = hfnemo("import", str(src), str(tmp_path / "o"), "--max-memory", "120MiB")  # below torch's own footprint
    assert r.returncode == 2 and "too small" in r.stderr and not (tmp_path / "o").exists()
