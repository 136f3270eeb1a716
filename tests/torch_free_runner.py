"""Run the hfnemo CLI with torch's import forbidden, to show what a CPU conversion needs of torch.

    python torch_free_runner.py MODE hfnemo-args...

MODE ``never``: no thread may import torch (or any torch.* module) at all. MODE ``prewarm``: the
background prewarm (hfnemo.lazy) is held back until the executor's ``execute`` returns, and until
then nothing may import torch; after that anything may (the end of an import writes common.pt and
DCP's .metadata with torch). Holding the prewarm back matters: were torch imported early in the
background, a use of torch by the streaming code would find it in sys.modules (or wait for it)
unnoticed. A forbidden import prints the stack and ends the process at once with exit code 97,
so no ``except ImportError`` on the way can hide it. On success the last stderr line is
``TORCH-FREE: torch imported by the end of execute: True|False``.
"""
from __future__ import annotations

import os
import runpy
import sys
import threading
import traceback

MODE = sys.argv[1]
state = {"done": False}


class _Forbid:
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if not (name == "torch" or name.startswith("torch.")):
            return None
        thread = threading.current_thread().name
        if MODE == "prewarm" and state["done"]:
            return None
        sys.stderr.write(f"TORCH-FREE: {name} imported in thread {thread}\n")
        traceback.print_stack(file=sys.stderr)
        sys.stderr.flush()
        os._exit(97)


sys.meta_path.insert(0, _Forbid())

import hfnemo.exec.executor as _executor  # noqa: E402
import hfnemo.lazy as _lazy  # noqa: E402

_execute = _executor.execute
_released = threading.Event()
_import_quietly = _lazy._import_quietly


def _held_back(names: tuple[str, ...]) -> None:
    _released.wait()
    _import_quietly(names)


_lazy._import_quietly = _held_back


def _watched(*args: object, **kwargs: object) -> object:
    out = _execute(*args, **kwargs)
    sys.stderr.write(f"TORCH-FREE: torch imported by the end of execute: {'torch' in sys.modules}\n")
    state["done"] = True
    _released.set()
    return out


_executor.execute = _watched
sys.argv = ["hfnemo"] + sys.argv[2:]
runpy.run_module("hfnemo", run_name="__main__")
