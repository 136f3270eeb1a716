"""Kernel backends behind one interface (api.Backend): torch reference, C++ (CPU), Triton (CUDA).

``get_backend("auto")`` picks Triton for CUDA tensors when Triton is importable, the C++ build
on CPU when it was compiled, else the torch reference (with a one-line warning that the native
build is missing). Every backend is tested bit-exactly against :mod:`hfnemo.kernels.torch_ref`.
"""
from __future__ import annotations

import sys
import warnings

from hfnemo.kernels.api import Backend

_CACHE: dict[str, Backend] = {}
_warned = False
WARN_FALLBACK = True  # the CLI's --quiet turns the one-line fallback warning off


def _load(name: str) -> Backend:
    if name not in _CACHE:
        if name == "torch":
            from hfnemo.kernels.torch_ref import TorchBackend
            _CACHE[name] = TorchBackend()
        elif name == "cpp":
            from hfnemo.kernels.cpp import CppBackend  # ImportError when the extension is not built
            _CACHE[name] = CppBackend()
        elif name == "triton":
            from hfnemo.kernels.triton_backend import TritonBackend
            _CACHE[name] = TritonBackend()
        else:
            raise ValueError(f"unknown kernel backend {name!r} (torch, cpp, triton, auto)")
    return _CACHE[name]


def get_backend(name: str = "auto", *, device: str = "cpu", threads: int | None = None) -> Backend:
    """The backend for ``device`` ("cpu" or "cuda"); ``name`` forces one."""
    global _warned
    if name != "auto":
        b = _load(name)
    elif device.startswith("cuda"):
        try:
            b = _load("triton")
        except ImportError:
            b = _load("torch")
    else:
        try:
            b = _load("cpp")
        except ImportError:
            if not _warned and WARN_FALLBACK:
                print("hfnemo: native kernels not built (hfnemo._C missing); using the torch reference",
                      file=sys.stderr)
                _warned = True
            b = _load("torch")
    if threads is not None:
        b.set_threads(threads)
    return b


__all__ = ["Backend", "get_backend"]
