"""A CPU conversion streams without torch (issue 4: the CUDA build of torch takes 3-5 s to import,
most of a small conversion's start-up): the executor's buffers are plain host memory, the C++
kernels take them directly, readers, .metadata parsing and the chunks' torch.save pickles need no
torch. An import to NeMo 2 needs torch only at the end (common.pt and .metadata; imported in the
background meanwhile); an export to HF never imports it. Proved by running the CLI with torch's import forbidden (tests/torch_free_runner.py),
and the buffer kernels bit for bit against the torch reference."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfnemo.exec import sources as src_mod
from hfnemo.exec.buffers import HostBuffer, TensorBuffer, address
from hfnemo.kernels.cpp import CppBackend
from hfnemo.kernels.torch_ref import TorchBackend
from test_kernels_cpp import bits, expected_cast, random_values
from tiny_models import load_hf_state

RUNNER = Path(__file__).with_name("torch_free_runner.py")
CPP, REF = CppBackend(), TorchBackend()
FLOATS = ["float64", "float32", "float16", "bfloat16"]
ITEM = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _run(mode: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HFNEMO_PREFETCH="0")
    return subprocess.run([sys.executable, str(RUNNER), mode, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _last_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("TORCH-FREE:")]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------- the CLI, torch forbidden

@pytest.mark.parametrize("tp,dtype", [(1, "auto"), (2, "fp32")])
def test_import_and_export_never_import_torch(tiny_hf_factory, tmp_path, tp, dtype):
    hf = tiny_hf_factory("llama3_gqa")  # bf16; --dtype fp32 casts every tensor, tp 2 cuts row-parallel ones
    nemo, back = tmp_path / "nemo", tmp_path / "back"
    # the import: torch only in the helper process (hfnemo.torchside), for .metadata and common.pt
    p = _run("never", "import", str(hf), str(nemo), "--tp", str(tp), "--dtype", dtype, "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert _last_line(p) == "TORCH-FREE: torch imported by the end of execute: False", p.stderr[-2000:]
    assert (nemo / "weights" / ".metadata").is_file() and (nemo / "weights" / "common.pt").is_file()
    # the export reads .metadata and the chunks (row-parallel ones scattered back) with no torch at all
    p = _run("never", "export", str(nemo), str(back), "--dtype", "bf16", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert _last_line(p) == "TORCH-FREE: torch imported by the end of execute: False", p.stderr[-2000:]
    a, b = load_hf_state(hf), load_hf_state(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and torch's own reader agrees with what the helper wrote
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(nemo / "weights")).read_metadata()
    assert "module.embedding.word_embeddings.weight" in md.state_dict_metadata
    # the same files, byte for byte, as the in-process writer (helper off) and the prewarm-thread one
    keep = {n: (nemo / "weights" / n).read_bytes() for n in (".metadata", "common.pt")}
    for knob in ({"HFNEMO_TORCHSIDE": "0"}, {"HFNEMO_TORCHSIDE": "0", "HFNEMO_PREWARM": "0"}):
        r = subprocess.run([sys.executable, "-m", "hfnemo", "import", str(hf), str(nemo), "--tp", str(tp),
                            "--dtype", dtype, "--device", "cpu", "--overwrite"], capture_output=True, text=True,
                           env=dict(os.environ, HFNEMO_PREFETCH="0", **knob), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        for n, data in keep.items():
            assert (nemo / "weights" / n).read_bytes() == data, (knob, n)


def test_reshard_and_nemo1_dist_never_import_torch(tiny_hf_factory, tmp_path):
    hf = tiny_hf_factory("llama3_gqa")
    tp2, tp1, n1 = tmp_path / "tp2", tmp_path / "tp1", tmp_path / "n1"
    for args in (("import", str(hf), str(tp2), "--tp", "2"), ("reshard", str(tp2), str(tp1), "--tp", "1"),
                 ("import", str(hf), str(n1), "--format", "nemo1-dist")):
        p = _run("never", *args, "--device", "cpu")
        assert p.returncode == 0, (args, p.stderr[-3000:])
        assert _last_line(p) == "TORCH-FREE: torch imported by the end of execute: False", p.stderr[-2000:]
    for out in (tp1, n1):  # hfnemo verify: every tensor equal to the HF model's (exit 0)
        r = subprocess.run([sys.executable, "-m", "hfnemo", "verify", str(hf), str(out)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and "EQUAL" in r.stdout, (out, r.stdout[-2000:], r.stderr[-2000:])
    assert torch.load(n1 / "model_weights" / "common.pt", weights_only=False) == {}


def test_helper_failure_falls_back_in_process(tiny_hf_factory, tmp_path):
    """A helper that dies mid-run costs speed, never the conversion: the end is written in-process."""
    hf = tiny_hf_factory("llama3_gqa")
    code = f"""
