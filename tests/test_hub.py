"""``hf://ORG/NAME`` and bare ``ORG/NAME`` sources through huggingface_hub's cache. Never touches
the network: the cache is populated by hand in the layout huggingface_hub reads
(``models--ORG--NAME/refs/main`` + ``snapshots/<commit>/``) and HF_HUB_OFFLINE=1."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import load_hf_state

import hfnemo
from hfnemo import hub
from hfnemo.cli import main
from hfnemo.errors import UsageError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_hf

    return make_tiny_hf(tmp_path_factory.mktemp("hf"), "llama3_gqa", num_layers=2)


@pytest.fixture()
def cache(src: Path, tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "hub"
    repo = root / "models--tiny-org--tiny-llama"
    shutil.copytree(src, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def _same_model(a: Path, b: Path) -> bool:
    x, y = load_hf_state(a), load_hf_state(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("spelling", ["hf://tiny-org/tiny-llama", "tiny-org/tiny-llama", f"tiny-org/tiny-llama@{COMMIT}"])
def test_hub_id_resolves_from_the_cache_offline(src: Path, cache: Path, tmp_path: Path, monkeypatch,
                                                spelling: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_source(spelling) == cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    report = hfnemo.convert(spelling, tmp_path / "nemo")
    assert report.source.endswith(COMMIT)
    hfnemo.convert(tmp_path / "nemo", tmp_path / "back")
    assert _same_model(src, tmp_path / "back")


def test_guide_command_line_with_a_hub_id(src: Path, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["llm", "import", "-y", "model=llama3_8b", "source=hf://tiny-org/tiny-llama", f"output_path={out}",
                 "--quiet"]) == 0
    assert (out / "weights" / ".metadata").is_file()


def test_missing_model_offline_names_cache_and_fix(cache: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as info:
        hfnemo.convert("hf://tiny-org/absent", tmp_path / "out")
    e = info.value
    assert e.file == str(cache / "models--tiny-org--absent")
    assert "HF_HUB_OFFLINE" in str(e) and "huggingface-cli download tiny-org/absent" in e.fix
    assert main(["import", "tiny-org/absent", str(tmp_path / "out"), "--quiet"]) == 2
    assert "models--tiny-org--absent" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_local_paths_stay_local(src: Path, cache: Path, tmp_path: Path, monkeypatch) -> None:
    local = tmp_path / "tiny-org" / "tiny-llama"
    shutil.copytree(src, local)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_source("tiny-org/tiny-llama") == Path("tiny-org/tiny-llama")  # a local dir wins
    assert hub.resolve_source("hf://tiny-org/tiny-llama") == Path("tiny-org/tiny-llama")
    assert hub.resolve_source(f"hf://{local}") == local  # hf:///abs/path
    assert hub.resolve_source("./not/there") == Path("not/there")  # not hub-shaped: the caller says "does not exist"
    with pytest.raises(UsageError, match="neither a local directory nor a Hub model id"):
        hub.resolve_source("hf://a/b/c")


def test_download_arguments(monkeypatch, tmp_path: Path) -> None:
    """Online, snapshot_download gets the cache, the token and the files a conversion reads (mocked:
    no network)."""
    import huggingface_hub

    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hub.download("meta-llama/Llama-3.2-1B@v1") == tmp_path
    assert seen["repo_id"] == "meta-llama/Llama-3.2-1B" and seen["revision"] == "v1"
    assert seen["cache_dir"] == str(tmp_path / "home" / "hub") and seen["token"] == "hf_secret"
    assert seen["local_files_only"] is False
    pats = seen["allow_patterns"]
    assert {"*.safetensors", "*.safetensors.index.json", "config.json", "tokenizer.json"} <= set(pats)
    assert not any(p.endswith((".bin", ".pth", ".pt")) for p in pats)
