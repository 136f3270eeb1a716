"""The start-up read-ahead (hfnemo.prefetch) and the cheap CLI import it relies on.

Timings are never asserted: what is checked is that the read-ahead is bounded, stops (on its cap,
on a stop request, on any error) without disturbing anything, can be switched off, never changes a
conversion's output, and maps nothing into the process."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hfnemo import memwatch, prefetch
from hfnemo.cli import _common

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFNEMO_PREFETCH")}
    env["PYTHONPATH"] = os.pathsep.join([SRC] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(kw)
    return env


def _files(tmp_path: Path, sizes: list[int]) -> list[str]:
    out = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(os.urandom(n))
        out.append(str(p))
    return out


@pytest.mark.parametrize("mode", ["willneed", "pread"])
def test_bounded_by_cap(tmp_path: Path, mode: str) -> None:
    files = _files(tmp_path, [3 << 20, 3 << 20])
    p = prefetch.Prefetch(files, cap=4 << 20, mode=mode, chunk=1 << 20).start()
    p.join(30)
    assert not p.running and p.reason == "cap" and p.issued == 4 << 20
    p = prefetch.Prefetch(files, cap=1 << 30, mode=mode, chunk=1 << 20).start()
    p.join(30)
    assert p.reason == "done" and p.issued == 6 << 20  # never past the end of the files
    p = prefetch.Prefetch(files, cap=0, mode=mode).start()
    p.join(30)
    assert p.issued == 0


def test_stop_request_ends_it(tmp_path: Path) -> None:
    files = _files(tmp_path, [1 << 20])
    p = prefetch.Prefetch(files * 10000, cap=1 << 40, mode="pread", chunk=4096)
    p.stop()  # set before the first chunk: it reads nothing
    p.start().join(30)
    assert p.reason == "stopped" and p.issued == 0


@pytest.mark.parametrize("mode", ["willneed", "pread"])
def test_errors_end_it_silently(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(tmp_path, [1 << 20])
    p = prefetch.Prefetch([files[0], str(tmp_path / "gone.bin")], cap=1 << 30, mode=mode).start()
    p.join(30)
    assert p.reason.startswith("error: FileNotFoundError") and p.issued == 1 << 20

    def boom(*a: object) -> None:
        raise OSError(22, "no")

    monkeypatch.setattr(os, "posix_fadvise", boom)
    monkeypatch.setattr(os, "preadv", boom)
    p = prefetch.Prefetch(files, cap=1 << 30, mode=mode).start()
    p.join(30)
    assert p.reason.startswith("error: OSError") and p.issued == 0


def test_switch_and_cap_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for off in ("0", "off", "no", "false", " OFF "):
        assert prefetch.cap_from_env({prefetch.ENV: off}) == 0
    default = prefetch.cap_from_env({})
    assert 0 < default <= prefetch.DEFAULT_CAP
    avail = prefetch.mem_available()
    if avail is not None:
        assert default <= avail // prefetch.MEM_FRACTION
    assert prefetch.cap_from_env({prefetch.ENV: "1"}) == default
    assert prefetch.cap_from_env({prefetch.ENV: "256MiB"}) == 256 << 20
    with pytest.raises(ValueError):
        prefetch.cap_from_env({prefetch.ENV: "lots"})
    monkeypatch.setenv(prefetch.ENV, "lots")  # a bad value: no read-ahead, no error
    assert prefetch.start_for_argv(["import", "a", "b"], _common) is None


def _hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    for n in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "consolidated.safetensors"):
        (d / n).write_bytes(b"\0" * 4096)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "lm_head.weight": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors"}}))
    return d


def test_source_files_order(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path)
    assert [Path(f).name for f in prefetch.source_files(str(hf))] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # not index order, not unlisted
    nemo = tmp_path / "nemo"
    (nemo / "weights").mkdir(parents=True)
    for n in ("__0_10.distcp", "__0_2.distcp", "__0_0.distcp", ".metadata", "common.pt"):
        (nemo / "weights" / n).write_bytes(b"x")
    assert [Path(f).name for f in prefetch.source_files(str(nemo))] == ["__0_0.distcp", "__0_2.distcp", "__0_10.distcp"]
    assert [Path(f).name for f in prefetch.source_files(str(nemo / "weights"))][0] == "__0_0.distcp"
    assert prefetch.source_files(str(tmp_path / "missing")) == []
    assert prefetch.source_files(str(hf / "model.safetensors.index.json")) == []  # a file: not read ahead


def test_source_of_command_lines(tmp_path: Path) -> None:
    hf = str(_hf_dir(tmp_path))

    def src(*argv: str) -> str | None:
        try:
            return prefetch._source_of(list(argv), _common)
        except ValueError:  # does not parse (start_for_argv then starts nothing)
            return None

    assert src("import", hf, "out") == hf
    assert src("import", "--max-memory", "1GiB", "--tp", "8", hf, "out") == hf  # option values are no paths
    assert src("import", "--dtype", "bf16", hf, "out", "--quiet") == hf
    assert src("reshard", hf, "out", "--tp", "2") == hf
    assert src("export", hf, "out") == hf
    assert src("export", "--latest", hf, "out") is None
    assert src("llm", "import", "model=llama3_8b", f"source=hf://{hf}", "output_path=o") == f"hf://{hf}"
    assert src("llm", "export", f"path={hf}", "output_path=o") == hf
    for argv in (["plan", hf], ["inspect", hf], ["verify", hf, hf], [], ["import", "--bogus-choice"],
                 ["import", "--dtype", "int3", hf, "o"], ["--help"], ["import", "-h"]):
        assert src(*argv) is None, argv
    assert prefetch._local(f"hf://{hf}") == hf and prefetch._local("meta-llama/Llama-3-8B") is None


def test_start_for_argv_and_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = str(_hf_dir(tmp_path))
    monkeypatch.delenv(prefetch.ENV, raising=False)
    p = prefetch.start_for_argv(["import", hf, str(tmp_path / "o")], _common)
    assert p is not None and p is prefetch.last
    p.join(30)
    assert p.reason == "done" and p.issued == 2 * 4096
    monkeypatch.setenv(prefetch.ENV, "0")
    assert prefetch.start_for_argv(["import", hf, str(tmp_path / "o")], _common) is None
    monkeypatch.setenv(prefetch.ENV, "1")
    assert prefetch.start_for_argv(["plan", hf], _common) is None
    assert prefetch.start_for_argv(["import", "org/name", "o"], _common) is None


def test_first_source_read_stops_it(tiny_hf_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hfnemo

    src = tiny_hf_factory("llama3_gqa")
    p = prefetch.Prefetch([str(f) for f in sorted(src.glob("*.safetensors"))], cap=1 << 30)  # never started
    monkeypatch.setattr(prefetch, "last", p)
    hfnemo.convert(src, tmp_path / "n", max_memory="64GiB")  # in-process: the pytest process is large by then
    assert p._stop.is_set()


def _tree(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def test_conversion_identical_with_and_without(tiny_hf_factory, tmp_path: Path) -> None:
    src = tiny_hf_factory("llama3_gqa")
    out, back = tmp_path / "n", tmp_path / "h"  # the same paths every run: .metadata records its own
    imports, exports = [], []
    for i, env in enumerate([{prefetch.ENV: "0"}, {}, {prefetch.ENV_MODE: "pread", prefetch.ENV: "64KiB"}]):
        r = subprocess.run([sys.executable, "-m", "hfnemo", "import", str(src), str(out), "--quiet", "--tp", "2",
                            "--max-memory", "1GiB", "--overwrite"], capture_output=True, text=True, timeout=300,
                           env=_env(HFNEMO_PREFETCH_DEBUG="1", **env))
        assert r.returncode == 0, r.stderr
        assert ("hfnemo prefetch" in r.stderr) == (i > 0), r.stderr
        imports.append(_tree(out))
        r = subprocess.run([sys.executable, "-m", "hfnemo", "export", str(out), str(back), "--quiet", "--overwrite"],
                           capture_output=True, text=True, timeout=300, env=_env(HFNEMO_PREFETCH_DEBUG="1", **env))
        assert r.returncode == 0, r.stderr
        assert ("hfnemo prefetch" in r.stderr) == (i > 0), r.stderr
        exports.append(_tree(back))
    assert imports[0] == imports[1] == imports[2] and exports[0] == exports[1] == exports[2]


def test_cli_import_is_light() -> None:
    code = textwrap.dedent("""
        import sys
        import hfnemo.cli
        heavy = sorted(m for m in ("torch", "numpy", "safetensors", "transformers", "hfnemo.api") if m in sys.modules)
        assert not heavy, heavy
        import hfnemo
        assert "hfnemo.api" not in sys.modules
        import hfnemo.plan.planner                  # binds the subpackage; hfnemo.plan stays the function
        assert callable(hfnemo.plan) and hfnemo.plan.__module__ == "hfnemo.api", hfnemo.plan
        from hfnemo import convert, inspect, verify, ConversionError, iter_tensors, backup, Report
        assert convert is hfnemo.convert and convert.__module__ == "hfnemo.api"
        assert inspect.__module__ == "hfnemo.tools.inspect" and verify.__module__ == "hfnemo.tools.verify"
        ns = {}
        exec("from hfnemo import *", ns)
        assert set(hfnemo.__all__) <= set(ns) and set(hfnemo.__all__) <= set(dir(hfnemo))
        try:
            hfnemo.no_such_name
        except AttributeError:
            pass
        else:
            raise SystemExit("no AttributeError")
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("mode", ["willneed", "pread"])
def test_maps_nothing_into_the_process(tmp_path: Path, mode: str) -> None:
    """Summed PSS (what the budget counts) stays at a bare interpreter's while 128 MiB is read ahead."""
    files = _files(tmp_path, [64 << 20, 64 << 20])
    memwatch.evict_page_cache(files)
    code = (f"import sys; sys.path.insert(0, {SRC!r}); from hfnemo import prefetch; "
            f"p = prefetch.Prefetch({files!r}, cap=1 << 30, mode={mode!r}).start(); p.join(); "
            f"assert p.reason == 'done' and p.issued == 128 << 20, p.reason")
    m = memwatch.run_and_measure([sys.executable, "-c", code], interval=0.005)
    assert m.returncode == 0, m.stderr
    assert m.peak_pss_bytes < 48 << 20, m.peak_pss_bytes
