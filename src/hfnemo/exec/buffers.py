"""Host byte buffers without torch: the CPU conversion path reads, casts, cuts and writes through
these, so it never imports torch (whose CUDA build takes seconds to import) before the very end.

``HostBuffer(n)`` is an anonymous private mapping (page-aligned, zero-filled on first touch, not
resident until written); ``.mv`` is a writable memoryview of its ``n`` bytes and ``.addr`` its
address, which the native core (hfnemo._C) takes. :func:`address` gives the address of any
writable C-contiguous buffer (a memoryview slice, a bytearray, a numpy array, a torch tensor)."""
from __future__ import annotations

import ctypes
import mmap


def address(buf: object) -> int:
    """The address of the first byte of ``buf``: a torch tensor's data_ptr(), else the buffer
    protocol's (writable, C-contiguous buffers only)."""
    ptr = getattr(buf, "data_ptr", None)
    if ptr is not None:
        return int(ptr())
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)  # type: ignore[arg-type]
    if mv.readonly:
        raise ValueError("buffer is read-only")
    if not mv.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if mv.nbytes == 0:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv))


def nbytes(buf: object) -> int:
    n = getattr(buf, "nbytes", None)
    if isinstance(n, int):
        return n
    return memoryview(buf).nbytes  # type: ignore[arg-type]


class _Buffer:
    """What the executor needs of a buffer: ``mv`` (its bytes), ``addr``, ``n``, and zero()."""

    __slots__ = ("mv", "addr", "n")

    def zero(self, lo: int, hi: int) -> None:
        if hi > lo:
            ctypes.memset(self.addr + lo, 0, hi - lo)

    def __len__(self) -> int:
        return self.n


class HostBuffer(_Buffer):
    """``n`` bytes of anonymous memory with a memoryview (``mv``) and an address (``addr``)."""

    __slots__ = ("_map",)

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self._map = mmap.mmap(-1, max(self.n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mv = memoryview(self._map)[:self.n]
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))


class TensorBuffer(_Buffer):
    """A 1-D uint8 CPU torch tensor seen as a HostBuffer (``mv``, ``addr``, ``zero``): for callers
    that want the executor's rows in a tensor of their own (hfnemo.stream)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: object) -> None:
        self.tensor = tensor
        self.n = int(tensor.numel())  # type: ignore[attr-defined]
        self.mv = memoryview(tensor.numpy()) if self.n else memoryview(bytearray())  # type: ignore[attr-defined]
        self.addr = int(tensor.data_ptr())  # type: ignore[attr-defined]
