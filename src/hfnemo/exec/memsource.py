"""An HF state dict already in host memory as a conversion source.

A training job that holds HF-named weights in memory (received from another process, kept for a
refit, loaded once) converts them without writing or re-reading a file: the plan is made from the
tensors' names, dtypes and shapes exactly as from a directory's safetensors headers, and
:class:`MemoryReader` serves the row (and column-window) reads the executors make, straight from
the tensors' bytes. On the GPU path (:func:`hfnemo.exec.gpu.iter_tensors_to_device`) tensors in
pinned memory (``tensor.pin_memory()``, ``torch.empty(..., pin_memory=True)``) are copied to the
device directly, with no staging copy on the host; other tensors go through the pinned slots.

The tensors stay the caller's: never written to, and not counted in ``max_memory`` (as the output
tensors a caller keeps are not).
"""
from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Mapping

from hfnemo.dtypes import BY_NAME, BY_TORCH
from hfnemo.errors import UsageError
from hfnemo.exec.buffers import address
from hfnemo.exec.sources import RowReader
from hfnemo.plan.plan import SourceTensor

if TYPE_CHECKING:
    import torch

try:
    from hfnemo import _C
except ImportError:  # pragma: no cover - exercised when the extension is not built
    _C = None

KIND = "memory"
WHERE = "<state dict>"  # the "file" errors name for an in-memory source


def memory_sources(tensors: Mapping[str, "torch.Tensor"], allow_cuda: bool = False) -> dict[str, SourceTensor]:
    """One SourceTensor per tensor (location ``("memory", name)``), after checking that every
    tensor can be read in place: a CPU tensor (or, ``allow_cuda``, one on a CUDA device: the GPU
    pipeline copies it device to device), C-contiguous, of a dtype the plans know."""
    import torch

    if not isinstance(tensors, Mapping) or not tensors:
        raise UsageError("the state dict is empty or not a mapping of names to tensors", file=WHERE,
                         fix="pass a dict of HF tensor names to torch tensors (model.state_dict())")
    out: dict[str, SourceTensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise UsageError(f"entry {name!r} is a {type(t).__name__}, not a tensor", file=WHERE, tensor=str(name),
                             fix="pass a dict of HF tensor names (str) to torch tensors")
        if t.device.type != "cpu" and not (allow_cuda and t.device.type == "cuda"):
            raise UsageError(f"tensor is on {t.device}", file=WHERE, tensor=name,
                             fix=f"pass device='{t.device}' to convert on that GPU, or host tensors (tensor.cpu(); "
                                 ".pin_memory() for the fastest GPU path)" if t.device.type == "cuda" else
                             "pass host tensors (tensor.cpu())")
        if not t.is_contiguous():
            raise UsageError(f"tensor is not contiguous (strides {tuple(t.stride())})", file=WHERE, tensor=name,
                             fix="pass tensor.contiguous()")
        dt = BY_TORCH.get(t.dtype)
        if dt is None or dt.name not in BY_NAME:
            raise UsageError(f"dtype {t.dtype} is not supported", file=WHERE, tensor=name,
                             fix="cast it to bfloat16, float16 or float32")
        out[name] = SourceTensor(name, dt.name, tuple(int(s) for s in t.shape), (KIND, name))
    return out


class MemoryReader(RowReader):
    """RowReader over host tensors: ``read_rows`` / ``read_cols`` copy their bytes (a memcpy, and
    the native core's column cut, with the GIL released).
    The mapping is copied when the plan is made: entries added or replaced later are not seen, and
    a tensor changed in place to another shape or dtype is refused before it is read."""

    def __init__(self, tensors: Mapping[str, "torch.Tensor"]) -> None:
        super().__init__()
        self.tensors = dict(tensors)

    def tensor(self, src: SourceTensor) -> "torch.Tensor":
        return self.tensors[src.location[1]]

    def _check(self, src: SourceTensor) -> None:
        t = self.tensors.get(src.location[1])
        if t is None or tuple(t.shape) != tuple(src.shape) or BY_TORCH.get(t.dtype) is None \
                or BY_TORCH[t.dtype].name != src.dtype:
            raise UsageError("the state dict changed after the plan was made (tensor missing, or another shape "
                             "or dtype)", file=WHERE, tensor=src.name,
                             fix="keep the state dict unchanged while the conversion runs, or plan again")

    def read_rows(self, src: SourceTensor, r0: int, r1: int, dest: memoryview) -> None:
        if src.location[0] != KIND:
            return super().read_rows(src, r0, r1, dest)
        self._check(src)
        if self.tensor(src).device.type != "cpu":  # device tensors are copied by the GPU pipeline itself
            raise UsageError("a device tensor cannot be read into host memory here", file=WHERE, tensor=src.name,
                             fix="convert with device='cuda', or pass tensor.cpu()")
        row = BY_NAME[src.dtype].itemsize
        for s in src.shape[1:]:
            row *= s
        a, n = r0 * row, (r1 - r0) * row if src.shape else row
        if n == 0:
            return
        # one thread's memcpy, the GIL released (ctypes): the readers run several at once
        ctypes.memmove(address(dest), self.tensor(src).data_ptr() + a, n)

    def read_cols(self, src: SourceTensor, r0: int, r1: int, col: int, cols: int,
                  dest: "torch.Tensor | memoryview") -> bool:
        """Columns [col, col+cols) of rows [r0, r1) (columns of the flattened row) into ``dest``:
        the native core's column cut, else torch's strided copy. False for a device tensor."""
        if src.location[0] != KIND:
            return super().read_cols(src, r0, r1, col, cols, dest)
        t = self.tensor(src)
        if not src.shape or t.device.type != "cpu":
            return False
        self._check(src)
        item = BY_NAME[src.dtype].itemsize
        row = item
        for s in src.shape[1:]:
            row *= s
        if _C is not None:
            _C.slice_cols(address(dest), t.data_ptr() + r0 * row, r1 - r0, row, col * item, cols * item)
            return True
        import torch

        n = (r1 - r0) * cols * item
        window = t.reshape(-1).view(torch.uint8)[r0 * row:r1 * row].view(r1 - r0, row)[:, col * item:(col + cols) * item]
        out = dest if isinstance(dest, torch.Tensor) else torch.frombuffer(dest, dtype=torch.uint8, count=n)
        out[:n].view(r1 - r0, cols * item).copy_(window)
        return True
