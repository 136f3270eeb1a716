"""The GPU path of file conversion (``--device cuda``) and of the in-memory pipeline with column
cuts, against the CPU path, byte for byte. The CUDA tests run on the GPU lane (a CUDA device with
triton); the wiring of ``--device`` is checked everywhere."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hfnemo
from hfnemo import api

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: the GPU lane runs on the GPU machine")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same_tree(a: Path, b: Path) -> None:
    """Every file identical, except DCP's .metadata (it records the checkpoint id, which differs
    between any two output paths, CPU or not) and the manifest's line for it; the tensor bytes are
    all in the .distcp files."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if k.endswith(".metadata"):
            continue
        if k == "hfnemo-manifest.json":  # the same, but for .metadata's hash and the total it changes
            ma, mb = json.loads(fa[k]), json.loads(fb[k])
            for m in (ma, mb):
                m["files"] = [f for f in m["files"] if not f["path"].endswith(".metadata")]
                m.pop("total_bytes")
            assert ma == mb
            continue
        assert fa[k] == fb[k], k


def test_device_cpu_and_auto_keep_cpu_kernels(tiny_hf_factory):
    src = tiny_hf_factory("llama3_gqa", dtype=torch.float32)
    plan = hfnemo.api.plan(src, to="nemo", dtype="bf16", max_memory="8GiB")
    assert getattr(api._kernels("cpu", None, plan), "device", None) is None
    if not (CUDA and api.AUTO_GPU):
        assert getattr(api._kernels("auto", None, plan), "device", None) is None
    # a plan with no cast and no cut never leaves the CPU, whatever the device setting
    plan_copy0 = hfnemo.api.plan(src, to="nemo", dtype="auto", max_memory="8GiB")
    assert getattr(api._kernels("auto", None, plan_copy0), "device", None) is None
    plan_copy = hfnemo.api.plan(src, to="nemo", dtype="auto", max_memory="8GiB")
    from hfnemo.exec.gpu import plan_has_kernel_work
    assert plan_has_kernel_work(plan) and not plan_has_kernel_work(plan_copy)


def test_device_bad_value():
    from hfnemo.errors import UsageError
    with pytest.raises(UsageError):
        api._kernels("tpu", None)


@needs_cuda
@pytest.mark.parametrize("dtype,tp,fmt", [("fp16", 1, "nemo2"), ("bf16", 2, "nemo2"), ("auto", 2, "nemo2"),
                                          ("fp16", 2, "megatron")])
def test_convert_device_cuda_matches_cpu(tiny_hf_factory, tmp_path, dtype, tp, fmt):
    src = tiny_hf_factory("llama3_gqa", dtype=torch.float32)
    kw = dict(dtype=dtype, tp=tp, format=fmt, max_memory="4GiB")
    hfnemo.convert(src, tmp_path / "cpu", device="cpu", **kw)
    k = api._kernels("cuda", None, hfnemo.api.plan(src, to="nemo", dtype=dtype, tp=tp, max_memory="4GiB"))
    assert getattr(k, "device", None) is not None
    hfnemo.convert(src, tmp_path / "gpu", device="cuda", **kw)
    _same_tree(tmp_path / "cpu", tmp_path / "gpu")


@needs_cuda
def test_export_device_cuda_matches_cpu(tiny_hf_factory, tmp_path):
    src = tiny_hf_factory("llama3_gqa", dtype=torch.bfloat16)
    hfnemo.convert(src, tmp_path / "nemo", tp=2)
    hfnemo.convert(tmp_path / "nemo", tmp_path / "cpu", dtype="fp32", device="cpu")
    hfnemo.convert(tmp_path / "nemo", tmp_path / "gpu", dtype="fp32", device="cuda")
    _same_tree(tmp_path / "cpu", tmp_path / "gpu")


@needs_cuda
@pytest.mark.parametrize("dtype", ["auto", "fp16"])
def test_iter_tensors_to_device_column_cuts(tiny_hf_factory, dtype):
    """tp=2 plans cut column windows (row-parallel shards): the pipeline cuts them on the GPU."""
    from hfnemo.exec.gpu import iter_tensors_to_device
    from hfnemo.exec.sources import RowReader

    src = tiny_hf_factory("llama3_gqa", dtype=torch.float32)
    plan = hfnemo.api.plan(src, to="nemo", dtype=dtype, tp=2, max_memory="8GiB")
    assert any(s.cols for it in plan.items for s in it.segments)
    data = _cpu_bytes(plan)
    reader = RowReader()
    seen = 0
    for key, offsets, t in iter_tensors_to_device(plan, reader, "cuda", max_memory="64MiB", depth=3):
        assert t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes() == bytes(data[(key, tuple(offsets))])
        seen += 1
    reader.close()
    assert seen == len(plan.items)


def _cpu_bytes(plan):
    from hfnemo.exec.executor import execute
    from hfnemo.exec.sources import RowReader

    data: dict = {}

    class Sink:
        def begin(self, item):
            data[(item.key, tuple(item.offsets))] = bytearray()

        def write(self, item, d):
            data[(item.key, tuple(item.offsets))] += bytes(d)

        def end(self, item):
            pass

    reader = RowReader()
    execute(plan, reader, Sink())
    reader.close()
    return data


