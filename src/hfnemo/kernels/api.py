"""The kernel interface. Buffers are torch tensors: byte buffers are 1-D uint8, typed views for
casts. Every function writes into ``dst`` and returns nothing; all are pure data movement or
elementwise casts, so every backend must agree with the torch reference bit for bit.

``cast_buffers`` and ``slice_cols_buffers`` are the same two operations on plain host byte buffers
(memoryviews of :class:`hfnemo.exec.buffers.HostBuffer`) with dtypes named by torch's attribute
names ("bfloat16"): the CPU executor uses them, so that a CPU conversion never imports torch. The
C++ backend runs them natively; :class:`BufferOps` gives every torch-based backend the same two
methods through ``torch.frombuffer``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import torch

# (dst_offset, src_buffer, src_offset, nbytes): one contiguous run of a batched gather.
Piece = tuple[int, "torch.Tensor", int, int]


class Backend(Protocol):
    name: str

    def set_threads(self, n: int) -> None:
        """Worker threads for CPU backends (ignored on GPU)."""

    def cast(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst[i] = src[i] converted to dst.dtype; float narrowing rounds to nearest even (as
        torch's copy_), NaN stays NaN, infinities and signed zeros are kept. Same numel, both
        contiguous. Dtypes: float64/32/16, bfloat16 (any pair)."""

    def gather(self, dst: torch.Tensor, pieces: Sequence[Piece]) -> None:
        """Batched memcpy into the uint8 buffer dst: QKV interleave, gate/up fusion, expert
        stacking and their inverses are all lists of contiguous runs."""

    def slice_cols(self, dst: torch.Tensor, src: torch.Tensor, rows: int, src_row_bytes: int, col_offset: int,
                   col_bytes: int) -> None:
        """dst[r*col_bytes:(r+1)*col_bytes] = src[r*src_row_bytes + col_offset : ... + col_bytes] for r < rows:
        the strided copy that cuts a row-parallel (column) shard out of full rows, uint8 buffers."""

    def cast_buffers(self, dst: memoryview, dst_dtype: str, src: memoryview, src_dtype: str) -> None:
        """cast() on host byte buffers: ``dst`` holds len(src) / itemsize(src_dtype) elements of
        ``dst_dtype`` (torch attribute names: "float32", "bfloat16", ...)."""

    def slice_cols_buffers(self, dst: memoryview, src: memoryview, rows: int, src_row_bytes: int,
                           col_offset: int, col_bytes: int) -> None:
        """slice_cols() on host byte buffers."""


class BufferOps:
    """The buffer methods for backends whose kernels take torch tensors (wrapped, not copied)."""

    def cast_buffers(self, dst: memoryview, dst_dtype: str, src: memoryview, src_dtype: str) -> None:
        import torch

        if src.nbytes == 0 and dst.nbytes == 0:  # (torch.frombuffer refuses empty buffers)
            return
        s = torch.frombuffer(src, dtype=torch.uint8).view(getattr(torch, src_dtype))
        d = torch.frombuffer(dst, dtype=torch.uint8).view(getattr(torch, dst_dtype))
        self.cast(d, s)  # type: ignore[attr-defined]

    def slice_cols_buffers(self, dst: memoryview, src: memoryview, rows: int, src_row_bytes: int,
                           col_offset: int, col_bytes: int) -> None:
        import torch

        if rows == 0 or col_bytes == 0:
            return
        self.slice_cols(torch.frombuffer(dst, dtype=torch.uint8),  # type: ignore[attr-defined]
                        torch.frombuffer(src, dtype=torch.uint8), rows, src_row_bytes, col_offset, col_bytes)
