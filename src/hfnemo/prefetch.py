"""Read the source ahead while the interpreter loads torch and plans, so the disk does not sit idle.

``hfnemo import|export|reshard`` spends its first seconds importing torch (0.9 s with a CPU build,
4.4 s with a CUDA build) and planning, with nothing read from the source yet. :func:`start_for_argv`,
called by the CLI before it builds its parser (which imports torch), starts one daemon thread that
reads the first part of the source files into the page cache, in the order a conversion is likely
to read them: the safetensors shards by name (``save_pretrained`` writes them in state-dict order,
embeddings first), or the ``*.distcp`` files of a NeMo / dist-ckpt source in rank order.

Bounded and harmless by construction:

* at most a cap of bytes: ``min(4 GiB, MemAvailable / 4)`` by default, or ``HFNEMO_PREFETCH=SIZE``
  (``2GiB``); ``HFNEMO_PREFETCH=0`` (or ``off``/``no``/``false``) turns it off;
* it stops as soon as the conversion reads its first source row (:func:`stop`, called by
  :class:`hfnemo.exec.sources.RowReader`), so it never competes with the conversion's own reads;
* nothing is mapped into the process: ``posix_fadvise(WILLNEED)`` in chunks (default; it can block
  while the device queue is full, hence the thread), or, with ``HFNEMO_PREFETCH_MODE=pread``,
  preads into one reused 8 MiB buffer; page cache filled this way is no process's PSS;
* any error (a file gone, no posix_fadvise, a read failing) ends the thread silently: the
  conversion then reads what it needs itself, as it would have anyway.

The state of the last prefetch (bytes issued, why it stopped) is :data:`last`, for tests and ``-v``.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Sequence

ENV = "HFNEMO_PREFETCH"
ENV_MODE = "HFNEMO_PREFETCH_MODE"
ENV_DEBUG = "HFNEMO_PREFETCH_DEBUG"  # set: one line on stderr when the read-ahead ends
DEFAULT_CAP = 4 << 30
MEM_FRACTION = 4  # at most MemAvailable / MEM_FRACTION
CHUNK = 8 << 20
_OFF = {"0", "off", "no", "false"}
_ON = {"", "1", "on", "yes", "true"}
COMMANDS = ("import", "export", "reshard")


class Prefetch:
    """One background read-ahead over ``files`` (in order), at most ``cap`` bytes."""

    def __init__(self, files: Sequence[str], cap: int, mode: str = "willneed", chunk: int = CHUNK) -> None:
        self.files = list(files)
        self.cap = max(0, int(cap))
        self.mode = mode
        self.chunk = max(1, int(chunk))
        self.issued = 0  # bytes asked for (WILLNEED) or read (pread)
        self.reason: str | None = None  # why it ended: "cap", "done", "stopped", "error: ..."
        self.started = time.monotonic()
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hfnemo-prefetch", daemon=True)

    def start(self) -> "Prefetch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.reason = self._read()
        except BaseException as e:  # never let the read-ahead disturb the conversion
            self.reason = f"error: {type(e).__name__}: {e}"
        self.seconds = time.monotonic() - self.started
        if os.environ.get(ENV_DEBUG):
            try:
                os.write(2, (f"hfnemo prefetch ({self.mode}): {self.issued / 1e9:.3f} GB of {len(self.files)} "
                             f"file(s) in {self.seconds:.2f} s, cap {self.cap / 1e9:.2f} GB, {self.reason}\n").encode())
            except OSError:
                pass

    def _headers(self) -> None:
        """Every safetensors shard's header first: planning reads them all while the bulk read-ahead
        fills the device queue, and a header queued behind gigabytes of file 1 cost the plan up to
        2 s on the H200 machine's virtual disk."""
        for path in self.files:
            if not path.endswith(".safetensors") or self._stop.is_set():
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                head = os.pread(fd, 8, 0)
                if len(head) == 8:
                    n = int.from_bytes(head, "little")
                    if 0 < n < (100 << 20):
                        os.posix_fadvise(fd, 0, 8 + n, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def _read(self) -> str:
        self._headers()
        left = self.cap
        buf = memoryview(bytearray(min(self.chunk, left))) if self.mode == "pread" and left else None
        for path in self.files:
            if left <= 0:
                return "cap"
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                size = os.fstat(fd).st_size
                off = 0
                while off < size and left > 0:
                    if self._stop.is_set():
                        return "stopped"
                    n = min(self.chunk, size - off, left)
                    if buf is None:
                        os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                    else:
                        n = os.preadv(fd, [buf[:n]], off)
                        if n <= 0:
                            break
                    off += n
                    left -= n
                    self.issued += n
            finally:
                os.close(fd)
        return "cap" if left <= 0 else "done"


last: Prefetch | None = None
_lock = threading.Lock()


def stop() -> None:
    """The conversion has started reading: end the read-ahead (cheap; safe to call any time)."""
    p = last
    if p is not None:
        p.stop()


def cap_from_env(environ: "os._Environ[str] | dict[str, str] | None" = None) -> int:
    """Bytes to read ahead: 0 when switched off; raises ValueError for a value that is no size."""
    env = os.environ if environ is None else environ
    text = env.get(ENV, "").strip()
    if text.lower() in _OFF:
        return 0
    if text.lower() in _ON:
        cap = DEFAULT_CAP
        avail = mem_available()
        if avail is not None:
            cap = min(cap, avail // MEM_FRACTION)
        return cap
    from hfnemo.memwatch import parse_size

    return parse_size(text)


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def source_files(src: str) -> list[str]:
    """The data files of a local source, in the order a conversion is likely to read them; [] when
    the source is not a local directory hfnemo reads in pieces (a Hub id, a .nemo tar, torch files)."""
    if not os.path.isdir(src):
        return []
    names = os.listdir(src)
    shards = sorted((n for n in names if n.endswith(".safetensors")), key=_natural)
    if shards:
        index = os.path.join(src, "model.safetensors.index.json")
        if os.path.isfile(index) and os.path.getsize(index) < (64 << 20):
            try:
                with open(index, encoding="utf-8") as f:
                    listed = set(json.load(f).get("weight_map", {}).values())
                shards = [n for n in shards if n in listed] or shards
            except (OSError, ValueError, AttributeError):
                pass
        return [os.path.join(src, n) for n in shards]
    for sub in ("weights", "model_weights", "."):
        d = os.path.normpath(os.path.join(src, sub))
        try:
            dcp = sorted((n for n in os.listdir(d) if n.endswith(".distcp")), key=_natural)
        except OSError:
            continue
        if dcp:
            return [os.path.join(d, n) for n in dcp]
    return []


def _local(src: str | None) -> str | None:
    """``src`` when it names a local directory (``hf://`` stripped, as hfnemo.hub does)."""
    if not src:
        return None
    rest = src[len("hf://"):] if src.startswith("hf://") else src
    rest = os.path.expanduser(rest)
    return rest if os.path.isdir(rest) else None


def _source_of(argv: Sequence[str], add_options) -> str | None:
    """The source path of an ``import|export|reshard`` (or ``llm import|export``) command line,
    parsed with the CLI's own options (``add_options``: cli._common) so option values are never
    taken for paths; None for anything else or anything that does not parse."""
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):  # never print or exit: this is only a peek
            raise ValueError(message)

    if not argv or argv[0] not in COMMANDS + ("llm",):
        return None
    ap = _Parser(add_help=False)
    sub = ap.add_subparsers(dest="cmd")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd, add_help=False)
        p.add_argument("src", nargs="?")
        p.add_argument("dst", nargs="?")
        if cmd == "export":
            p.add_argument("--latest")
        add_options(p)
    p = sub.add_parser("llm", add_help=False)
    p.add_argument("action")
    p.add_argument("kv", nargs="*")
    add_options(p)
    args, _ = ap.parse_known_args(list(argv))
    if args.cmd == "llm":
        kv = dict(a.split("=", 1) for a in args.kv if "=" in a)
        return kv.get("source") if args.action == "import" else kv.get("path") if args.action == "export" else None
    if getattr(args, "latest", None):
        return None
    return args.src


def start_for_argv(argv: Sequence[str], add_options) -> Prefetch | None:
    """Start the read-ahead for this command line if it converts a local source; never raises."""
    global last
    try:
        if os.environ.get("WORLD_SIZE", "1") != "1" and os.environ.get("LOCAL_RANK", "0") != "0":
            return None  # several ranks on one machine: one read-ahead is enough
        cap = cap_from_env()
        if cap <= 0 or not hasattr(os, "posix_fadvise"):
            return None
        src = _local(_source_of(argv, add_options))
        files = source_files(src) if src else []
        if not files:
            return None
        mode = "pread" if os.environ.get(ENV_MODE, "").strip().lower() == "pread" else "willneed"
        with _lock:
            if last is not None:
                last.stop()
            last = Prefetch(files, cap, mode).start()
        return last
    except Exception:
        return None
