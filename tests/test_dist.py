"""Many processes write one checkpoint (hfnemo.dist, issue 8): two and three gloo ranks on this
machine, started by ``--workers N`` / ``workers=N`` or by torchrun, give the tensors a single
process gives, bit for bit; a rank killed mid-run leaves a staging directory the same command
resumes to the same bytes."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import clean, tree
from test_reference import load_dcp
from tiny_models import load_hf_state

import hfnemo
from hfnemo import dist
from hfnemo.errors import ConversionError, ResumeMismatch
from hfnemo.exec.staging import staging_dir
from hfnemo.io.dcp import read_index
from hfnemo.manifest import check_manifest

CLI = [sys.executable, "-m", "hfnemo"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def hf_src(tiny_hf_factory) -> Path:
    # 4 layers, several source shards, GQA: ~8 MB of bf16
    return tiny_hf_factory("llama3_gqa", num_layers=4, max_shard_size="2MB")


@pytest.fixture(scope="module")
def single(hf_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "nemo"
    hfnemo.convert(hf_src, out)
    return out


def _writer_files(weights: Path) -> set[str]:
    return {c.file for g in read_index(weights).tensors.values() for c in g.chunks}


@pytest.mark.parametrize("n", [2, 3])
def test_import_ranks_bit_identical(hf_src: Path, single: Path, tmp_path: Path, n: int) -> None:
    out = tmp_path / "nemo"
    report = hfnemo.convert(hf_src, out, workers=n)
    assert report.bytes_written == hfnemo.plan(hf_src).write_bytes
    want, got = load_dcp(single / "weights"), load_dcp(out / "weights")  # torch's own reader
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    # every rank wrote its own __<rank>_<i>.distcp files, and .metadata points into all of them
    files = _writer_files(out / "weights")
    assert {f.split("_")[2] for f in files} == {str(r) for r in range(n)}
    assert sorted(p.name for p in (out / "weights").glob("*.distcp")) == sorted(
        f"__{r}_{i}.distcp" for r in range(n) for i in range(2))
    # the side files are the single process's, the manifest checks out, no journal is left
    for rel in ("context/model.yaml", "context/io.json", "weights/common.pt", "weights/metadata.json"):
        assert (out / rel).read_bytes() == (single / rel).read_bytes(), rel
    assert check_manifest(out) == []
    assert not list(out.rglob("hfnemo-journal*")) and not staging_dir(out).exists()
    # and back to HF: the original tensors
    back = tmp_path / "hf"
    hfnemo.convert(out, back)
    a, b = load_hf_state(hf_src), load_hf_state(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("n", [2, 3])
def test_export_ranks_byte_identical(single: Path, tmp_path: Path, n: int) -> None:
    one, many = tmp_path / "one", tmp_path / "many"
    hfnemo.convert(single, one, max_shard_size="1MB")
    hfnemo.convert(single, many, max_shard_size="1MB", workers=n)
    assert len(list(one.glob("*.safetensors"))) >= 3 * n  # every rank had shards to write
    assert tree(one) == tree(many)  # shards, index, config, tokenizer and manifest, byte for byte


def test_legacy_and_reshard_ranks_byte_identical(hf_src: Path, single: Path, tmp_path: Path) -> None:
    """Files handed out whole: a Megatron-LM TP=2 PP=2 import by three ranks is the single
    process's, file for file; a reshard of the NeMo 2 checkpoint to TP=2 by two ranks has its tensors."""
    one, many = tmp_path / "m1", tmp_path / "m3"
    hfnemo.convert(hf_src, one, format="megatron", tp=2, pp=2)
    hfnemo.convert(hf_src, many, format="megatron", tp=2, pp=2, workers=3)
    assert tree(one) == tree(many)
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    hfnemo.reshard(single, r1, tp=2)
    hfnemo.reshard(single, r2, tp=2, workers=2)
    want, got = load_dcp(r1 / "weights"), load_dcp(r2 / "weights")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert read_index(r1 / "weights").tensors.keys() == read_index(r2 / "weights").tensors.keys()
    for k, g in read_index(r1 / "weights").tensors.items():  # the same TP chunks, in other files
        assert sorted(c.offsets for c in g.chunks) == sorted(c.offsets for c in read_index(r2 / "weights").tensors[k].chunks)


def test_cli_workers_and_torchrun(hf_src: Path, single: Path, tmp_path: Path) -> None:
    r = subprocess.run(CLI + ["import", str(hf_src), str(tmp_path / "w"), "--workers", "2", "--json"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0]["output"] == str(tmp_path / "w")  # rank 0 alone reports
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port",
                        str(dist._free_port()), "-m", "hfnemo", "import", str(hf_src), str(tmp_path / "t"), "--quiet"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    want = load_dcp(single / "weights")
    for out in ("w", "t"):
        got = load_dcp(tmp_path / out / "weights")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), out
    assert len(_writer_files(tmp_path / "t" / "weights")) == 6


