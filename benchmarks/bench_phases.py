"""Where the wall time of one ``hfnemo`` command goes: process start -> the plan is ready (the
conversion starts) -> published -> the process has exited. Not a test.

    python benchmarks/bench_phases.py [--repeat N] -- import SRC DST --max-memory 1GiB --overwrite

Runs the command N times as a child process (``python benchmarks/bench_phases.py --child ...``,
which is ``python -m hfnemo`` with two timestamps printed on stderr), and prints one JSON line per
run: ``startup_s`` (spawn to plan ready: interpreter, imports, planning), ``convert_s`` (plan ready
to published: what the Report's ``seconds`` measures), ``exit_s`` (published to the parent seeing
the exit: helper shutdown, interpreter finalisation) and ``wall_s``. ``--evict DIR`` drops the
page cache of every file under DIR first (``posix_fadvise(DONTNEED)`` after a ``sync``), for cold
runs; otherwise the cache is left as it is.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(argv: list[str]) -> None:
    import hfnemo.api as api
    from hfnemo import dist
    from hfnemo.cli import main

    run = api._run

    def timed(*a, **k):
        print(f"[phase] ready {time.time():.6f}", file=sys.stderr, flush=True)
        try:
            return run(*a, **k)
        finally:
            print(f"[phase] published {time.time():.6f}", file=sys.stderr, flush=True)

    api._run = timed
    sys.argv = ["hfnemo", *argv]
    dist.EXIT_FAST = True
    dist.exit(main())


def evict(root: str) -> None:
    import os

    os.sync()
    for d, _, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def parent(argv: list[str], repeat: int, evict_dir: str | None = None) -> None:
    for i in range(repeat):
        if evict_dir:
            evict(evict_dir)
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--child", *argv], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        t3 = time.time()
        marks = {line.split()[1]: float(line.split()[2]) for line in p.stderr.splitlines() if line.startswith("[phase]")}
        t1, t2 = marks.get("ready"), marks.get("published")
        row = {"bench": "phases", "run": i, "argv": argv, "rc": p.returncode, "cold": bool(evict_dir),
               "wall_s": round(t3 - t0, 3)}
        if t1 is not None and t2 is not None:
            row.update(startup_s=round(t1 - t0, 3), convert_s=round(t2 - t1, 3), exit_s=round(t3 - t2, 3))
        else:
            row["stderr_tail"] = p.stderr[-2000:]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        ap.add_argument("--repeat", type=int, default=1)
        ap.add_argument("--evict", metavar="DIR", help="drop the page cache of the files under DIR before each run")
        ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the hfnemo command line")
        a = ap.parse_args()
        cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
        if not cmd:
            ap.error("give the hfnemo command after --")
        parent(cmd, a.repeat, a.evict)
