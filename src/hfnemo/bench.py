"""``hfnemo bench``: how fast is a conversion of *this* checkpoint on *this* disk, against a plain copy?

Two measurements, each in a child process, with the page cache of the source evicted before
every run (``os.sync()`` + ``posix_fadvise(DONTNEED)``, checked with ``mincore``, as
``benchmarks/bench_convert.py`` does):

1. the **copy floor**: read exactly the byte ranges the conversion reads (the plan's source
   tensors, in the source files) and write exactly as many bytes as it writes, into as many
   files, in a scratch directory on the output's filesystem (16 MiB ``readinto``/``write``);
2. the **conversion**: ``python -m hfnemo import|export SRC OUT ...``, sampled every ~50 ms for
   the bytes its output occupies on disk (-> bytes/s) and the summed PSS of its process tree
   (``hfnemo.memwatch``).

Both move the same bytes, so ``ratio_to_floor`` is simply ``wall / floor wall``. Rates are output
bytes per second (``write_bytes / wall``), like the converter's own report.

Process layout: ``hfnemo bench`` plans in the CLI process (torch loaded), writes ``spec.json`` into
the scratch directory and then *execs* a bare interpreter that runs :func:`_harness` from this file
(loaded by path, no ``import hfnemo``). PSS charges a page mapped by two processes half to each, so
a parent holding torch's libraries would hide part of the measured child's memory; after the exec
no process but the child maps them. The harness removes the scratch directory unless ``--keep``.

This module's top level is stdlib-only for that reason; everything touching hfnemo or torch is
imported inside the functions that run in the CLI process.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUF = 16 << 20  # copy floor buffer
INTERVAL = 0.05  # sampling interval of the conversion (s)
RATE_WINDOW = 0.25  # bytes/s are differences over this many seconds of samples
PNG_PX = (1000, 600)  # width, height of --png in pixels
PNG_DPI = 100
PLOT_HINT = "pip install 'hfnemo[plot]'"
MAX_TIMELINE = 1000  # points of the timeline kept in the JSON line
EVICTED_BELOW = 0.02  # cached fraction under which the source counts as evicted

# `python -c _STUB <this file> <cmd> ...`: run this file's _entry without importing the package.
_STUB = ("import importlib.util, sys\n"
         "s = importlib.util.spec_from_file_location('_hfnemo_bench', sys.argv[1])\n"
         "m = importlib.util.module_from_spec(s)\n"
         "sys.modules['_hfnemo_bench'] = m\n"
         "s.loader.exec_module(m)\n"
         "sys.exit(m._entry(sys.argv[2:]))\n")


# =============================================================================== CLI process

def _require_matplotlib() -> None:
    from hfnemo.errors import UsageError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--png needs matplotlib, which is not installed",
                         fix=f"{PLOT_HINT}  (or pip install matplotlib), or leave out --png") from None


def _read_ranges(plan: Any) -> list[tuple[str, int, int]]:
    """(file, offset, length) of every byte range the conversion reads, coalesced where adjacent."""
    ranges: list[tuple[str, int, int]] = []
    reader = None
    try:
        for src in plan.sources:
            kind = src.location[0]
            if kind == "safetensors":
                _, path, offset = src.location
                ranges.append((str(path), int(offset), src.nbytes))
            elif kind == "legacy":
                for path, off, lr0, n, _gr0, _col, _cols, lrb in src.location[1]:
                    ranges.append((str(path), int(off) + lr0 * lrb, n * lrb))
            elif kind == "dcp":  # the chunk rows RowReader._read_dcp preads (whole rows of each chunk)
                if reader is None:
                    from hfnemo.exec.sources import RowReader
                    from hfnemo.io.dcp import read_index

                    reader = RowReader(index=read_index(Path(plan.source) / "weights"))
                ranges.extend(reader.byte_ranges(src, 0, src.shape[0] if src.shape else 1))
            else:
                raise ValueError(f"unknown source location {kind!r}")
    finally:
        if reader is not None:
            reader.close()
    ranges.sort()
    out: list[tuple[str, int, int]] = []
    for f, off, n in ranges:
        if n <= 0:
            continue
        if out and out[-1][0] == f and out[-1][1] + out[-1][2] == off:
            out[-1] = (f, out[-1][1], out[-1][2] + n)
        else:
            out.append((f, off, n))
    return out


def _scratch_base(src: Path, out: str | None) -> Path:
    """A directory on the output's filesystem for the scratch directory: beside --out (inside it
    when it is an existing directory on another filesystem than its parent, e.g. a mount point);
    without --out, beside the source (where `plan` checks the disk)."""
    from hfnemo.errors import UsageError

    if not out:
        return src.resolve().parent
    o = Path(out).expanduser().resolve()
    if o.is_dir() and o.stat().st_dev != o.parent.stat().st_dev:
        return o
    if not o.parent.is_dir():
        raise UsageError(f"--out {out}: {o.parent} does not exist", file=o.parent,
                         fix="create the parent directory or choose another --out")
    return o.parent


def run(args: Any) -> int:
    """The ``bench`` subcommand: plan here, then exec the measuring harness (does not return
    on success). Errors before the exec are ConversionErrors (exit 2)."""
    from hfnemo.api import plan as make_plan
    from hfnemo.errors import InsufficientDisk, UsageError
    from hfnemo.memwatch import parse_size

    src = Path(args.src).expanduser()
    if not src.exists():
        raise UsageError(f"{src} does not exist", file=src, fix="check the path")
    src = src.resolve()
    try:
        budget = parse_size(args.max_memory)
    except ValueError as e:
        raise UsageError(f"--max-memory {args.max_memory!r}: {e}", fix="write it like 1GiB, 512MiB or 5GB") from None
    if args.repeat < 1:
        raise UsageError(f"--repeat {args.repeat}", fix="use --repeat 1 or more")
    png = None
    if args.png:
        png = Path(args.png).expanduser().resolve()
        if not png.parent.is_dir():
            raise UsageError(f"--png {args.png}: {png.parent} does not exist", file=png.parent,
                             fix="create the directory or choose another --png path")
        _require_matplotlib()
    p = make_plan(src, to=args.to, dtype=args.dtype, max_memory=budget, tp=args.tp)
    verb = {"hf_to_nemo": "import", "nemo_to_hf": "export"}.get(p.direction)
    if verb is None:
        raise UsageError(f"bench measures import and export, not {p.direction}", file=src)
    if verb == "export" and args.tp != 1:
        raise UsageError("--tp applies to NeMo output", fix="leave out --tp for --to hf")
    reads = _read_ranges(p)
    sizes: dict[str, int] = {}
    for it in p.items:
        sizes[it.file] = sizes.get(it.file, 0) + it.nbytes
    writes = [sizes[f] for f in p.files if sizes.get(f)] + [n for f, n in sizes.items() if f not in p.files and n]

    base = _scratch_base(src, args.out)
    keep = bool(args.keep)
    need = p.write_bytes * (2 if keep else 1) + (64 << 20)
    free = shutil.disk_usage(base).free
    if free < need:
        raise InsufficientDisk(f"bench needs {need} bytes of scratch space at {base} but only {free} are free",
                               file=base, fix="free disk space or pass --out on another disk")
    try:
        run_dir = Path(tempfile.mkdtemp(prefix=".hfnemo-bench-", dir=base))
    except OSError as e:
        raise UsageError(f"cannot create a scratch directory in {base}: {e.strerror}", file=base,
                         fix="pass --out DIR on a writable disk") from None
    pkg_root = str(Path(__file__).resolve().parent.parent)
    conv_out = run_dir / "conv" / "out"
    argv = [sys.executable, "-m", "hfnemo", verb, str(src), str(conv_out), "--max-memory", args.max_memory,
            "--dtype", args.dtype, "--quiet", "--json"] + (["--tp", str(args.tp)] if verb == "import" else [])
    spec = {
        "src": str(src), "verb": verb, "direction": p.direction, "arch": p.arch, "dtype": p.dtype,
        "read_bytes": p.read_bytes, "write_bytes": p.write_bytes, "files": list(p.files), "tensors": len(p.items),
        "reads": reads, "writes": writes, "budget": budget, "repeat": args.repeat, "keep": keep,
        "json": bool(args.json), "png": str(png) if png else None, "run_dir": str(run_dir),
        "conv_out": str(conv_out), "argv": argv, "pythonpath": pkg_root, "interval": INTERVAL,
    }
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    del p
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, "-c", _STUB, str(Path(__file__).resolve()), "harness",
                                  str(spec_path)])
    except OSError as e:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise UsageError(f"cannot start the measuring process: {e}", fix=f"check {sys.executable}") from None
    return 1  # pragma: no cover - execv does not return


# =============================================================================== harness (stdlib only)

def _entry(argv: list[str]) -> int:
    if argv[:1] == ["harness"]:
        return _harness(Path(argv[1]))
    if argv[:1] == ["floor"]:
        return _floor_worker(Path(argv[1]), Path(argv[2]))
    print(f"hfnemo bench: unknown internal command {argv!r}", file=sys.stderr)
    return 1


def _memwatch() -> Any:
    """hfnemo/memwatch.py (stdlib only), without importing the hfnemo package (and torch)."""
    mod = sys.modules.get("hfnemo.memwatch") or sys.modules.get("_hfnemo_bench_memwatch")
    if mod is not None:
        return mod
    import importlib.util

    spec = importlib.util.spec_from_file_location("_hfnemo_bench_memwatch", Path(__file__).with_name("memwatch.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_hfnemo_bench_memwatch"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _files(path: Path) -> list[Path]:
    return [Path(f) for f in _memwatch().files_under(path)]


def _tree_size(root: Path) -> int:
    """Bytes of the regular files under ``root`` (st_size), tolerant of files renamed mid-walk."""
    total = 0
    stack = [str(root)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    return total


def _evict(paths: list[Path]) -> bool:
    return _memwatch().evict_page_cache(paths)


def _cached_fraction(paths: list[Path]) -> float | None:
    return _memwatch().cached_fraction(paths)


def _rm(path: Path) -> None:
    """Evict then delete ``path`` (its dirty pages are written back first: no stale writeback later)."""
    if path.exists():
        _evict([path])
        shutil.rmtree(path, ignore_errors=True)


def _floor_worker(spec_path: Path, out_dir: Path) -> int:
    """Read the spec's byte ranges, write the spec's file sizes; one JSON line on stdout."""
    spec = json.loads(spec_path.read_text())
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = bytearray(BUF)
    mv = memoryview(buf)
    writes = list(spec["writes"])
    wi, fo, left = 0, None, 0
    read = written = 0
    last = 0  # valid bytes in buf

    def put(n: int) -> None:
        """Write n bytes of buf to the outputs (rolling over files)."""
        nonlocal wi, fo, left, written
        o = 0
        while o < n:
            if left == 0:
                if fo is not None:
                    fo.close()
                    fo = None
                if wi >= len(writes):
                    return
                fo = open(out_dir / f"{wi:05d}.bin", "wb", buffering=0)
                left = writes[wi]
                wi += 1
                continue
            k = min(n - o, left)
            w = 0
            while w < k:
                w += fo.write(mv[o + w:o + k])
            o += k
            left -= k
            written += k

    for path, off, length in spec["reads"]:
        with open(path, "rb", buffering=0) as fi:
            fi.seek(off)
            while length > 0:
                n = fi.readinto(mv[:min(BUF, length)])
                if not n:
                    raise SystemExit(f"{path}: short read at {off}")
                read += n
                length -= n
                off += n
                last = n
                put(n)
    total_w = sum(writes)
    if written < total_w and last == 0:  # nothing read (e.g. an empty plan): write zeros
        last = BUF
    while written < total_w:
        put(min(last, total_w - written))
    if fo is not None:
        fo.close()
    print(json.dumps({"bytes_read": read, "bytes_written": written, "files_read": len({r[0] for r in spec["reads"]}),
                      "files_written": len(writes), "inner_s": time.perf_counter() - t0}))
    return 0


def _parse_json(text: str) -> Any:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _disk(path: Path) -> dict[str, Any]:
    du = shutil.disk_usage(path)
    dev = fs = None
    try:
        cols = subprocess.run(["df", "-PT", str(path)], capture_output=True, text=True,
                              timeout=10, check=False).stdout.splitlines()[1].split()
        dev, fs = cols[0], cols[1]
    except Exception:
        pass
    return {"path": str(path), "device": dev, "fstype": fs, "total_bytes": du.total, "free_bytes": du.free}


class _Harness:
    def __init__(self, spec_path: Path) -> None:
        self.spec_path = spec_path
        self.spec = json.loads(spec_path.read_text())
        self.mw = _memwatch()
        self.run = Path(self.spec["run_dir"])
        self.src = Path(self.spec["src"])
        self.budget = int(self.spec["budget"])
        self.repeat = int(self.spec["repeat"])
        self.env = dict(os.environ)
        pp = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = os.pathsep.join([self.spec["pythonpath"]] + ([pp] if pp else []))
        self.read_files = sorted({Path(r[0]) for r in self.spec["reads"]}) or [self.src]

    # -- page cache ---------------------------------------------------------------------- #
    def cold(self) -> tuple[bool, float | None]:
        ok = _evict([self.src])
        return ok, _cached_fraction(self.read_files)

    @staticmethod
    def page_cache(runs: list[dict[str, Any]]) -> dict[str, Any]:
        fr = [r["cached_fraction_before"] for r in runs]
        known = [f for f in fr if f is not None]
        if not all(r["fadvise"] for r in runs):
            evicted: bool | None = False
        elif len(known) < len(fr):
            evicted = None  # mincore unavailable: not verified
        else:
            evicted = max(known, default=0.0) <= EVICTED_BELOW
        return {"policy": "cold", "method": "fadvise_dontneed", "eviction_possible": evicted,
                "cached_fraction_before": fr}

    # -- the two measurements ---------------------------------------------------------- #
    def floor(self) -> dict[str, Any]:
        out = self.run / "floor"
        runs = []
        for r in range(self.repeat):
            _rm(out)
            fadv, cached = self.cold()
            argv = [sys.executable, "-c", _STUB, str(Path(__file__).resolve()), "floor", str(self.spec_path), str(out)]
            m = self.mw.run_and_measure(argv, interval=INTERVAL, cwd=str(self.run), env=self.env)
            t0 = time.perf_counter()
            os.sync()
            sync_s = time.perf_counter() - t0
            rep = _parse_json(m.stdout)
            _log(f"copy floor run {r + 1}/{self.repeat}: wall {m.wall_s:.3f} s, peak PSS "
                 f"{self.mw.format_size(m.peak_pss_bytes)}, cached before {_pct(cached)}")
            if not m.ok or rep is None:
                raise _StepFailed("copy_floor", m.returncode, m.stderr, m.stdout)
            runs.append({"wall_s": m.wall_s, "sync_s": sync_s, "peak_pss_bytes": m.peak_pss_bytes,
                         "fadvise": fadv, "cached_fraction_before": cached, "report": rep})
        if not self.spec["keep"]:
            _rm(out)
        return self.record("copy_floor", runs)

    def convert(self, floor: dict[str, Any]) -> dict[str, Any]:
        conv = self.run / "conv"
        runs = []
        for r in range(self.repeat):
            _rm(conv)
            conv.mkdir()
            fadv, cached = self.cold()
            res = self.measure(self.spec["argv"], conv)
            t0 = time.perf_counter()
            os.sync()
            res["sync_s"] = time.perf_counter() - t0
            res.update(fadvise=fadv, cached_fraction_before=cached)
            _log(f"{self.spec['verb']} run {r + 1}/{self.repeat}: wall {res['wall_s']:.3f} s, peak PSS "
                 f"{self.mw.format_size(res['peak_pss_bytes'])}, {res['samples']} samples, "
                 f"cached before {_pct(cached)}")
            if res["returncode"] != 0:
                raise _StepFailed(self.spec["verb"], res["returncode"], res["stderr"], res["stdout"])
            res["out_bytes"] = _tree_size(Path(self.spec["conv_out"]))
            runs.append(res)
        rec = self.record(self.spec["verb"], runs, floor)
        return rec

    def measure(self, argv: list[str], root: Path) -> dict[str, Any]:
        """Run argv; sample (time, bytes under root, tree PSS) every INTERVAL s."""
        mw = self.mw
        logs = self.run / "logs"
        logs.mkdir(exist_ok=True)
        t0 = time.perf_counter()

        class Series(mw.PeakMemorySampler):  # type: ignore[name-defined,misc]
            def __init__(self, pid: int) -> None:
                super().__init__(pid, INTERVAL, max_duty=0.25)
                self.points: list[tuple[float, int, int]] = []

            def sample(self) -> int:
                t = time.perf_counter() - t0  # when the sample began: before the child's exit or after it
                pss = super().sample()
                self.points.append((t, _tree_size(root), pss))
                return pss

        with open(logs / "stdout", "wb") as so, open(logs / "stderr", "wb") as se:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=so, stderr=se, env=self.env,
                                    cwd=str(self.run))
            sampler = Series(proc.pid)
            sampler.start()
            try:
                _, status, _ru = os.wait4(proc.pid, 0)
            except BaseException:
                mw._kill_tree(proc.pid)
                proc.wait()
                sampler.stop(final_sample=False)
                raise
            wall = time.perf_counter() - t0
            sampler.stop(final_sample=False)
        proc.returncode = os.waitstatus_to_exitcode(status)
        # A sample the thread began after the child had exited (it races wait4) describes no
        # running process and would put a time past the end: the timeline ends at the wall.
        points = [p for p in sampler.points if p[0] < wall] + [(wall, _tree_size(root), 0)]
        stdout = (logs / "stdout").read_text(errors="replace")
        return {"wall_s": wall, "returncode": proc.returncode, "peak_pss_bytes": sampler.peak_bytes,
                "peak_rss_hwm_bytes": sampler.last_hwm_bytes or sampler.peak_hwm_bytes,
                "peak_nprocs": sampler.peak_nprocs, "samples": sampler.samples,
                "sample_time_s": sampler.sample_time_s, "approximate": sampler.approximate, "points": points,
                "stdout": stdout, "stderr": (logs / "stderr").read_text(errors="replace"),
                "report": _parse_json(stdout)}

    def record(self, bench: str, runs: list[dict[str, Any]], floor: dict[str, Any] | None = None) -> dict[str, Any]:
        s = self.spec
        walls = [r["wall_s"] for r in runs]
        best = min(range(len(runs)), key=lambda i: walls[i])
        wmin, wmed = walls[best], statistics.median(walls)
        durable = [r["wall_s"] + r["sync_s"] for r in runs]
        wb = s["write_bytes"]
        peak = max(r["peak_pss_bytes"] for r in runs)
        rec: dict[str, Any] = {
            "bench": bench, "source": s["src"], "direction": s["direction"], "arch": s["arch"],
            "read_bytes": s["read_bytes"], "write_bytes": wb, "repeat": self.repeat,
            "wall_s": round(wmin, 4), "wall_s_median": round(wmed, 4), "wall_s_runs": [round(w, 4) for w in walls],
            "gb_per_s": round(wb / wmin / 1e9, 4) if wmin else None,
            "gb_per_s_median": round(wb / wmed / 1e9, 4) if wmed else None,
            "sync_s_median": round(statistics.median(r["sync_s"] for r in runs), 4),
            "wall_plus_sync_s": round(min(durable), 4),
            "peak_pss_bytes": peak,
        }
        if bench == "copy_floor":
            rep = runs[best]["report"]
            rec.update({"floor_bytes_read": rep["bytes_read"], "floor_bytes_written": rep["bytes_written"],
                        "files_read": rep["files_read"], "files_written": rep["files_written"],
                        "bytes_match_plan": rep["bytes_read"] == s["read_bytes"] and rep["bytes_written"] == wb,
                        "fsync": False})
        else:
            b = runs[best]
            rep = b["report"] or {}
            fw = floor["wall_s"] if floor else None
            fd = floor["wall_plus_sync_s"] if floor else None
            rec.update({
                "out_bytes": b["out_bytes"],
                "report_seconds": rep.get("seconds"),
                "bytes_match_plan": rep.get("bytes_read") == s["read_bytes"] and rep.get("bytes_written") == wb,
                "ratio_to_floor": round(wmin / fw, 3) if fw else None,
                "ratio_to_floor_median": round(wmed / floor["wall_s_median"], 3) if fw else None,
                "ratio_to_floor_durable": round(min(durable) / fd, 3) if fd else None,
                "floor_gb_per_s": floor["gb_per_s"] if floor else None,
                "max_memory_bytes": self.budget,
                "peak_over_budget": peak > self.budget,
                "peak_to_budget": round(peak / self.budget, 4) if self.budget else None,
                "peak_rss_hwm_bytes": max(r["peak_rss_hwm_bytes"] for r in runs),
                "peak_nprocs": max(r["peak_nprocs"] for r in runs),
                "samples": sum(r["samples"] for r in runs),
                "sample_interval_s": INTERVAL,
                "sample_time_s": round(sum(r["sample_time_s"] for r in runs), 4),
                "pss_approximate": any(r["approximate"] for r in runs),
                "timeline": _timeline(b["points"]),
                "command": s["argv"],
                "report": b["report"],
                "returncode": b["returncode"],
            })
        rec["page_cache"] = self.page_cache(runs)
        rec["fsync_policy"] = ("wall_s excludes any sync; os.sync() after each run is timed as sync_s; "
                               "hfnemo fsyncs its outputs, the floor does not (compare *_durable)")
        rec["scratch"] = _disk(self.run)
        return rec

    # -- all of it ------------------------------------------------------------------------ #
    def main(self) -> int:
        s = self.spec
        _log(f"{s['verb']} {s['src']}: read {s['read_bytes'] / 1e9:.3f} GB, write {s['write_bytes'] / 1e9:.3f} GB; "
             f"scratch {self.run}")
        floor = self.floor()
        conv = self.convert(floor)
        png = s["png"]
        if png:
            plot_png(Path(png), conv, floor, self.budget)
        conv["png"] = png
        kept = str(self.run) if s["keep"] else None
        conv["kept"] = kept
        conv["kept_output"] = s["conv_out"] if s["keep"] else None
        if s["json"]:
            for rec in (floor, conv):
                print(json.dumps(rec), flush=True)
        else:
            sys.stdout.write(summary(floor, conv))
            sys.stdout.flush()
        return 0


class _StepFailed(Exception):
    def __init__(self, bench: str, rc: int, stderr: str, stdout: str) -> None:
        super().__init__(bench)
        self.bench, self.rc, self.stderr, self.stdout = bench, rc, stderr, stdout


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.1f}%"


def _x(ratio: float | None) -> str:
    return "?x" if ratio is None else f"{ratio:.2f}x"


def _timeline(points: list[tuple[float, int, int]]) -> dict[str, list]:
    step = max(1, -(-len(points) // MAX_TIMELINE))
    pts = points[::step]
    if pts and pts[-1] is not points[-1]:
        pts.append(points[-1])
    return {"t_s": [round(t, 4) for t, _, _ in pts], "out_bytes": [o for _, o, _ in pts],
            "pss_bytes": [m for _, _, m in pts]}


def rates(t: list[float], out: list[int], window: float = RATE_WINDOW) -> tuple[list[float], list[float]]:
    """Output bytes/s at each sample: the growth over the last ``window`` seconds."""
    ts, rs = [], []
    j = 0
    for i in range(1, len(t)):
        while j < i - 1 and t[i] - t[j + 1] >= window:
            j += 1
        dt = t[i] - t[j]
        if dt > 0:
            ts.append(t[i])
            rs.append(max(0.0, (out[i] - out[j]) / dt))
    return ts, rs


def plot_png(path: Path, conv: dict[str, Any], floor: dict[str, Any], budget: int) -> None:
    """Two stacked panels over time: output bytes/s (floor average dashed) and tree PSS (budget red)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise _PlotMissing() from None
    tl = conv["timeline"]
    t, out, pss = tl["t_s"], tl["out_bytes"], tl["pss_bytes"]
    rt, rv = rates(t, out)
    fig = Figure(figsize=(PNG_PX[0] / PNG_DPI, PNG_PX[1] / PNG_DPI), dpi=PNG_DPI)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(rt, [r / 1e6 for r in rv], color="tab:blue", lw=1.2, label=f"{conv['bench']} (output bytes/s)")
    floor_rate = (floor["write_bytes"] / floor["wall_s"]) if floor["wall_s"] else 0.0
    top.axhline(floor_rate / 1e6, color="tab:gray", ls="--", lw=1.2,
                label=f"copy floor average {floor_rate / 1e6:.0f} MB/s")
    top.set_ylabel("MB/s")
    top.set_ylim(bottom=0)
    top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    top.set_title(f"hfnemo {conv['bench']} {conv['arch']}: {conv['wall_s']:.2f} s, {conv['gb_per_s']:.3f} GB/s, "
                  f"{_x(conv['ratio_to_floor'])} the copy floor", fontsize=10)
    mib = 1 << 20
    bottom.plot(t, [m / mib for m in pss], color="tab:green", lw=1.2, label="PSS of the process tree")
    bottom.axhline(budget / mib, color="red", lw=1.2, label=f"budget {budget / mib:.0f} MiB")
    bottom.set_ylabel("memory (MiB)")
    bottom.set_xlabel("time since start (s)")
    bottom.set_ylim(0, max(budget, max(pss, default=0)) / mib * 1.1)
    bottom.legend(loc="upper right", fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=PNG_DPI, format="png")


