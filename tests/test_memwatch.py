"""Tests of hfnemo.memwatch: process-tree PSS sampling and size parsing.

Each case spawns small Python children; the whole file runs in a few seconds.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

try:
    from hfnemo import memwatch
except ImportError:  # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hfnemo import memwatch

from hfnemo.memwatch import (
    Measured,
    PeakMemorySampler,
    format_size,
    parse_size,
    run_and_measure,
    tree_memory,
    tree_pss_bytes,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="memwatch reads Linux /proc"
)

MiB = 1024 * 1024
PY = sys.executable


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


@pytest.fixture(scope="module")
def baseline() -> Measured:
    """A bare interpreter that sleeps: the fixed cost of every child below."""
    m = run_and_measure(py("import time; time.sleep(0.3)"), interval=0.01)
    assert m.returncode == 0
    assert m.samples >= 5
    assert 0 < m.peak_pss_bytes < 64 * MiB
    return m


# --------------------------------------------------------------------------- #
# sampling
# --------------------------------------------------------------------------- #


def test_child_allocation_is_seen(baseline: Measured) -> None:
    n = 200 * MiB
    m = run_and_measure(
        py(
            f"""
            import time
            b = b"\\x01" * {n}          # allocated and touched
            time.sleep(0.3)
            """
        ),
        interval=0.01,
    )
    assert m.returncode == 0, m.stderr
    expected = baseline.peak_pss_bytes + n
    assert abs(m.peak_pss_bytes - expected) <= 0.10 * expected, (
        format_size(m.peak_pss_bytes),
        format_size(expected),
    )
    # single process: its own peak RSS tells the same story
    assert m.peak_rss_hwm_bytes >= n
    assert m.ru_maxrss_bytes >= n
    assert m.peak_nprocs == 1
    assert not m.approximate


def test_grandchildren_are_counted(baseline: Measured) -> None:
    n = 150 * MiB
    worker = f"import time; b = b'\\x01' * {n}; time.sleep(0.4)"
    m = run_and_measure(
        py(
            f"""
            import subprocess, sys
            p = subprocess.Popen([sys.executable, "-c", {worker!r}])
            sys.exit(p.wait())
            """
        ),
        interval=0.01,
    )
    assert m.returncode == 0, m.stderr
    assert m.peak_nprocs >= 2
    expected = 2 * baseline.peak_pss_bytes + n
    assert m.peak_pss_bytes >= 0.9 * expected, format_size(m.peak_pss_bytes)
    assert m.peak_pss_bytes <= 1.2 * expected + 16 * MiB, format_size(m.peak_pss_bytes)
    # the root itself stayed small: its own RSS would miss the worker entirely
    assert m.peak_rss_hwm_bytes < 64 * MiB, format_size(m.peak_rss_hwm_bytes)


def test_touched_mmap_pages_are_counted(tmp_path: Path, baseline: Measured) -> None:
    n = 128 * MiB
    path = tmp_path / "blob.bin"
    with open(path, "wb") as f:
        block = os.urandom(MiB)
        for _ in range(n // MiB):
            f.write(block)
    m = run_and_measure(
        py(
            f"""
            import mmap, time
            with open({str(path)!r}, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            s = 0
            for i in range(0, len(mm), 4096):
                s += mm[i]                  # fault every page in, no copy
            time.sleep(0.3)
            """
        ),
        interval=0.01,
    )
    assert m.returncode == 0, m.stderr
    expected = baseline.peak_pss_bytes + n
    assert abs(m.peak_pss_bytes - expected) <= 0.10 * expected, (
        format_size(m.peak_pss_bytes),
        format_size(expected),
    )


def test_in_process_sampler_context_manager() -> None:
    before = tree_pss_bytes(os.getpid())
    assert before > 0
    with PeakMemorySampler(interval=0.005) as s:
        buf = bytearray(b"\x01") * (100 * MiB)
        time.sleep(0.1)
        del buf
    assert not s.running
    assert s.samples >= 3
    assert s.peak_bytes >= before + 90 * MiB, (format_size(before), s)
    assert s.peak_hwm_bytes >= 100 * MiB
    assert s.peak_rss_sum_bytes >= s.peak_bytes
    with pytest.raises(ValueError):
        PeakMemorySampler(interval=0)


def test_start_stop_api_and_vanishing_processes() -> None:
    # a child that keeps spawning and reaping short-lived workers: the walk
    # must tolerate processes disappearing under it
    m_args = py(
        """
        import subprocess, sys
        for _ in range(15):
            subprocess.run([sys.executable, "-c", "pass"])
        """
    )
    import subprocess

    p = subprocess.Popen(m_args)
    s = PeakMemorySampler(p.pid, interval=0.002).start()
    try:
        while p.poll() is None:
            tree_memory(p.pid)
    finally:
        p.wait()
        peak = s.stop()
    assert peak > 0 and s.samples > 10
    assert s.peak_nprocs >= 1


def test_gone_pid_reads_zero() -> None:
    import subprocess

    p = subprocess.Popen(py("pass"))
    p.wait()
    assert tree_pss_bytes(p.pid) == 0
    tm = tree_memory(p.pid)
    assert tm.pids == () and tm.pss_bytes == 0


def test_run_and_measure_captures_output_and_status() -> None:
    m = run_and_measure(
        py(
            """
            import sys
            print('{"ok": true}')
            print("oops", file=sys.stderr)
            sys.exit(3)
            """
        )
    )
    assert m.returncode == 3
    assert m.stdout.strip() == '{"ok": true}'
    assert "oops" in m.stderr
    assert m.wall_s > 0 and m.peak_pss_bytes > 0 and not m.timed_out
    with pytest.raises(Exception):  # frozen
        m.returncode = 0  # type: ignore[misc]


def test_run_and_measure_timeout_kills() -> None:
    t0 = time.perf_counter()
    m = run_and_measure(py("import time; time.sleep(30)"), timeout=0.5)
    assert time.perf_counter() - t0 < 10
    assert m.timed_out and not m.ok
    assert m.returncode == -9


# --------------------------------------------------------------------------- #
# parse_size
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "text, value",
    [
        ("0", 0),
        ("4096", 4096),
        ("17B", 17),
        ("1KB", 1000),
        ("1kB", 1000),
        ("2MB", 2_000_000),
        ("5GB", 5_000_000_000),
        ("1TB", 10**12),
        ("1KiB", 1024),
        ("3MiB", 3 * MiB),
        ("1GiB", 1 << 30),
        ("2TiB", 2 << 40),
        ("1.5GiB", 3 << 29),
        ("0.5KB", 500),
        ("1 GiB", 1 << 30),
        (" 1GiB ", 1 << 30),
        ("1gib", 1 << 30),
        ("1GIB", 1 << 30),
        ("1gb", 10**9),
        (123, 123),
    ],
)
def test_parse_size_good(text, value) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text",
    ["", " ", "GiB", "1G", "1k", "1Gb", "1Mb", "1gIB", "-1", "-1GiB", "1e9", "0x10", "1,000",
     "1 024", "1  GiB", "1.0001KB", "0.5B", "1.5", "abc", "1GiBs", "1 GiB B", "nan", "inf", -5, 1.5, True, None],
)
def test_parse_size_bad(text) -> None:
    with pytest.raises(ValueError) as ei:
        parse_size(text)
    assert repr(text) in str(ei.value)


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(1 << 30) == "1.00 GiB"
    assert memwatch.format_size(3 * MiB) == "3.00 MiB"


# --------------------------------------------------------------------------- #
# fallbacks (forced)
# --------------------------------------------------------------------------- #


def _sleeping_tree():
    """A child with one grandchild, both idle; returns (child Popen, grandchild pid)."""
    import subprocess

    p = subprocess.Popen(
        py(
            """
            import subprocess, sys, time
            g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
            print(g.pid, flush=True)
            g.wait()
            """
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    return p, int(p.stdout.readline())


def test_descendants_without_children_files(monkeypatch) -> None:
    p, gpid = _sleeping_tree()
    try:
        with_files = tree_memory(p.pid)
        monkeypatch.setattr(memwatch, "_HAS_CHILDREN", False)
        scanned = tree_memory(p.pid)
        assert set(scanned.pids) == {p.pid, gpid}
        assert set(with_files.pids) == {p.pid, gpid}
    finally:
        _kill(p, gpid)


def test_smaps_and_rss_fallbacks(monkeypatch) -> None:
    p, gpid = _sleeping_tree()
    try:
        rollup = tree_memory(p.pid)
        assert rollup.method == "smaps_rollup" and not rollup.approximate
        monkeypatch.setattr(memwatch, "_HAS_ROLLUP", False)
        smaps = tree_memory(p.pid)
        assert smaps.method == "smaps" and not smaps.approximate
        assert abs(smaps.pss_bytes - rollup.pss_bytes) <= 0.1 * rollup.pss_bytes + MiB

        real = memwatch._read_bytes

        def deny(path: str) -> bytes:
            if path.endswith("/smaps") and path.startswith(f"/proc/{gpid}/"):
                raise PermissionError(13, "denied", path)
            return real(path)

        monkeypatch.setattr(memwatch, "_read_bytes", deny)
        mixed = tree_memory(p.pid)
        assert mixed.method == "mixed" and mixed.approximate
        assert set(mixed.pids) == {p.pid, gpid}
        s = PeakMemorySampler(p.pid)
        s.sample()
        assert s.approximate and s.peak_bytes > 0
    finally:
        _kill(p, gpid)


def _kill(p, gpid: int) -> None:
    for pid in (gpid, p.pid):
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    p.wait()
    p.stdout.close()
