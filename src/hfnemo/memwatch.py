"""Process-tree memory measurement from Linux ``/proc`` (stdlib only).

"Memory" in hfnemo means the peak, over time, of the **summed PSS of a process
and all of its descendants**.  PSS (proportional set size) charges every
resident page to the processes mapping it in equal parts, so

* worker processes are counted (unlike the root's RSS),
* pages shared between parent and forked workers are not double counted
  (unlike a sum of RSS),
* file pages of an ``mmap``-ed checkpoint that the process has touched count
  (they are resident and mapped), while page cache filled by plain ``read()``
  does not (it is not mapped by anyone).

Public API
----------
``tree_pss_bytes(pid)``        one reading, in bytes.
``tree_memory(pid)``           one reading with details (pids, RSS sum, method).
``PeakMemorySampler``          background thread keeping the peak.
``run_and_measure(argv)``      spawn a command and measure its tree -> ``Measured``.
``parse_size(text)``           ``"1GiB"`` -> ``1073741824`` (strict).
``format_size(n)``             ``1073741824`` -> ``"1.00 GiB"``.

Sources, in order of preference, per process: ``/proc/<p>/smaps_rollup``
(``Pss:``), the sum of ``Pss:`` over ``/proc/<p>/smaps`` (kernels < 4.14), then
``VmRSS`` from ``/proc/<p>/status`` (e.g. no permission), in which case the
reading is flagged ``approximate``.  Descendants come from
``/proc/<p>/task/*/children`` when the kernel has ``CONFIG_PROC_CHILDREN``,
otherwise from a scan of the parent pid in every ``/proc/<n>/stat``.
Processes that vanish mid-walk are skipped.

Sampling is periodic, so a spike shorter than the interval can be missed; the
sampler also caps its own duty cycle (``max_duty``): reading ``smaps_rollup``
walks the page tables of the process, so for a process with many GiB mapped
one reading costs milliseconds and the effective interval grows to keep the
sampler's CPU share bounded.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Iterable, Mapping, Sequence

__all__ = [
    "Measured",
    "PeakMemorySampler",
    "TreeMemory",
    "format_size",
    "parse_size",
    "run_and_measure",
    "tree_memory",
    "tree_pss_bytes",
]

_PROC = "/proc"

# --------------------------------------------------------------------------- #
# sizes
# --------------------------------------------------------------------------- #

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s?([A-Za-z]*)\s*$")
_UNITS_CI = {k.lower(): k for k in _UNITS if k}


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``"1GiB"``, ``"512MiB"``, ``"5GB"``, ``"1.5GiB"``, ``"4096"``.

    Units: ``B``; ``KB MB GB TB`` (powers of 1000, ``kB`` too); ``KiB MiB GiB
    TiB`` (powers of 1024); no unit means bytes.  A unit may also be written
    all lower-case or all upper-case (``gib``, ``GIB``, ``gb``); mixed spellings
    that could mean bits (``Gb``, ``Mb``) and bare prefixes (``G``, ``k``) are
    rejected.  One space between number and unit is allowed.  A decimal value
    is allowed only if it comes to a whole number of bytes.  Anything else
    (negative, empty, non-numeric, unknown unit) raises ``ValueError`` naming
    the offending text.  An ``int`` is returned unchanged if it is >= 0.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"invalid size {text!r}: expected a string like '1GiB' or an int")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: must not be negative")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(
            f"invalid size {text!r}: expected a number followed by an optional unit "
            f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    number, unit = m.group(1), m.group(2)
    if unit not in _UNITS:
        canon = _UNITS_CI.get(unit.lower())
        if canon is None or not (unit in (unit.lower(), unit.upper()) or unit == "kB"):
            raise ValueError(
                f"invalid size {text!r}: unknown unit {unit!r} "
                f"(use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            )
        unit = canon
    try:
        value = Decimal(number) * _UNITS[unit]
    except InvalidOperation:  # pragma: no cover - the regex guarantees a number
        raise ValueError(f"invalid size {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int | float) -> str:
    """Human-readable binary size: ``format_size(1536) == '1.50 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- #
