"""hfnemo: streaming, bounded-memory, bit-exact HF safetensors <-> NeMo 2 / Megatron-Core converter.

The public names are imported on first use (PEP 562), not with the package: ``import hfnemo.cli``
(and ``python -m hfnemo``) must not pay for torch before the command line is parsed, so that the
source can be read ahead while torch loads (:mod:`hfnemo.prefetch`). ``hfnemo.convert``,
``from hfnemo import convert`` and ``from hfnemo import *`` behave as eager imports would.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from hfnemo.api import Report, convert, find_latest, plan, reshard
    from hfnemo.errors import ConversionError
    from hfnemo.stream import iter_tensors
    from hfnemo.tools.backup import BackupReport, backup
    from hfnemo.tools.inspect import CheckpointEntry, ModelInfo, inspect, list_checkpoints
    from hfnemo.tools.verify import Diff, TensorDiff, verify

# public name -> the module that defines it
_LAZY = {
    "convert": "hfnemo.api", "plan": "hfnemo.api", "reshard": "hfnemo.api", "find_latest": "hfnemo.api",
    "Report": "hfnemo.api",
    "ConversionError": "hfnemo.errors",
    "iter_tensors": "hfnemo.stream",
    "backup": "hfnemo.tools.backup", "BackupReport": "hfnemo.tools.backup",
    "inspect": "hfnemo.tools.inspect", "ModelInfo": "hfnemo.tools.inspect",
    "list_checkpoints": "hfnemo.tools.inspect", "CheckpointEntry": "hfnemo.tools.inspect",
    "verify": "hfnemo.tools.verify", "Diff": "hfnemo.tools.verify", "TensorDiff": "hfnemo.tools.verify",
}

__all__ = ["convert", "plan", "reshard", "find_latest", "Report", "ConversionError", "inspect", "ModelInfo",
           "list_checkpoints", "CheckpointEntry", "verify", "Diff", "TensorDiff", "iter_tensors", "backup",
           "BackupReport"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``hfnemo.plan`` is the function hfnemo.api.plan, as it was when this package imported it
    eagerly; but importing the subpackage ``hfnemo.plan`` (which hfnemo.api and others do) makes the
    import system set the attribute ``plan`` of this package to that subpackage. Refuse that one
    binding, so that ``hfnemo.plan`` stays (or lazily becomes) the function; the subpackage is
    still imported normally, through sys.modules."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
