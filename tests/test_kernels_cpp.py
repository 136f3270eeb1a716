"""The C++ kernels (hfnemo._C via hfnemo.kernels.cpp) against the torch reference, bit for bit.

`make test` builds the extension (pip install -e .), so a missing hfnemo._C is a failure here,
not a skip. Float results are compared as integer bit patterns (torch.equal on int views).

NaN: torch's copy_ is not self-consistent for NaN bit patterns (its scalar tail loop, the last
numel % vector-width elements of each chunk, gives 0x7FC0 for float64->bfloat16 and 0x7FFFFFFF
for float16->float32 where the vectorized main loop gives 0xFFFF and a quieted payload). The
backend follows the main loop everywhere, so wherever the reference is NaN the expected bits
are torch's main-loop result for that source element (`torch_bulk`); everywhere else they are
the reference's own bits.
"""
from __future__ import annotations

import random
import threading

import pytest
import torch

import hfnemo._C as _C  # must import: `make test` builds it
from hfnemo.kernels import get_backend
from hfnemo.kernels.cpp import CppBackend
from hfnemo.kernels.torch_ref import TorchBackend

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
FLOATS = [F64, F32, F16, BF16]
INT = {F64: torch.int64, F32: torch.int32, F16: torch.int16, BF16: torch.int16}
PAIRS = [(s, d) for s in FLOATS for d in FLOATS]
THREADS = [1, 2, 3, 8]
ODD_SIZES = [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 255, 1000, 4097]

CPP = CppBackend()
REF = TorchBackend()


def _id(x):
    return str(x).replace("torch.", "")


def _pair_id(pair):
    return f"{_id(pair[0])}->{_id(pair[1])}"


@pytest.fixture(autouse=True)
def _restore_knobs():
    threads, chunk = _C.get_threads(), _C._min_chunk_bytes()
    yield
    _C.set_threads(threads)
    _C._set_min_chunk_bytes(chunk)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT[t.dtype])


def from_bits(dtype: torch.dtype, values) -> torch.Tensor:
    """A tensor of `dtype` holding the given (unsigned) bit patterns."""
    w = torch.finfo(dtype).bits
    signed = [v - (1 << w) if v >= 1 << (w - 1) else v for v in values]
    return torch.tensor(signed, dtype=torch.int64).to(INT[dtype]).view(dtype)


def random_bits(dtype: torch.dtype, n: int, g: torch.Generator) -> torch.Tensor:
    it = INT[dtype]
    info = torch.iinfo(it)
    return torch.randint(info.min, info.max, (n,), dtype=torch.int64, generator=g).to(it).view(dtype)


def random_values(dtype: torch.dtype, n: int, g: torch.Generator) -> torch.Tensor:
    """Mixed random bit patterns (every class of value) and realistic weights of many scales."""
    a = random_bits(dtype, n, g)
    scale = torch.exp2(torch.randint(-30, 17, (n,), generator=g).double())
    b = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
    pick = torch.rand(n, generator=g) < 0.5
    out = torch.where(pick, bits(a), bits(b)).view(dtype)
    return out


def torch_bulk(dst_dtype: torch.dtype, src: torch.Tensor) -> torch.Tensor:
    """torch's vectorized-loop conversion of each element: every element is repeated 64 times
    (a multiple of every vector width, one thread) and the first copy's result taken."""
    outs = []
    for chunk in bits(src).split(256):
        rep = chunk.repeat_interleave(64).view(src.dtype)
        o = torch.empty(rep.numel(), dtype=dst_dtype)
        o.copy_(rep)
        outs.append(bits(o)[::64])
    return torch.cat(outs) if outs else torch.empty(0, dtype=INT[dst_dtype])


def expected_cast(dst_dtype: torch.dtype, src: torch.Tensor) -> torch.Tensor:
    ref = torch.empty(src.numel(), dtype=dst_dtype)
    REF.cast(ref, src)
    nan = torch.isnan(ref)
    if nan.any():
        bits(ref)[nan] = torch_bulk(dst_dtype, src[nan])
    return bits(ref)