# /proc readers
# --------------------------------------------------------------------------- #


def _read_bytes(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        chunks = []
        while True:
            b = f.read(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


def _field_kb(blob: bytes, key: bytes) -> int | None:
    """Value in bytes of the first ``key`` line (``b'Pss:'``) of a /proc file."""
    i = blob.find(b"\n" + key)
    if i < 0:
        if not blob.startswith(key):
            return None
        i = 0
    else:
        i += 1
    j = blob.find(b"\n", i)
    parts = blob[i + len(key): j if j >= 0 else None].split()
    if not parts:
        return None
    return int(parts[0]) * 1024


def _sum_field_kb(blob: bytes, key: bytes) -> int:
    total = 0
    for line in blob.split(b"\n"):
        if line.startswith(key):
            total += int(line[len(key):].split()[0]) * 1024
    return total


_HAS_ROLLUP = os.path.exists(f"{_PROC}/self/smaps_rollup")


def _has_children_files() -> bool:
    try:
        tid = os.listdir(f"{_PROC}/self/task")[0]
    except (OSError, IndexError):
        return False
    return os.path.exists(f"{_PROC}/self/task/{tid}/children")


_HAS_CHILDREN = _has_children_files()


def _process_memory(pid: int) -> tuple[int, int, str] | None:
    """(pss, rss, method) of one process, or None if it is gone.

    A process without an address space (zombie, kernel thread) reads as 0.
    """
    base = f"{_PROC}/{pid}"
    if _HAS_ROLLUP:
        try:
            blob = _read_bytes(base + "/smaps_rollup")
        except FileNotFoundError:
            return None
        except ProcessLookupError:
            return None
        except PermissionError:
            blob = None
        except OSError:
            blob = None
        if blob is not None:
            pss = _field_kb(blob, b"Pss:")
            rss = _field_kb(blob, b"Rss:")
            return (pss or 0, rss or 0, "smaps_rollup")
    else:
        try:
            blob = _read_bytes(base + "/smaps")
        except (FileNotFoundError, ProcessLookupError):
            return None
        except OSError:
            blob = None
        if blob is not None:
            return (_sum_field_kb(blob, b"Pss:"), _sum_field_kb(blob, b"Rss:"), "smaps")
    try:
        blob = _read_bytes(base + "/status")
    except OSError:
        return None
    rss = _field_kb(blob, b"VmRSS:") or 0
    return (rss, rss, "rss")


def _read_hwm(pid: int) -> int | None:
    """VmHWM of ``pid`` in bytes; None if gone or a zombie (no address space)."""
    try:
        blob = _read_bytes(f"{_PROC}/{pid}/status")
    except OSError:
        return None
    return _field_kb(blob, b"VmHWM:")


def _children_direct(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"{_PROC}/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{_PROC}/{pid}/task/{tid}/children", "rb") as f:
                data = f.read()
        except OSError:
            continue
        out.extend(int(x) for x in data.split())
    return out


def _ppid_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from a scan of every /proc/<n>/stat."""
    kids: dict[int, list[int]] = {}
    try:
        names = os.listdir(_PROC)
    except OSError:
        return kids
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"{_PROC}/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces and parens: fields resume after the last ')'
        rest = stat[stat.rfind(b")") + 2:].split(None, 2)
        if len(rest) < 2:
            continue
        kids.setdefault(int(rest[1]), []).append(int(name))
    return kids


def _descendants(root: int) -> list[int]:
    """``root`` and all its live descendants (breadth first)."""
    out = [root]
    seen = {root}
    if _HAS_CHILDREN:
        lookup = _children_direct
    else:
        table = _ppid_map()
        lookup = lambda p: table.get(p, ())  # noqa: E731
    i = 0
    while i < len(out):
        for c in lookup(out[i]):
            if c not in seen:
                seen.add(c)
                out.append(c)
        i += 1
    return out


@dataclass(frozen=True)
class TreeMemory:
    """One reading of a process tree."""

    pss_bytes: int
    rss_bytes: int  # sum of RSS (double counts shared pages; for comparison)
    pids: tuple[int, ...]
    method: str  # "smaps_rollup", "smaps", "rss" or "mixed"

    @property
    def approximate(self) -> bool:
        """True if some process could only be read as RSS (not PSS)."""
        return self.method in ("rss", "mixed")


def tree_memory(pid: int) -> TreeMemory:
    """Summed PSS (and RSS) of ``pid`` and all its descendants."""
    pss = rss = 0
    pids: list[int] = []
    methods: set[str] = set()
    for p in _descendants(pid):
        m = _process_memory(p)
        if m is None:
            continue  # vanished mid-walk
        pss += m[0]
        rss += m[1]
        pids.append(p)
        methods.add(m[2])
    if not methods:
        method = "smaps_rollup" if _HAS_ROLLUP else "smaps"
    elif len(methods) == 1:
        method = methods.pop()
    else:
        method = "mixed" if "rss" in methods else sorted(methods)[0]
    return TreeMemory(pss, rss, tuple(pids), method)


def tree_pss_bytes(pid: int) -> int:
    """Sum of ``Pss:`` (bytes) over ``pid`` and all its descendants; 0 if gone.

    Falls back to ``smaps`` if ``smaps_rollup`` is missing and to ``VmRSS`` if
    neither can be read; use :func:`tree_memory` to see which (``.method``,
    ``.approximate``).
    """
    return tree_memory(pid).pss_bytes


# --------------------------------------------------------------------------- #
# sampler
# --------------------------------------------------------------------------- #


class PeakMemorySampler:
    """Track the peak tree PSS of ``pid`` (default: this process) in a daemon thread.

    >>> with PeakMemorySampler(interval=0.02) as s:
    ...     work()
    >>> s.peak_bytes, s.samples, s.peak_hwm_bytes

    Attributes (readable while running):

    ``peak_bytes``       peak summed PSS of the tree.
    ``peak_rss_sum_bytes`` peak summed RSS of the tree (overcounts sharing).
    ``peak_hwm_bytes``   largest ``VmHWM`` of the root seen (its own peak RSS).
    ``last_hwm_bytes``   ``VmHWM`` at the last reading before the root exited.
    ``samples``          number of readings taken.
    ``peak_nprocs``      largest number of processes seen in the tree.
    ``approximate``      some reading fell back to RSS.
    ``sample_time_s``    total time spent reading /proc (sampling cost).

    ``max_duty`` caps the sampler's own CPU share: after a reading that took
    ``t`` seconds the thread sleeps ``max(interval, t * (1 - max_duty) / max_duty)``.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.02, *, max_duty: float = 0.25):
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        if not 0 < max_duty <= 1:
            raise ValueError(f"max_duty must be in (0, 1], got {max_duty!r}")
        self.pid = os.getpid() if pid is None else int(pid)
        self.interval = float(interval)
        self.max_duty = float(max_duty)
        self.peak_bytes = 0
        self.peak_rss_sum_bytes = 0
        self.peak_hwm_bytes = 0
        self.last_hwm_bytes = 0
        self.last_bytes = 0
        self.samples = 0
        self.peak_nprocs = 0
        self.approximate = False
        self.methods: set[str] = set()
        self.sample_time_s = 0.0
        self.max_sample_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- one reading ------------------------------------------------------- #
    def sample(self) -> int:
        """Take one reading now; returns the tree PSS in bytes."""
        t0 = time.perf_counter()
        hwm = _read_hwm(self.pid)
        tm = tree_memory(self.pid)
        dt = time.perf_counter() - t0
        with self._lock:
            self.samples += 1
            self.sample_time_s += dt
            self.max_sample_s = max(self.max_sample_s, dt)
            if tm.pids:
                self.last_bytes = tm.pss_bytes
                self.methods.add(tm.method)
                self.approximate |= tm.approximate
                self.peak_bytes = max(self.peak_bytes, tm.pss_bytes)
                self.peak_rss_sum_bytes = max(self.peak_rss_sum_bytes, tm.rss_bytes)
                self.peak_nprocs = max(self.peak_nprocs, len(tm.pids))
            if hwm is not None:
                self.last_hwm_bytes = hwm
                self.peak_hwm_bytes = max(self.peak_hwm_bytes, hwm)
        return tm.pss_bytes

    def _run(self) -> None:
        k = (1.0 - self.max_duty) / self.max_duty
        sleep = self.interval
        while not self._stop.wait(sleep):
            t0 = time.perf_counter()
            try:
                self.sample()
            except Exception:  # never let a /proc oddity kill the thread
                pass
            sleep = max(self.interval, (time.perf_counter() - t0) * k)

    # -- lifecycle --------------------------------------------------------- #
    def start(self) -> "PeakMemorySampler":
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._stop.clear()
        self.sample()  # the peak is at least the starting point
        self._thread = threading.Thread(target=self._run, name=f"memwatch-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, final_sample: bool = True) -> int:
        """Stop the thread (one last reading first, if asked); returns ``peak_bytes``."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if final_sample:
                self.sample()
        return self.peak_bytes

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def mean_sample_s(self) -> float:
        return self.sample_time_s / self.samples if self.samples else 0.0

    def __enter__(self) -> "PeakMemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"PeakMemorySampler(pid={self.pid}, peak={format_size(self.peak_bytes)}, "
            f"hwm={format_size(self.peak_hwm_bytes)}, samples={self.samples})"
        )


# --------------------------------------------------------------------------- #
# run a command
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Measured:
    """Result of :func:`run_and_measure`.

    ``peak_pss_bytes``      peak summed PSS of the child's process tree.
    ``peak_rss_hwm_bytes``  the root child's own ``VmHWM`` (peak RSS), as last
                            read from /proc while it was alive (a zombie has
                            none).  If it exited before any reading, this is
                            ``ru_maxrss_bytes`` instead.
    ``ru_maxrss_bytes``     ``ru_maxrss`` from ``wait4``: the largest peak RSS of
                            the child or any descendant it reaped (not a sum).
    ``peak_rss_sum_bytes``  peak of summed RSS over the tree (overcounts sharing).
    """

    returncode: int
    wall_s: float
    peak_pss_bytes: int
    peak_rss_hwm_bytes: int
    stdout: str
    stderr: str
    ru_maxrss_bytes: int = 0
    peak_rss_sum_bytes: int = 0
    peak_nprocs: int = 0
    samples: int = 0
    sample_time_s: float = 0.0
    approximate: bool = False
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _kill_tree(pid: int) -> None:
    for p in reversed(_descendants(pid)):
        try:
            os.kill(p, 9)
        except OSError:
            pass


def run_and_measure(
    argv: Sequence[str],
    *,
    interval: float = 0.02,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = None,
    max_duty: float = 0.25,
) -> Measured:
    """Run ``argv`` (stdin closed, stdout/stderr captured) and measure its tree.

    ``wall_s`` runs from just before the spawn to the reaping of the child
    (descendants still alive after the child exits are not waited for).
    With ``timeout`` the child and its descendants are killed (SIGKILL) after
    that many seconds and ``timed_out`` is set.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    )
    sampler = PeakMemorySampler(proc.pid, interval, max_duty=max_duty)
    sampler.start()

    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []

    def _drain(stream, sink: list[bytes]) -> None:
        with stream:
            for chunk in iter(lambda: stream.read1(65536), b""):
                sink.append(chunk)

    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, out_chunks), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err_chunks), daemon=True),
    ]
    for t in readers:
        t.start()

    timed_out = threading.Event()
    timer = None
    if timeout is not None:
        def _expire() -> None:
            timed_out.set()
            _kill_tree(proc.pid)

        timer = threading.Timer(timeout, _expire)
        timer.daemon = True
        timer.start()
    try:
        # wait4 (not Popen.wait) to get the child's rusage; Popen is told below.
        _, status, rusage = os.wait4(proc.pid, 0)
    except BaseException:
        _kill_tree(proc.pid)
        proc.wait()
        sampler.stop(final_sample=False)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    wall = time.perf_counter() - t0
    sampler.stop(final_sample=False)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()

    ru_maxrss = int(rusage.ru_maxrss) * 1024  # KiB on Linux
    hwm = sampler.last_hwm_bytes or sampler.peak_hwm_bytes or ru_maxrss
    return Measured(
        returncode=proc.returncode,
        wall_s=wall,
        peak_pss_bytes=sampler.peak_bytes,
        peak_rss_hwm_bytes=hwm,
        stdout=b"".join(out_chunks).decode("utf-8", "replace"),
        stderr=b"".join(err_chunks).decode("utf-8", "replace"),
        ru_maxrss_bytes=ru_maxrss,
        peak_rss_sum_bytes=sampler.peak_rss_sum_bytes,
        peak_nprocs=sampler.peak_nprocs,
        samples=sampler.samples,
        sample_time_s=sampler.sample_time_s,
        approximate=sampler.approximate,
        timed_out=timed_out.is_set(),
    )