def test_error_reported_once_nothing_left(hf_src: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in hf_src.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.unlink()
    r = subprocess.run(CLI + ["import", str(bad), str(tmp_path / "out"), "--workers", "2"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("hfnemo: error:") == 1, r.stderr
    assert shard.name in r.stderr and "fix:" in r.stderr
    assert not (tmp_path / "out").exists() and not staging_dir(tmp_path / "out").exists()


@pytest.mark.slow
def test_rank_killed_resumes_byte_identical(hf_src: Path, tmp_path: Path) -> None:
    """SIGKILL one rank of two at a seeded write (rank 0 or 1); the survivor stops, no output is
    published, the staging directory stays; the same conversion resumes from it and gives the
    bytes of an uninterrupted two-rank run."""
    from dist_helpers import convert_killing

    dst = tmp_path / "out"
    hfnemo.convert(hf_src, dst, workers=2)  # the reference, at the same path (.metadata names it)
    want = tree(dst)
    rng = random.Random(8)
    resumed = 0
    block = 16384
    os.environ["WORLD_SIZE"] = "2"
    try:
        plan = hfnemo.plan(hf_src)
    finally:
        del os.environ["WORLD_SIZE"]
    # a lower bound of each rank's output writes: one per row block of each of its items
    writes = [sum(-(-i.nbytes // block) for i in dist.share(plan, r, 2).items) for r in range(2)]
    assert min(writes) > 100
    trials = [(0, 3), (1, 5)] + [(r, rng.randrange(10, int(writes[r] * 0.9))) for r in (0, 1, 1)]
    for kill_rank, at in trials:
        clean(dst)
        with pytest.raises(ConversionError, match=f"rank {kill_rank} of 2 was killed by signal 9"):
            dist.spawn(2, convert_killing, kill_rank, at, hf_src, dst, block)
        staging = staging_dir(dst)
        assert not dst.exists() and staging.is_dir()
        assert {p.name for p in staging.glob("hfnemo-journal-*.jsonl")} <= {"hfnemo-journal-0.jsonl",
                                                                          "hfnemo-journal-1.jsonl"}
        report = hfnemo.convert(hf_src, dst, workers=2)
        resumed += report.resumed_bytes > 0
        assert tree(dst) == want, (kill_rank, at)
        assert not staging.exists()
    assert resumed >= 3  # most trials kept work (the earliest kills may find nothing committed)


def test_resume_with_other_world_refused(hf_src: Path, tmp_path: Path) -> None:
    from dist_helpers import convert_killing

    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match="killed"):
        dist.spawn(2, convert_killing, 1, 200, hf_src, dst, 16384)
    with pytest.raises(ResumeMismatch, match="different plan"):
        hfnemo.convert(hf_src, dst, workers=3)
    with pytest.raises(ResumeMismatch, match="written by 2 or more ranks"):
        hfnemo.convert(hf_src, dst)  # one process does not throw the ranks' work away unasked
    hfnemo.convert(hf_src, dst, workers=3, restart=True)
    assert check_manifest(dst) == [] and len(_writer_files(dst / "weights")) == 6


def test_owners_balanced(hf_src: Path, single: Path) -> None:
    """Shares by size: DCP files by their writer prefix, spread by bytes; HF shards whole,
    largest first, never a rank more than one shard above another."""
    os.environ["WORLD_SIZE"] = "4"
    try:
        plan = hfnemo.plan(hf_src)
    finally:
        del os.environ["WORLD_SIZE"]
    own = dist.owners(plan, 4)
    assert all(own[f] == int(f.split("_")[2]) for f in plan.files)
    loads = [sum(i.nbytes for i in dist.share(plan, r, 4).items) for r in range(4)]
    biggest = max(i.nbytes for i in plan.items)
    assert sum(loads) == plan.write_bytes and max(loads) - min(loads) <= biggest
    exp = hfnemo.plan(single, max_shard_size="1MB")
    for n in (2, 3, 5):
        shares = [dist.share(exp, r, n) for r in range(n)]
        assert sorted(f for s in shares for f in s.files) == sorted(exp.files)
        assert sum(len(s.items) for s in shares) == len(exp.items)
        sizes = {f: sum(i.nbytes for i in exp.items if i.file == f) for f in exp.files}
        loads = [sum(sizes[f] for f in s.files) for s in shares]
        assert max(loads) - min(loads) <= max(sizes.values())
    with pytest.raises(ConversionError, match="laid out for 4 writers"):
        os.environ["WORLD_SIZE"] = "4"
        try:
            p4 = hfnemo.plan(hf_src)
        finally:
            del os.environ["WORLD_SIZE"]
        dist.owners(p4, 2)


@pytest.mark.slow
def test_memory_budget_holds_per_rank(tmp_path: Path) -> None:
    """Two ranks under --max-memory 512MiB, one of them streaming a 573 MB embedding: the process
    tree (launcher and both ranks, summed PSS) stays under two budgets."""
    from test_memory_bound import BUDGET, build_big_embedding_model

    from hfnemo.memwatch import run_and_measure

    src = tmp_path / "hf"
    build_big_embedding_model(src)
    m = run_and_measure(CLI + ["import", str(src), str(tmp_path / "nemo"), "--workers", "2", "--max-memory",
                               str(BUDGET), "--quiet"], env=ENV)
    assert m.returncode == 0, m.stderr
    assert m.peak_nprocs >= 3
    assert m.peak_pss_bytes <= 2 * BUDGET, (m.peak_pss_bytes, 2 * BUDGET)
    # every tensor against the source, streamed in another process (this one's peak RSS stays small)
    r = subprocess.run(CLI + ["verify", str(src), str(tmp_path / "nemo"), "--max-memory", "512MiB"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0 and "EQUAL" in r.stdout, r.stdout + r.stderr
