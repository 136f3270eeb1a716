"""The Triton backend against the torch reference, bit for bit.

Two lanes, one per process:
  * ``cuda``: compiled kernels on CUDA tensors, compared with torch on the same GPU (runs where a
    GPU and triton are present and TRITON_INTERPRET is unset);
  * ``interpreter``: the same kernels under ``TRITON_INTERPRET=1`` on CPU tensors, compared with
    torch on the CPU (runs wherever triton imports and no GPU lane runs, i.e. CPU CI).
The lane that cannot run is skipped with the reason.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

from hfnemo.kernels.torch_ref import TorchBackend

HAVE_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
INTERPRET_ENV = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ACTIVE = "cuda" if (CUDA and HAVE_TRITON and not INTERPRET_ENV) else "interpreter"
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
REF = TorchBackend()


def _skip_reason(lane: str) -> str | None:
    if not HAVE_TRITON:
        return "triton is not installed (pip install triton); this lane needs it"
    if lane == "cuda":
        if not CUDA:
            return "no CUDA device: the compiled lane runs on the GPU machine"
        if INTERPRET_ENV:
            return "TRITON_INTERPRET is set: this process runs the interpreter lane"
    elif ACTIVE == "cuda":
        return "a GPU is present: this process runs the compiled lane (set TRITON_INTERPRET=1 for this one)"
    return None


@pytest.fixture(scope="module", params=["interpreter", "cuda"])
def lane(request):
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    old = os.environ.get("TRITON_INTERPRET")
    if request.param == "interpreter":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: (re)import after
    mod = sys.modules.get("hfnemo.kernels.triton_backend")
    mod = importlib.reload(mod) if mod is not None else importlib.import_module("hfnemo.kernels.triton_backend")
    yield mod.TritonBackend(), torch.device("cuda" if request.param == "cuda" else "cpu")
    if request.param == "interpreter":
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        sys.modules.pop("hfnemo.kernels.triton_backend", None)  # leave no interpreted kernels behind


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _random_floats(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (every class: normal, subnormal, zero, inf, NaN) plus values near the
    rounding boundaries of the narrower types."""
    if dtype == torch.float32:
        bits = torch.randint(-(1 << 31), 1 << 31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
        x = bits.view(torch.float32).clone()
        # a third of the values in fp16/bf16 range and exactly on/near halfway points
        k = n // 3
        base = torch.randint(0, 1 << 16, (k,), generator=gen, dtype=torch.int64)
        halfway = (base << 16) | 0x8000 | torch.randint(-1, 2, (k,), generator=gen, dtype=torch.int64)
        x[:k] = (halfway - ((halfway >> 31) << 32)).to(torch.int32).view(torch.float32)
        h = torch.randint(0, 1 << 15, (k,), generator=gen, dtype=torch.int64)
        e = ((h >> 10) & 0x1F) + 112
        hbits = (e << 23) | ((h & 0x3FF) << 13) | 0x1000 | torch.randint(0, 2, (k,), generator=gen) * 0x800
        x[k:2 * k] = hbits.to(torch.int32).view(torch.float32)
        return x
    bits = torch.randint(-(1 << 15), 1 << 15, (n,), generator=gen, dtype=torch.int64).to(torch.int16)
    return bits.view(dtype).clone()


def _assert_cast_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    g, w = got.cpu(), want.cpu()
    nan = torch.isnan(w.float())
    assert torch.equal(torch.isnan(g.float()), nan), "NaN positions differ"
    gb, wb = _bits(g)[~nan], _bits(w)[~nan]
    bad = (gb != wb).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} elements differ, first at {bad[0].item()}: {gb[bad[0]].item():#x} vs " \
                             f"{wb[bad[0]].item():#x}"


@pytest.mark.parametrize("src_dt", FLOATS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dst_dt", FLOATS, ids=lambda d: str(d)[6:])
def test_cast_random_bits(lane, src_dt, dst_dt):
    backend, dev = lane
    gen = torch.Generator().manual_seed(hash((str(src_dt), str(dst_dt))) & 0xFFFF)
    for n, skew in ((0, 0), (1, 0), (7, 1), (4097, 3), (70001, 1)):
        x = _random_floats(n + skew, src_dt, gen).to(dev)[skew:]  # odd storage offsets: misaligned
        got = torch.empty(n + skew, dtype=dst_dt, device=dev)[skew:]
        want = torch.empty(n, dtype=dst_dt, device=dev)
        backend.cast(got, x)
        REF.cast(want, x)
        _assert_cast_equal(got, want)


@pytest.mark.parametrize("src_dt", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cast_exhaustive_16bit(lane, src_dt):
    """Every 16-bit pattern into every other float type."""
    backend, dev = lane
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(src_dt).to(dev)
    for dst_dt in FLOATS:
        got = torch.empty(x.numel(), dtype=dst_dt, device=dev)
        want = torch.empty_like(got)
        backend.cast(got, x)
        REF.cast(want, x)
        _assert_cast_equal(got, want)


def test_cast_specials(lane):
    backend, dev = lane
    vals = [0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65519.99, 65520.0, -65520.0, 6.1e-5, 5.96e-8,
            2.98e-8, 2.9802322387695312e-08, 1.0e-45, -1.0e-45, 3.3895314e38, 3.4028235e38, 1.0 + 2 ** -8,
            1.0 + 3 * 2 ** -9, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -12, float("nan")]
    x = torch.tensor(vals, dtype=torch.float32, device=dev)
    for src_dt in FLOATS:
        xs = x.to(src_dt)
        for dst_dt in FLOATS:
            got, want = torch.empty(len(vals), dtype=dst_dt, device=dev), torch.empty(len(vals), dtype=dst_dt,
                                                                                       device=dev)
            backend.cast(got, xs)
            REF.cast(want, xs)
            _assert_cast_equal(got, want)


_PAIRS = [(s, d) for s in FLOATS for d in FLOATS if s != d]  # same dtype is a byte copy


@pytest.mark.parametrize("src_dt,dst_dt", _PAIRS, ids=[f"{str(s)[6:]}-{str(d)[6:]}" for s, d in _PAIRS])
def test_cast_nan_patterns_match_torch(lane, src_dt, dst_dt):
    """NaN bits as torch's (vectorised) copy_ gives them on this device: the calibrated rule."""
    backend, dev = lane
    gen = torch.Generator().manual_seed(7)
    x = _random_floats(8192, src_dt, gen)
    nan_bits = torch.tensor([float("nan")], dtype=src_dt)
    x = torch.where(torch.isnan(x.float()), x, nan_bits.expand(x.shape))  # keep random NaNs, else canonical
    # plus random payloads: set the exponent of random patterns to all ones
    if src_dt == torch.float32:
        b = _bits(x).clone()
        b[::2] |= 0x7F800001
        x = b.view(torch.float32)
    else:
        b = _bits(x).clone()
        b[::2] |= 0x7C01 if src_dt == torch.float16 else 0x7F81
        x = b.view(src_dt)
    x = x.to(dev)
    got = torch.empty(x.numel(), dtype=dst_dt, device=dev)
    want = torch.empty_like(got)
    backend.cast(got, x)
    REF.cast(want, x)
    assert torch.isnan(got.float()).all()
    assert torch.equal(_bits(got).cpu(), _bits(want).cpu())


def test_cast_float64_delegates(lane):
    backend, dev = lane
    x = torch.randn(1001, dtype=torch.float64, device=dev)
    for dt in FLOATS:
        got, want = torch.empty(1001, dtype=dt, device=dev), torch.empty(1001, dtype=dt, device=dev)
        backend.cast(got, x)
        REF.cast(want, x)
        _assert_cast_equal(got, want)


def _pieces(gen, srcs, dst_len, count, align):
    pieces, pos = [], 0
    for _ in range(count):
        src = srcs[int(torch.randint(0, len(srcs), (1,), generator=gen))]
        n = int(torch.randint(0, 3000, (1,), generator=gen)) // align * align
        so = int(torch.randint(0, src.numel() - n, (1,), generator=gen)) // align * align
        pos += int(torch.randint(0, 40, (1,), generator=gen)) // align * align
        if pos + n > dst_len:
            break
        pieces.append((pos, src, so, n))
        pos += n
    return pieces


@pytest.mark.parametrize("align", [1, 2, 4, 8, 16])
def test_gather(lane, align):
    backend, dev = lane
    gen = torch.Generator().manual_seed(align)
    srcs = [torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).to(dev) for n in (5000, 12345, 70000)]
    dst_len = 200000
    pieces = _pieces(gen, srcs, dst_len, 60, align)
    got = torch.zeros(dst_len, dtype=torch.uint8, device=dev)
    want = got.clone()
    backend.gather(got, pieces)
    REF.gather(want, pieces)
    assert torch.equal(got.cpu(), want.cpu())
    # the same into a view at an odd offset (dst misaligned)
    got2 = torch.zeros(dst_len + 3, dtype=torch.uint8, device=dev)[3:]
    backend.gather(got2, pieces)
    assert torch.equal(got2.cpu(), want.cpu())


def test_gather_large_pieces(lane):
    """Pieces longer than one program row (split on the host) and a gather of nothing."""
    backend, dev = lane
    gen = torch.Generator().manual_seed(3)
    src = torch.randint(0, 256, (5 << 20,), generator=gen, dtype=torch.uint8).to(dev)
    pieces = [(0, src, 16, (3 << 20) + 48), ((3 << 20) + 48, src, 7, 1000), ((3 << 20) + 2048, src, 4 << 20, 1 << 20)]
    got = torch.zeros((4 << 20) + 4096, dtype=torch.uint8, device=dev)
    want = got.clone()
    backend.gather(got, pieces)
    REF.gather(want, pieces)
    assert torch.equal(got.cpu(), want.cpu())
    backend.gather(got, [])


@pytest.mark.parametrize("rows,src_row,col_off,cols", [
    (1, 16, 0, 16), (37, 200, 12, 48), (37, 203, 13, 47), (5, 4096, 2048, 2048), (1000, 96, 32, 32),
    (3, 20000, 4, 12000), (129, 64, 62, 2), (64, 8192 * 2, 4096 * 2, 4096 * 2),
    (300, 512, 256, 128), (33, 520, 8, 24), (17, 1032, 1000, 24)])
def test_slice_cols(lane, rows, src_row, col_off, cols):
    backend, dev = lane
    gen = torch.Generator().manual_seed(rows + cols)
    src = torch.randint(0, 256, (rows * src_row + 5,), generator=gen, dtype=torch.uint8).to(dev)
    for skew in (0, 1):
        got = torch.zeros(rows * cols + 7, dtype=torch.uint8, device=dev)
        want = got.clone()
        backend.slice_cols(got, src[skew:], rows, src_row, col_off, cols)
        REF.slice_cols(want, src[skew:], rows, src_row, col_off, cols)
        assert torch.equal(got.cpu(), want.cpu())


def test_get_backend_picks_triton_on_cuda(lane):
    backend, dev = lane
    if dev.type != "cuda":
        pytest.skip("get_backend('auto', device='cuda') is checked in the cuda lane")
    from hfnemo.kernels import get_backend
    assert get_backend("auto", device="cuda").name == "triton"


class _Collect:
    """A sink that keeps every item's bytes (the CPU executor's output)."""

    def __init__(self) -> None:
        self.data: dict[tuple, bytearray] = {}

    def begin(self, item) -> None:
        self.data[(item.key, tuple(item.offsets))] = bytearray()

    def write(self, item, data) -> None:
        self.data[(item.key, tuple(item.offsets))] += bytes(data)

    def end(self, item) -> None:
        pass


@pytest.mark.parametrize("dtype,block", [("auto", None), ("bf16", None), ("fp16", 8192)])
def test_iter_tensors_to_device_matches_cpu_executor(lane, tiny_hf_factory, dtype, block):
    """The GPU pipeline yields, for every plan item, the bytes the CPU executor writes."""
    backend, dev = lane
    if dev.type != "cuda":
        pytest.skip("iter_tensors_to_device needs CUDA streams: checked in the cuda lane")
    import hfnemo
    from hfnemo.exec.executor import execute
    from hfnemo.exec.gpu import iter_tensors_to_device
    from hfnemo.exec.sources import RowReader

    src = tiny_hf_factory("llama3_gqa", dtype=torch.float32)
    plan = hfnemo.api.plan(src, to="nemo", dtype=dtype, max_memory="8GiB")
    sink = _Collect()
    reader = RowReader()
    execute(plan, reader, sink)
    stats: dict = {}
    seen = 0
    for key, offsets, t in iter_tensors_to_device(plan, reader, "cuda", max_memory="64MiB", backend=backend,
                                                  depth=3, block_bytes=block, stats=stats):
        want = bytes(sink.data[(key, tuple(offsets))])
        got = t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()
        assert got == want, key
        seen += 1
    reader.close()
    assert seen == len(plan.items)
    assert stats["pinned_bytes"] + stats["device_staging_bytes"] <= stats["budget"]


@pytest.mark.parametrize("src_dt,dst_dt", [(s, d) for s in FLOATS for d in FLOATS if s != d])
def test_hw_cast_every_pattern(lane, src_dt, dst_dt):
    """The hardware-conversion cast kernel (compiled CUDA) against torch's copy_ on every bit
    pattern of the source type: all 2^16 for 16-bit sources, all 2^32 float32 patterns in slices
    of 2^28. Also: the backend's self-check picks it on this device (else the integer kernel runs,
    and the test says so)."""
    backend, dev = lane
    if dev.type != "cuda":
        pytest.skip("the hardware-conversion kernel is compiled CUDA only")
    mod = sys.modules["hfnemo.kernels.triton_backend"]
    iv = {4: torch.int32, 2: torch.int16}
    step = 1 << 28
    if src_dt == torch.float32:
        starts = range(-(1 << 31), 1 << 31, step)
    else:
        starts = [-(1 << 15)]
        step = 1 << 16
    for a in starts:
        bits = torch.arange(a, a + step, dtype=torch.int64, device=dev)
        x = (bits.to(torch.int32) if src_dt == torch.float32 else bits.to(torch.int16)).view(src_dt)
        del bits
        got = torch.empty(x.numel(), dtype=dst_dt, device=dev)
        mod._hwcast_kernel[(mod.triton.cdiv(x.numel(), 4096),)](x, got, x.numel(), BLOCK=4096, num_warps=8)
        want = torch.empty_like(got).copy_(x)
        k = dst_dt.itemsize
        assert torch.equal(got.view(iv[k]), want.view(iv[k])), (src_dt, dst_dt, a)
        del x, got, want
    assert backend.hw_cast_ok(dev, src_dt, dst_dt), "the self-check refused a pair that matches torch everywhere"
