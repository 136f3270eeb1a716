"""The reference backend: plain torch, the source of truth for every other backend."""
from __future__ import annotations

from typing import Sequence

import torch

from hfnemo.kernels.api import BufferOps, Piece


class TorchBackend(BufferOps):
    name = "torch"

    def set_threads(self, n: int) -> None:
        torch.set_num_threads(max(1, n))

    def cast(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)  # torch rounds float narrowing to nearest even

    def gather(self, dst: torch.Tensor, pieces: Sequence[Piece]) -> None:
        for dst_off, src, src_off, n in pieces:
            dst[dst_off:dst_off + n].copy_(src[src_off:src_off + n])

    def slice_cols(self, dst: torch.Tensor, src: torch.Tensor, rows: int, src_row_bytes: int, col_offset: int,
                   col_bytes: int) -> None:
        view = src[:rows * src_row_bytes].view(rows, src_row_bytes)[:, col_offset:col_offset + col_bytes]
        dst[:rows * col_bytes].view(rows, col_bytes).copy_(view)
