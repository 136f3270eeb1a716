"""One checkpoint written by many processes (and machines), on torch.distributed.

Every rank plans the whole conversion (a pure function of metadata, so every rank gets the same
plan), takes its share of the output files and writes them into the one staging directory beside
the output, through a resume journal of its own (``hfnemo-journal-<rank>.jsonl``). Rank 0 then
gathers every rank's write results (where each DCP chunk landed, each file's size and xxh3_64),
writes ``.metadata`` (or the HF index), the side files and the manifest last, and renames the
staging directory into place. No scheduler: the ranks come from ``torchrun`` (or any launcher that
sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), or from ``--workers N``
(:func:`spawn`), which starts them on this machine.

Shares (:func:`owners`): an import into DCP lays its chunks over ``__<rank>_<i>.distcp`` files
balanced by size (:func:`hfnemo.plan.planner.layout_nemo` with ``writers``), so rank ``r`` writes
the files torch's own writer would give it; HF shards and legacy per-rank files are handed out
whole, largest first to the least loaded rank. Each rank holds the memory budget on its own.

Collectives are few and small: one barrier-like exchange per phase (preflight, journals read,
journals ready, shares written, published), each carrying every rank's outcome, so that an error
on any rank stops all of them at the same point with the same message, and a rank that dies makes
the others stop with their journals consistent. gloo on CPU; with ``--device cuda`` the group is
``cpu:gloo,cuda:nccl`` and every rank takes the GPU of its local rank.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from hfnemo import errors
from hfnemo.errors import ConversionError, UsageError

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
JOURNAL_FMT = "hfnemo-journal-{rank}.jsonl"
# A rank waits for the slowest one at the end of the writing: as long as a conversion can take.
TIMEOUT = datetime.timedelta(hours=48)


def _since_start() -> float:
    """Seconds since this process started (from /proc; since the first call elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def trace(what: str) -> None:
    """``HFNEMO_TRACE=1``: one line per phase on stderr, seconds since the process started."""
    if os.environ.get("HFNEMO_TRACE"):
        print(f"hfnemo[rank {os.environ.get('RANK', '0')}] {_since_start():8.3f}s {what}", file=sys.stderr, flush=True)


# Set by the command line (``python -m hfnemo``, a ``--workers`` rank), which ends through exit():
# a rank then leaves without the interpreter's finalisation, so rank 0 need not import torch's DCP
# classes before joining the group (see join()).
EXIT_FAST = False


def exit(code: int) -> None:  # noqa: A001 - the process's exit, as sys.exit
    """End the process with ``code``. A rank of a world of several (every file it wrote is closed
    and fsynced by now) leaves with os._exit: torch keeps a gloo group alive past
    destroy_process_group once the DCP classes were imported while it existed, and its threads
    then race the interpreter's finalisation (std::terminate). So does a process whose background
    import of torch (hfnemo.lazy.prewarm) is still running, e.g. after an early error: its result
    is printed and nothing is left to write, so it does not wait seconds for an import it will not
    use."""
    from hfnemo import lazy

    if writers() > 1 or lazy.pending():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) outside one."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError as e:
        raise UsageError(f"RANK / WORLD_SIZE are not integers: {e}",
                         fix="launch with torchrun (or unset RANK and WORLD_SIZE)") from e
    if size < 1 or not 0 <= rank < size:
        raise UsageError(f"RANK={rank} WORLD_SIZE={size} is not a rank of that world",
                         fix="launch with torchrun (or unset RANK and WORLD_SIZE)")
    return rank, size


def writers() -> int:
    """How many processes write the checkpoint being planned."""
    return world()[1]


def rank() -> int:
    return world()[0]


def journal_names(size: int) -> tuple[str, ...]:
    from hfnemo.exec.journal import JOURNAL

    return (JOURNAL,) if size == 1 else tuple(JOURNAL_FMT.format(rank=r) for r in range(size))


# ------------------------------------------------------------------------------ shares

def owners(plan: Any, size: int) -> dict[str, int]:
    """Which rank writes each output file of ``plan``. DCP files ``__<r>_<i>.distcp`` belong to rank
    ``r``; any other files (HF shards, legacy rank files) go whole, largest first, to the rank with
    the fewest bytes so far."""
    import re

    dcp = [re.fullmatch(r"__(\d+)_\d+\.distcp", f) for f in plan.files]
    if plan.files and all(dcp):
        out = {f: int(m.group(1)) for f, m in zip(plan.files, dcp)}
        if max(out.values()) >= size:
            raise UsageError(f"the plan is laid out for {max(out.values()) + 1} writers, the world has {size}",
                             fix="plan with the same WORLD_SIZE as the run")
        return out
    sizes = {f: 0 for f in plan.files}
    for it in plan.items:
        sizes[it.file] += it.nbytes
    load = [0] * size
    out = {}
    for f in sorted(plan.files, key=lambda f: (-sizes[f], plan.files.index(f))):
        r = min(range(size), key=lambda k: (load[k], k))
        out[f] = r
        load[r] += sizes[f]
    return out