def assert_bits_equal(got: torch.Tensor, exp: torch.Tensor, what: str) -> None:
    if torch.equal(got, exp):
        return
    bad = (got != exp).nonzero().flatten()[:8].tolist()
    w = got.element_size() * 2
    detail = ", ".join(f"[{i}] got {int(got[i]) & ((1 << 4 * w) - 1):#0{w + 2}x} "
                       f"want {int(exp[i]) & ((1 << 4 * w) - 1):#0{w + 2}x}" for i in bad)
    raise AssertionError(f"{what}: {int((got != exp).sum())} of {got.numel()} differ: {detail}")


def check_cast(dst_dtype: torch.dtype, src: torch.Tensor, what: str) -> None:
    exp = expected_cast(dst_dtype, src)
    out = torch.empty(src.numel(), dtype=dst_dtype)
    bits(out).fill_(0x5A)  # garbage: every element must be written
    CPP.cast(out, src)
    assert_bits_equal(bits(out), exp, f"{what} {_id(src.dtype)}->{_id(dst_dtype)}")


# ---------------------------------------------------------------- the extension is there

def test_extension_is_built():
    assert _C.get_threads() >= 1
    assert 1 <= _C.default_threads() <= 8
    assert "-O3" in _C.build_info() and "march" not in _C.build_info()
    assert get_backend("cpp").name == "cpp"
    assert get_backend("auto", device="cpu").name == "cpp"


def test_set_threads():
    CPP.set_threads(3)
    assert _C.get_threads() == 3 == CPP.get_threads()
    with pytest.raises(ValueError):
        CPP.set_threads(0)
    with pytest.raises(ValueError):
        _C.set_threads(0)


# ---------------------------------------------------------------- casts

# Bit patterns at every boundary that matters for float32 sources (each also +-1, +-2 ulps).
F32_KEYS = [
    0x00000000, 0x00000001, 0x00000002, 0x007FFFFF, 0x00800000,          # zero, f32 subnormals, min normal
    0x33000000, 0x33400000, 0x33800000, 0x33C00000, 0x34200000,          # f16 subnormal rounding, ties
    0x387FC000, 0x387FE000, 0x387FF000, 0x38800000,                      # around f16 min normal
    0x3F800000, 0x3F808000, 0x3F818000, 0x3F801000, 0x3F803000,          # 1.0 and RNE ties (bf16, f16)
    0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,          # f16 max finite / overflow
    0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F800000,                      # bf16 max finite / overflow, inf
    0x7F800001, 0x7FA00000, 0x7FBFFFFF, 0x7FC00000, 0x7FC00001, 0x7FC12345, 0x7FFFFFFF,  # NaNs
]


def f32_specials() -> torch.Tensor:
    vals = set()
    for k in F32_KEYS:
        for d in (-2, -1, 0, 1, 2):
            v = (k + d) & 0x7FFFFFFF
            vals.add(v)
            vals.add(v | 0x80000000)
    return from_bits(F32, sorted(vals))


def f64_specials() -> torch.Tensor:
    """float32 boundaries widened, +-1 and +-2 ulps of float64 (double-rounding cases), float64
    NaN payloads, values beyond float32's range and float64 subnormals."""
    base = bits(f32_specials().double()).tolist()
    extra = [0x0000000000000001, 0x000FFFFFFFFFFFFF, 0x0010000000000000, 0x36A0000000000000,
             0x3690000000000000, 0x47EFFFFFE0000000, 0x47EFFFFFF0000000, 0x7FEFFFFFFFFFFFFF,
             0x7FF0000000000000, 0x7FF0000000000001, 0x7FF4000000000000, 0x7FF8000000000000,
             0x7FF8000000000001, 0x7FF8123456789ABC, 0x7FFFFFFFFFFFFFFF, 0x3FF0000010000000,
             0x3FF0000010000001, 0x3FF0010000000001, 0x3FF0080000000001, 0x3FF0020000000001]
    vals = set()
    for k in [b & 0xFFFFFFFFFFFFFFFF for b in base] + extra:
        for d in (-2, -1, 0, 1, 2):
            v = (k + d) & 0x7FFFFFFFFFFFFFFF
            vals.add(v)
            vals.add(v | 0x8000000000000000)
    return from_bits(F64, sorted(vals))


