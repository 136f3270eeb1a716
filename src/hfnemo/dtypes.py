"""The dtype table shared by every reader and writer: one row per dtype, all its spellings."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hfnemo.errors import UsageError


@dataclass(frozen=True)
class DType:
    name: str  # canonical short name used in plans and the CLI: "bf16"
    safetensors: str  # safetensors header code: "BF16"
    torch: torch.dtype
    itemsize: int
    storage: str  # legacy torch storage class name pickled by torch.save: "BFloat16Storage"


# Provenance: safetensors codes from safetensors/src/tensor.rs Dtype; storage names from
# torch/storage.py (_LegacyStorage subclasses) as written by torch.save's data.pkl.
_TABLE = (
    DType("fp64", "F64", torch.float64, 8, "DoubleStorage"),
    DType("fp32", "F32", torch.float32, 4, "FloatStorage"),
    DType("fp16", "F16", torch.float16, 2, "HalfStorage"),
    DType("bf16", "BF16", torch.bfloat16, 2, "BFloat16Storage"),
    DType("fp8_e4m3", "F8_E4M3", torch.float8_e4m3fn, 1, "Float8_e4m3fnStorage"),
    DType("fp8_e5m2", "F8_E5M2", torch.float8_e5m2, 1, "Float8_e5m2Storage"),
    DType("i64", "I64", torch.int64, 8, "LongStorage"),
    DType("i32", "I32", torch.int32, 4, "IntStorage"),
    DType("i16", "I16", torch.int16, 2, "ShortStorage"),
    DType("i8", "I8", torch.int8, 1, "CharStorage"),
    DType("u8", "U8", torch.uint8, 1, "ByteStorage"),
    DType("bool", "BOOL", torch.bool, 1, "BoolStorage"),
)

BY_NAME = {d.name: d for d in _TABLE}
BY_SAFETENSORS = {d.safetensors: d for d in _TABLE}
BY_TORCH = {d.torch: d for d in _TABLE}
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


def from_torch(dtype: torch.dtype) -> DType:
    return BY_TORCH[dtype]


FLOAT_DTYPES = frozenset({"fp64", "fp32", "fp16", "bf16"})
