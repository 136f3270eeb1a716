"""Nothing lost (issue 5): kill -9 anywhere, disk full, file size limits, Ctrl-C and SIGTERM, then
the same command again -- and the output is byte for byte what an uninterrupted run writes.
Also the preflight checks and the completeness manifest.

The kill -9 trials fork the test process (tests/faults.py); a few more kill a real
``python -m hfnemo`` process from outside. benchmarks/bench_faults.py runs many more trials.
"""
from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from faults import block_size, clean, in_child, kill_trials_isolated, tree

import hfnemo
from hfnemo import cli
from hfnemo.errors import InsufficientDisk, OutputNotWritable, ResumeMismatch
from hfnemo.exec import journal as jmod
from hfnemo.exec import staging as stmod
from hfnemo.exec.staging import staging_dir
from hfnemo.io import fileio
from hfnemo.manifest import MANIFEST, check_manifest, read_manifest

REPO = Path(__file__).resolve().parent.parent
N_TRIALS = 24  # per direction; benchmarks/bench_faults.py runs hundreds


@pytest.fixture(scope="module")
def hf_src(tiny_hf_factory) -> Path:
    return tiny_hf_factory("llama3_gqa")


@pytest.fixture(scope="module")
def nemo_src(hf_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "nemo"
    hfnemo.convert(hf_src, out)
    return out


def _assert_trials(trials: list, events: int, min_resumed: int) -> None:
    bad = [t.to_json() for t in trials if not t.identical]
    assert not bad, bad
    resumed = [t for t in trials if t.resumed_bytes > 0]
    assert len(resumed) >= min_resumed, [t.to_json() for t in trials]
    assert sum(t.killed for t in trials) >= len(trials) // 2
    assert events > 10


# ------------------------------------------------------------------------------ kill -9

def test_kill9_import_resumes_byte_identical(hf_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "nemo"
    trials, events = kill_trials_isolated(lambda: hfnemo.convert(hf_src, dst), dst, N_TRIALS, seed=1)
    _assert_trials(trials, events, N_TRIALS // 3)
    # some runs stopped inside an item (a DCP chunk half written) and resumed from its middle
    assert any(t.journal_at and t.journal_at[1] > 0 and t.resumed_bytes for t in trials), \
        [t.to_json() for t in trials]


def test_kill9_export_resumes_byte_identical(nemo_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "hf"
    convert = lambda: hfnemo.convert(nemo_src, dst, max_shard_size="300KB")  # noqa: E731
    trials, events = kill_trials_isolated(convert, dst, N_TRIALS, seed=2)
    _assert_trials(trials, events, N_TRIALS // 3)
    assert len(hfnemo.plan(nemo_src, max_shard_size="300KB").files) >= 8


@pytest.mark.parametrize("fmt,layout", [("nemo1", {"tp": 2}), ("megatron", {"pp": 2})])
def test_kill9_legacy_formats_resume_byte_identical(hf_src: Path, tmp_path: Path, fmt: str,
                                                    layout: dict) -> None:
    """One torch.save archive per rank file: a resumed archive needs the CRCs of its finished records."""
    dst = tmp_path / fmt
    convert = lambda: hfnemo.convert(hf_src, dst, format=fmt, **layout)  # noqa: E731
    trials, events = kill_trials_isolated(convert, dst, 8, seed=3)
    _assert_trials(trials, events, 2)


def _hfnemo_proc(*args: str, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "hfnemo", *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_kill9_external_process_then_cli_resumes(tmp_path: Path) -> None:
    """A real `kill -9` from outside, while the output is being written."""
    src, dst = tmp_path / "hf8", tmp_path / "nemo"

    def build() -> str:  # in a child: the test process keeps none of the model's memory
        from tiny_models import make_tiny_hf

        make_tiny_hf(src, "llama3_gqa", num_layers=8)
        hfnemo.convert(src, dst)
        return "ok"

    assert in_child(build)[0] == "ok"
    ref = tree(dst)
    rng = random.Random(4)
    killed_mid_run = 0
    for _ in range(8):
        clean(dst)
        p = _hfnemo_proc("import", str(src), str(dst), "--quiet", env={"HFNEMO_COMMIT_BYTES": "65536"})
        journal = staging_dir(dst) / jmod.JOURNAL
        while not journal.exists() and p.poll() is None:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.05))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        if not dst.exists():
            killed_mid_run += 1
            r = subprocess.run([sys.executable, "-m", "hfnemo", "import", str(src), str(dst)],
                               env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True,
                               text=True)
            assert r.returncode == 0, r.stderr
        assert tree(dst) == ref
        if killed_mid_run >= 3:
            break
    assert killed_mid_run >= 1


# ------------------------------------------------------------------------------ interrupts

def _hook_at(k: int, action) -> None:
    seen = 0

    def hook(event: str, f: object, nbytes: int) -> None:
        nonlocal seen
        if event == "write":
            seen += 1
            if seen == k:
                action()

    fileio.FAULT_HOOK = hook


@pytest.fixture
def no_hook():
    yield
    fileio.FAULT_HOOK = None
    jmod.COMMIT_BYTES = 256 << 20


def _raise(exc: BaseException):
    def action() -> None:
        raise exc
    return action


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_cleanly_and_say_how_to_resume(hf_src: Path, tmp_path: Path, capsys, no_hook,
                                                               how: str) -> None:
    dst = tmp_path / "nemo"
    hfnemo.convert(hf_src, dst)
    ref = tree(dst)
    clean(dst)
    jmod.COMMIT_BYTES = 1
    sig = signal.SIGINT if how == "SIGINT" else signal.SIGTERM
    # 16 KiB row blocks: the writes, hence the signal's point, do not follow this process's resident
    # size (with 64 MiB blocks a small pytest process made fewer than 200 writes and no signal came)
    # Python's own Ctrl-C handler, as a fresh `hfnemo` process has it (in the full suite an earlier
    # test leaves another one installed in this pytest process and the SIGINT went unnoticed)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with block_size(16384):
            _hook_at(200, lambda: os.kill(os.getpid(), sig))  # the handler raises in this (the main) thread
            rc = cli.main(["import", str(hf_src), str(dst), "--quiet"])
    finally:
        signal.signal(signal.SIGINT, old_int)
    fileio.FAULT_HOOK = None
    err = capsys.readouterr().err
    assert rc == (130 if how == "SIGINT" else 143), err
    assert "re-run the same command to resume" in err and str(staging_dir(dst)) in err
    assert not dst.exists()
    prior = jmod._parse(staging_dir(dst) / jmod.JOURNAL)
    assert prior is not None and prior.done > 0  # the last finished block was committed on the way out
    rc = cli.main(["import", str(hf_src), str(dst)])
    assert rc == 0
    assert "resumed:" in capsys.readouterr().err
    assert tree(dst) == ref


# ------------------------------------------------------------------------------ disk full, size limits

def test_injected_enospc_keeps_staging_names_bytes_and_resumes(hf_src: Path, tmp_path: Path, capsys,
                                                               no_hook) -> None:
    """Deterministic: the 150th write fails with ENOSPC."""
    dst = tmp_path / "nemo"
    hfnemo.convert(hf_src, dst)
    ref = tree(dst)
    clean(dst)
    jmod.COMMIT_BYTES = 1
    _hook_at(150, _raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    rc = cli.main(["import", str(hf_src), str(dst), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "the disk filled up" in err and "more bytes of tensor data are needed" in err
    assert "re-run the same command to resume" in err and "--restart" in err
    assert staging_dir(dst).is_dir() and not dst.exists()
    with pytest.raises(InsufficientDisk):  # the API raises the same error
        _hook_at(1, _raise(OSError(errno.ENOSPC, "No space left on device")))
        hfnemo.convert(hf_src, dst)
    fileio.FAULT_HOOK = None
    report = hfnemo.convert(hf_src, dst)
    assert report.resumed_bytes > 0
    assert tree(dst) == ref


def _can_unshare() -> list[str] | None:
    for cmd in (["unshare", "-m"], ["unshare", "-rm"]) if os.geteuid() == 0 else (["unshare", "-rm"],):
        probe = subprocess.run([*cmd, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                                "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
        if probe.returncode == 0:
            return cmd
    return None


_ENOSPC_SCRIPT = textwrap.dedent('''
    import json, os, subprocess, sys, shutil
    from pathlib import Path
    src, mnt = Path(sys.argv[1]), Path(sys.argv[2])
    import hfnemo
    from hfnemo.errors import InsufficientDisk
    from hfnemo.exec import journal as jmod
    from hfnemo.io import fileio
    plan = hfnemo.plan(src)
    size = plan.write_bytes + (64 << 20) + (8 << 20)  # enough for the preflight, not for the filler too
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    dst = mnt / "nemo"
    hfnemo.convert(src, dst)
    ref = {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    shutil.rmtree(dst)
    jmod.COMMIT_BYTES = 1
    seen = 0
    def fill(event, f, n):  # at the 100th write, a filler takes every free byte of the filesystem
        global seen
        seen += 1
        if event == "write" and seen == 100:
            with open(mnt / "filler", "wb", buffering=0) as g:
                try:
                    while True:
                        g.write(b"x" * 4096)
                except OSError:
                    pass
    fileio.FAULT_HOOK = fill
    out = {}
    try:
        hfnemo.convert(src, dst)
    except InsufficientDisk as e:
        out["error"] = str(e)
    fileio.FAULT_HOOK = None
    out["staging_kept"] = (mnt / ".nemo.hfnemo-partial" / "hfnemo-journal.jsonl").is_file()
    (mnt / "filler").unlink()
    out["resumed_bytes"] = hfnemo.convert(src, dst).resumed_bytes
    out["identical"] = ref == {p.relative_to(dst).as_posix(): p.read_bytes()
                               for p in dst.rglob("*") if p.is_file()}
    subprocess.run(["umount", str(mnt)])
    print(json.dumps(out))
''')


def test_real_enospc_on_a_small_filesystem_then_resume(hf_src: Path, tmp_path: Path) -> None:
    """A tmpfs just big enough for the preflight; a filler takes the rest mid-write; the kernel's
    ENOSPC stops the run; the filler goes; the same call resumes. Runs in a private mount namespace
    (unshare), skipped where the machine allows no mounts (the RLIMIT_FSIZE test still runs)."""
    prefix = _can_unshare()
    if prefix is None:
        pytest.skip("no mount namespace here (needs root or unprivileged user namespaces)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = tmp_path / "enospc.py"
    script.write_text(_ENOSPC_SCRIPT)
    r = subprocess.run([*prefix, sys.executable, str(script), str(hf_src), str(mnt)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "the disk filled up" in out["error"] and "re-run the same command to resume" in out["error"], out
    assert out["staging_kept"] and out["resumed_bytes"] > 0 and out["identical"], out


def test_file_size_limit_efbig_keeps_staging_and_resumes(hf_src: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE in a forked child: writes past 1 MiB fail with EFBIG (no root needed)."""
    dst = tmp_path / "nemo"
    hfnemo.convert(hf_src, dst)
    ref = tree(dst)
    clean(dst)

    def child() -> str:
        jmod.COMMIT_BYTES = 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        hfnemo.convert(hf_src, dst)
        return "no error"

    msg, _ = in_child(child)
    assert msg.startswith("WriteFailed") and "file size limit" in msg and "resume" in msg, msg
    assert staging_dir(dst).is_dir()
    report = hfnemo.convert(hf_src, dst)
    assert report.resumed_bytes > 0
    assert tree(dst) == ref


# ------------------------------------------------------------------------------ resume decisions

def _interrupt(src: Path, dst: Path, k: int = 150, **kw) -> None:
    jmod.COMMIT_BYTES = 1
    _hook_at(k, _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        hfnemo.convert(src, dst, **kw)
    fileio.FAULT_HOOK = None
    assert (staging_dir(dst) / jmod.JOURNAL).is_file()


def test_other_conversion_refused_until_restart(hf_src: Path, tmp_path: Path, capsys, no_hook) -> None:
    dst = tmp_path / "nemo"
    _interrupt(hf_src, dst)
    before = tree(staging_dir(dst))
    rc = cli.main(["import", str(hf_src), str(dst), "--dtype", "fp32", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "different plan" in err and "--restart" in err, err
    assert tree(staging_dir(dst)) == before  # untouched
    with pytest.raises(ResumeMismatch):
        hfnemo.convert(hf_src, dst, dtype="fp32")
    assert cli.main(["import", str(hf_src), str(dst), "--dtype", "fp32", "--restart", "--quiet"]) == 0
    fresh = tmp_path / "fresh" / "nemo"
    hfnemo.convert(hf_src, fresh, dtype="fp32")
    assert {k: v for k, v in tree(dst).items() if k not in ("weights/.metadata", MANIFEST)} == \
        {k: v for k, v in tree(fresh).items() if k not in ("weights/.metadata", MANIFEST)}


def test_changed_source_refused(hf_src: Path, tmp_path: Path, no_hook) -> None:
    src = tmp_path / "hf"
    shutil.copytree(hf_src, src)
    dst = tmp_path / "nemo"
    _interrupt(src, dst)
    shard = next(src.glob("*.safetensors"))
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ResumeMismatch, match="source files"):
        hfnemo.convert(src, dst)
    assert hfnemo.convert(src, dst, restart=True).resumed_bytes == 0


def test_damaged_staging_starts_over(hf_src: Path, tmp_path: Path, no_hook) -> None:
    dst = tmp_path / "nemo"
    hfnemo.convert(hf_src, dst)
    ref = tree(dst)
    clean(dst)
    _interrupt(hf_src, dst, k=250)
    victim = staging_dir(dst) / "weights" / "__0_0.distcp"
    data = bytearray(victim.read_bytes())
    data[64] ^= 0xFF  # inside the part the journal vouches for
    victim.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not verify"):
        report = hfnemo.convert(hf_src, dst)
    assert report.resumed_bytes == 0
    assert tree(dst) == ref


def test_crash_after_manifest_publishes_on_rerun(hf_src: Path, tmp_path: Path, no_hook) -> None:
    """Killed between the manifest and the rename: the re-run checks the manifest and publishes."""
    dst = tmp_path / "nemo"
    hfnemo.convert(hf_src, dst)
    ref = tree(dst)
    for point in ("journal-unlink", "publish"):
        clean(dst)

        def hook(event: str, f: object, n: int) -> None:
            if event == point:
                raise KeyboardInterrupt

        fileio.FAULT_HOOK = hook
        with pytest.raises(KeyboardInterrupt):
            hfnemo.convert(hf_src, dst)
        fileio.FAULT_HOOK = None
        assert (staging_dir(dst) / MANIFEST).is_file() and not dst.exists()
        report = hfnemo.convert(hf_src, dst)
        assert report.resumed_bytes == report.bytes_written
        assert tree(dst) == ref


def test_reruns_write_identical_bytes(hf_src: Path, tmp_path: Path) -> None:
    """No random ids anywhere (DCP save_id, torch.save serialization ids): what resume relies on."""
    dst = tmp_path / "nemo"
    hfnemo.convert(hf_src, dst)
    first = tree(dst)
    hfnemo.convert(hf_src, dst, overwrite=True)
    assert tree(dst) == first
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(dst / "weights")).read_metadata()
    assert len(md.storage_meta.save_id) == 36


# ------------------------------------------------------------------------------ preflight

def test_preflight_disk_space_names_the_bytes(hf_src: Path, tmp_path: Path, monkeypatch) -> None:
    planned = hfnemo.plan(hf_src).write_bytes
    monkeypatch.setattr(stmod.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    with pytest.raises(InsufficientDisk, match=f"needs {planned} bytes but only 1000 are free"):
        hfnemo.convert(hf_src, tmp_path / "out" / "nemo")
    assert not any((tmp_path / "out").iterdir())


def test_preflight_output_not_writable(hf_src: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = _can_unshare() if os.geteuid() == 0 else None
    if os.geteuid() != 0:
        ro.chmod(0o555)
        try:
            with pytest.raises(OutputNotWritable, match="cannot write"):
                hfnemo.convert(hf_src, ro / "nemo")
            assert not any(ro.iterdir())
        finally:
            ro.chmod(0o755)
        return
    if prefix is None:
        pytest.skip("root without mount namespaces: no read-only directory to test with")
    script = tmp_path / "ro.py"
    script.write_text(textwrap.dedent(f'''
        import subprocess, sys
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", {str(ro)!r}], check=True)
        from hfnemo import cli
        rc = cli.main(["import", {str(hf_src)!r}, {str(ro / "nemo")!r}, "--quiet"])
        import os
        print("RC", rc, "EMPTY", not os.listdir({str(ro)!r}))
    '''))
    r = subprocess.run([*prefix, sys.executable, str(script)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert "RC 2 EMPTY True" in r.stdout, r.stdout + r.stderr
    assert "cannot write in the output's directory" in r.stderr


def test_preflight_unreadable_source_file(hf_src: Path, tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "hf"
    shutil.copytree(hf_src, src)
    shard = next(src.glob("*.safetensors"))
    real_open = os.open

    def deny(path, flags, *a, **kw):  # root reads anything: simulate the permission bit
        if Path(path) == shard and flags == os.O_RDONLY:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(stmod.os, "open", deny)
    with pytest.raises(hfnemo.ConversionError, match="cannot read a source file") as e:
        hfnemo.convert(src, tmp_path / "nemo")
    assert e.value.file == str(shard)
    assert not (tmp_path / "nemo").exists() and not staging_dir(tmp_path / "nemo").exists()


# ------------------------------------------------------------------------------ manifest

def test_manifest_lists_every_file_and_finds_damage(nemo_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    hfnemo.convert(nemo_src, out, max_shard_size="300KB")
    man = read_manifest(out)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(man.files) == files and man.meta["direction"] == "nemo_to_hf"
    assert man.total_bytes == sum((out / f).stat().st_size for f in files)
    assert check_manifest(out) == []
    shard = out / sorted(f for f in files if f.endswith(".safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    (out / "config.json").unlink()
    (out / "stray.txt").write_text("x")
    problems = check_manifest(out)
    assert any(shard.name in p and "content differs" in p for p in problems), problems
    assert any(p.startswith("config.json: missing") for p in problems), problems
    assert any(p.startswith("stray.txt: not in the manifest") for p in problems), problems
    assert len(check_manifest(out, hashes=False)) == 2  # sizes only: the flipped bit goes unseen