@pytest.mark.parametrize("pair", [(s, d) for s in (F16, BF16) for d in FLOATS], ids=_pair_id)
def test_cast_every_16bit_pattern(pair):
    src_dtype, dst_dtype = pair
    _C.set_threads(3)
    _C._set_min_chunk_bytes(4096)  # several threads with ragged boundaries
    src = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(src_dtype)
    check_cast(dst_dtype, src, "all 65536 patterns")


@pytest.mark.parametrize("pair", [(s, d) for s in (F32, F64) for d in FLOATS], ids=_pair_id)
def test_cast_special_values(pair):
    src_dtype, dst_dtype = pair
    src = f32_specials() if src_dtype == F32 else f64_specials()
    check_cast(dst_dtype, src, "specials")
    # one at a time too (the 1-element path) for a sample
    for i in range(0, src.numel(), 7):
        check_cast(dst_dtype, src[i:i + 1].clone(), f"special #{i} alone")


def test_nan_rules_pinned():
    """The NaN patterns documented in csrc/cast.h, on both sides (torch's main loop and ours)."""
    cases = [  # (src dtype, src bits, dst dtype, dst bits)
        (F32, 0x7FC00000, BF16, 0xFFFF), (F32, 0xFFA5A5A5, BF16, 0xFFFF),
        (F64, 0x7FF8000000000000, BF16, 0xFFFF), (F16, 0x7E00, BF16, 0x7FC0), (F16, 0xFD5A, BF16, 0x7FC0),
        (F32, 0x7F800001, F16, 0x7E00), (F32, 0xFFA5A5A5, F16, 0xFF2D), (BF16, 0x7F81, F16, 0x7E08),
        (F16, 0x7C01, F32, 0x7FC02000), (F16, 0xFD5A, F32, 0xFFEB4000), (BF16, 0x7F81, F32, 0x7F810000),
        (F32, 0x7F800001, F64, 0x7FF8000020000000), (F64, 0xFFF5A5A5A5A5A5A5, F32, 0xFFED2D2D),
        (F64, 0x7FF4123456789ABC, F16, 0x7F04), (BF16, 0xFF93, F64, 0xFFFA600000000000),
    ]
    for sd, sb, dd, db in cases:
        src = from_bits(sd, [sb] * 64)
        want = bits(from_bits(dd, [db]))[0]
        assert int(torch_bulk(dd, src[:1])[0]) == int(want), (sd, hex(sb), dd)
        out = torch.empty(64, dtype=dd)
        CPP.cast(out, src)
        assert bool((bits(out) == want).all()), (sd, hex(sb), dd, hex(int(bits(out)[0])))
    assert _C.f32_to_bf16(0x7FC00000) == 0xFFFF and _C.f32_to_f16(0x477FF000) == 0x7C00
    assert _C.f16_to_f32(0x0001) == 0x33800000


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_cast_odd_shapes_and_offsets(pair, threads):
    src_dtype, dst_dtype = pair
    _C.set_threads(threads)
    _C._set_min_chunk_bytes(64)
    g = torch.Generator().manual_seed(FLOATS.index(src_dtype) * 100 + FLOATS.index(dst_dtype) * 10 + threads)
    for n in ODD_SIZES:
        for off in (0, 1, 3):
            buf = random_values(src_dtype, n + off + 2, g)
            src = buf[off:off + n]  # contiguous view at an element (not vector) aligned offset
            exp = expected_cast(dst_dtype, src)
            dbuf = torch.empty(n + 5, dtype=dst_dtype)
            bits(dbuf).fill_(0x33)
            out = dbuf[off + 1:off + 1 + n]
            CPP.cast(out, src)
            assert_bits_equal(bits(out), exp, f"n={n} off={off} t={threads} {_id(src_dtype)}->{_id(dst_dtype)}")
            # bytes around the destination view are untouched
            rest = torch.cat([bits(dbuf)[:off + 1], bits(dbuf)[off + 1 + n:]])
            assert bool((rest == 0x33).all())


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("pair", [(F32, BF16), (BF16, F32), (F32, F16), (F16, F32), (F64, BF16), (BF16, F16),
                                  (F32, F32)], ids=_pair_id)
