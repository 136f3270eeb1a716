"""The GPU path of file conversion (``--device cuda``) and of the in-memory pipeline with column
cuts, against the CPU path, byte for byte. The CUDA tests run on the GPU lane (a CUDA device with
triton); the wiring of ``--device`` is checked everywhere."""
from __future__ import annotations

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
    between any two runs, CPU or not); the tensor bytes are all in the .distcp files."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if k.endswith(".metadata"):
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
    from hfnemo.exec.executor import execute
    from hfnemo.exec.gpu import iter_tensors_to_device
    from hfnemo.exec.sources import RowReader

    src = tiny_hf_factory("llama3_gqa", dtype=torch.float32)
    plan = hfnemo.api.plan(src, to="nemo", dtype=dtype, tp=2, max_memory="8GiB")
    assert any(s.cols for it in plan.items for s in it.segments)
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
    seen = 0
    for key, offsets, t in iter_tensors_to_device(plan, reader, "cuda", max_memory="64MiB", depth=3):
        assert t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes() == bytes(data[(key, tuple(offsets))])
        seen += 1
    reader.close()
    assert seen == len(plan.items)
