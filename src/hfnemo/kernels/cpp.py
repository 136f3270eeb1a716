"""The C++ backend: hfnemo._C (csrc/), multithreaded, bit-identical to the torch reference.

Importing this module raises ImportError when the extension was not built; get_backend("auto")
then falls back to the torch reference. Tensors cross into C++ as raw addresses, so every
argument is checked here first (CPU, contiguous, dtype, sizes, bounds, overlap) and a bad one
raises ValueError before any byte moves. The C++ side releases the GIL for the whole call and
is reentrant: several Python threads may call one backend at once.
"""
from __future__ import annotations

import bisect
import operator
from typing import TYPE_CHECKING, Callable, Sequence

from hfnemo import _C  # ImportError when the native build is missing
from hfnemo.exec.buffers import address
from hfnemo.kernels.api import Piece
from hfnemo.lazy import LazyModule

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # only the tensor methods need it; the buffer methods never do

# element sizes of the dtypes the native casts take, by torch attribute name
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _dtype_name(t: "torch.Tensor") -> str | None:
    name = str(t.dtype).removeprefix("torch.")
    return name if name in _ITEMSIZE else None


def _int(name: str, v: object) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, got a bool")
    try:
        i = operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(v).__name__}") from None
    if i < 0:
        raise ValueError(f"{name} must be >= 0, got {i}")
    return i