def test_cast_large_default_chunks(pair, threads):
    src_dtype, dst_dtype = pair
    """Multi-MiB inputs with the default 1 MiB minimum range: real multithreading."""
    _C.set_threads(threads)
    g = torch.Generator().manual_seed(threads)
    n = (3 << 20) // 2 + 12345
    src = random_values(src_dtype, n + 1, g)[1:]
    check_cast(dst_dtype, src, f"large t={threads}")


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_cast_large_streamed(pair, threads):
    """Outputs >= 8 MiB (the tiled, non-temporal store path): destination 2 bytes past a line,
    a length that leaves a head, whole tiles and a tail shorter than a line; bytes around the
    destination untouched."""
    src_dtype, dst_dtype = pair
    _C.set_threads(threads)
    old = _C._cast_stream_min_bytes()
    _C._set_cast_stream_min_bytes(8 << 20)  # the streamed path, whatever this CPU's default
    try:
        _check_streamed(src_dtype, dst_dtype, threads)
    finally:
        _C._set_cast_stream_min_bytes(old)


def _check_streamed(src_dtype, dst_dtype, threads):
    g = torch.Generator().manual_seed(7 + threads)
    ds = dst_dtype.itemsize
    n = (8 << 20) // ds + 16384 // ds * 3 + 29
    src = random_values(src_dtype, n + 3, g)[3:]
    exp = expected_cast(dst_dtype, src)
    lead = 2 // ds if ds <= 2 else 1  # 2 or 4 bytes past a 64-byte line
    dbuf = torch.empty(n + 64, dtype=dst_dtype)
    bits(dbuf).fill_(0x33)
    skip = (-dbuf.data_ptr() % 64) // ds + lead
    out = dbuf[skip:skip + n]
    CPP.cast(out, src)
    assert_bits_equal(bits(out), exp, f"streamed t={threads} {_id(src_dtype)}->{_id(dst_dtype)}")
    rest = torch.cat([bits(dbuf)[:skip], bits(dbuf)[skip + n:]])
    assert bool((rest == 0x33).all())


# ---------------------------------------------------------------- gather

def random_gather(rng: random.Random, g: torch.Generator):
    """Random disjoint destination runs (shuffled order, gaps, empty and 1-byte runs) filled from
    random places of several source buffers."""
    srcs = [torch.randint(0, 256, (rng.choice([1, 17, 1000, 70001, 300000]),), dtype=torch.uint8, generator=g)
            for _ in range(rng.randint(1, 4))]
    pieces, pos = [], rng.randint(0, 9)
    for _ in range(rng.randint(0, 40)):
        src = rng.choice(srcs)
        n = min(src.numel(), rng.choice([0, 1, 2, 3, 63, 64, 65, 4095, rng.randint(0, 200000)]))
        src_off = rng.randint(0, src.numel() - n)
        pieces.append((pos, src, src_off, n))
        pos += n + rng.choice([0, 0, 1, 7])
    rng.shuffle(pieces)
    return pos + rng.randint(0, 9), pieces


@pytest.mark.parametrize("threads", THREADS)
def test_gather_random(threads):
    _C.set_threads(threads)
    rng = random.Random(1000 + threads)
    g = torch.Generator().manual_seed(threads)
    for trial in range(25):
        _C._set_min_chunk_bytes(rng.choice([1, 100, 4096, 1 << 20]))
        size, pieces = random_gather(rng, g)
        a = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
        b = a.clone()
        REF.gather(a, pieces)
        CPP.gather(b, pieces)
        assert torch.equal(a, b), f"trial {trial}: {len(pieces)} pieces into {size} bytes, threads={threads}"


def test_gather_qkv_like():
    """QKV interleave (q heads of a group, then k, then v) and its inverse."""
    _C.set_threads(3)
    g = torch.Generator().manual_seed(7)
    groups, qpg, head = 4, 3, 64 * 33  # head bytes not a power of two
    q = torch.randint(0, 256, (groups * qpg * head,), dtype=torch.uint8, generator=g)
    k = torch.randint(0, 256, (groups * head,), dtype=torch.uint8, generator=g)
    v = torch.randint(0, 256, (groups * head,), dtype=torch.uint8, generator=g)
    pieces, pos = [], 0
    for gi in range(groups):
        for src, off, n in ((q, gi * qpg * head, qpg * head), (k, gi * head, head), (v, gi * head, head)):
            pieces.append((pos, src, off, n))
            pos += n
    a, b = torch.zeros(pos, dtype=torch.uint8), torch.ones(pos, dtype=torch.uint8)
    REF.gather(a, pieces)
    CPP.gather(b, pieces)
    assert torch.equal(a, b)
    # the inverse: split the fused buffer back into q, k, v
    for part in (q, k, v):
        back = [(s_off, b, d_off, n) for d_off, src, s_off, n in pieces if src is part]
        ra, rb = torch.zeros_like(part), torch.zeros_like(part)
        REF.gather(ra, back)
        CPP.gather(rb, back)
        assert torch.equal(ra, rb) and torch.equal(rb, part)