def share(plan: Any, rank: int, size: int) -> Any:
    """The part of ``plan`` that ``rank`` writes: its files, their items and blobs, in plan order."""
    own = {f for f, r in owners(plan, size).items() if r == rank}
    return dataclasses.replace(plan, items=tuple(i for i in plan.items if i.file in own),
                               byte_items=tuple(b for b in plan.byte_items if b.file in own),
                               files=tuple(f for f in plan.files if f in own))


# ------------------------------------------------------------------------------ the group

class PeerFailed(ConversionError):
    """Another rank of the conversion failed or stopped; its own message says why (rank 0 repeats it)."""

    def __init__(self, message: str, *, exit_code: int = 2, quiet: bool = False, keep: bool = True,
                 **kw: Any) -> None:
        super().__init__(message, **kw)
        self.exit_code = exit_code
        self.quiet = quiet  # the CLI prints nothing: rank 0 reports for every rank
        self.keep_staging = keep  # the failure keeps the staging directory (resumable)


@dataclass
class _Outcome:
    ok: bool
    value: Any = None
    kind: str = ""  # error class name
    message: str = ""
    file: str | None = None
    tensor: str | None = None
    fix: str | None = None
    exit_code: int = 1
    interrupted: bool = False
    keep: bool = False  # the staging directory stays resumable (I/O errors, interrupts, lost peers)


def _outcome_of(e: BaseException) -> _Outcome:
    if isinstance(e, ConversionError):
        kind = "PeerFailed" if isinstance(e, PeerFailed) else type(e).__name__  # relayed: not this rank's own
        return _Outcome(False, kind=kind, message=e.message, file=e.file, tensor=e.tensor, fix=e.fix,
                        exit_code=e.exit_code, keep=bool(getattr(e, "keep_staging", False)))
    if isinstance(e, KeyboardInterrupt):
        return _Outcome(False, kind=type(e).__name__, message="interrupted",
                        exit_code=143 if "Terminated" in type(e).__name__ else 130, interrupted=True, keep=True)
    return _Outcome(False, kind=type(e).__name__, message=f"{type(e).__name__}: {e}", exit_code=1)


class Group:
    """The process group of one conversion: its rank, size, and phase-by-phase agreement."""

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int, owned: bool) -> None:
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size
        self._owned = owned  # we initialised torch.distributed, so we tear it down
        self.staging: Path | None = None

    def exchange(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (all_gather_object); a lost peer is a PeerFailed."""
        import torch.distributed as tdist

        out: list[Any] = [None] * self.size
        try:
            tdist.all_gather_object(out, obj)
        except (RuntimeError, ConnectionError, OSError) as e:
            where = f"; the work done so far is kept in {self.staging}" if self.staging else ""
            raise PeerFailed(f"rank {self.rank}: lost contact with the other ranks ({e}){where}",
                             fix="see the other ranks' messages; re-run the same command to resume") from e
        return out

    def agree(self, fn: Callable[[], Any], *, live: Callable[[], None] | None = None, gather: bool = True) -> Any:
        """Run ``fn`` on every rank, then exchange the outcomes: every rank's value (``gather``; else
        this rank's own value, nothing sent), or on every rank the first failure (raised as it is on
        rank 0 when it is rank 0's, else as a PeerFailed that rank 0 reports and the others keep
        quiet about). ``live`` is called every 0.25 s while this rank waits for the others."""
        value = None
        try:
            value = fn()
            mine = _Outcome(True, value if gather else None)
        except BaseException as e:  # noqa: BLE001 - every rank must reach the exchange
            mine, raised = _outcome_of(e), e
        else:
            raised = None
        if live is None:
            outs = self.exchange(mine)
        else:
            outs = self._exchange_live(mine, live)
        bad = [(r, o) for r, o in enumerate(outs) if not o.ok]
        if not bad:
            return [o.value for o in outs] if gather else value
        if isinstance(raised, KeyboardInterrupt):  # interrupted here too: say so as a single process does
            if self.staging is not None:
                raised.hfnemo_staging = self.staging  # type: ignore[attr-defined]
            raise raised
        # The first rank whose failure is its own (not relayed): rank 0 reports it, the others stop
        # quietly with the same exit code.
        r, o = next(((r, o) for r, o in bad if o.kind != "PeerFailed"), bad[0])
        if r == self.rank == 0 and raised is not None:
            raise raised
        text = o.message if o.kind == "PeerFailed" else f"rank {r} of {self.size}: {o.message}"
        if o.interrupted:
            text = f"rank {r} of {self.size} was interrupted"
        fix = o.fix
        if o.keep and self.staging is not None:
            text += f"; the work done so far is kept in {self.staging}"
            fix = fix or "re-run the same command to resume, or pass --restart to start over"
        raise PeerFailed(text, file=o.file, tensor=o.tensor, fix=fix, exit_code=o.exit_code, quiet=self.rank != 0,
                         keep=o.keep)

    def _exchange_live(self, mine: Any, live: Callable[[], None]) -> list[Any]:
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["v"] = self.exchange(mine)
            except BaseException as e:  # noqa: BLE001
                box["e"] = e

        t = threading.Thread(target=run, name="hfnemo-exchange", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.25)
            live()
        if "e" in box:
            raise box["e"]
        return box["v"]

    def close(self) -> None:
        if self._owned:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


@contextmanager
def session(device: str = "cpu", dcp_metadata: bool = True) -> Iterator[Group | None]:
    """The process group of one conversion (see :func:`join`), left at the end."""
    group = join(device, dcp_metadata)
    try:
        yield group
    finally:
        if group is not None:
            group.close()


def agreed(group: Group | None, fn: Callable[[], Any]) -> Any:
    """``fn()``; in a group, on every rank, with any rank's failure raised on all (planning)."""
    return fn() if group is None else group.agree(fn, gather=False)


