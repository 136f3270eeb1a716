"""Checkpoints as streams of named tensors, produced row block by row block in memory.

The same plans ``hfnemo convert`` executes (row gathers of source tensors: QKV interleave, GLU
fusion, layer stacking, TP cuts) are run here into buffers instead of files, so that a running
program (or ``hfnemo verify``) sees the converted tensors without any disk output and within the
memory budget. A :class:`TensorView` names a checkpoint's tensors one of three ways:

* ``"hf"``: HF tensor names (an HF directory as stored; any other format through its export plan);
* ``"nemo"``: logical NeMo tensors, one per layer (and expert), the TP/PP/EP shards of any NeMo 2,
  NeMo 1 or Megatron-LM checkpoint re-assembled (the names ``hfnemo.exec.sources`` gives them);
* ``"dcp"``: the chunks of the NeMo 2 DCP checkpoint an import (or a reshard) would write.

Example:
    >>> for name, t in hfnemo.iter_tensors("llama3-nemo", to="hf", max_memory="1GiB"):
    ...     model.state_dict()[name].copy_(t)
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from hfnemo.lazy import LazyModule

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # imported on first use: parsing the command line must not cost it

from hfnemo.dtypes import BY_NAME, parse_dtype
from hfnemo.errors import BudgetExceeded, CorruptCheckpoint, UsageError
from hfnemo.exec.buffers import TensorBuffer
from hfnemo.exec.executor import _Block, _fill
from hfnemo.exec.sources import RowReader, dcp_sources
from hfnemo.memory import current_rss
from hfnemo.plan.plan import OutputItem, Segment, SourceTensor
from hfnemo.plan.planner import widest_row

RESERVE = 48 << 20  # Python objects, allocator slack, page tables (as hfnemo.plan.planner.Budget)
MAX_BLOCK = 64 << 20
DEPTH = 2  # row blocks in flight per stream
TORCH_DIST_TRACKER = "latest_checkpointed_iteration.txt"


# ------------------------------------------------------------------------------ what a path holds

def megatron_dist_dir(path: Path) -> Path | None:
    """The iteration directory of a Megatron-LM ``ckpt_format=torch_dist`` checkpoint (a DCP
    ``.metadata`` under ``iter_NNNNNNN/`` or ``release/``), else None."""
    tracker = path / TORCH_DIST_TRACKER
    if not tracker.is_file():
        return None
    try:
        text = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    sub = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
    if sub and (path / sub / ".metadata").is_file():
        return path / sub
    return None


def source_kind(path: Path) -> str:
    """``hf``, ``nemo2``, ``nemo1``, ``megatron``, ``megatron_dist`` or whatever else
    :func:`hfnemo.api.detect` recognises (raises UsageError for anything else)."""
    from hfnemo import api
    from hfnemo.io import legacy

    if not path.exists():
        raise UsageError(f"{path} does not exist", file=path, fix="check the path")
    if path.is_dir() and megatron_dist_dir(path) is not None:
        return "megatron_dist"
    kind = api.detect(path)
    if kind == "nemo":
        return "nemo2"
    if kind == "legacy":
        if legacy.is_nemo1_dir(path):
            return "nemo1"
        return "megatron" if legacy.is_megatron_dir(path) else "nemo1-tar"
    return kind


# ------------------------------------------------------------------------------ views

@dataclass
class TensorView:
    """A checkpoint as an ordered table of named tensors, each an OutputItem (row gathers of the
    source tensors) that :class:`BlockStreamer` produces."""

    path: Path
    kind: str
    naming: str  # "hf" | "nemo" | "dcp"
    arch: str | None
    items: list[OutputItem]
    sources: dict[str, SourceTensor]
    reader: RowReader
    layout: dict[str, Any] = field(default_factory=dict)
    keep: Any = field(default=None, repr=False)  # what must outlive the reads (a .nemo's scratch files)

    def close(self) -> None:
        self.reader.close()
        close = getattr(getattr(self.keep, "tar", None), "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "TensorView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def by_name(self) -> dict[str, OutputItem]:
        return {it.key: it for it in self.items}


def _elems(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def copy_item(src: SourceTensor, dtype: str = "auto") -> OutputItem:
    """A source tensor as it is stored (cast to ``dtype`` when that is a float dtype)."""
    rows = src.shape[0] if src.shape else 1
    out = src.dtype if dtype == "auto" or src.dtype not in ("fp64", "fp32", "fp16", "bf16") else dtype
    return OutputItem(key=src.name, shape=tuple(src.shape), dtype=out, rows=rows,
                      row_elems=_elems(src.shape[1:]) if src.shape else 1,
                      segments=(Segment(0, rows, src.name, 0),) if rows else (), transform="copy", file="")


def _dtype(d: str | None) -> str:
    return "auto" if d in (None, "auto") else parse_dtype(d).name


def _hf_view(path: Path, dtype: str) -> TensorView:
    from hfnemo.exec.sources import hf_sources
    from hfnemo.io import hf as hfio

    sources = hf_sources(hfio.scan_weights(path))
    arch = None
    if (path / "config.json").is_file():
        arch = (hfio.read_config(path).data.get("architectures") or [None])[0]
    items = [copy_item(s, dtype) for s in sources.values()]
    return TensorView(path, "hf", "hf", arch, items, sources, RowReader())


def _hf_arch(spec: Any) -> str | None:
    return spec.hf_architectures[0] if spec is not None and spec.hf_architectures else None


def _job_view(job: Any, kind: str, naming: str) -> TensorView:
    plan = job.plan
    return TensorView(job.src, kind, naming, _hf_arch(job.extra.get("spec")) or plan.arch, list(plan.items),
                      {s.name: s for s in plan.sources}, job.reader, dict(plan.layout),
                      keep=job.extra.get("ckpt"))


def open_hf_view(path: str | Path, *, dtype: str | None = "auto",
                 max_memory: int | str | None = None) -> TensorView:
    """HF tensor names: an HF directory as stored, any other checkpoint through its export plan."""
    from hfnemo import api

    path = Path(path).expanduser()
    kind = source_kind(path)
    if kind == "hf":
        return _hf_view(path, _dtype(dtype))
    if kind == "megatron_dist":
        raise UsageError("a Megatron-LM torch_dist checkpoint is compared by its NeMo tensor names only",
                         file=path, fix="compare it with a NeMo 2 / NeMo 1 / Megatron-LM checkpoint")
    return _job_view(api._job(path, "hf", _dtype(dtype), max_memory, None), kind, "hf")


def open_nemo_view(path: str | Path) -> TensorView | None:
    """Logical NeMo tensors (TP/PP/EP shards re-assembled), or None for an HF directory or a
    format without per-layer sources. ``_extra_state`` entries are left out."""
    from hfnemo import api
    from hfnemo.io.dcp import read_index

    path = Path(path).expanduser()
    kind = source_kind(path)
    keep = None
    if kind == "nemo2":
        ck = api._open_nemo(path)
        sources, reader, arch = ck.sources, RowReader(index=ck.index), _hf_arch(ck.spec)
    elif kind in ("nemo1", "nemo1-tar", "megatron"):
        m = api._legacy_model(path)
        sources, reader, arch, keep = m["sources"], RowReader(), _hf_arch(m["spec"]), m["ckpt"]
    elif kind == "megatron_dist":
        index = read_index(megatron_dist_dir(path))
        sources, _ = dcp_sources(index)
        reader, arch = RowReader(index=index), None
    else:
        return None
    sources = {n: s for n, s in sources.items() if "_extra_state" not in n}
    return TensorView(path, kind, "nemo", arch, [copy_item(s) for s in sources.values()], sources, reader,
                      keep=keep)


def open_dcp_view(path: str | Path, *, dtype: str | None = "auto", max_memory: int | str | None = None,
                   tp: int = 1, pp: int = 1, ep: int = 1, overrides: Any = None) -> TensorView:
    """The chunks of the NeMo 2 checkpoint that importing (HF, with config ``overrides``) or
    resharding (NeMo 2 / NeMo 1 / Megatron-LM) ``path`` for this layout would write, keyed by DCP fqn."""
    from hfnemo import api
    from hfnemo.plan.planner import Budget

    path = Path(path).expanduser()
    kind = source_kind(path)
    if overrides is not None and kind != "hf":
        raise UsageError("config overrides apply to an import (HF -> NeMo)", file=path,
                         fix="drop overrides=, or stream from the HF model")
    if kind == "hf":
        job = api._job(path, "nemo", _dtype(dtype), max_memory, None, tp, pp, ep, "nemo2", overrides)
    elif kind in ("nemo2", "nemo1", "nemo1-tar", "megatron"):
        budget = Budget(max_memory=api._size(max_memory, api.DEFAULT_MAX_MEMORY, "--max-memory"),
                        baseline=_baseline())
        job = api._plan_reshard(path, "nemo2", _dtype(dtype), budget, tp, pp, ep)
    else:
        raise UsageError(f"cannot produce NeMo 2 tensors from a {kind} checkpoint", file=path,
                         fix="pass an HF directory or a NeMo 2 / NeMo 1 / Megatron-LM checkpoint")
    return _job_view(job, kind, "dcp")


# ------------------------------------------------------------------------------ memory

def needs_stage(view: TensorView) -> tuple[bool, bool]:
    """(casting, slicing): whether blocks of this view need one or two staging buffers."""
    casting = slicing = False
    for it in view.items:
        for s in it.segments:
            if s.source:
                casting = casting or view.sources[s.source].dtype != it.dtype
                slicing = slicing or bool(s.cols)
    return casting, slicing


def buffers_per_slot(view: TensorView, with_out: bool = True) -> int:
    """Block-sized buffers one in-flight block of this view may hold: the output, staging to cast
    or cut, and the temporary a reader of TP-split DCP chunks or legacy column shards allocates."""
    casting, slicing = needs_stage(view)
    n = int(with_out) + (casting or slicing) + (casting and slicing)
    if any(s.location and s.location[0] in ("dcp", "legacy") for s in view.sources.values()):
        n += 1
    return n


def _baseline() -> int:
    """The resident size a budget starts from: now, plus torch's import when it is still to come
    (these views hand out torch tensors)."""
    from hfnemo.io.dcp import torch_import_reserve

    return current_rss() + torch_import_reserve()


def widest(view: TensorView) -> int:
    return max([1] + [widest_row(it, view.sources) for it in view.items])


def block_bytes(max_memory: int, buffers: int, row: int, fixed: int = 0, largest: int = 0, held: int = 0) -> int:
    """The row-block size that keeps baseline + reserve + ``fixed`` + ``buffers`` blocks under
    ``max_memory``; BudgetExceeded when not even one row fits. ``held``: resident bytes that are
    the caller's (an in-memory source), left out of the baseline."""
    baseline = max(0, _baseline() - held)
    usable = max_memory - baseline - RESERVE - fixed
    block = min(MAX_BLOCK, usable // max(buffers, 1)) if usable > 0 else 0
    block -= block % 4096
    if largest:
        block = min(block, max(4096, -(-largest // 4096) * 4096))  # small models need no big buffers
    if block < row:
        need = baseline + RESERVE + fixed + buffers * max(row, 4096)
        raise BudgetExceeded(
            f"--max-memory {max_memory} bytes is too small: the process already holds {baseline} bytes "
            f"and one row needs {row} bytes x {buffers} buffers"
            + (f" besides {fixed} bytes" if fixed else ""),
            fix=f"raise --max-memory to at least {(need >> 20) + 1} MiB")
    return block


class _SlotBuffers:
    """One in-flight block's buffers (the executor's _Slot, with ``out`` optionally replaced by a
    window of the caller's tensor)."""

    def __init__(self, block: int, stage: int, with_out: bool) -> None:
        self.block = block
        self.own_out = TensorBuffer(torch.empty(block, dtype=torch.uint8)) if with_out else None
        self.stage = TensorBuffer(torch.empty(block, dtype=torch.uint8)) if stage > 0 else None
        self.stage2 = TensorBuffer(torch.empty(block, dtype=torch.uint8)) if stage > 1 else None
        self.out: TensorBuffer | None = self.own_out


class BlockStreamer:
    """Produces the rows of one view's items block by block, ``depth`` blocks read ahead by a
    shared thread pool; buffers are allocated once and reused."""

    def __init__(self, view: TensorView, block: int, pool: ThreadPoolExecutor, *, depth: int = DEPTH,
                 with_out: bool = True, kernels: Any = None) -> None:
        from hfnemo.kernels import get_backend

        casting, slicing = needs_stage(view)
        self.view = view
        self.block = block
        self.pool = pool
        self.kernels = kernels or get_backend("auto", device="cpu")
        self.slots = [_SlotBuffers(block, int(casting or slicing) + int(casting and slicing), with_out)
                      for _ in range(depth)]

    def step(self, item: OutputItem, row_bytes: int | None = None) -> int:
        """Rows per block for ``item`` (``row_bytes``: a wider row to agree with another stream)."""
        return max(1, self.block // max(row_bytes or 0, widest_row(item, self.view.sources), 1))

    def _run(self, item: OutputItem, slot: _SlotBuffers, r0: int, r1: int, out: torch.Tensor | None) -> int:
        if out is not None:
            slot.out = TensorBuffer(out)
        try:
            return _fill(_Block(item, 0, r0, r1, r0 == 0, r1 == item.rows), slot, self.view.reader,
                         self.view.sources, self.kernels)
        finally:
            slot.out = slot.own_out

    def stream(self, item: OutputItem, step: int, dest: torch.Tensor | None = None
               ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(r0, r1, bytes)`` for each row block of ``item`` in order. Without ``dest`` the bytes
        are a slot buffer, valid until the next block is asked for; with ``dest`` (a uint8 tensor
        of ``item.nbytes``) blocks are produced in place there."""
        if item.rows == 0 or item.nbytes == 0:
            return
        row = item.nbytes // item.rows
        spans = [(r0, min(item.rows, r0 + step)) for r0 in range(0, item.rows, step)]
        free = deque(range(len(self.slots)))
        inflight: deque[tuple[int, int, int, Future[int]]] = deque()
        pos = 0
        try:
            while pos < len(spans) or inflight:
                while pos < len(spans) and free:
                    r0, r1 = spans[pos]
                    sid = free.popleft()
                    out = dest[r0 * row:r1 * row] if dest is not None else None
                    fut = self.pool.submit(self._run, item, self.slots[sid], r0, r1, out)
                    inflight.append((r0, r1, sid, fut))
                    pos += 1
                r0, r1, sid, fut = inflight.popleft()
                n = fut.result()
                if n != (r1 - r0) * row:
                    raise CorruptCheckpoint(f"rows {r0}..{r1} gave {n} bytes, expected {(r1 - r0) * row}",
                                            tensor=item.key, fix="the checkpoint is inconsistent")
                yield r0, r1, (dest[r0 * row:r1 * row] if dest is not None else self.slots[sid].out.tensor[:n])
                free.append(sid)
        finally:
            for *_, fut in inflight:
                fut.cancel()
            for *_, fut in inflight:
                if not fut.cancelled():
                    try:
                        fut.result()
                    except Exception:  # noqa: BLE001 - already failing or abandoned
                        pass


def as_tensor(item: OutputItem, data: torch.Tensor) -> torch.Tensor:
    """The bytes of a whole item as a tensor of its dtype and shape."""
    return data.view(BY_NAME[item.dtype].torch).view(item.shape)


# ------------------------------------------------------------------------------ the public stream

def iter_tensors(src: "str | Path | Mapping[str, torch.Tensor]", to: str = "hf", *, dtype: str | None = "auto",
                 max_memory: int | str | None = None, tp: int = 1, pp: int = 1, ep: int = 1,
                 chunks: bool = False, config: Any = None, device: str = "cpu",
                 overrides: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the tensors of ``src`` converted to ``to``, without writing anything.

    Args:
        src: HF directory, NeMo 2 checkpoint, NeMo 1 directory or Megatron-LM checkpoint; or an HF
            state dict in memory (``{hf_name: tensor}``, contiguous; on the CPU, or with
            ``device="cuda"`` also on that GPU) with ``config`` (``to="nemo"`` only): its tensors
            are read in place, never changed.
        to: ``"hf"``: one ``(hf_name, tensor)`` per HF tensor, exactly what ``hfnemo export``
            would write into the safetensors shards (an HF source: its own tensors).
            ``"nemo"``: one ``(fqn, chunk)`` per chunk of the NeMo 2 DCP checkpoint ``hfnemo
            import`` (or ``reshard``) would write for ``tp``/``pp``/``ep``: the key is the DCP
            fqn (``module.decoder.layers.mlp.linear_fc1.weight``), which repeats: stacked
            tensors have one chunk per layer (leading axis of size 1; GLU fc1: two, gate and up;
            experts: per layer and expert), and with ``tp > 1`` one per tensor-parallel piece.
            ``chunks=True`` yields ``(fqn, offsets, chunk)`` with the chunk's global offsets.
        dtype: ``"auto"`` (as stored) or bf16/fp16/fp32 (round to nearest even).
        max_memory: the process's peak, as for convert (default 2GiB), counting the tensor being
            produced and the one the caller still holds from the previous step (drop it before
            asking for the next one); BudgetExceeded when the largest tensor does not fit. An
            in-memory source's tensors are not counted. With ``device="cuda"``: the pinned host
            and device staging buffers (the yielded device tensors are the caller's).
        tp, pp, ep: NeMo layout (``to="nemo"``).
        config: the HF config of an in-memory ``src``: a dict, a transformers config, or the path
            of config.json (or of its directory).
        device: ``"cpu"``, or ``"cuda"`` / ``"cuda:N"``: the tensors are produced in device memory
            (pinned reads, async copies and the Triton kernels, overlapped:
            :func:`hfnemo.exec.gpu.iter_tensors_to_device`); in-memory tensors that are pinned
            (``tensor.pin_memory()``) are copied to the device directly, and tensors already on
            that device device to device (an HF state dict on the GPU, converted there).
        overrides: config overrides of an import, as for convert (an HF source).

    Yields:
        Freshly allocated tensors, yours to keep (on ``device``; ready on its current stream).
    """
    from hfnemo import api
    from hfnemo.exec import memsource

    if to not in ("hf", "nemo"):
        raise UsageError(f"to={to!r}", fix='use to="hf" or to="nemo"')
    dev = str(device)
    if dev != "cpu" and not dev.startswith("cuda"):
        raise UsageError(f"device={device!r}", fix='use device="cpu" or "cuda" (or "cuda:N")')
    limit = api._size(max_memory, api.DEFAULT_MAX_MEMORY, "max_memory")
    # on the GPU, max_memory bounds the pipeline's pinned and device buffers (checked there), not
    # the resident size of a process that holds a CUDA context: the plans are made unbounded
    plan_limit = limit if dev == "cpu" else 1 << 60
    held = 0
    if isinstance(src, Mapping):
        if to != "nemo":
            raise UsageError("an in-memory state dict is converted to NeMo tensors", file=memsource.WHERE,
                             fix='pass to="nemo" (the state dict is HF already)')
        job = api._memory_job(src, config, _dtype(dtype), plan_limit, tp, pp, ep, overrides, allow_cuda=dev != "cpu")
        view = _job_view(job, "hf", "dcp")
        held = job.extra["held"]
    else:
        if config is not None:
            raise UsageError("config= is for an in-memory state dict", file=str(src),
                             fix="drop config=: a checkpoint directory has its own")
        if overrides is not None and to == "hf":
            raise UsageError("config overrides apply to an import (HF -> NeMo)", file=str(src),
                             fix='drop overrides=, or pass to="nemo"')
        view = (open_hf_view(src, dtype=dtype, max_memory=plan_limit) if to == "hf"
                else open_dcp_view(src, dtype=dtype, max_memory=plan_limit, tp=tp, pp=pp, ep=ep, overrides=overrides))
    try:
        if dev != "cpu":
            yield from _iter_device(view, dev, limit, chunks)
            return
        largest = max([0] + [it.nbytes for it in view.items])
        # two whole tensors (the one the caller holds, the one being produced) + staging blocks
        per_slot = buffers_per_slot(view, with_out=False)
        block = block_bytes(limit, DEPTH * per_slot, widest(view), fixed=2 * largest, largest=largest, held=held)
        with ThreadPoolExecutor(max_workers=DEPTH, thread_name_prefix="hfnemo-stream") as pool:
            streamer = BlockStreamer(view, block, pool, with_out=False)
            for it in view.items:
                dest = torch.empty(it.nbytes, dtype=torch.uint8)
                for _ in streamer.stream(it, streamer.step(it), dest):
                    pass
                t = as_tensor(it, dest)
                del dest
                yield (it.key, tuple(it.offsets), t) if chunks else (it.key, t)
                del t
    finally:
        view.close()


def _iter_device(view: TensorView, device: str, limit: int, chunks: bool) -> Iterator[tuple]:
    """The view's items produced on a CUDA device by the GPU pipeline."""
    from hfnemo.exec.gpu import iter_tensors_to_device
    from hfnemo.plan.plan import Plan

    if not torch.cuda.is_available():
        raise UsageError(f"device={device!r} but CUDA is not available", fix='use device="cpu"')
    plan = Plan(direction="stream", arch=view.arch or "", source=str(view.path), dtype="auto",
                sources=tuple(view.sources.values()), items=tuple(view.items), byte_items=(), files=(),
                config={}, budget={}, layout=dict(view.layout))
    for key, offsets, t in iter_tensors_to_device(plan, view.reader, device, max_memory=limit):
        yield (key, offsets, t) if chunks else (key, t)
        del t


__all__ = ["iter_tensors", "TensorView", "open_hf_view", "open_nemo_view", "open_dcp_view", "source_kind"]
