"""A helper process that imports torch while the conversion streams, and writes the few files that
need torch's own classes (DCP's ``.metadata``, NeMo's ``common.pt``) at the end.

Why a process: a CPU conversion streams without torch (hfnemo.exec.buffers), but an import to NeMo 2
ends with two pickles of torch objects. Importing torch in a thread of the converting process
overlaps nothing: the import holds the GIL through most of its 3-5 s on a CUDA build (loading and
registering its extension modules), and the H200 measurements showed the streaming slowed by 2.2-2.9
s, all that the overlap gained (benchmarks/RESULTS.md, pass 7). In a process of its own the import
runs on another core.

``start()`` launches it (``python -m hfnemo.torchside``) once per process; ``call(module, function,
*args)`` runs ``module.function(*args)`` there and returns its result (plain picklable data both
ways); ``run(...)`` does the same, or in this process when the helper is not there. Anything going wrong with the helper (it cannot start, dies, answers garbage) makes ``call``
raise :class:`Unavailable`, and the caller does the work in-process instead: the helper is a speed-up,
never a new way to fail. An error *of the function* (a full disk, say) is re-raised as the same
exception type when it pickles. ``HFNEMO_TORCHSIDE=0`` turns the helper off.

The helper's memory is the tree's (hfnemo.memwatch sums PSS over the process tree): the budget
reserves torch's import whether it happens here or there (hfnemo.io.dcp.torch_import_reserve).
"""
from __future__ import annotations

import atexit
import importlib
import os
import pickle
import subprocess
import sys
import threading
from typing import Any

_PROTO = pickle.HIGHEST_PROTOCOL
_MODULES = ("torch", "torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class Unavailable(RuntimeError):
    """The helper cannot do it (not started, died, broken pipe): do it in-process."""


_proc: subprocess.Popen | None = None
_lock = threading.Lock()
_failed = False


def enabled() -> bool:
    return os.environ.get("HFNEMO_TORCHSIDE", "1") != "0" and not _failed


def start() -> bool:
    """Launch the helper (once); True when it is running. It imports torch at once."""
    global _proc, _failed
    with _lock:
        if _proc is not None:
            return _proc.poll() is None
        if not enabled():
            return False
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # hfnemo's own tree first
        env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["HFNEMO_PREFETCH"] = "0"
        try:
            _proc = subprocess.Popen([sys.executable, "-m", "hfnemo.torchside"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     close_fds=True)
        except OSError:
            _failed = True
            return False
        atexit.register(shutdown)
        return True


def running() -> bool:
    return _proc is not None and _proc.poll() is None


def call(module: str, function: str, *args: Any) -> Any:
    """``module.function(*args)`` in the helper. Unavailable when the helper cannot answer."""
    global _failed
    with _lock:
        p = _proc
        if p is None or _failed:
            raise Unavailable("the torch helper is not running")
        if p.poll() is not None:
            _failed = True
            raise Unavailable(f"the torch helper ended (exit code {p.returncode})")
        try:
            pickle.dump((module, function, args), p.stdin, protocol=_PROTO)
            p.stdin.flush()
            ok, value = pickle.load(p.stdout)
        except Exception as e:  # noqa: BLE001 - a broken pipe, EOF, a truncated answer: all "unavailable"
            _failed = True
            _kill(p)
            raise Unavailable(f"the torch helper failed: {type(e).__name__}: {e}") from None
    if ok:
        return value
    if isinstance(value, BaseException):
        raise value
    raise Unavailable(str(value))


def run(module: str, function: str, *args: Any, needs: tuple[str, ...] = ("torch",)) -> Any:
    """``module.function(*args)``: in the helper while it runs and this process has not imported
    ``needs`` itself (then the helper saves that import), else (or when the helper is unavailable)
    here."""
    if running() and not all(m in sys.modules for m in needs):
        try:
            return call(module, function, *args)
        except Unavailable:
            pass
    return getattr(importlib.import_module(module), function)(*args)


def _kill(p: subprocess.Popen) -> None:
    try:
        p.kill()
        p.wait(timeout=5)
    except Exception:  # noqa: BLE001 - it is gone either way
        pass


def shutdown() -> None:
    """End the helper (at exit, or when a caller is done). Calls are synchronous, so it is idle or
    still importing torch: either way it has nothing to finish, and it is killed rather than left
    to run an interpreter shutdown with torch loaded (0.3-0.5 s, which the command would wait for)."""
    global _proc
    with _lock:
        p, _proc = _proc, None
    if p is None:
        return
    try:
        p.stdin.close()
    except Exception:  # noqa: BLE001
        pass
    _kill(p)


def _serve() -> int:
    """The helper's main loop: import torch now, then answer calls until EOF."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends us
    for m in _MODULES:
        importlib.import_module(m)
    rd, wr = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the answer stream
    while True:
        try:
            module, function, args = pickle.load(rd)
        except EOFError:
            return 0
        try:
            answer = (True, getattr(importlib.import_module(module), function)(*args))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
            try:
                pickle.dumps(e, protocol=_PROTO)
                answer = (False, e)
            except Exception:  # noqa: BLE001
                answer = (False, f"{type(e).__name__}: {e}")
        pickle.dump(answer, wr, protocol=_PROTO)
        wr.flush()


if __name__ == "__main__":
    sys.exit(_serve())