def join(device: str = "cpu", dcp_metadata: bool = True) -> Group | None:
    """The process group of this conversion, when the environment names a world of several ranks
    (joined here if torch.distributed is not initialised yet); None for a single process.
    ``dcp_metadata``: the output is DCP, whose .metadata rank 0 writes."""
    rank, size = world()
    if size == 1:
        return None
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE={size} but {', '.join(missing)} not set",
                         fix="launch with torchrun --nproc-per-node N -m hfnemo ..., or use --workers N")
    import torch
    import torch.distributed as tdist

    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    owned = not tdist.is_initialized()
    if owned and rank == 0 and dcp_metadata and not EXIT_FAST:
        # Rank 0 writes DCP's .metadata with torch's classes. Importing them while a process group
        # exists keeps that group alive past destroy_process_group (torch 2.13: its gloo threads then
        # race the interpreter's exit and abort it), so they are imported before the group, unless
        # the process ends through exit() (the command line), which skips that race.
        from hfnemo import lazy
        from hfnemo.io import dcp

        dcp.prewarm_writer()
        lazy.join_all()
    trace("joining the process group")
    if owned:
        cuda = device in ("cuda", "auto") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        tdist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda and device == "cuda" else "gloo",
                                 timeout=TIMEOUT)
    elif tdist.get_world_size() != size or tdist.get_rank() != rank:
        raise UsageError("torch.distributed is initialised with another world than RANK/WORLD_SIZE say",
                         fix="call hfnemo in the process group it was launched with")
    trace("joined")
    return Group(rank, size, local_rank, local_size, owned)


class Progress:
    """Bytes written by every rank, summed for rank 0's progress bar through the group's store."""

    def __init__(self, group: Group, total: int, report: Callable[[int, int], None] | None) -> None:
        import torch.distributed as tdist

        self.group, self.total, self.report = group, total, report
        self.store = None
        try:
            self.store = tdist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - progress is best effort
            self.store = None
        self.mine = 0
        self._last = 0.0

    def update(self, done: int, total: int, force: bool = False) -> None:
        self.mine = done
        now = time.monotonic()
        if not force and now - self._last < 0.25:
            return
        self._last = now
        if self.store is not None:
            try:
                self.store.set(f"hfnemo/progress/{self.group.rank}", str(done))
            except Exception:  # noqa: BLE001
                self.store = None
        self.poll()

    def poll(self) -> None:
        if self.group.rank != 0 or self.report is None:
            return
        done = self.mine
        if self.store is not None:
            try:
                keys = [f"hfnemo/progress/{r}" for r in range(1, self.group.size)]
                if self.store.check(keys):
                    done += sum(int(v) for v in self.store.multi_get(keys))
            except Exception:  # noqa: BLE001
                self.store = None
        self.report(min(done, self.total), self.total)


# ------------------------------------------------------------------------------ the staged run