# ---------------------------------------------------------------- slice_cols

@pytest.mark.parametrize("threads", THREADS)
def test_slice_cols_random(threads):
    _C.set_threads(threads)
    rng = random.Random(2000 + threads)
    g = torch.Generator().manual_seed(threads)
    for trial in range(40):
        _C._set_min_chunk_bytes(rng.choice([1, 64, 4096, 1 << 20]))
        rows = rng.choice([0, 1, 2, 3, 7, 33, rng.randint(1, 3000)])
        src_row = rng.choice([1, 2, 3, 64, 100, 4096, rng.randint(1, 5000)])
        col_bytes = rng.randint(0, src_row)
        col_off = rng.randint(0, src_row - col_bytes)
        src = torch.randint(0, 256, (rows * src_row + rng.randint(0, 5),), dtype=torch.uint8, generator=g)
        dst_len = rows * col_bytes + rng.randint(0, 5)
        a = torch.randint(0, 256, (dst_len,), dtype=torch.uint8, generator=g)
        b = a.clone()
        args = (rows, src_row, col_off, col_bytes)
        REF.slice_cols(a, src, *args)
        CPP.slice_cols(b, src, *args)
        assert torch.equal(a, b), f"trial {trial}: rows={rows} src_row={src_row} off={col_off} cols={col_bytes}"


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_slice_cols_tp_shards(tp):
    """Cutting every tensor-parallel shard of a row-parallel weight, unaligned source offset."""
    _C.set_threads(3)
    rows, row_bytes = 301, 2 * 8 * 136
    buf = torch.randint(0, 256, (rows * row_bytes + 1,), dtype=torch.uint8, generator=torch.Generator().manual_seed(tp))
    src = buf[1:]
    w = row_bytes // tp
    for r in range(tp):
        a, b = torch.empty(rows * w, dtype=torch.uint8), torch.empty(rows * w, dtype=torch.uint8)
        REF.slice_cols(a, src, rows, row_bytes, r * w, w)
        CPP.slice_cols(b, src, rows, row_bytes, r * w, w)
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(1500, 8191, 1237, 5701, 1), (300, 57344, 28672, 28672, 0), (70000, 300, 5, 130, 3)],
                         ids=["odd-unaligned", "tp2-aligned", "short-rows"])
def test_slice_cols_large_streamed(shape, threads):
    """Outputs >= 8 MiB (the non-temporal store path): odd row lengths, destination not 64-byte
    aligned, rows split between threads, bytes around the destination untouched."""
    rows, src_row, col_off, col_bytes, dst_off = shape
    _C.set_threads(threads)
    g = torch.Generator().manual_seed(rows + threads)
    src = torch.randint(0, 256, (rows * src_row + 3,), dtype=torch.uint8, generator=g)[3:]
    a = torch.randint(0, 256, (rows * col_bytes + dst_off + 64,), dtype=torch.uint8, generator=g)
    b = a.clone()
    REF.slice_cols(a[dst_off:dst_off + rows * col_bytes], src, rows, src_row, col_off, col_bytes)
    CPP.slice_cols(b[dst_off:dst_off + rows * col_bytes], src, rows, src_row, col_off, col_bytes)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- concurrency

