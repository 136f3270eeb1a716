"""hfnemo: streaming, bounded-memory, bit-exact HF safetensors <-> NeMo 2 / Megatron-Core converter."""
from hfnemo.api import Report, convert, find_latest, plan, reshard
from hfnemo.errors import ConversionError
from hfnemo.stream import iter_tensors
from hfnemo.tools.backup import BackupReport, backup
from hfnemo.tools.inspect import CheckpointEntry, ModelInfo, inspect, list_checkpoints
from hfnemo.tools.verify import Diff, TensorDiff, verify

__all__ = ["convert", "plan", "reshard", "find_latest", "Report", "ConversionError", "inspect", "ModelInfo",
           "list_checkpoints", "CheckpointEntry", "verify", "Diff", "TensorDiff", "iter_tensors", "backup",
           "BackupReport"]
__version__ = "0.1.0"