def _cpu_contig(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; the cpp backend takes CPU tensors only")
    if t.layout != torch.strided:
        raise ValueError(f"{name} has layout {t.layout}; only dense (strided) tensors are supported")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")
    return t


def _bytes1d(name: str, t: object) -> torch.Tensor:
    t = _cpu_contig(name, t)
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D uint8 tensor, got {t.dtype} with shape {tuple(t.shape)}")
    return t


def _overlap(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


class CppBackend:
    name = "cpp"

    def set_threads(self, n: int) -> None:
        n = _int("threads", n)
        if n < 1:
            raise ValueError("threads must be >= 1")
        _C.set_threads(n)

    def get_threads(self) -> int:
        return _C.get_threads()

    def cast(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst = _cpu_contig("dst", dst)
        src = _cpu_contig("src", src)
        for name, t in (("dst", dst), ("src", src)):
            if _dtype_name(t) is None:
                raise ValueError(f"{name} has dtype {t.dtype}; cast supports float64, float32, float16, bfloat16")
        n = src.numel()
        if dst.numel() != n:
            raise ValueError(f"cast: dst has {dst.numel()} elements, src has {n}")
        if n == 0:
            return
        _cast(dst.data_ptr(), _dtype_name(dst), src.data_ptr(), _dtype_name(src), n)

    def gather(self, dst: torch.Tensor, pieces: Sequence[Piece]) -> None:
        dst = _bytes1d("dst", dst)
        base, size = dst.data_ptr(), dst.numel()
        rows: list[tuple[int, int, int]] = []
        writes: list[tuple[int, int]] = []  # dst byte ranges written, relative to base
        reads: list[tuple[int, int]] = []  # absolute source address ranges
        for i, piece in enumerate(pieces):
            try:
                dst_off, src, src_off, n = piece
            except (TypeError, ValueError):
                raise ValueError(f"piece {i} must be (dst_offset, src, src_offset, nbytes)") from None
            dst_off = _int(f"piece {i} dst_offset", dst_off)
            src_off = _int(f"piece {i} src_offset", src_off)
            n = _int(f"piece {i} nbytes", n)
            src = _bytes1d(f"piece {i} src", src)
            if dst_off + n > size:
                raise ValueError(f"piece {i} writes dst[{dst_off}:{dst_off + n}] past its end ({size} bytes)")
            if src_off + n > src.numel():
                raise ValueError(f"piece {i} reads src[{src_off}:{src_off + n}] past its end ({src.numel()} bytes)")
            if n == 0:
                continue
            sp = src.data_ptr() + src_off
            rows.append((base + dst_off, sp, n))
            writes.append((dst_off, dst_off + n))
            reads.append((sp, sp + n))
        if not rows:
            return
        writes.sort()
        for (_, e0), (b1, _) in zip(writes, writes[1:]):
            if b1 < e0:
                raise ValueError(f"gather: pieces overlap in dst (at byte {b1})")
        # A source run must not intersect what the call writes (parallel order is unspecified).
        # Writes are sorted and disjoint: only the last one starting before a run's end can reach it.
        starts = [base + w[0] for w in writes]
        for s0, s1 in reads:
            j = bisect.bisect_left(starts, s1) - 1
            if j >= 0 and base + writes[j][1] > s0:
                raise ValueError("gather: a source piece overlaps a destination piece")
        table = torch.tensor(rows, dtype=torch.int64)
        _C.gather(table.data_ptr(), len(rows))

    def slice_cols(self, dst: torch.Tensor, src: torch.Tensor, rows: int, src_row_bytes: int, col_offset: int,
                   col_bytes: int) -> None:
        dst = _bytes1d("dst", dst)
        src = _bytes1d("src", src)
        _slice_cols(lambda: dst.data_ptr(), dst.numel(), lambda: src.data_ptr(), src.numel(), rows,
                    src_row_bytes, col_offset, col_bytes)

    # The same two kernels on plain host byte buffers (the CPU executor's; no torch anywhere).

    def cast_buffers(self, dst: memoryview, dst_dtype: str, src: memoryview, src_dtype: str) -> None:
        for name, dt in (("dst", dst_dtype), ("src", src_dtype)):
            if dt not in _ITEMSIZE:
                raise ValueError(f"{name} has dtype {dt}; cast supports float64, float32, float16, bfloat16")
        d_size, s_size = _ITEMSIZE[dst_dtype], _ITEMSIZE[src_dtype]
        if src.nbytes % s_size:
            raise ValueError(f"cast: src has {src.nbytes} bytes, not a whole number of {src_dtype} elements")
        n = src.nbytes // s_size
        if dst.nbytes != n * d_size:
            raise ValueError(f"cast: dst has {dst.nbytes} bytes, needs {n} x {d_size} for {n} elements")
        if n == 0:
            return
        _cast(address(dst), dst_dtype, address(src), src_dtype, n)

    def slice_cols_buffers(self, dst: memoryview, src: memoryview, rows: int, src_row_bytes: int,
                           col_offset: int, col_bytes: int) -> None:
        _slice_cols(lambda: address(dst), dst.nbytes, lambda: address(src), src.nbytes, rows, src_row_bytes,
                    col_offset, col_bytes)


def _cast(dp: int, dst_dtype: str, sp: int, src_dtype: str, n: int) -> None:
    """The checks on addresses common to both cast entry points (alignment, overlap), then the call."""
    d_size, s_size = _ITEMSIZE[dst_dtype], _ITEMSIZE[src_dtype]
    for name, p, size in (("dst", dp, d_size), ("src", sp, s_size)):
        if p % size:
            raise ValueError(f"{name} address {p:#x} is not aligned to its element size {size}")
    if _overlap(dp, dp + n * d_size, sp, sp + n * s_size) and not (dp == sp and dst_dtype == src_dtype):
        raise ValueError("cast: dst and src overlap in memory")
    _C.cast(dp, dst_dtype, sp, src_dtype, n)


def _slice_cols(dst_ptr: Callable[[], int], dst_size: int, src_ptr: Callable[[], int], src_size: int, rows: int,
                src_row_bytes: int, col_offset: int, col_bytes: int) -> None:
    """Every check of slice_cols on byte sizes, then on addresses (asked for only when there is
    something to copy: an empty buffer has none), then the call; for tensors and buffers alike."""
    rows = _int("rows", rows)
    src_row_bytes = _int("src_row_bytes", src_row_bytes)
    col_offset = _int("col_offset", col_offset)
    col_bytes = _int("col_bytes", col_bytes)
    if col_offset + col_bytes > src_row_bytes:
        raise ValueError(f"slice_cols: col_offset + col_bytes = {col_offset + col_bytes} exceeds "
                         f"src_row_bytes = {src_row_bytes}")
    if rows * src_row_bytes > src_size:
        raise ValueError(f"slice_cols: src has {src_size} bytes, needs rows * src_row_bytes = {rows * src_row_bytes}")
    if rows * col_bytes > dst_size:
        raise ValueError(f"slice_cols: dst has {dst_size} bytes, needs rows * col_bytes = {rows * col_bytes}")
    if rows == 0 or col_bytes == 0:
        return
    dp, sp = dst_ptr(), src_ptr()
    if _overlap(dp, dp + rows * col_bytes, sp, sp + rows * src_row_bytes):
        raise ValueError("slice_cols: dst and src overlap in memory")
    _C.slice_cols(dp, sp, rows, src_row_bytes, col_offset, col_bytes)

__all__ = ["CppBackend"]