import sys
from hfnemo import torchside
import hfnemo

def kill_helper(done, total):  # the helper dies while the conversion streams
    if torchside._proc is not None and torchside._proc.poll() is None:
        torchside._proc.kill()
        torchside._proc.wait()

hfnemo.convert({str(hf)!r}, {str(tmp_path / 'nemo')!r}, device="cpu", progress=kill_helper)
assert torchside._proc.returncode is not None  # it was killed, and the end went on without it
print("torch" in sys.modules)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HFNEMO_PREFETCH="0"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "True"  # written in-process after all
    from torch.distributed.checkpoint import FileSystemReader

    assert FileSystemReader(str(tmp_path / "nemo" / "weights")).read_metadata().state_dict_metadata
    assert torch.load(tmp_path / "nemo" / "weights" / "common.pt", weights_only=False)["epoch"] == 0


def test_helper_answers_and_relays_errors():
    code = """
from hfnemo import torchside
assert torchside.start()
import os
assert torchside.call("os.path", "join", "a", "b") == "a/b"
try:
    torchside.call("os", "stat", "/nonexistent/hfnemo")
except FileNotFoundError as e:
    print("relayed", e.filename)
torchside.shutdown()
print("running", torchside.running())
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["relayed", "/nonexistent/hfnemo", "running", "False"]


def test_runner_catches_a_torch_import(tiny_hf_factory):
    """The runner is not a no-op: verify compares tensors with torch while it streams, so under
    ``never`` it is stopped at its first torch import, with the runner's exit code."""
    hf = tiny_hf_factory("llama3_gqa")
    p = _run("never", "verify", str(hf), str(hf))
    assert p.returncode == 97, p.stderr[-2000:]
    assert "TORCH-FREE: torch imported in thread MainThread" in p.stderr


