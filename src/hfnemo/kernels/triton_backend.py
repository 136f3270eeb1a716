"""Triton kernels for CUDA tensors: cast, gather, slice_cols (see :mod:`hfnemo.kernels.api`).

One ``@triton.jit`` kernel per operation. Every kernel moves data in the widest word (1, 2 or 4
bytes) that the pointers, offsets and lengths of the call allow and tells the compiler how aligned
the addresses are (``tl.multiple_of``), so 16-byte-aligned calls compile to 16-byte vector loads
and stores.

Casts have two kernels. The integer kernel does the conversion in integer bit arithmetic, never
with ``.to(float type)``: the Triton interpreter (``TRITON_INTERPRET=1``, the CPU test lane)
truncates float->bf16 while compiled Triton rounds to nearest even, and integer arithmetic is the
same in both, so it is bit-exact everywhere (round-to-nearest-even with subnormals, overflow to
infinity and signed zeros as torch). Compiled on CUDA, the hardware-conversion kernel (the same
``cvt.rn`` instructions torch's CUDA copy_ uses, ~3 instructions an element instead of ~20) is
used for each dtype pair once a self-check on this device found its bits equal to torch's on every
16-bit pattern / a float32 probe with every rounding boundary and the NaN probe
(:meth:`TritonBackend.hw_cast_ok`); the GPU test lane compares it with torch over all 2^32 float32
patterns.

NaN: torch's own NaN bit patterns differ between devices and even between its scalar and
vectorised loops on one device (on CPU, torch 2.13: f32->bf16 gives 0xFFFF, f16->bf16 0x7FC0,
f16->f32 keeps sign and payload and sets the quiet bit, bf16->f32 shifts the bits unchanged). The
backend therefore asks torch once per (device type, source dtype, destination dtype) what it
produces for a 4096-element probe of signalling/quiet/negative NaNs with varied payloads, and
picks the one NaN rule (keep sign+payload [+quiet bit], or one constant [+sign]) that reproduces
it; the kernel then applies that rule. NaN stays NaN in every case.

Import is lazy: importing this module without triton raises ImportError, which makes
``get_backend("auto", device="cuda")`` fall back to the torch reference. CPU tensors go through the
Triton interpreter when ``TRITON_INTERPRET=1``, else through the torch reference; float64 casts
(not a checkpoint dtype in practice) are delegated to torch.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

import triton  # noqa: F401  (ImportError here -> get_backend falls back to torch)
import triton.language as tl

from hfnemo.kernels.api import Piece
from hfnemo.kernels.torch_ref import TorchBackend

# dtype codes used by the cast kernel
F32, F16, BF16 = 0, 1, 2
_CODE = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_WORD = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
# NaN rules (cast kernel NAN_MODE)
NAN_KEEP_QUIET, NAN_KEEP_RAW, NAN_CONST, NAN_CONST_SIGN = 0, 1, 2, 3

# Launch shapes (tuned on an H100 with benchmarks/bench_gpu.py, which sweeps them through ``CONFIG``):
#   cast_block: elements per program; cast_warps;
#   tile_bytes / copy_warps: bytes per program (one loop step) in gather and slice_cols.
CONFIG = {"cast_block": 4096, "cast_warps": 8, "tile_bytes": 8192, "copy_warps": 8,
          # gather: bytes per program and loop step; warps when every piece is 16-byte aligned / not
          # (H100 pass 5: 16 KiB x 8 warps: QKV 1.06, 64 KiB pieces 0.95 x D2D; 2-byte aligned 4 warps 0.86)
          "gather_tile_bytes": 16384, "gather_warps": 8, "gather_warps_unaligned": 4}
# per (source, destination) dtype code: (elements per program, warps), best of the H100 sweep
# (benchmarks/RESULTS.md, GPU); pairs not listed use CONFIG. bench_gpu.py clears it to sweep CONFIG.
CAST_TUNED = {(F32, BF16): (4096, 8), (F16, BF16): (4096, 8), (BF16, F32): (2048, 4), (BF16, F16): (2048, 4),
              (F32, F16): (2048, 4)}
# the hardware-conversion cast kernel: (elements per program, warps); H100 pass 5: 0.97-1.01 x D2D
# for every float pair (benchmarks/RESULTS.md), the integer kernel 0.94-0.98
HW_CAST = (4096, 8)
COPY_CHUNK = 8192  # (kept for callers of earlier versions) bytes per program iteration
GATHER_SPLIT = 1 << 20  # pieces are cut into runs of at most this many bytes (one program row each)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _cast_kernel(src_ptr, dst_ptr, n, SRC: tl.constexpr, DST: tl.constexpr, NAN_MODE: tl.constexpr,
                 NAN_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """dst[i] = cast(src[i]); src/dst are int32/int16 views of the float buffers. One block a
    program (a persistent grid looping over blocks measured 2-15 % slower on the H100)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    raw = tl.load(src_ptr + offs, mask=mask, other=0)
    # ---- widen the source to float32 bits (exact); NaNs are rebuilt below from the raw bits
    if SRC == 0:
        x = raw.to(tl.uint32, bitcast=True)
        xn = x
    elif SRC == 2:
        x = raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        xn = x
    else:
        # f16 -> f32 is exact (subnormals included): the hardware conversion; the NaN payload
        # is taken from the raw bits, since the hardware may set the quiet bit
        h = raw.to(tl.uint16, bitcast=True).to(tl.uint32)
        x = raw.to(tl.float16, bitcast=True).to(tl.float32).to(tl.uint32, bitcast=True)
        xn = ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x3FF) << 13)
    sign = xn & 0x80000000
    ax = x & 0x7FFFFFFF
    is_nan = ax > 0x7F800000
    # ---- narrow float32 bits to the destination, round to nearest even
    if DST == 0:
        out = x
        payload = xn & 0x007FFFFF
        exp_bits = 0x7F800000
        quiet = 0x00400000
        sign_out = sign
    elif DST == 2:
        out = (x + 0x7FFF + ((x >> 16) & 1)) >> 16
        payload = (xn >> 16) & 0x7F
        exp_bits = 0x7F80
        quiet = 0x0040
        sign_out = sign >> 16
    else:
        # f32 -> f16 round-to-nearest-even (subnormals, overflow to inf): the hardware cvt.rn
        # compiled, numpy's astype under the interpreter; both are IEEE RNE. NaN fixed below.
        sign_out = sign >> 16
        out = x.to(tl.float32, bitcast=True).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        payload = (xn >> 13) & 0x3FF
        exp_bits = 0x7C00
        quiet = 0x0200
    if NAN_MODE == 0:
        nan_out = sign_out | exp_bits | quiet | payload
    elif NAN_MODE == 1:
        nan_out = sign_out | exp_bits | payload
    elif NAN_MODE == 2:
        nan_out = (out & 0) | NAN_BITS  # (no tl.zeros_like: a jit helper the interpreter may not patch)
    else:
        nan_out = sign_out | NAN_BITS
    out = tl.where(is_nan, nan_out, out)
    if DST == 0:
        tl.store(dst_ptr + offs, out.to(tl.int32, bitcast=True), mask=mask)
    else:
        tl.store(dst_ptr + offs, out.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def _hwcast_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """dst[i] = src[i] through the hardware conversions (widen to float32, exact; narrow with
    cvt.rn, round to nearest even): compiled CUDA only, and only for the dtype pairs whose results
    :meth:`TritonBackend.hw_cast_ok` found bit-identical to torch's own copy_ on this device."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src_ptr + offs, mask=mask)
    tl.store(dst_ptr + offs, x.to(tl.float32).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_kernel(dst_ptr, table_ptr, iters, G, R, ALIGN: tl.constexpr, CHUNK: tl.constexpr,
                   ADJACENT: tl.constexpr):
    """Row p of the int64 table is (dst_off, src_off, nwords), all in words of dst's element type
    and all multiples of ALIGN; src_off is relative to dst_ptr (the source's address minus dst's,
    so the compiler sees the source as aligned as dst and vectorises). A 1-D grid of rows x G
    programs, the G programs of one row adjacent (consecutive programs walk consecutive chunks of
    one piece: DRAM locality; with the row index fastest, QKV-shaped gathers ran at 0.945 x D2D on
    an H100, 0.989 this way). Program (p, c) copies chunks c, c+G, ... of row p, ``iters`` in all
    (the loop bound is a plain argument: older interpreters cannot loop up to a loaded value)."""
    pid = tl.program_id(0).to(tl.int64)
    if ADJACENT:
        p = pid // G
        c = pid % G
    else:  # the row index fastest: kept for pieces under 16-byte alignment (0.86 this way, 0.54 adjacent)
        p = pid % R
        c = pid // R
    dst_off = tl.multiple_of(tl.load(table_ptr + p * 3), ALIGN)
    src_off = tl.multiple_of(tl.load(table_ptr + p * 3 + 1), ALIGN)
    # the length too: without it the load mask `offs < n` has unknown constancy and the compiler
    # may not vectorise the masked loads (QKV-shaped gather 0.955 -> 1.07 x a 1 GiB D2D on an H100)
    n = tl.multiple_of(tl.load(table_ptr + p * 3 + 2), ALIGN)
    dst = dst_ptr + dst_off
    src = dst_ptr + src_off
    for i in range(0, iters):
        offs = (c + i * G) * CHUNK + tl.arange(0, CHUNK)
        offs = tl.max_contiguous(tl.multiple_of(offs, CHUNK), CHUNK)
        m = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


@triton.jit
def _slice_cols_kernel(dst_ptr, src_ptr, rows, src_row, col_off, cols, ALIGN: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    """dst[r, c] = src[r * src_row + col_off + c], a 2-D grid of (row blocks, column blocks); all
    sizes in words of the pointers' element type. WIDE: 64-bit offsets (else 32-bit, less index
    arithmetic; the host picks WIDE when an offset can pass 2**31)."""
    if WIDE:
        rb = tl.program_id(0).to(tl.int64)
        cb = tl.program_id(1).to(tl.int64)
    else:
        rb = tl.program_id(0)
        cb = tl.program_id(1)
    # (no tl.multiple_of on the scalars: Triton passes an int argument equal to 1 as a constexpr;
    # arguments divisible by 16 are specialised as such anyway)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c = tl.max_contiguous(tl.multiple_of(c, BLOCK_C), BLOCK_C)
    m = (r[:, None] < rows) & (c[None, :] < cols)
    s_off = r[:, None] * src_row + col_off + c[None, :]
    d_off = r[:, None] * cols + c[None, :]
    tl.store(dst_ptr + d_off, tl.load(src_ptr + s_off, mask=m), mask=m)


# ----------------------------------------------------------------------------- host side

_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2_align(*values: int, cap: int = 16) -> int:
    """The largest power of two, at most ``cap``, dividing every value."""
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    a = 1
    while a < cap and (g == 0 or g % (a * 2) == 0):
        a *= 2
    return a


def _words(t: torch.Tensor, nbytes: int, word: int) -> torch.Tensor:
    """A view of the first ``nbytes`` (a multiple of ``word``) of the uint8 tensor ``t`` as words."""
    return t[:nbytes].view(_WORD[word]) if word > 1 else t[:nbytes]


def _word_views_ok(word: int, *ts: torch.Tensor) -> bool:
    """torch's view(dtype) wants the storage offset (not only the address) to be word-aligned."""
    return all(t.storage_offset() % word == 0 for t in ts)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF if t.element_size() == 4 else \
        t.view(torch.int16).to(torch.int64) & 0xFFFF


