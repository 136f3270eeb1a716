"""Kill -9 trials: shared by tests/test_faults.py and benchmarks/bench_faults.py.

A trial forks the (already imported) process; the child runs a conversion with a fault hook
(hfnemo.io.fileio.FAULT_HOOK) that SIGKILLs it at its k-th event (an output write, a journal
commit, a step of the manifest/publish), with a random commit interval and row-block size. The
parent then re-runs the same conversion in-process (another random block size) and compares every
output file with an uninterrupted run's, byte for byte.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import hfnemo.api as api
from hfnemo.exec import journal as jmod
from hfnemo.exec.staging import staging_dir
from hfnemo.io import fileio
from hfnemo.plan.planner import Budget

BLOCKS = (4096, 16384, 65536, 64 << 20)  # row-block sizes: many blocks per item .. one per item
COMMITS = (1, 65536, 1 << 20)  # journal commit interval in bytes (1: after every block)


def tree(root: str | Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def clean(dst: Path) -> None:
    for p in (dst, staging_dir(dst)):
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def block_size(block: int | None) -> Iterator[None]:
    """Row blocks of at most ``block`` bytes for conversions run inside the context."""
    old = api.Budget
    if block is not None:
        api.Budget = functools.partial(Budget, max_block=block)
    try:
        yield
    finally:
        api.Budget = old


def count_events(convert: Callable[[], Any]) -> int:
    n = 0

    def hook(event: str, f: object, nbytes: int) -> None:
        nonlocal n
        n += 1

    fileio.FAULT_HOOK = hook
    try:
        convert()
    finally:
        fileio.FAULT_HOOK = None
    return n


def _child_setup() -> None:
    # OpenMP's thread pool does not survive fork(): keep torch's own work on this thread
    # (conftest's deterministic mode fills new tensors, in parallel when it can).
    torch.set_num_threads(1)
    torch.utils.deterministic.fill_uninitialized_memory = False


def in_child(fn: Callable[[], str], timeout: float = 60.0) -> tuple[str, int]:
    """Run ``fn`` in a forked child; returns what it returned (or the exception it raised, as
    "Name: message") and the child's wait status (a SIGKILL inside ``fn`` leaves "")."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        code = 0
        try:
            os.close(r)
            _child_setup()
            try:
                out = fn()
            except BaseException as e:  # noqa: BLE001
                out, code = f"{type(e).__name__}: {e}", 3
            os.write(w, out.encode()[:60000])
        finally:
            os._exit(code)
    os.close(w)
    os.set_blocking(r, False)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            raise TimeoutError("the child process hung")
        time.sleep(0.002)
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    os.close(r)
    return b"".join(chunks).decode(), status


def run_killed(convert: Callable[[], Any], k: int, block: int, commit: int, timeout: float = 60.0) -> bool:
    """Run ``convert`` in a forked child that SIGKILLs itself at its k-th fault event. True when it
    was killed (False: it finished first)."""
    def child() -> str:
        seen = 0

        def hook(event: str, f: object, nbytes: int) -> None:
            nonlocal seen
            seen += 1
            if seen >= k:
                os.kill(os.getpid(), signal.SIGKILL)

        fileio.FAULT_HOOK = hook
        jmod.COMMIT_BYTES = commit
        api.Budget = functools.partial(Budget, max_block=block)
        convert()
        return "finished"

    out, status = in_child(child, timeout)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3:
        raise RuntimeError(f"the child conversion failed before fault event {k}: {out}")
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@dataclass
class Trial:
    k: int
    block: int
    commit: int
    resume_block: int
    killed: bool
    published: bool  # the child got as far as the rename
    journal_at: tuple[int, int] | None  # where the journal said the run stood
    resumed_bytes: int
    identical: bool
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def kill_trial(convert: Callable[[], Any], dst: Path, ref: dict[str, str], k: int, block: int, commit: int,
               resume_block: int) -> Trial:
    t0 = time.perf_counter()
    clean(dst)
    killed = run_killed(convert, k, block, commit)
    published = dst.exists()
    prior = jmod._parse(staging_dir(dst) / jmod.JOURNAL)
    at = prior.start if prior is not None else None
    resumed = 0
    if not published:
        with block_size(resume_block):
            resumed = convert().resumed_bytes
    same = tree(dst) == ref and not staging_dir(dst).exists()
    return Trial(k, block, commit, resume_block, killed, published, at, resumed, same,
                 time.perf_counter() - t0)


def kill_trials(convert: Callable[[], Any], dst: Path, n: int, seed: int) -> tuple[list[Trial], int]:
    """``n`` trials at random fault events; returns them and the number of events of a clean run."""
    clean(dst)
    events = count_events(convert)
    ref = tree(dst)
    rng = random.Random(seed)
    trials = [kill_trial(convert, dst, ref, rng.randint(1, events), rng.choice(BLOCKS), rng.choice(COMMITS),
                         rng.choice(BLOCKS)) for _ in range(n)]
    return trials, events


def kill_trials_isolated(convert: Callable[[], Any], dst: Path, n: int, seed: int,
                         timeout: float = 600.0) -> tuple[list[Trial], int]:
    """:func:`kill_trials` in a forked child, so that the test process's own memory (its peak
    RSS, which later tests read) does not carry the conversions'."""
    import json

    out, status = in_child(lambda: json.dumps(_trials_json(convert, dst, n, seed)), timeout)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise RuntimeError(f"the trial runner failed: {out}")
    doc = json.loads(out)
    return [Trial(**{**t, "journal_at": tuple(t["journal_at"]) if t["journal_at"] else None})
            for t in doc["trials"]], doc["events"]


def _trials_json(convert: Callable[[], Any], dst: Path, n: int, seed: int) -> dict[str, Any]:
    trials, events = kill_trials(convert, dst, n, seed)
    return {"trials": [t.to_json() for t in trials], "events": events}