def test_torch_import_reserve_counts_torch_until_imported():
    code = ("import sys; from hfnemo.io import dcp; r = dcp.torch_import_reserve(); "
            "assert 'torch' not in sys.modules; import torch; print(r, dcp.torch_import_reserve())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    before, after = map(int, p.stdout.split())
    assert before >= 200 << 20 and after == 0


# ------------------------------------------------------------------------------- buffer kernels

def _host(data: bytes, offset: int = 0) -> tuple[HostBuffer, memoryview]:
    buf = HostBuffer(len(data) + offset + 64)
    buf.mv[offset:offset + len(data)] = data
    return buf, buf.mv[offset:offset + len(data)]


@pytest.mark.parametrize("backend", [CPP, REF], ids=["cpp", "torch"])
@pytest.mark.parametrize("src_dt", FLOATS)
@pytest.mark.parametrize("dst_dt", FLOATS)
def test_cast_buffers_bit_exact(backend, src_dt, dst_dt):
    g = torch.Generator().manual_seed(hash((src_dt, dst_dt)) & 0xFFFF)
    rng = random.Random(src_dt + dst_dt)
    for n in (0, 1, 3, 17, 255, 4097, 70001):
        src = random_values(getattr(torch, src_dt), n, g)
        exp = expected_cast(getattr(torch, dst_dt), src)
        s_off = ITEM[src_dt] * rng.randrange(0, 5)  # element-aligned, not vector-aligned
        d_off = ITEM[dst_dt] * rng.randrange(0, 5)
        _, s_mv = _host(src.view(torch.uint8).numpy().tobytes(), s_off)
        out, d_mv = _host(b"\x5a" * (n * ITEM[dst_dt]), d_off)
        backend.cast_buffers(d_mv, dst_dt, s_mv, src_dt)
        got = torch.frombuffer(bytearray(d_mv), dtype=torch.uint8).view(getattr(torch, dst_dt)) if n else \
            torch.empty(0, dtype=getattr(torch, dst_dt))
        if backend is CPP:
            assert torch.equal(bits(got), exp), (src_dt, dst_dt, n)
        else:  # torch's own copy_ gives NaN payloads that depend on where its vector loop's tails fall
            nan = torch.isnan(exp.view(getattr(torch, dst_dt)))
            assert torch.equal(torch.isnan(got), nan), (src_dt, dst_dt, n)
            assert torch.equal(bits(got)[~nan], exp[~nan]), (src_dt, dst_dt, n)
        assert bytes(out.mv[:d_off]) == b"\0" * d_off  # nothing written before dst


def test_cast_buffers_refuses_bad_arguments():
    a, b = HostBuffer(64), HostBuffer(64)
    with pytest.raises(ValueError, match="dtype int8"):
        CPP.cast_buffers(a.mv[:8], "int8", b.mv[:8], "float32")
    with pytest.raises(ValueError, match="needs 4 x 2"):
        CPP.cast_buffers(a.mv[:16], "bfloat16", b.mv[:16], "float32")
    with pytest.raises(ValueError, match="whole number"):
        CPP.cast_buffers(a.mv[:2], "bfloat16", b.mv[:6], "float32")
    with pytest.raises(ValueError, match="aligned"):
        CPP.cast_buffers(a.mv[1:9], "bfloat16", b.mv[:16], "float32")
    with pytest.raises(ValueError, match="overlap"):
        CPP.cast_buffers(a.mv[8:16], "bfloat16", a.mv[0:16], "float32")
    with pytest.raises(ValueError, match="read-only"):
        CPP.cast_buffers(memoryview(bytes(8)), "bfloat16", b.mv[:16], "float32")


@pytest.mark.parametrize("backend", [CPP, REF], ids=["cpp", "torch"])
def test_slice_cols_buffers_bit_exact(backend):
    rng = random.Random(4)
    for _ in range(40):
        rows, row = rng.randrange(0, 70), rng.randrange(1, 3000)
        off = rng.randrange(0, row)
        width = rng.randrange(0, row - off + 1)
        src = torch.randint(0, 256, (rows * row,), dtype=torch.uint8)
        exp = torch.empty(rows * width, dtype=torch.uint8)
        REF.slice_cols(exp, src, rows, row, off, width)
        _, s_mv = _host(src.numpy().tobytes(), rng.randrange(0, 9))
        out, d_mv = _host(b"\x33" * (rows * width + 5), rng.randrange(0, 9))
        backend.slice_cols_buffers(d_mv, s_mv, rows, row, off, width)
        assert bytes(d_mv[:rows * width]) == exp.numpy().tobytes()
        assert bytes(d_mv[rows * width:]) == b"\x33" * 5  # nothing past the window rows
    with pytest.raises(ValueError, match="exceeds"):
        CPP.slice_cols_buffers(HostBuffer(64).mv, HostBuffer(64).mv, 2, 8, 4, 8)
    with pytest.raises(ValueError, match="dst has"):
        CPP.slice_cols_buffers(HostBuffer(4).mv, HostBuffer(64).mv, 2, 8, 0, 4)


def test_host_and_tensor_buffers():
    b = HostBuffer(1000)
    b.mv[:] = b"\x01" * 1000
    b.zero(10, 20)
    assert bytes(b.mv[:30]) == b"\x01" * 10 + b"\0" * 10 + b"\x01" * 10
    assert address(b.mv[100:]) == b.addr + 100 and b.addr % 4096 == 0
    t = torch.arange(16, dtype=torch.uint8)
    tb = TensorBuffer(t)
    tb.zero(0, 4)
    assert t[:4].tolist() == [0] * 4 and t[4] == 4 and address(t) == tb.addr == address(tb.mv)
    assert address(bytearray(0)) == 0


# --------------------------------------------------------- DCP chunks split in trailing dims

@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("full,offs,sizes", [
    ((12,), (4,), (5,)),  # 2-D tensor, row-parallel column window
    ((6, 10), (2, 0), (3, 10)),  # 3-D, cut on the first trailing dim: one run per row
    ((6, 10), (1, 3), (4, 5)),  # 3-D, cut on both: a run per (row, i)
    ((3, 4, 5), (0, 1, 2), (3, 2, 3)),  # 4-D
])
def test_scatter_chunk_rows(tmp_path, monkeypatch, native, full, offs, sizes):
    if not native:
        monkeypatch.setattr(src_mod, "_C", None)
    rows, itemsize = 7, 2
    whole = torch.randint(-30000, 30000, (rows, *full), dtype=torch.int16)
    region = whole
    for j, (o, s) in enumerate(zip(offs, sizes)):
        region = region.narrow(j + 1, o, s)
    chunk = region.contiguous()
    path = tmp_path / "chunk.bin"
    path.write_bytes(b"junk" + chunk.numpy().tobytes())
    row_bytes = itemsize * int(torch.tensor(full).prod())
    dest = HostBuffer(rows * row_bytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = src_mod._scatter_chunk_rows(fd, str(path), 4, rows, chunk[0].numel() * itemsize, offs, sizes, full,
                                        itemsize, dest.mv)
    finally:
        os.close(fd)
    assert n == chunk.numel() * itemsize
    got = torch.frombuffer(bytearray(dest.mv), dtype=torch.int16).view(rows, *full)
    exp = torch.zeros_like(whole)
    view = exp
    for j, (o, s) in enumerate(zip(offs, sizes)):
        view = view.narrow(j + 1, o, s)
    view.copy_(chunk)
    assert torch.equal(got, exp)