@pytest.mark.parametrize("window", [4096, 12288, 1 << 20])
def test_mmap_schedule_reproduces_cpu_bytes(tiny_hf_factory, window):
    """The mmap path's work list (ops cut at window and piece boundaries), replayed on the CPU from
    the files, gives the CPU executor's bytes; windows needed at once are counted."""
    from hfnemo.dtypes import BY_NAME
    from hfnemo.exec.gpu import mmap_schedule, mmap_supported

    src = tiny_hf_factory("llama3_gqa", dtype=torch.bfloat16)
    for dtype in ("auto", "fp32"):
        plan = hfnemo.api.plan(src, to="nemo", dtype=dtype, max_memory="8GiB")
        assert mmap_supported(plan) in (None, "no CUDA")
        ops, order, last, peak = mmap_schedule(plan, window, piece=20000)
        assert 1 <= peak <= len(order) and set(last) == set(order)
        files = {}
        want = _cpu_bytes(plan)
        got = {(it.key, tuple(it.offsets)): bytearray(it.nbytes) for it in plan.items}
        for op in ops:
            it = plan.items[op.item]
            buf = got[(it.key, tuple(it.offsets))]
            if op.kind == "zero":
                buf[op.lo:op.hi] = bytes(op.hi - op.lo)
                continue
            raw = b""
            for (path, w), off, m in op.parts:
                if path not in files:
                    files[path] = Path(path).read_bytes()
                assert off + m <= window
                raw += files[path][w * window + off:w * window + off + m]
            t = torch.frombuffer(bytearray(raw), dtype=BY_NAME[op.src_dtype].torch)
            if op.kind == "cast":
                t = t.to(BY_NAME[it.dtype].torch)
            buf[op.lo:op.hi] = t.view(torch.uint8).numpy().tobytes()
        assert sum(op.end for op in ops) == len(plan.items)
        for k in want:
            assert bytes(got[k]) == bytes(want[k]), k


def test_mmap_schedule_refuses_column_cuts(tiny_hf_factory):
    from hfnemo.exec.gpu import mmap_schedule

    src = tiny_hf_factory("llama3_gqa", dtype=torch.float32)
    plan = hfnemo.api.plan(src, to="nemo", dtype="auto", tp=2, max_memory="8GiB")
    with pytest.raises(ValueError):
        mmap_schedule(plan, 1 << 20)


@needs_cuda
@pytest.mark.parametrize("dtype,window", [("auto", 65536), ("auto", None), ("fp16", 131072), ("fp32", None)])
def test_iter_tensors_to_device_mmap_matches_cpu(tiny_hf_factory, dtype, window):
    """The mmap-window source path (registered page-cache windows, no pinned bounce) gives the CPU
    executor's bytes; tiny windows make copies straddle windows and force releases mid-item."""
    from hfnemo.exec.gpu import iter_tensors_to_device
    from hfnemo.exec.sources import RowReader

    src = tiny_hf_factory("llama3_gqa", dtype=torch.bfloat16)
    plan = hfnemo.api.plan(src, to="nemo", dtype=dtype, max_memory="8GiB")
    want = _cpu_bytes(plan)
    for source in ("mmap", "pread"):
        reader = RowReader()
        stats: dict = {}
        seen = 0
        for key, offsets, t in iter_tensors_to_device(plan, reader, "cuda", max_memory="512MiB", source=source,
                                                      window_bytes=window, stats=stats, map_threads=3):
            got = t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()
            assert got == bytes(want[(key, tuple(offsets))]), (source, key)
            seen += 1
        reader.close()
        assert seen == len(plan.items)
        assert stats["source_path"] == source
        if source == "mmap":
            assert stats["peak_mapped_windows"] <= stats["max_windows"]
            assert stats["peak_mapped_bytes"] + stats["device_staging_bytes"] <= stats["budget"]


@needs_cuda
def test_iter_tensors_to_device_mmap_early_exit_and_auto(tiny_hf_factory):
    """Leaving the loop early unmaps every window; auto is the pread path; mmap refuses column cuts
    and a budget too small for its windows."""
    from hfnemo.errors import BudgetExceeded
    from hfnemo.exec.gpu import iter_tensors_to_device
    from hfnemo.exec.sources import RowReader

    src = tiny_hf_factory("llama3_gqa", dtype=torch.bfloat16)
    plan = hfnemo.api.plan(src, to="nemo", dtype="auto", max_memory="8GiB")
    reader = RowReader()
    stats: dict = {}
    gen = iter_tensors_to_device(plan, reader, "cuda", max_memory="256MiB", source="mmap", window_bytes=65536,
                                 stats=stats)
    next(gen)
    gen.close()
    assert stats["source_path"] == "mmap"
    stats2: dict = {}
    assert sum(1 for _ in iter_tensors_to_device(plan, reader, "cuda", stats=stats2)) == len(plan.items)
    assert stats2["source_path"] == "pread"
    with pytest.raises(BudgetExceeded):
        next(iter_tensors_to_device(plan, reader, "cuda", max_memory="4MiB", source="mmap", window_bytes=4 << 20))
    plan2 = hfnemo.api.plan(src, to="nemo", dtype="auto", tp=2, max_memory="8GiB")
    with pytest.raises(ValueError, match="column"):
        next(iter_tensors_to_device(plan2, reader, "cuda", max_memory="64MiB", source="mmap"))
    reader.close()


