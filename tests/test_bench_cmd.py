"""`hfnemo bench`: copy floor + measured conversion on the user's checkpoint, JSON lines, PNG."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
PLOT_HINT = "pip install 'hfnemo[plot]'"


def hfnemo(*args: str, pre: str | None = None) -> subprocess.CompletedProcess:
    """``python -m hfnemo ARGS``; with ``pre``, that code runs first in the same interpreter."""
    if pre is None:
        argv = [sys.executable, "-m", "hfnemo", *args]
    else:
        argv = [sys.executable, "-c", f"{pre}\nimport sys\nfrom hfnemo.cli import main\nsys.exit(main(sys.argv[1:]))",
                *args]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, env=dict(os.environ))


def json_lines(stdout: str) -> dict[str, dict]:
    recs = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return {r["bench"]: r for r in recs}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def scratch_dirs(parent: Path) -> list[Path]:
    return sorted(parent.glob(".hfnemo-bench-*"))


def check_records(recs: dict[str, dict], verb: str, plan: dict, budget: int) -> None:
    assert set(recs) == {"copy_floor", verb}
    floor, conv = recs["copy_floor"], recs[verb]
    # the floor moves exactly the bytes the plan (and the conversion) reads and writes
    assert floor["floor_bytes_read"] == plan["read_bytes"] == floor["read_bytes"]
    assert floor["floor_bytes_written"] == plan["write_bytes"] == floor["write_bytes"]
    assert floor["bytes_match_plan"] is True
    assert floor["files_written"] == len(plan["files"])
    assert conv["report"]["bytes_read"] == plan["read_bytes"] and conv["report"]["bytes_written"] == plan["write_bytes"]
    assert conv["bytes_match_plan"] is True
    assert conv["out_bytes"] >= plan["write_bytes"]
    assert conv["direction"] == plan["direction"] and conv["returncode"] == 0
    for rec in (floor, conv):
        assert rec["wall_s"] > 0 and rec["gb_per_s"] > 0 and len(rec["wall_s_runs"]) == rec["repeat"]
        pc = rec["page_cache"]
        assert pc["method"] == "fadvise_dontneed" and pc["eviction_possible"] in (True, False, None)
        assert len(pc["cached_fraction_before"]) == rec["repeat"]
    assert conv["ratio_to_floor"] == pytest.approx(conv["wall_s"] / floor["wall_s"], rel=1e-2)
    assert conv["max_memory_bytes"] == budget
    assert 0 < conv["peak_pss_bytes"] and conv["peak_over_budget"] == (conv["peak_pss_bytes"] > budget)
    # (rounded to 4 decimals: an export without torch peaks at ~1 % of a 2 GiB budget)
    assert conv["peak_to_budget"] == pytest.approx(conv["peak_pss_bytes"] / budget, rel=1e-3, abs=5e-5)
    tl = conv["timeline"]
    assert len(tl["t_s"]) == len(tl["out_bytes"]) == len(tl["pss_bytes"]) >= 2
    assert tl["t_s"] == sorted(tl["t_s"]) and tl["out_bytes"][-1] == conv["out_bytes"]
    assert max(tl["pss_bytes"]) == conv["peak_pss_bytes"] or conv["samples"] > len(tl["t_s"])
    assert conv["samples"] >= 2


def test_bench_both_directions_json_and_png(tiny_hf_factory, tmp_path: Path) -> None:
    src = tiny_hf_factory("llama3_gqa")
    plan = json.loads(hfnemo("plan", str(src), "--json").stdout)
    png = tmp_path / "import.png"
    out = tmp_path / "nemo_out"
    r = hfnemo("bench", str(src), "--to", "nemo", "--out", str(out), "--max-memory", "1GiB", "--json", "--keep",
               "--repeat", "2", "--png", str(png))
    if not HAS_MPL:
        assert r.returncode == 2 and PLOT_HINT in r.stderr, r.stderr
        assert not scratch_dirs(tmp_path)
        r = hfnemo("bench", str(src), "--to", "nemo", "--out", str(out), "--max-memory", "1GiB", "--json", "--keep",
                   "--repeat", "2")
    assert r.returncode == 0, r.stderr
    recs = json_lines(r.stdout)
    check_records(recs, "import", plan, 1 << 30)
    conv = recs["import"]
    if HAS_MPL:
        assert conv["png"] == str(png) and png_size(png) == (1000, 600)
    # --keep: the scratch directory beside --out, with the conversion's output in it
    kept = Path(conv["kept"])
    assert kept.parent == tmp_path and scratch_dirs(tmp_path) == [kept]
    nemo = Path(conv["kept_output"])
    assert (nemo / "weights" / ".metadata").is_file() and (nemo / "context").is_dir()

    # export of the kept checkpoint; no --keep: the scratch directory is gone afterwards
    plan = json.loads(hfnemo("plan", str(nemo), "--json").stdout)
    r = hfnemo("bench", str(nemo), "--to", "hf", "--out", str(tmp_path / "hf_out"), "--json")
    assert r.returncode == 0, r.stderr
    recs = json_lines(r.stdout)
    check_records(recs, "export", plan, 2 << 30)
    assert recs["export"]["kept"] is None and recs["export"]["png"] is None
    assert scratch_dirs(tmp_path) == [kept]
    shutil.rmtree(kept)


def test_bench_text_summary(tiny_hf_factory, tmp_path: Path) -> None:
    src = tiny_hf_factory("llama3_gqa")
    r = hfnemo("bench", str(src), "--out", str(tmp_path / "o"), "--max-memory", "1GiB")
    assert r.returncode == 0, r.stderr
    assert "copy floor" in r.stdout and "x the floor" in r.stdout and "of 1.00 GiB budget" in r.stdout
    assert "page cache" in r.stdout
    assert not scratch_dirs(tmp_path)


def test_bench_png_without_matplotlib(tiny_hf_factory, tmp_path: Path) -> None:
    src = tiny_hf_factory("llama3_gqa")
    block = "import sys\nsys.modules['matplotlib'] = None  # import matplotlib -> ImportError"
    r = hfnemo("bench", str(src), "--out", str(tmp_path / "o"), "--png", str(tmp_path / "p.png"), pre=block)
    assert r.returncode == 2 and PLOT_HINT in r.stderr and "matplotlib" in r.stderr, r.stderr
    assert not (tmp_path / "p.png").exists() and not scratch_dirs(tmp_path)


def test_bench_usage_errors(tmp_path: Path) -> None:
    r = hfnemo("bench", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "m").mkdir()
    r = hfnemo("bench", str(tmp_path / "m"), "--repeat", "0")
    assert r.returncode == 2 and "--repeat" in r.stderr


def test_timeline_ends_at_the_wall_when_a_sample_straddles_the_exit(tmp_path: Path, monkeypatch) -> None:
    """A sample that is still reading when the child exits must not land after the wall.

    The sampler thread's first sample (the second reading; start() takes the first itself)
    is made to outlast the child: it sleeps after its reading, so it is in flight when
    wait4 returns: the race CI once hit by chance, forced here.
    """
    import time

    from hfnemo import bench

    mw = bench._memwatch()
    orig = mw.PeakMemorySampler.sample
    calls = []

    def slow_sample(self):
        pss = orig(self)
        calls.append(pss)
        if len(calls) == 2:
            time.sleep(0.6)  # the child (0.3 s) exits meanwhile
        return pss

    monkeypatch.setattr(mw.PeakMemorySampler, "sample", slow_sample)
    h = object.__new__(bench._Harness)
    h.mw, h.run, h.env = mw, tmp_path, dict(os.environ)
    root = tmp_path / "out"
    root.mkdir()
    res = h.measure([sys.executable, "-c", "import time; time.sleep(0.3)"], root)
    assert res["returncode"] == 0 and len(calls) >= 2
    t = [p[0] for p in res["points"]]
    assert t == sorted(t) and t[-1] == res["wall_s"] and all(x < res["wall_s"] for x in t[:-1]), (t, res["wall_s"])
    tl = bench._timeline(res["points"])
    assert tl["t_s"] == sorted(tl["t_s"])
