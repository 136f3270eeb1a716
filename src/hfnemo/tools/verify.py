"""``hfnemo verify A B``: two checkpoints compared tensor by tensor through the mapping.

Both sides are brought to one naming (hfnemo.stream): logical NeMo tensors when both are NeMo 2 /
NeMo 1 / Megatron-LM checkpoints (any TP/PP/EP layout: shards are re-assembled, padded vocab rows
included), HF names otherwise (a NeMo side through its export plan). Each pair of tensors is read
in matching row blocks, within ``--max-memory``, and compared bytes first; only blocks that
differ are converted to float64, in small pieces, for the maximum absolute difference.

A tensor is equal when both sides have it with the same shape and, at the same dtype, the same
bytes (``--atol`` > 0: a maximum absolute difference at most atol); at different dtypes (a
``--dtype`` conversion) when the values are equal (or within atol). Exit 0 when every tensor is
equal, 1 on any difference, 2 when a checkpoint cannot be read.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hfnemo.lazy import LazyModule

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # imported on first use: parsing the command line must not cost it

from hfnemo.dtypes import BY_NAME
from hfnemo.memory import peak_rss
from hfnemo.plan.planner import widest_row
from hfnemo.stream import (DEPTH, BlockStreamer, TensorView, block_bytes, buffers_per_slot, open_hf_view,
                           open_nemo_view, source_kind, widest)

DEFAULT_MAX_MEMORY = 2 << 30
CMP_ELEMS = 1 << 19  # elements per float64 comparison piece (a few 4 MiB temporaries)
CMP_TEMP_BYTES = 24 << 20
_INT_VIEW = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # torch attribute names
MANIFEST = "hfnemo-manifest.json"


@dataclass(frozen=True)
class TensorDiff:
    """One tensor of the comparison. ``status``: equal, different, shape (shapes differ),
    only_a / only_b (the other side has no such tensor)."""

    name: str
    status: str
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    dtype_a: str | None
    dtype_b: str | None
    bit_equal: bool
    max_abs_diff: float | None  # None: not compared (shape or presence differs)
    n_different: int  # elements whose bits (same dtype) or values (different dtypes) differ
    first_index: tuple[int, ...] | None  # index of the first such element

    @property
    def equal(self) -> bool:
        return self.status == "equal"


@dataclass(frozen=True)
class Diff:
    """The result of :func:`verify`; ``equal`` when every tensor is."""

    a: str
    b: str
    format_a: str
    format_b: str
    arch_a: str | None
    arch_b: str | None
    naming: str  # "hf" or "nemo": the names tensors were compared under
    atol: float
    tensors: list[TensorDiff]
    bytes_compared: int
    seconds: float
    peak_rss_bytes: int
    max_memory_bytes: int
    manifests: dict[str, Any] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        return bool(self.tensors) and all(t.equal for t in self.tensors)

    @property
    def differences(self) -> list[TensorDiff]:
        return [t for t in self.tensors if not t.equal]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for t in out["tensors"]:
            if t["max_abs_diff"] is not None and math.isinf(t["max_abs_diff"]):
                t["max_abs_diff"] = "inf"  # JSON has no infinity
        out["equal"] = self.equal
        out["counts"] = {s: sum(t.status == s for t in self.tensors)
                         for s in ("equal", "different", "shape", "only_a", "only_b")}
        return out


class _Acc:
    """Running comparison of one tensor pair."""

    def __init__(self, dt_a: str, dt_b: str, shape: tuple[int, ...]) -> None:
        self.a, self.b = BY_NAME[dt_a], BY_NAME[dt_b]
        self.same = dt_a == dt_b
        self.shape = shape
        self.max = 0.0
        self.n = 0
        self.first: int | None = None
        self.bit_equal = self.same

    def block(self, a: torch.Tensor, b: torch.Tensor, elem0: int) -> None:
        if self.same and torch.equal(a, b):
            return
        self.bit_equal = False
        va, vb = a.view(self.a.torch), b.view(self.b.torch)
        ia = a.view(getattr(torch, _INT_VIEW[self.a.itemsize])) if self.same else None
        ib = b.view(getattr(torch, _INT_VIEW[self.b.itemsize])) if self.same else None
        for i in range(0, va.numel(), CMP_ELEMS):
            j = min(va.numel(), i + CMP_ELEMS)
            fa, fb = va[i:j].double(), vb[i:j].double()
            d = (fa - fb).abs_()
            both = fa.isnan() & fb.isnan()
            d.masked_fill_(both, 0.0)
            d.nan_to_num_(nan=math.inf)
            if d.numel():
                self.max = max(self.max, float(d.max()))
            neq = (ia[i:j] != ib[i:j]) if self.same else (d > 0)
            k = int(neq.sum())
            if k:
                if self.first is None:
                    self.first = elem0 + i + int(neq.to(torch.uint8).argmax())
                self.n += k

    def index(self) -> tuple[int, ...] | None:
        if self.first is None:
            return None
        idx, rest = [], self.first
        for s in reversed(self.shape):
            idx.append(rest % s if s else 0)
            rest = rest // s if s else 0
        return tuple(reversed(idx))


def _manifest(path: Path) -> dict[str, Any] | None:
    """What the checkpoint's hfnemo manifest says of its files (sizes only: instant; ``hfnemo
    validate`` re-hashes them), when it has one."""
    f = path / MANIFEST if path.is_dir() else None
    if f is None or not f.is_file():
        return None
    try:
        from hfnemo.manifest import ManifestError, check_manifest, read_manifest
    except ImportError:  # pragma: no cover - an hfnemo without manifests
        return {"file": str(f), "checked": False}
    try:
        files = len(read_manifest(path).files)
    except ManifestError as e:
        return {"file": str(f), "checked": True, "files": 0, "problems": [str(e)]}
    return {"file": str(f), "checked": True, "files": files, "problems": check_manifest(path, hashes=False)}


def _views(a: Path, b: Path, max_memory: int) -> tuple[TensorView, TensorView]:
    """Both sides under one naming: NeMo's when both can give it, else HF's."""
    ka, kb = source_kind(a), source_kind(b)
    if ka != "hf" and kb != "hf":
        va = open_nemo_view(a)
        vb = open_nemo_view(b) if va is not None else None
        if va is not None and vb is not None:
            return va, vb
        for v in (va, vb):
            if v is not None:
                v.close()
    va = open_hf_view(a, max_memory=max_memory)
    try:
        vb = open_hf_view(b, max_memory=max_memory)
    except BaseException:
        va.close()
        raise
    return va, vb


def verify(a: str | Path, b: str | Path, *, max_memory: int | str | None = None, atol: float = 0.0,
           progress: Callable[[int, int], None] | None = None) -> Diff:
    """Compare two checkpoints tensor by tensor, streaming within ``max_memory``.

    Args:
        a, b: HF directories, NeMo 2 checkpoints, NeMo 1 directories or Megatron-LM checkpoints
            (any layout, any pair: HF vs NeMo compares HF names, the NeMo side through its
            export plan; NeMo vs NeMo compares the logical NeMo tensors).
        max_memory: peak memory of the process (default 2GiB).
        atol: largest absolute difference still counted as equal (default 0: bit-exact).
        progress: called with (bytes_done, bytes_total) after each block.

    Returns:
        A Diff; ``diff.equal`` is True when every tensor matches.

    Example:
        >>> d = hfnemo.verify("Meta-Llama-3-8B", "llama3-nemo")
        >>> d.equal, [t.name for t in d.differences]
    """
    from hfnemo import api

    t0 = time.perf_counter()
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    limit = api._size(max_memory, DEFAULT_MAX_MEMORY, "--max-memory")
    if atol < 0 or math.isnan(atol):
        from hfnemo.errors import UsageError

        raise UsageError(f"--atol {atol}", fix="use a tolerance >= 0")
    va, vb = _views(pa, pb, limit)
    try:
        by_a, by_b = va.by_name, vb.by_name
        names = list(by_a) + [n for n in by_b if n not in by_a]
        pairs = [(by_a[n], by_b[n]) for n in names if n in by_a and n in by_b
                 and by_a[n].shape == by_b[n].shape and by_a[n].nbytes and by_b[n].nbytes]
        total = sum(x.nbytes + y.nbytes for x, y in pairs)
        row = max([widest(va), widest(vb)])
        buffers = DEPTH * (buffers_per_slot(va) + buffers_per_slot(vb))
        largest = max([0] + [max(x.nbytes, y.nbytes) for x, y in pairs])
        block = block_bytes(limit, buffers, row, fixed=CMP_TEMP_BYTES, largest=largest)
        results: list[TensorDiff] = []
        done = 0
        with ThreadPoolExecutor(max_workers=2 * DEPTH, thread_name_prefix="hfnemo-verify") as pool:
            sa, sb = BlockStreamer(va, block, pool), BlockStreamer(vb, block, pool)
            for n in names:
                x, y = by_a.get(n), by_b.get(n)
                if x is None or y is None:
                    it = x or y
                    results.append(TensorDiff(n, "only_a" if y is None else "only_b",
                                              x.shape if x else None, y.shape if y else None,
                                              x.dtype if x else None, y.dtype if y else None,
                                              False, None, _elems(it.shape), None))
                    continue
                if x.shape != y.shape:
                    results.append(TensorDiff(n, "shape", x.shape, y.shape, x.dtype, y.dtype, False, None,
                                              max(_elems(x.shape), _elems(y.shape)), None))
                    continue
                acc = _Acc(x.dtype, y.dtype, x.shape)
                if x.nbytes and y.nbytes:
                    wide = max(widest_row(x, va.sources), widest_row(y, vb.sources))
                    step = sa.step(x, wide)
                    elems_per_row = x.nbytes // x.rows // BY_NAME[x.dtype].itemsize
                    for (r0, r1, ba), (_, _, bb) in zip(sa.stream(x, step), sb.stream(y, step)):
                        acc.block(ba, bb, r0 * elems_per_row)
                        done += ba.numel() + bb.numel()
                        if progress:
                            progress(done, total)
                equal = acc.bit_equal if (acc.same and atol == 0) else (acc.max <= atol)
                results.append(TensorDiff(n, "equal" if equal else "different", x.shape, y.shape, x.dtype,
                                          y.dtype, acc.bit_equal, acc.max, acc.n, acc.index()))
    finally:
        va.close()
        vb.close()
    manifests = {side: m for side, m in (("a", _manifest(pa)), ("b", _manifest(pb))) if m is not None}
    return Diff(str(pa), str(pb), va.kind, vb.kind, va.arch, vb.arch, va.naming, float(atol), results, done,
                time.perf_counter() - t0, peak_rss(), limit, manifests)


def _elems(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ------------------------------------------------------------------------------ CLI

def _fmt_diff(t: TensorDiff) -> str:
    if t.status in ("only_a", "only_b"):
        side = "A" if t.status == "only_a" else "B"
        return f"  {t.name}: only in {side} ({list(t.shape_a or t.shape_b)} {t.dtype_a or t.dtype_b})"
    if t.status == "shape":
        return f"  {t.name}: shape {list(t.shape_a)} {t.dtype_a} vs {list(t.shape_b)} {t.dtype_b}"
    tag = "bit-equal" if t.bit_equal else f"max |a-b| {t.max_abs_diff:.6g}"
    dts = t.dtype_a if t.dtype_a == t.dtype_b else f"{t.dtype_a} vs {t.dtype_b}"
    extra = (f", {t.n_different} element(s) differ, first at {list(t.first_index)}"
             if t.n_different and t.first_index is not None else "")
    return f"  {t.name}: {t.status} {list(t.shape_a)} {dts}, {tag}{extra}"


def _cmd_verify(args: argparse.Namespace) -> int:
    d = verify(args.a, args.b, max_memory=args.max_memory, atol=args.atol)
    if args.json:
        print(json.dumps(d.to_json()))
    else:
        w = sys.stdout.write
        w(f"A: {d.a} ({d.format_a}{', ' + d.arch_a if d.arch_a else ''})\n")
        w(f"B: {d.b} ({d.format_b}{', ' + d.arch_b if d.arch_b else ''})\n")
        shown = d.tensors if args.verbose else d.differences
        for t in shown:
            w(_fmt_diff(t) + "\n")
        for side, m in d.manifests.items():
            for problem in m.get("problems", [])[:8]:
                w(f"  manifest of {side.upper()}: {problem}\n")
        c = d.to_json()["counts"]
        verdict = "EQUAL" if d.equal else "DIFFERENT"
        atol = f", atol {d.atol:g}" if d.atol else ""
        w(f"{verdict}: {c['equal']} of {len(d.tensors)} tensors equal ({d.naming} names{atol}); "
          f"{c['different']} different, {c['shape']} shape, {c['only_a']} only in A, "
          f"{c['only_b']} only in B; {d.bytes_compared / 1e9:.3f} GB read in {d.seconds:.1f} s, "
          f"peak RSS {d.peak_rss_bytes / 2**20:.0f} MiB\n")
    return 0 if d.equal else 1


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("verify", help="compare two checkpoints tensor by tensor through the mapping "
                                      "(exit 1 on any difference)")
    p.add_argument("a", help="HF directory, NeMo 2 checkpoint, NeMo 1 directory or Megatron-LM checkpoint")
    p.add_argument("b")
    p.add_argument("--max-memory", default="2GiB", help="peak process memory, e.g. 1GiB (default 2GiB)")
    p.add_argument("--atol", type=float, default=0.0, help="largest absolute difference counted as equal "
                                                            "(default 0: bit-exact)")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="list every tensor, not only differences")
    p.set_defaults(tool=_cmd_verify)
