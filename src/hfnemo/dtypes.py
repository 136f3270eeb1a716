"""The dtype table shared by every reader and writer: one row per dtype, all its spellings.

Importing it does not import torch (a CPU conversion never needs torch's tensors, and the CUDA
build of torch takes seconds to import): ``DType.torch`` and :data:`BY_TORCH` import it on use."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from hfnemo.errors import UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str  # canonical short name used in plans and the CLI: "bf16"
    safetensors: str  # safetensors header code: "BF16"
    torch_name: str  # attribute of the torch module: "bfloat16" (torch.bfloat16)
    itemsize: int
    storage: str  # legacy torch storage class name pickled by torch.save: "BFloat16Storage"

    @property
    def torch(self) -> "torch.dtype":
        return getattr(importlib.import_module("torch"), self.torch_name)


# Provenance: safetensors codes from safetensors/src/tensor.rs Dtype; storage names from
# torch/storage.py (_LegacyStorage subclasses) as written by torch.save's data.pkl.
_TABLE = (
    DType("fp64", "F64", "float64", 8, "DoubleStorage"),
    DType("fp32", "F32", "float32", 4, "FloatStorage"),
    DType("fp16", "F16", "float16", 2, "HalfStorage"),
    DType("bf16", "BF16", "bfloat16", 2, "BFloat16Storage"),
    DType("fp8_e4m3", "F8_E4M3", "float8_e4m3fn", 1, "Float8_e4m3fnStorage"),
    DType("fp8_e5m2", "F8_E5M2", "float8_e5m2", 1, "Float8_e5m2Storage"),
    DType("i64", "I64", "int64", 8, "LongStorage"),
    DType("i32", "I32", "int32", 4, "IntStorage"),
    DType("i16", "I16", "int16", 2, "ShortStorage"),
    DType("i8", "I8", "int8", 1, "CharStorage"),
    DType("u8", "U8", "uint8", 1, "ByteStorage"),
    DType("bool", "BOOL", "bool", 1, "BoolStorage"),
)

BY_NAME = {d.name: d for d in _TABLE}
BY_SAFETENSORS = {d.safetensors: d for d in _TABLE}
BY_TORCH_NAME = {d.torch_name: d for d in _TABLE}


class _ByTorch:
    """``BY_TORCH[torch.bfloat16]``: keyed by torch dtypes without importing torch (a torch dtype's
    str() is "torch.bfloat16")."""

    @staticmethod
    def _key(dtype: object) -> str:
        return str(dtype).removeprefix("torch.")

    def __getitem__(self, dtype: object) -> DType:
        return BY_TORCH_NAME[self._key(dtype)]

    def get(self, dtype: object, default: DType | None = None) -> DType | None:
        return BY_TORCH_NAME.get(self._key(dtype), default)

    def __contains__(self, dtype: object) -> bool:
        return self._key(dtype) in BY_TORCH_NAME

    def __iter__(self) -> Iterator[DType]:
        return iter(_TABLE)


BY_TORCH = _ByTorch()
BY_STORAGE = {d.storage: d for d in _TABLE}
# Spellings users and configs use: --dtype bf16, torch_dtype "bfloat16", "torch.bfloat16".
_ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "float64": "fp64", "double": "fp64", "int64": "i64", "int32": "i32", "uint8": "u8",
}


def parse_dtype(text: str) -> DType:
    """Resolve any common spelling ('bf16', 'bfloat16', 'torch.bfloat16', 'BF16') to a DType."""
    key = text.strip().removeprefix("torch.")
    key = _ALIASES.get(key.lower(), key.lower())
    if key in BY_NAME:
        return BY_NAME[key]
    if text.upper() in BY_SAFETENSORS:
        return BY_SAFETENSORS[text.upper()]
    raise UsageError(f"unknown dtype {text!r}", fix=f"use one of {', '.join(BY_NAME)}")


def from_torch(dtype: "torch.dtype") -> DType:
    return BY_TORCH[dtype]


FLOAT_DTYPES = frozenset({"fp64", "fp32", "fp16", "bf16"})