def test_concurrent_calls_from_python_threads():
    _C.set_threads(2)
    _C._set_min_chunk_bytes(4096)
    g = torch.Generator().manual_seed(3)
    srcs = [random_values(F32, 200_000 + i, g) for i in range(6)]
    exps = [expected_cast(BF16, s) for s in srcs]
    outs = [torch.empty(s.numel(), dtype=BF16) for s in srcs]
    errors = []

    def work(i):
        try:
            for _ in range(5):
                CPP.cast(outs[i], srcs[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(srcs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for o, e in zip(outs, exps):
        assert torch.equal(bits(o), e)


# ---------------------------------------------------------------- argument validation

def test_cast_rejects_bad_arguments():
    f = torch.zeros(8)
    h = torch.zeros(8, dtype=F16)
    with pytest.raises(ValueError, match="elements"):
        CPP.cast(torch.zeros(7, dtype=F16), f)
    with pytest.raises(ValueError, match="contiguous"):
        CPP.cast(torch.zeros(4, dtype=F16), f[::2])
    with pytest.raises(ValueError, match="contiguous"):
        CPP.cast(torch.zeros(4, 4).t(), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="dtype"):
        CPP.cast(torch.zeros(8, dtype=torch.int32), f)
    with pytest.raises(ValueError, match="dtype"):
        CPP.cast(h, torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="CPU"):
        CPP.cast(torch.zeros(8, device="meta"), h)
    with pytest.raises(ValueError, match="Tensor"):
        CPP.cast(h, [0.0] * 8)
    with pytest.raises(ValueError, match="overlap"):
        CPP.cast(f.view(F16)[:8], f)
    raw = torch.zeros(64, dtype=torch.uint8)
    misaligned = torch.frombuffer(memoryview(raw.numpy()), dtype=F32, count=4, offset=1) \
        if hasattr(torch, "frombuffer") else None
    if misaligned is not None and misaligned.data_ptr() % 4:
        with pytest.raises(ValueError, match="aligned"):
            CPP.cast(torch.zeros(4, dtype=BF16), misaligned)
    CPP.cast(torch.zeros(0, dtype=BF16), torch.zeros(0))  # empty is fine
    CPP.cast(f, f)  # same buffer, same dtype: a no-op, as torch


def test_gather_rejects_bad_arguments():
    dst = torch.zeros(16, dtype=torch.uint8)
    src = torch.arange(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="past its end"):
        CPP.gather(dst, [(10, src, 0, 8)])
    with pytest.raises(ValueError, match="past its end"):
        CPP.gather(dst, [(0, src, 10, 8)])
    with pytest.raises(ValueError, match=">= 0"):
        CPP.gather(dst, [(0, src, -1, 8)])
    with pytest.raises(ValueError, match="overlap in dst"):
        CPP.gather(dst, [(0, src, 0, 8), (7, src, 8, 4)])
    with pytest.raises(ValueError, match="overlaps a destination"):
        CPP.gather(dst, [(0, dst, 8, 4), (8, src, 0, 4)])
    with pytest.raises(ValueError, match="uint8"):
        CPP.gather(dst, [(0, src.view(torch.int16), 0, 4)])
    with pytest.raises(ValueError, match="uint8"):
        CPP.gather(dst.view(torch.int16), [(0, src, 0, 4)])
    with pytest.raises(ValueError, match="piece 0 must be"):
        CPP.gather(dst, [(0, src, 0)])
    with pytest.raises(ValueError, match="integer"):
        CPP.gather(dst, [(0.5, src, 0, 4)])
    CPP.gather(dst, [(0, dst, 8, 4)])  # reading the part of dst that is not written is fine
    assert torch.equal(dst, torch.zeros(16, dtype=torch.uint8))
    CPP.gather(dst, [])


def test_slice_cols_rejects_bad_arguments():
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="exceeds"):
        CPP.slice_cols(dst, src, 4, 16, 10, 8)
    with pytest.raises(ValueError, match="src has"):
        CPP.slice_cols(dst, src, 5, 16, 0, 4)
    with pytest.raises(ValueError, match="dst has"):
        CPP.slice_cols(dst, src, 4, 16, 0, 9)
    with pytest.raises(ValueError, match=">= 0"):
        CPP.slice_cols(dst, src, -1, 16, 0, 4)
    with pytest.raises(ValueError, match="overlap"):
        CPP.slice_cols(src[8:], src, 2, 16, 0, 8)
    with pytest.raises(ValueError, match="1-D uint8"):
        CPP.slice_cols(dst, src.view(4, 16), 4, 16, 0, 8)
    CPP.slice_cols(dst, src, 0, 16, 0, 4)
    CPP.slice_cols(dst, src, 4, 16, 3, 0)