def _main(argv: Iterable[str] | None = None) -> int:
    """``python -m hfnemo.memwatch CMD ...``: run CMD and print its memory peak."""
    import json
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m hfnemo.memwatch CMD [ARG ...]", file=sys.stderr)
        return 2
    m = run_and_measure(args)
    sys.stdout.write(m.stdout)
    sys.stderr.write(m.stderr)
    rec = {k: v for k, v in m.__dict__.items() if k not in ("stdout", "stderr")}
    print(json.dumps(rec), file=sys.stderr)
    return m.returncode


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())


# --------------------------------------------------------------------------------- page cache
# Benchmarks evict the page cache of their inputs before each run and check how much of them is
# still resident; hfnemo.bench and benchmarks/bench_convert.py share these (stdlib only).

def files_under(path: "os.PathLike[str] | str") -> list[str]:
    """Every regular file at or below ``path``, sorted."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    out: list[str] = []
    for root, _dirs, names in os.walk(path):
        out += [os.path.join(root, n) for n in names]
    return sorted(out)


def evict_page_cache(paths: Iterable["os.PathLike[str] | str"]) -> bool:
    """os.sync(), then POSIX_FADV_DONTNEED on every file; False when fadvise is unavailable."""
    os.sync()
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        for f in files_under(p):
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)
    return True


_libc = None


def cached_fraction(paths: Iterable["os.PathLike[str] | str"]) -> float | None:
    """Fraction of the pages of ``paths`` resident in the page cache (mincore); None if unknown."""
    global _libc
    import ctypes
    import mmap

    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        page = mmap.PAGESIZE
        total = resident = 0
        for p in paths:
            for f in files_under(p):
                size = os.path.getsize(f)
                if size == 0:
                    continue
                with open(f, "rb") as fh:
                    mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)  # writable: from_buffer
                anchor = ctypes.c_char.from_buffer(mm)
                try:
                    npages = (size + page - 1) // page
                    vec = (ctypes.c_ubyte * npages)()
                    if _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                        return None
                    resident += npages - bytes(vec).count(0)
                    total += npages
                finally:
                    del anchor
                    mm.close()
        return resident / total if total else 0.0
    except Exception:  # noqa: BLE001 - an estimate; never fail a benchmark over it
        return None
