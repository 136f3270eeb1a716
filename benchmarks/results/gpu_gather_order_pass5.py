"""Pass-5 experiment (H100, kept for the record): the gather kernel's program order and cache
modifiers against the same-bytes D2D copy. Result: cache modifiers change nothing (0.942-0.953);
a 1-D grid with one piece's programs adjacent lifts the QKV gather from 0.945 to 0.989 and 64 KiB
pieces from 0.952 to 0.974 (now the committed kernel). Run from the repo root on the device:
    PYTHONPATH=src:benchmarks python3 benchmarks/results/gpu_gather_order_pass5.py
"""
import sys, statistics, torch, triton, triton.language as tl
sys.path.insert(0, "src"); sys.path.insert(0, "benchmarks")
import bench_kernels as bk
from hfnemo.kernels.triton_backend import TritonBackend, _words
import hfnemo.kernels.triton_backend as tb

@triton.jit
def g_cs(dst_ptr, table_ptr, iters, ALIGN: tl.constexpr, CHUNK: tl.constexpr, LMOD: tl.constexpr, SMOD: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    dst_off = tl.multiple_of(tl.load(table_ptr + p * 3), ALIGN)
    src_off = tl.multiple_of(tl.load(table_ptr + p * 3 + 1), ALIGN)
    n = tl.multiple_of(tl.load(table_ptr + p * 3 + 2), ALIGN)
    dst = dst_ptr + dst_off
    src = dst_ptr + src_off
    c = tl.program_id(1).to(tl.int64)
    g = tl.num_programs(1).to(tl.int64)
    for i in range(0, iters):
        offs = (c + i * g) * CHUNK + tl.arange(0, CHUNK)
        offs = tl.max_contiguous(tl.multiple_of(offs, CHUNK), CHUNK)
        m = offs < n
        x = tl.load(src + offs, mask=m, cache_modifier=LMOD)
        tl.store(dst + offs, x, mask=m, cache_modifier=SMOD)

@triton.jit
def g_1d(dst_ptr, table_ptr, iters, G, ALIGN: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    p = pid // G
    c = pid % G
    dst_off = tl.multiple_of(tl.load(table_ptr + p * 3), ALIGN)
    src_off = tl.multiple_of(tl.load(table_ptr + p * 3 + 1), ALIGN)
    n = tl.multiple_of(tl.load(table_ptr + p * 3 + 2), ALIGN)
    dst = dst_ptr + dst_off
    src = dst_ptr + src_off
    for i in range(0, iters):
        offs = (c + i * G) * CHUNK + tl.arange(0, CHUNK)
        offs = tl.max_contiguous(tl.multiple_of(offs, CHUNK), CHUNK)
        m = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)

b = TritonBackend()
scale = 1 << 30
cases = {n: s for n, _, s in bk.cuda_kernels(scale) if n.startswith("gather_qkv") or n == "gather_64KiB_pieces"}
for name, setup in cases.items():
    run = setup()
    run(b)
    out_ref = run.__closure__ if False else None
    prep = run.preps["triton"]
    dst, word, table_t, grid, iters, align, chunk, warps = prep
    wd = _words(dst, dst.numel() // word * word, word)
    nbytes = 2 * dst.numel()
    half = nbytes // 2
    cs, cd = torch.randint(0, 256, (half,), dtype=torch.uint8, device="cuda"), torch.empty(half, dtype=torch.uint8, device="cuda")
    fns = [("d2d", lambda: cd.copy_(cs)), ("committed", lambda: b.gather_launch(prep))]
    G = grid[1]
    fns.append(("1d", lambda: g_1d[(grid[0] * G,)](wd, table_t, iters, G, ALIGN=align, CHUNK=chunk, num_warps=warps)))
    for tile, w in ((32768, 8), (65536, 8), (8192, 8)):
        ch = tile // word
        longest = int(table_t.view(-1, 3)[:, 2].max().item())
        G2 = max(1, min(triton.cdiv(longest, ch), 64)); it2 = triton.cdiv(triton.cdiv(longest, ch), G2)
        fns.append((f"1d_{tile}", lambda ch=ch, G2=G2, it2=it2, w=w: g_1d[(grid[0] * G2,)](wd, table_t, it2, G2, ALIGN=align, CHUNK=ch, num_warps=w)))
    b.gather_launch(prep); ref = dst.clone()
    for t, f in fns[2:]:
        dst.zero_(); f(); torch.cuda.synchronize()
        print(name, t, "equal", torch.equal(dst, ref), flush=True)
    for _, f in fns: f()
    torch.cuda.synchronize()
    r = {t: [] for t, _ in fns[1:]}
    for rep in range(9):
        order = fns[rep % len(fns):] + fns[:rep % len(fns)]
        ms = {t: bk._cuda_batch_ms(f, 10) for t, f in order}
        for t in r: r[t].append(ms["d2d"] / ms[t])
    print(name, {t: round(statistics.median(v), 3) for t, v in r.items()}, flush=True)
