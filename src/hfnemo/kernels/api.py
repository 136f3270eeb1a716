"""The kernel interface. Buffers are torch tensors: byte buffers are 1-D uint8, typed views for
casts. Every function writes into ``dst`` and returns nothing; all are pure data movement or
elementwise casts, so every backend must agree with the torch reference bit for bit."""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

# (dst_offset, src_buffer, src_offset, nbytes): one contiguous run of a batched gather.
Piece = tuple[int, torch.Tensor, int, int]


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