class _PlotMissing(Exception):
    pass


def summary(floor: dict[str, Any], conv: dict[str, Any]) -> str:
    gib = 1 << 30
    mib = 1 << 20
    pc = conv["page_cache"]
    ev = pc["eviction_possible"]
    worst = max((f for f in pc["cached_fraction_before"] + floor["page_cache"]["cached_fraction_before"]
                 if f is not None), default=None)
    cache = {True: f"evicted before every run (posix_fadvise DONTNEED; at most {_pct(worst)} of the source cached)",
             False: f"NOT evicted ({_pct(worst)} of the source stayed cached): the numbers are warm-cache",
             None: "eviction requested (posix_fadvise DONTNEED) but not verifiable (mincore unavailable)"}[ev]
    runs = f" (best of {conv['repeat']}, median {conv['wall_s_median']:.2f} s)" if conv["repeat"] > 1 else ""
    frun = f" (best of {floor['repeat']}, median {floor['wall_s_median']:.2f} s)" if floor["repeat"] > 1 else ""
    inproc = f", in-process {conv['report_seconds']:.2f} s" if conv.get("report_seconds") else ""
    lines = [
        f"hfnemo bench: {conv['bench']} {conv['arch']} {conv['source']}",
        (f"  bytes       read {conv['read_bytes'] / 1e9:.3f} GB from {floor['files_read']} file(s), "
         f"write {conv['write_bytes'] / 1e9:.3f} GB into {floor['files_written']} file(s)"),
        f"  copy floor  {floor['wall_s']:.2f} s  {floor['gb_per_s']:.3f} GB/s{frun}",
        (f"  {conv['bench']:<10s}  {conv['wall_s']:.2f} s  {conv['gb_per_s']:.3f} GB/s  "
         f"{_x(conv['ratio_to_floor'])} the floor ({_x(conv['ratio_to_floor_durable'])} with sync){inproc}{runs}"),
        (f"  memory      peak PSS {conv['peak_pss_bytes'] / mib:.0f} MiB of {conv['max_memory_bytes'] / gib:.2f} GiB "
         f"budget ({100 * conv['peak_to_budget']:.0f}%{', OVER BUDGET' if conv['peak_over_budget'] else ''})"),
        f"  page cache  {cache}",
    ]
    if conv.get("png"):
        lines.append(f"  plot        {conv['png']}")
    if conv.get("kept"):
        lines.append(f"  kept        {conv['kept']} (conversion output: {conv['kept_output']})")
    return "\n".join(lines) + "\n"


def _harness(spec_path: Path) -> int:
    h = None
    rc = 1
    try:
        h = _Harness(spec_path)
        rc = h.main()
    except _StepFailed as e:
        err = {"bench": e.bench, "error": f"{e.bench} failed (exit {e.rc})", "returncode": e.rc,
               "stderr_tail": e.stderr[-4000:], "stdout_tail": e.stdout[-1000:]}
        if h is not None and h.spec.get("json"):
            print(json.dumps(err), flush=True)
        tail = e.stderr.strip().splitlines()[-12:]
        print(f"hfnemo: error: bench: {e.bench} failed (exit {e.rc})" + "".join(f"\n  {ln}" for ln in tail),
              file=sys.stderr)
        rc = 2 if e.rc == 2 else 1
    except _PlotMissing:
        print(f"hfnemo: error: --png needs matplotlib, which is not installed\n  fix:    {PLOT_HINT}",
              file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        print("hfnemo: interrupted", file=sys.stderr)
        rc = 130
    finally:
        spec = h.spec if h is not None else json.loads(spec_path.read_text())
        if not spec.get("keep"):
            shutil.rmtree(spec["run_dir"], ignore_errors=True)
        elif rc == 0:
            _log(f"kept {spec['run_dir']}")
    return rc
