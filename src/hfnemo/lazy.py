"""Deferred imports of heavy modules (torch.distributed.checkpoint costs 0.6-3.5 s to import).

``LazyModule(name)`` imports ``name`` on first attribute access; ``prewarm(*names)`` imports them
in a background thread now, so that the import overlaps with I/O the caller is about to do (Python's
per-module import locks make a concurrent first use wait for that import, never run it twice).
"""
from __future__ import annotations

import importlib
import threading
from types import ModuleType

_started: set[str] = set()
_lock = threading.Lock()


class LazyModule:
    def __init__(self, name: str) -> None:
        self.__dict__["_name"] = name
        self.__dict__["_mod"] = None

    def _load(self) -> ModuleType:
        mod = self.__dict__["_mod"]
        if mod is None:
            mod = importlib.import_module(self.__dict__["_name"])
            self.__dict__["_mod"] = mod
        return mod

    def __getattr__(self, attr: str) -> object:
        return getattr(self._load(), attr)


def _import_quietly(names: tuple[str, ...]) -> None:
    for n in names:
        try:
            importlib.import_module(n)
        except Exception:  # noqa: BLE001 - the real use imports again and reports
            return


_threads: list[threading.Thread] = []


def pending() -> bool:
    """True while a prewarm import is still running."""
    return any(t.is_alive() for t in _threads)


def join_all() -> None:
    """Wait for every prewarm to finish (hfnemo.dist: before a process group exists). The
    interpreter's own exit waits for them too: they are not daemon threads."""
    for t in list(_threads):
        t.join()


def prewarm(*names: str) -> None:
    """Import ``names`` in a background thread (once per process). Not a daemon: the interpreter
    waits for it before it starts finalising, so that no extension module is half-imported while
    modules are torn down (torch's weakref finalizers then fail, or std::terminate). A command line
    that ends early leaves through hfnemo.dist.exit, which does not wait (os._exit)."""
    with _lock:
        todo = tuple(n for n in names if n not in _started)
        _started.update(todo)
    if todo:
        t = threading.Thread(target=_import_quietly, args=(todo,), name="hfnemo-prewarm", daemon=False)
        _threads.append(t)
        t.start()