def _nan_probe(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """4096 NaNs of ``dtype``: both signs, quiet and signalling, payloads in high and low bits."""
    g = torch.Generator().manual_seed(1234)
    if dtype == torch.float32:
        mant = torch.randint(1, 1 << 23, (4096,), generator=g, dtype=torch.int64)
        mant[:8] = torch.tensor([1, 1 << 22, (1 << 22) | 1, (1 << 23) - 1, 1 << 13, 1 << 16, 2, (1 << 22) | (1 << 16)])
        bits = 0x7F800000 | mant
        bits[1::2] |= 0x80000000
        return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32).to(device)
    width = 10 if dtype == torch.float16 else 7
    exp = 0x7C00 if dtype == torch.float16 else 0x7F80
    mant = torch.randint(1, 1 << width, (4096,), generator=g, dtype=torch.int64)
    mant[:4] = torch.tensor([1, 1 << (width - 1), (1 << width) - 1, 1 << (width - 2)])
    bits = exp | mant
    bits[1::2] |= 0x8000
    return (bits - ((bits >> 15) << 16)).to(torch.int16).view(dtype).to(device)


def _hw_probe(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Inputs for :meth:`TritonBackend.hw_cast_ok`: every bit pattern of a 16-bit type; for
    float32, the NaN probe, 2^20 random patterns, and for each exponent the patterns around the
    bfloat16 / float16 rounding points (ties to even and odd, one above, one below)."""
    if dtype != torch.float32:
        return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).to(device)
    g = torch.Generator().manual_seed(4321)
    parts = [torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=g, dtype=torch.int64)]
    hi = torch.arange(0, 1 << 9, dtype=torch.int64) << 23  # sign + exponent
    for low in (0x8000, 0x18000, 0x7FFF, 0x8001, 0x1000, 0x3000, 0x0FFF, 0x1001, 0, 0x7FFFFF, 0x7FE000, 0x7FF000):
        mant = (torch.randint(0, 1 << 23, (hi.numel(),), generator=g, dtype=torch.int64) & ~0x1FFFF) | low
        parts.append(hi | (mant & 0x7FFFFF))
    bits = torch.cat(parts) & 0xFFFFFFFF
    bits = bits - ((bits >> 31) << 32)
    return torch.cat([bits.to(torch.int32).view(torch.float32), _nan_probe(torch.float32, torch.device("cpu"))]).to(device)


def _predict_nan(src_bits: torch.Tensor, s: int, d: int, mode: int, const: int) -> torch.Tensor:
    """What the kernel's NaN rule ``mode`` gives for the source NaN bit patterns (CPU int64)."""
    if s == F32:
        x = src_bits
    elif s == BF16:
        x = src_bits << 16
    else:
        x = ((src_bits & 0x8000) << 16) | 0x7F800000 | ((src_bits & 0x3FF) << 13)
    sign = x & 0x80000000
    if d == F32:
        so, payload, exp, quiet = sign, x & 0x7FFFFF, 0x7F800000, 0x400000
    elif d == BF16:
        so, payload, exp, quiet = sign >> 16, (x >> 16) & 0x7F, 0x7F80, 0x40
    else:
        so, payload, exp, quiet = sign >> 16, (x >> 13) & 0x3FF, 0x7C00, 0x200
    if mode == NAN_KEEP_QUIET:
        return so | exp | quiet | payload
    if mode == NAN_KEEP_RAW:
        return so | exp | payload
    if mode == NAN_CONST:
        return torch.full_like(x, const)
    return so | const


class TritonBackend:
    name = "triton"

    def __init__(self) -> None:
        self._ref = TorchBackend()
        self._nan_rules: dict[tuple[str, torch.dtype, torch.dtype], tuple[int, int]] = {}
        self._hw_ok: dict[tuple[str, torch.dtype, torch.dtype], bool] = {}

    # -- protocol ----------------------------------------------------------------------------

    def set_threads(self, n: int) -> None:  # GPU kernels: nothing to set
        return None

    def _native(self, *ts: torch.Tensor) -> bool:
        """Whether the tensors go through the Triton kernels (CUDA, or CPU under the interpreter)."""
        return all(t.is_cuda for t in ts) or (_interpreting() and all(t.device.type == "cpu" for t in ts))

    def cast(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.numel() != src.numel():
            raise ValueError(f"cast: {src.numel()} elements into {dst.numel()}")
        if not self._native(dst, src) or src.dtype not in _CODE or dst.dtype not in _CODE:
            dst.copy_(src)  # float64 (or CPU tensors outside the interpreter): the torch reference
            return
        if not (dst.is_contiguous() and src.is_contiguous()):
            raise ValueError("cast: both tensors must be contiguous")
        n = src.numel()
        if n == 0:
            return
        if src.dtype == dst.dtype:
            nb = n * src.element_size()
            self.gather(dst.view(-1).view(torch.uint8), [(0, src.view(-1).view(torch.uint8), 0, nb)])
            return
        if src.is_cuda and not _interpreting() and self.hw_cast_ok(src.device, src.dtype, dst.dtype):
            block, warps = HW_CAST
            _hwcast_kernel[(triton.cdiv(n, block),)](src.view(-1), dst.view(-1), n, BLOCK=block, num_warps=warps)
            return
        mode, const = self.nan_rule(src.device, src.dtype, dst.dtype)
        block, warps = CAST_TUNED.get((_CODE[src.dtype], _CODE[dst.dtype]),
                                      (CONFIG["cast_block"], CONFIG["cast_warps"]))
        _cast_kernel[(triton.cdiv(n, block),)](src.view(-1).view(_INT_VIEW[src.dtype]),
                                               dst.view(-1).view(_INT_VIEW[dst.dtype]), n,
                                               SRC=_CODE[src.dtype], DST=_CODE[dst.dtype], NAN_MODE=mode,
                                               NAN_BITS=const, BLOCK=block, num_warps=warps)

    def gather(self, dst: torch.Tensor, pieces: Sequence[Piece]) -> None:
        prep = self.gather_prepare(dst, pieces)
        if prep is not None:
            self.gather_launch(prep)

    def gather_prepare(self, dst: torch.Tensor, pieces: Sequence[Piece]):
        """Host side of a gather: check the pieces and build the device piece table (numpy, no
        per-piece Python arithmetic). Returns what :meth:`gather_launch` needs, or None when the
        call was served otherwise (nothing to do, or the torch reference for non-native tensors)."""
        if not pieces:
            return None
        if not self._native(dst, *(p[1] for p in pieces)):
            self._ref.gather(dst, [p for p in pieces if p[3] > 0])
            return None
        k = len(pieces)
        # transpose the list at C speed; each distinct source tensor's address is looked up once
        d_l, t_l, so_l, n_l = zip(*pieces)
        ids = list(map(id, t_l))
        first = dict(zip(ids, t_l))
        uniq = list(first)
        base_of = {u: i for i, u in enumerate(uniq)}
        d_a = np.fromiter(d_l, np.int64, k)
        so_a = np.fromiter(so_l, np.int64, k)
        n_a = np.fromiter(n_l, np.int64, k)
        idx = np.fromiter(map(base_of.__getitem__, ids), np.int64, k)
        sptr = np.array([first[u].data_ptr() for u in uniq], np.int64)[idx]
        slen = np.array([first[u].numel() for u in uniq], np.int64)[idx]
        live = n_a > 0
        if not live.all():
            d_a, so_a, n_a, sptr, slen = d_a[live], so_a[live], n_a[live], sptr[live], slen[live]
        if n_a.size == 0:
            return None
        if (d_a < 0).any() or (so_a < 0).any() or (d_a + n_a > dst.numel()).any() or (so_a + n_a > slen).any():
            bad = int(np.nonzero((d_a < 0) | (so_a < 0) | (d_a + n_a > dst.numel()) | (so_a + n_a > slen))[0][0])
            raise ValueError(f"gather: piece ({int(d_a[bad])}, {int(so_a[bad])}, {int(n_a[bad])}) out of bounds")
        base = dst.data_ptr()
        dabs = base + d_a
        sabs = sptr + so_a
        acc = np.bitwise_or.reduce(np.concatenate([dabs, sabs, n_a]) | 16) | base | 16
        vec = int(acc & -acc)  # lowest set bit: the alignment every address and length shares (<= 16)
        word = min(vec, 4) if _word_views_ok(min(vec, 4), dst) else 1
        align = vec // word
        split = GATHER_SPLIT // word
        dw, sw, nw = d_a // word, (sabs - base) // word, n_a // word
        parts = (nw + split - 1) // split
        if (parts == 1).all():
            table = np.stack([dw, sw, nw], axis=1)
            longest = int(nw.max())
        else:
            rep = np.repeat(np.arange(nw.size), parts)
            first = np.cumsum(parts) - parts
            k_in = (np.arange(rep.size) - first[rep]) * split
            table = np.stack([dw[rep] + k_in, sw[rep] + k_in, np.minimum(split, nw[rep] - k_in)], axis=1)
            longest = int(min(split, int(nw.max())))
        table_t = torch.from_numpy(np.ascontiguousarray(table, dtype=np.int64)).view(-1)
        if dst.is_cuda:
            table_t = table_t.to(dst.device)  # pageable: the driver stages it, the host buffer is free after
        chunk = max(1, CONFIG["gather_tile_bytes"] // word)
        grid = (table.shape[0], max(1, min(triton.cdiv(longest, chunk), 64)))
        iters = triton.cdiv(triton.cdiv(longest, chunk), grid[1])
        warps = CONFIG["gather_warps"] if vec >= 16 else CONFIG["gather_warps_unaligned"]
        return (dst, word, table_t, grid, iters, align, chunk, warps)

    def gather_launch(self, prep) -> None:
        """Device side of a gather prepared by :meth:`gather_prepare` (one kernel launch)."""
        dst, word, table_t, grid, iters, align, chunk, warps = prep
        _gather_kernel[(grid[0] * grid[1],)](_words(dst, dst.numel() // word * word, word), table_t, iters, grid[1],
                                             grid[0], ALIGN=align, CHUNK=chunk, ADJACENT=align * word >= 16,
                                             num_warps=warps)

    def slice_cols(self, dst: torch.Tensor, src: torch.Tensor, rows: int, src_row_bytes: int, col_offset: int,
                   col_bytes: int) -> None:
        if rows <= 0 or col_bytes <= 0:
            return
        if not self._native(dst, src):
            self._ref.slice_cols(dst, src, rows, src_row_bytes, col_offset, col_bytes)
            return
        if col_offset < 0 or col_offset + col_bytes > src_row_bytes or rows * src_row_bytes > src.numel() \
                or rows * col_bytes > dst.numel():
            raise ValueError("slice_cols: out of bounds")
        vec = _pow2_align(dst.data_ptr(), src.data_ptr(), src_row_bytes, col_offset, col_bytes)
        word = min(vec, 4) if _word_views_ok(min(vec, 4), dst, src) else 1
        align = vec // word
        cols = col_bytes // word
        tile = max(1, CONFIG["tile_bytes"] // word)
        block_c = min(triton.next_power_of_2(cols), tile)
        block_r = max(1, min(tile // block_c, triton.next_power_of_2(rows)))
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
        wide = (grid[0] * block_r + 1) * (src_row_bytes // word) + grid[1] * block_c >= (1 << 31) - 1
        _slice_cols_kernel[grid](_words(dst, rows * col_bytes, word), _words(src, rows * src_row_bytes, word),
                                 rows, src_row_bytes // word, col_offset // word, cols, ALIGN=align,
                                 BLOCK_R=block_r, BLOCK_C=block_c, WIDE=wide, num_warps=CONFIG["copy_warps"])

    # -- hardware conversions --------------------------------------------------------------------

    def hw_cast_ok(self, device: torch.device, src: torch.dtype, dst: torch.dtype) -> bool:
        """Whether the hardware-conversion kernel gives torch's bits for src -> dst on this device:
        checked once per (device, pair) on every 16-bit pattern (16-bit sources) or on 2^20 random
        float32 patterns plus the rounding ties, boundaries and specials of both targets (float32
        sources), and on the NaN probe. Any difference keeps the integer kernel for that pair."""
        key = (str(device), src, dst)
        if key not in self._hw_ok:
            x = _hw_probe(src, device)
            got = torch.empty(x.numel(), dtype=dst, device=device)
            _hwcast_kernel[(triton.cdiv(x.numel(), 1024),)](x, got, x.numel(), BLOCK=1024, num_warps=4)
            want = torch.empty_like(got).copy_(x)
            iv = torch.int32 if got.element_size() == 4 else torch.int16
            self._hw_ok[key] = bool(torch.equal(got.view(iv), want.view(iv)))
        return self._hw_ok[key]

    # -- NaN rule -----------------------------------------------------------------------------

    def nan_rule(self, device: torch.device, src: torch.dtype, dst: torch.dtype) -> tuple[int, int]:
        """(NAN_MODE, NAN_BITS) reproducing what torch's copy_ gives for NaNs on this device type."""
        key = (device.type, src, dst)
        if key not in self._nan_rules:
            probe = _nan_probe(src, device)
            got = _bits(torch.empty(probe.numel(), dtype=dst, device=device).copy_(probe)).cpu()
            sbits = _bits(probe).cpu()
            s, d = _CODE[src], _CODE[dst]
            sign_bit = 0x80000000 if d == F32 else 0x8000
            chosen = (NAN_KEEP_QUIET, 0)  # IEEE default if torch follows none of the rules
            for mode in (NAN_KEEP_RAW, NAN_KEEP_QUIET, NAN_CONST, NAN_CONST_SIGN):
                if mode == NAN_KEEP_RAW and (s, d) not in ((F16, F32), (BF16, F32), (BF16, F16)):
                    continue  # a narrowed payload can truncate to zero (an infinity): needs the quiet bit
                const = int(got[0]) if mode == NAN_CONST else int(got[0]) & ~sign_bit
                if torch.equal(_predict_nan(sbits, s, d, mode, const), got):
                    chosen = (mode, const)
                    break
            self._nan_rules[key] = chosen
        return self._nan_rules[key]