def run_staged(group: Group, plan: Any, src: Path, dst: Path, index: Any, restart: bool, data_dir: str,
               write_share: Callable[[Path, Any, Any, Callable[[int, int], None]], Any],
               finish: Callable[[Path, list[Any]], None], publish: Callable[[Path, Path], None],
               progress: Callable[[int, int], None] | None = None) -> int:
    """hfnemo.exec.staging.run_staged for one rank of ``group``. ``write_share(staging, share_plan,
    journal, progress)`` writes this rank's files and returns what rank 0 needs of them (picklable);
    ``finish(staging, results)`` (rank 0) writes what comes after every rank's data. ``data_dir``:
    where the plan's files lie under the staging directory ("" or e.g. "weights/"). Returns the
    tensor bytes earlier runs had written (summed over the ranks)."""
    from hfnemo.exec import staging as st
    from hfnemo.exec.journal import Journal, fingerprint, plan_digest

    me, size = group.rank, group.size
    staging = st.staging_dir(dst)
    names = journal_names(size)
    rel_owner = {data_dir + f: r for f, r in owners(plan, size).items()}
    mine = share(plan, me, size)
    if me == 0:
        others = set(names[1:])
        scope = lambda rel: rel_owner.get(rel, 0) == 0 and rel not in others  # noqa: E731
    else:
        scope = lambda rel: rel_owner.get(rel) == me  # noqa: E731
    ctx: dict[str, Any] = {}

    def preflight() -> bool:
        st.check_writable(dst)
        files = st.source_files(plan, index)
        st.check_sources(files)
        ctx["sha"] = plan_digest(plan)
        ctx["fp"] = fingerprint(plan, files, ctx["sha"])
        if me != 0:
            return False
        if restart:
            st.discard(staging)
        if staging.is_dir() and st.complete(staging, ctx["sha"], names):
            for n in names:
                (staging / n).unlink(missing_ok=True)
            publish(staging, dst)
            return True
        if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
            staging.unlink()
        staging.mkdir(exist_ok=True)
        return False

    trace("planned")
    if group.agree(preflight)[0]:
        return plan.write_bytes  # a previous run had finished all but the rename
    group.staging = staging
    journal = Journal(staging, ctx["fp"], name=names[me], scope=scope, siblings=names)
    journal.prune = me == 0

    def inspect() -> int:
        journal.inspect()
        return journal.resumable_bytes

    kept = group.agree(inspect)

    def check_disk() -> None:
        if me == 0:
            st.check_disk(dst.parent, plan.write_bytes - sum(kept), plan.write_bytes)
        journal.begin()  # verify and keep this rank's files, or clear them

    group.agree(check_disk)
    trace("journals ready")
    for note in journal.notes:
        import warnings

        warnings.warn(f"rank {me}: {note}", stacklevel=3)
    bar = Progress(group, plan.write_bytes, progress)

    def write() -> Any:
        try:
            bar.update(journal.done, 0, force=True)  # a resumed share's kept bytes
            value = write_share(staging, mine, journal, bar.update)
            journal.stop()
            trace(f"share written ({mine.write_bytes} bytes)")
            return value, journal.digests(), journal.resumed_bytes
        except ConversionError:
            journal.stop()
            raise
        except OSError as e:  # disk full, I/O error: kept, and the message says how to resume
            journal.stop(save=True)
            err = st._write_error(e, mine, journal.done, staging)
            err.keep_staging = True  # type: ignore[attr-defined]
            raise err from e
        except BaseException:
            journal.stop(save=True)
            raise

    try:
        results = group.agree(write, live=bar.poll)
    except BaseException as e:
        # Bad input (or a bug) found while writing on some rank: nothing of it is worth keeping, as
        # for a single process; every rank has stopped writing once the exchange is over. I/O
        # errors, interrupts and lost peers keep it, resumable.
        if me == 0 and not (isinstance(e, KeyboardInterrupt) or getattr(e, "keep_staging", False)):
            shutil.rmtree(staging, ignore_errors=True)
        raise

    def publish_all() -> None:
        if me != 0:
            return
        finish(staging, [v for v, _, _ in results])
        streamed: dict[str, tuple[int, str]] = {}
        for _, digests, _ in results:
            streamed.update(digests)
        st.write_final_manifest(staging, streamed, plan, ctx["sha"], names)
        from hfnemo.io.fileio import fault_point

        fault_point("publish")
        publish(staging, dst)

    trace("all shares written")
    group.agree(publish_all)
    trace("published")
    if progress is not None and me == 0:
        progress(plan.write_bytes, plan.write_bytes)
    return sum(r for _, _, r in results)


