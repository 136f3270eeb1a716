#!/usr/bin/env python3
"""GPU pass 5 (issue 4): what bounds the Triton kernels and the pipeline, measured in one process.

Kernels: every case is timed as a batch of back-to-back launches (CUDA events around ``--batch``
launches), and each repetition rotates the D2D copy, the committed backend and the candidates so
drift hits all alike; the ratio is to the D2D copy timed in the same repetition (median over
repetitions reported, and the best). Candidates:

* ``tcopy``: a plain Triton copy kernel (int16/int32 words) -- the ceiling of this kernel shape;
* ``hw``: casts with the hardware conversions alone (``x.to(float32).to(dst)``, compiled Triton
  rounds to nearest even), no NaN fix-up -- bit-checked against torch's ``copy_`` (NaN probe
  included) before timing;
* gather with the piece length declared a multiple of the alignment (``tl.multiple_of(n, ALIGN)``:
  without it the load mask has unknown constancy and loads may be split);
* slice_cols against ``cudaMemcpy2DAsync`` of the same strided shape (the driver's own strided
  copy) as well as the 1-D copy.

Pipeline: a bare ring (T threads ``preadv`` the page-cached checkpoint into K pinned slots of S
bytes, the main thread queues one H2D copy per slot) for S in 2..64 MiB, to see whether small,
cache-resident slots beat host-memory bandwidth; and ``iter_tensors_to_device`` with those shapes.

    PYTHONPATH=src:benchmarks python3 benchmarks/results/gpu_pass5.py --cache /tmp/hfcache
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton
import triton.language as tl

GiB = 1 << 30
MiB = 1 << 20


def emit(obj):
    print(json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------- candidate kernels

@triton.jit
def tcopy_k(src, dst, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


@triton.jit
def hwcast_k(src, dst, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(src + offs, mask=m)
    tl.store(dst + offs, x.to(tl.float32).to(dst.dtype.element_ty), mask=m)


@triton.jit
def hwcast_even_k(src, dst, BLOCK: tl.constexpr):
    """no mask: the host launches only whole blocks (n % BLOCK == 0)"""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src + offs)
    tl.store(dst + offs, x.to(tl.float32).to(dst.dtype.element_ty))


@triton.jit
def gather_old_k(dst_ptr, table_ptr, iters, ALIGN: tl.constexpr, CHUNK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    dst_off = tl.multiple_of(tl.load(table_ptr + p * 3), ALIGN)
    src_off = tl.multiple_of(tl.load(table_ptr + p * 3 + 1), ALIGN)
    n = tl.load(table_ptr + p * 3 + 2)
    dst = dst_ptr + dst_off
    src = dst_ptr + src_off
    c = tl.program_id(1).to(tl.int64)
    g = tl.num_programs(1).to(tl.int64)
    for i in range(0, iters):
        offs = (c + i * g) * CHUNK + tl.arange(0, CHUNK)
        offs = tl.max_contiguous(tl.multiple_of(offs, CHUNK), CHUNK)
        m = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


@triton.jit
def gather2_k(dst_ptr, table_ptr, iters, ALIGN: tl.constexpr, CHUNK: tl.constexpr):
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
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


def cudart():
    with open("/proc/self/maps") as fh:
        paths = sorted({ln.split()[-1] for ln in fh if "libcudart.so" in ln})
    lib = ctypes.CDLL(paths[0]) if paths else None
    if lib is not None:
        lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.cudaMemcpy2DAsync.restype = ctypes.c_int
    return lib


# ----------------------------------------------------------------------------- timing

def batch_ms(fn, batch):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(batch):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / batch


_BUF = {}


def same_bytes_copy(nbytes):
    """A D2D copy moving nbytes (read + written) in total: the copy floor of the same bytes."""
    half = nbytes // 2
    if "src" not in _BUF or _BUF["src"].numel() < half:
        _BUF.clear()
        _BUF["src"] = torch.randint(0, 256, (half,), dtype=torch.uint8, device="cuda")
        _BUF["dst"] = torch.empty_like(_BUF["src"])
    s, d = _BUF["src"][:half], _BUF["dst"][:half]
    return lambda: d.copy_(s)


def compare(name, nbytes, variants, repeat, batch, copy_fn=None, copy_bytes=None, extra=None):
    """variants: list of (tag, fn); a D2D copy of the same bytes measured each repetition; ratios to it."""
    if copy_fn is None:
        copy_fn, copy_bytes = same_bytes_copy(nbytes), nbytes // 2 * 2
    allv = [("d2d", copy_fn)] + variants
    for _, f in allv:  # warm up / compile
        f()
    torch.cuda.synchronize()
    ratios = {t: [] for t, _ in variants}
    gbps = {t: [] for t, _ in allv}
    for rep in range(repeat):
        k = rep % len(allv)
        order = allv[k:] + allv[:k]
        t = {tag: batch_ms(f, batch) for tag, f in order}
        d2d = copy_bytes / t["d2d"] / 1e6
        gbps["d2d"].append(d2d)
        for tag, _ in variants:
            g = nbytes / t[tag] / 1e6
            gbps[tag].append(g)
            ratios[tag].append(g / d2d)
    row = {"bench": name, "bytes_rw": nbytes, "d2d_GBps_median": round(statistics.median(gbps["d2d"]), 1)}
    for tag, _ in variants:
        row[tag] = {"median": round(statistics.median(ratios[tag]), 3), "best": round(max(ratios[tag]), 3),
                    "GBps": round(statistics.median(gbps[tag]), 1)}
    if extra:
        row.update(extra)
    emit(row)
    return row


# ----------------------------------------------------------------------------- kernel section

def kernels(args):
    from hfnemo.kernels.triton_backend import TritonBackend

    b = TritonBackend()
    b_int = TritonBackend()  # the integer kernel forced: every pair marked not hardware-checked
    dev = torch.device("cuda")
    for s_ in (torch.float32, torch.float16, torch.bfloat16):
        for d_ in (torch.float32, torch.float16, torch.bfloat16):
            b_int._hw_ok[(str(torch.device("cuda", 0)), s_, d_)] = False
            b_int._hw_ok[(str(dev), s_, d_)] = False
    src8 = torch.randint(0, 256, (GiB,), dtype=torch.uint8, device=dev)
    dst8 = torch.empty_like(src8)
    copy = lambda: dst8.copy_(src8)  # noqa: E731
    # ceiling: plain Triton copies of 1 GiB
    variants = []
    for word, dt in ((2, torch.int16), (4, torch.int32), (8, torch.int64)):
        s, d = src8.view(dt), dst8.view(dt)
        n = s.numel()
        for block, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 8)):
            blk = block * 2 // word  # same bytes per program as an int16 block
            variants.append((f"tcopy_w{word}_{block * 2 // 1024}KiB_{warps}w",
                             lambda s=s, d=d, n=n, blk=blk, warps=warps:
                             tcopy_k[(triton.cdiv(n, blk),)](s, d, n, BLOCK=blk, num_warps=warps)))
    compare("triton_copy_1GiB", 2 * GiB, variants, args.repeat, args.batch, copy, 2 * GiB)

    n = GiB // 4
    f32 = torch.randn(n, device=dev)
    f32[::1001] = float("nan")
    f32[1::1001] = float("inf")
    f32[2::1001] = 1e-40  # subnormal
    f32[3::1001] = 70000.0  # f16 overflow
    pairs = (("f32_to_bf16", f32, torch.bfloat16), ("bf16_to_f32", f32.to(torch.bfloat16), torch.float32),
             ("f16_to_bf16", f32.to(torch.float16), torch.bfloat16), ("bf16_to_f16", f32.to(torch.bfloat16), torch.float16),
             ("f32_to_f16", f32, torch.float16), ("f16_to_f32", f32.to(torch.float16), torch.float32))
    from hfnemo.kernels.triton_backend import _nan_probe
    for name, s, dt in pairs:
        out = torch.empty(n, dtype=dt, device=dev)
        ref = torch.empty(n, dtype=dt, device=dev).copy_(s)
        # bit check of the hardware path on the data and torch's NaN probe
        hwcast_k[(triton.cdiv(n, 4096),)](s, out, n, BLOCK=4096, num_warps=8)
        iv = {4: torch.int32, 2: torch.int16}[out.element_size()]
        ok_data = torch.equal(out.view(iv), ref.view(iv))
        probe = _nan_probe(s.dtype, dev)
        po = torch.empty(probe.numel(), dtype=dt, device=dev)
        hwcast_k[(triton.cdiv(probe.numel(), 1024),)](probe, po, probe.numel(), BLOCK=1024, num_warps=4)
        ok_nan = torch.equal(po.view(iv), torch.empty_like(po).copy_(probe).view(iv))
        b.cast(out, s)
        ok_committed = torch.equal(out.view(iv), ref.view(iv))
        variants = [("committed", lambda s=s, out=out: b.cast(out, s)),
                    ("integer_kernel", lambda s=s, out=out: b_int.cast(out, s))]
        for block, warps in ((2048, 4), (4096, 8), (8192, 8)):
            variants.append((f"hw_{block}_{warps}w", lambda s=s, out=out, block=block, warps=warps:
                             hwcast_k[(triton.cdiv(n, block),)](s, out, n, BLOCK=block, num_warps=warps)))
        compare(f"cast_{name}", n * (s.element_size() + out.element_size()), variants, args.repeat, args.batch,
                extra={"hw_bits_equal_torch": ok_data, "hw_nan_probe_equal_torch": ok_nan,
                       "committed_bits_equal_torch": ok_committed,
                       "committed_uses_hw": b.hw_cast_ok(dev, s.dtype, dt)})
        del out, ref
    del f32
    torch.cuda.empty_cache()

    # gather: committed kernel vs n declared aligned, kernel alone (table prepared once)
    import hfnemo.kernels.triton_backend as tb
    big = torch.randint(0, 256, (GiB + (1 << 20),), dtype=torch.uint8, device=dev)
    gdst = torch.empty(GiB, dtype=torch.uint8, device=dev)
    cases = {}
    # QKV-shaped: 8 groups of (16 MiB q, 2 MiB k, 2 MiB v) interleaved... scaled to ~1 GiB
    pieces, pos = [], 0
    q, kv = 16 * MiB, 2 * MiB
    while pos + q + 2 * kv <= GiB:
        g = len(pieces) // 3
        pieces += [(pos, big, (g * q) % (GiB // 2), q), (pos + q, big, GiB // 2 + (g * kv) % (GiB // 4), kv),
                   (pos + q + kv, big, 3 * GiB // 4 + (g * kv) % (GiB // 4), kv)]
        pos += q + 2 * kv
    cases["gather_qkv"] = (pieces, pos)
    cases["gather_16384x64KiB"] = ([(i << 16, big, ((i * 7919) % 16384) << 16, 1 << 16) for i in range(16384)], GiB)
    cases["gather_16384x65534B_2B"] = ([(i * 65534, big, ((i * 7919) % 16384) * 65536 + 2, 65534) for i in range(16384)],
                                       16384 * 65534)
    for name, (pcs, nb) in cases.items():
        prep = b.gather_prepare(gdst, pcs)
        dst, word, table_t, grid, iters, align, chunk = prep[:7]
        wd = tb._words(dst, dst.numel() // word * word, word)
        variants = [("committed", lambda prep=prep: b.gather_launch(prep)),
                    ("old_no_n_align", lambda wd=wd, table_t=table_t, grid=grid, iters=iters, align=align, chunk=chunk:
                     gather_old_k[grid](wd, table_t, iters, ALIGN=align, CHUNK=chunk, num_warps=8))]
        longest = int(table_t.view(-1, 3)[:, 2].max().item())
        for tile, warps, cap in ((8192, 4, 64), (16384, 8, 64), (16384, 4, 64), (32768, 8, 64), (65536, 8, 64),
                                 (32768, 16, 64)):
            ch = tile // word
            gr = (grid[0], max(1, min(triton.cdiv(longest, ch), cap)))
            it = triton.cdiv(triton.cdiv(longest, ch), gr[1])
            variants.append((f"n_align_{tile // 1024}KiB_{warps}w", lambda wd=wd, table_t=table_t, gr=gr, it=it, align=align, ch=ch, warps=warps:
                             gather2_k[gr](wd, table_t, it, ALIGN=align, CHUNK=ch, num_warps=warps)))
        gdst.zero_()
        variants[1][1]()
        ok = True
        chk = torch.empty_like(gdst)
        chk.zero_()
        b.gather(chk, pcs)
        ok = torch.equal(chk, gdst)
        compare(name, 2 * nb, variants, args.repeat, args.batch, extra={"pieces": len(pcs), "word": word, "align": align, "candidate_equal_committed": ok})
    del big, gdst, chk
    torch.cuda.empty_cache()

    # slice_cols vs cudaMemcpy2DAsync of the same shape
    lib = cudart()
    stream = torch.cuda.current_stream().cuda_stream
    big_src = torch.randint(0, 256, (4 * GiB,), dtype=torch.uint8, device=dev)
    for name, row, width, scale in (("slice_16KiB_rows_half", 16384, 8192, 1), ("slice_512B_rows_quarter", 512, 128, 2),
                                    ("slice_7KiB_of_56KiB_tp8", 57344, 7168, 4), ("slice_1KiB_of_8KiB_tp8", 8192, 1024, 4),
                                    ("slice_28KiB_of_56KiB_tp2", 57344, 28672, 1)):
        src8 = big_src
        rows = scale * GiB // row
        sd = torch.empty(rows * width, dtype=torch.uint8, device=dev)
        variants = [("committed", lambda rows=rows, row=row, width=width, sd=sd:
                     b.slice_cols(sd, src8, rows, row, row // 4 if width <= row // 4 else 0, width))]
        if lib is not None:
            off = row // 4 if width <= row // 4 else 0
            variants.append(("memcpy2d", lambda rows=rows, row=row, width=width, sd=sd, off=off:
                             lib.cudaMemcpy2DAsync(sd.data_ptr(), width, src8.data_ptr() + off, row, width, rows, 3,
                                                   ctypes.c_void_p(stream))))
        row_ = compare(name, 2 * rows * width, variants, args.repeat, args.batch)
        if lib is not None:
            emit({"bench": name + "_vs_memcpy2d", "committed_over_memcpy2d":
                  round(row_["committed"]["GBps"] / row_["memcpy2d"]["GBps"], 3)})
        del sd
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- pipeline section

def h2d_pinned(repeat=10):
    host = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    d = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    best = min(batch_ms(lambda: d.copy_(host, non_blocking=True), 1) for _ in range(repeat))
    del host, d
    return GiB / best / 1e6


def ring(files, slot, depth, threads):
    """Bare ring: preadv into pinned slots, one H2D copy a slot; returns GB/s."""
    pinned = [torch.empty(slot, dtype=torch.uint8, pin_memory=True) for _ in range(depth)]
    mv = [memoryview(p.numpy()) for p in pinned]
    devbuf = torch.empty(GiB, dtype=torch.uint8, device="cuda")  # the copies cycle through 1 GiB of device memory
    stream = torch.cuda.Stream()
    jobs = []
    for f in files:
        size = os.path.getsize(f)
        for off in range(0, size, slot):
            jobs.append((f, off, min(slot, size - off)))
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    evs = [None] * depth
    total = sum(j[2] for j in jobs)

    def rd(i, j):
        f, off, n = j
        got = os.preadv(fds[f], [mv[i][:n]], off)
        assert got == n

    torch.cuda.synchronize()
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        futs = {}
        nxt = 0
        dpos = 0
        for k, j in enumerate(jobs):
            i = k % depth
            # keep up to depth reads in flight
            while nxt < len(jobs) and nxt < k + depth:
                s = nxt % depth
                if evs[s] is not None:
                    evs[s].synchronize()
                    evs[s] = None
                futs[nxt] = pool.submit(rd, s, jobs[nxt])
                nxt += 1
            futs.pop(k).result()
            n = j[2]
            if dpos + n > GiB:
                dpos = 0
            with torch.cuda.stream(stream):
                devbuf[dpos:dpos + n].copy_(pinned[i][:n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            evs[i] = ev
            dpos += n
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    for fd in fds.values():
        os.close(fd)
    del pinned, devbuf
    return total / secs / 1e9, total


def pipeline(args, h2d):
    import bench_convert
    import hfnemo
    from hfnemo.exec.gpu import iter_tensors_to_device
    from hfnemo.exec.sources import RowReader

    Path(args.cache).mkdir(parents=True, exist_ok=True)
    src = bench_convert.ensure_checkpoint(Path(args.cache), bench_convert.SHAPES["full"], 2)
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    for slot, depth, threads in ((64 * MiB, 8, 16), (32 * MiB, 16, 16), (8 * MiB, 16, 16), (4 * MiB, 16, 16),
                                 (2 * MiB, 16, 16), (2 * MiB, 32, 16), (1 * MiB, 32, 16), (4 * MiB, 8, 8),
                                 (8 * MiB, 8, 8), (4 * MiB, 32, 16)):
        res = [ring(files, slot, depth, threads) for _ in range(args.pipeline_repeat)]
        g = max(r[0] for r in res)
        emit({"bench": "ring_pread_h2d", "slot_MiB": slot // MiB, "depth": depth, "threads": threads,
              "GBps_best": round(g, 2), "all": [round(r[0], 2) for r in res], "ratio_h2d_pinned": round(g / h2d, 3),
              "bytes": res[0][1]})
    plan = hfnemo.api.plan(src, to="nemo", dtype="auto", max_memory="64GiB")
    for block, depth, threads in ((64 * MiB, 8, 16), (8 * MiB, 16, 16), (4 * MiB, 32, 16), (16 * MiB, 16, 16)):
        best = float("inf")
        for _ in range(args.pipeline_repeat):
            reader = RowReader()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _k, _o, tensor in iter_tensors_to_device(plan, reader, "cuda", max_memory="2GiB", read_threads=threads,
                                                         depth=depth, block_bytes=block, source="pread"):
                del tensor
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
            reader.close()
        g = plan.read_bytes / best / 1e9
        emit({"bench": "pipeline_pread", "block_MiB": block // MiB, "depth": depth, "threads": threads,
              "best_s": round(best, 3), "GBps": round(g, 2), "ratio_h2d_pinned": round(g / h2d, 3)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--pipeline-repeat", type=int, default=3)
    ap.add_argument("--cache", default="/tmp/hfcache")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args()
    emit({"bench": "machine", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "triton": triton.__version__, "cpus": os.cpu_count()})
    h2d = h2d_pinned()
    emit({"bench": "h2d_pinned_1GiB", "GBps": round(h2d, 2)})
    if not args.skip_kernels:
        kernels(args)
    if not args.skip_pipeline:
        pipeline(args, h2d)
        emit({"bench": "h2d_pinned_1GiB_after", "GBps": round(h2d_pinned(), 2)})


if __name__ == "__main__":
    main()