# ------------------------------------------------------------------ in-memory state dicts onto the GPU

def _host_chunks(it):
    return [(k, tuple(o), t.contiguous().view(-1).view(torch.uint8).cpu()) for k, o, t in it]


@needs_cuda
@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("dtype,tp", [("auto", 1), ("fp16", 1), ("auto", 2), ("fp16", 2)])
def test_state_dict_to_device_matches_cpu(tiny_hf_factory, pinned, dtype, tp):
    """hfnemo.iter_tensors(state_dict, device="cuda"): pinned tensors are copied to the device in
    place (no pinned slots), pageable ones through the slots; both byte-identical to the CPU stream
    (copies, casts, column cuts then casts)."""
    from tiny_models import load_hf_state
    from hfnemo.exec.gpu import iter_tensors_to_device

    src = tiny_hf_factory("llama3_gqa", dtype=torch.float32 if dtype == "fp16" else torch.bfloat16)
    sd = load_hf_state(src)
    if pinned:
        sd = {k: v.pin_memory() for k, v in sd.items()}
    before = {k: v.clone() for k, v in sd.items()}
    want = _host_chunks(hfnemo.iter_tensors(src, to="nemo", dtype=dtype, tp=tp, chunks=True))
    got = _host_chunks(hfnemo.iter_tensors(sd, to="nemo", dtype=dtype, tp=tp, chunks=True, config=src,
                                           device="cuda", max_memory="256MiB"))
    assert [(k, o) for k, o, _ in want] == [(k, o) for k, o, _ in got]
    for (k, o, a), (_, _, b) in zip(want, got):
        assert torch.equal(a, b), (k, o)
    assert all(torch.equal(before[k], sd[k]) for k in sd)
    job = api._memory_job(sd, src, dtype, "64GiB", tp)
    stats: dict = {}
    n = sum(1 for _ in iter_tensors_to_device(job.plan, job.reader, "cuda", max_memory="64MiB", depth=3, stats=stats))
    assert n == len(job.plan.items)
    assert (stats["source_path"] == "in place") == pinned
    assert (stats["pinned_bytes"] == 0) == pinned
    assert stats["sources_in_pinned_memory"] == (len(sd) if pinned else 0)


@needs_cuda
def test_directory_to_device_matches_cpu(tiny_hf_factory):
    src = tiny_hf_factory("llama3_gqa")
    want = _host_chunks(hfnemo.iter_tensors(src, to="nemo", tp=2, chunks=True))
    got = _host_chunks(hfnemo.iter_tensors(src, to="nemo", tp=2, chunks=True, device="cuda"))
    assert [(k, o) for k, o, _ in want] == [(k, o) for k, o, _ in got]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(want, got))


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(tiny_hf_factory):
    from hfnemo.errors import UsageError

    with pytest.raises(UsageError) as e:
        next(hfnemo.iter_tensors(tiny_hf_factory("llama3_gqa"), to="nemo", device="cuda"))
    assert "CUDA" in str(e.value) and e.value.fix


@needs_cuda
@pytest.mark.parametrize("dtype,tp", [("auto", 1), ("fp16", 2)])
def test_state_dict_on_the_gpu(tiny_hf_factory, dtype, tp):
    """An HF state dict already in device memory converts there (D2D copies, strided for column
    windows), byte-identical to the CPU stream; device="cpu" and another device are refused."""
    from tiny_models import load_hf_state
    from hfnemo.errors import UsageError

    src = tiny_hf_factory("llama3_gqa", dtype=torch.float32 if dtype == "fp16" else torch.bfloat16)
    host = load_hf_state(src)
    sd = {k: v.cuda() for k, v in host.items()}
    want = _host_chunks(hfnemo.iter_tensors(src, to="nemo", dtype=dtype, tp=tp, chunks=True))
    got = _host_chunks(hfnemo.iter_tensors(sd, to="nemo", dtype=dtype, tp=tp, chunks=True, config=src, device="cuda"))
    assert [(k, o) for k, o, _ in want] == [(k, o) for k, o, _ in got]
    for (k, o, a), (_, _, b) in zip(want, got):
        assert torch.equal(a, b), (k, o)
    assert all(torch.equal(host[k].cuda(), sd[k]) for k in sd)  # untouched
    with pytest.raises(UsageError) as e:
        next(hfnemo.iter_tensors(sd, to="nemo", config=src))
    assert e.value.tensor and "device" in e.value.fix
    mixed = {**host, next(iter(host)): sd[next(iter(host))]}  # host and device tensors together
    got2 = _host_chunks(hfnemo.iter_tensors(mixed, to="nemo", dtype=dtype, tp=tp, chunks=True, config=src,
                                            device="cuda"))
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(want, got2))