# ------------------------------------------------------------------------------ --workers N

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, mode: str, fn: Callable[..., Any], args: tuple, kwargs: dict,
            queue: Any) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "HFNEMO_WORKER": "1"})
    if mode == "cli":
        global EXIT_FAST
        EXIT_FAST = True
        exit(fn(*args, **kwargs))

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = fn(*args, **kwargs)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        o = _outcome_of(e)
        if isinstance(e, PeerFailed):
            o.kind = "PeerFailed" if e.quiet else "ConversionError"
        queue.put((rank, o))
        sys.exit(o.exit_code)
    queue.put((rank, _Outcome(True, result if rank == 0 else None)))


STOP_GRACE_S = 20.0


def _signal(procs: list[Any], sig: int) -> None:
    for p in procs:
        if p.exitcode is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass


def spawn(n: int, fn: Callable[..., Any], *args: Any, mode: str = "api", **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in ``n`` new processes on this machine, forming one world of ``n``
    ranks (gloo over loopback). ``mode="cli"``: ``fn`` returns an exit code; the first non-zero one
    (rank 0's first) is returned. ``mode="api"``: rank 0's return value is returned, or its error
    raised. A rank that dies by a signal makes the others stop (SIGTERM: journals saved)."""
    import multiprocessing as mp

    if n < 1:
        raise UsageError(f"--workers {n}", fix="use --workers 1 or more")
    if "WORLD_SIZE" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--workers inside a torchrun world", fix="leave out --workers under torchrun (it starts the ranks)")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue() if mode == "api" else None
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, n, port, mode, fn, args, kwargs, queue), name=f"hfnemo-rank-{r}")
             for r in range(n)]
    for p in procs:
        p.start()
    failed_at = stopped_at = None
    first_killed: list[int] = []  # ranks that died by a signal before the others were stopped
    try:
        while any(p.exitcode is None for p in procs):
            for p in procs:
                p.join(0.1)
            now = time.monotonic()
            codes = [p.exitcode for p in procs]
            if failed_at is None and any(c for c in codes if c is not None):
                failed_at = now
            if stopped_at is None:
                first_killed += [r for r, c in enumerate(codes) if c is not None and c < 0 and r not in first_killed]
            # A rank killed by a signal cannot tell the others: they are stopped (SIGTERM: their
            # journals are saved); a rank that failed on its own gives the others time to hear of it.
            if stopped_at is None and failed_at is not None and (
                    any(c is not None and c < 0 for c in codes) or now - failed_at > STOP_GRACE_S):
                stopped_at = now
                _signal(procs, signal.SIGTERM)
            if stopped_at is not None and now - stopped_at > STOP_GRACE_S:
                _signal(procs, signal.SIGKILL)  # blocked where a signal handler cannot run
    except KeyboardInterrupt:
        _signal(procs, signal.SIGTERM)
        for p in procs:
            p.join(STOP_GRACE_S)
        _signal(procs, signal.SIGKILL)
        raise
    codes = [p.exitcode for p in procs]
    killed = first_killed or [r for r, c in enumerate(codes) if c is not None and c < 0]
    if mode == "cli":
        if killed:
            print(f"hfnemo: rank {killed[0]} of {n} was killed by signal {-codes[killed[0]]}; no output was "
                  "published (the source is untouched). The work done so far is kept beside the output: re-run "
                  "the same command to resume, or pass --restart to start over", file=sys.stderr)
        bad = [c for c in codes if c]
        if codes[0]:
            return 128 - codes[0] if codes[0] < 0 else codes[0]
        return (128 - bad[0] if bad[0] < 0 else bad[0]) if bad else 0
    outs: dict[int, _Outcome] = {}
    while not queue.empty():
        r, o = queue.get()
        outs[r] = o
    first = outs.get(0)
    if first is not None and first.ok and not any(codes):
        return first.value
    own = [(r, o) for r, o in sorted(outs.items()) if not o.ok and o.kind != "PeerFailed"]
    if killed or not own:
        what = (f"rank {killed[0]} of {n} was killed by signal {-codes[killed[0]]}" if killed
                else f"the ranks exited with {codes}")
        raise PeerFailed(f"{what}; no output was published (the source is untouched)",
                         fix="re-run the same command to resume from the work kept beside the output, or pass "
                             "restart=True to start over")
    o = first if first is not None and not first.ok and first.kind != "PeerFailed" else own[0][1]
    if o.interrupted:
        raise KeyboardInterrupt()
    cls = getattr(errors, o.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, ConversionError)):
        raise PeerFailed(o.message, exit_code=o.exit_code)
    err = cls.__new__(cls)
    ConversionError.__init__(err, o.message, file=o.file, tensor=o.tensor, fix=o.fix)
    raise err
