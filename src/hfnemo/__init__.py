"""hfnemo: streaming, bounded-memory, bit-exact HF safetensors <-> NeMo 2 / Megatron-Core converter."""
from hfnemo.api import Report, convert, find_latest, plan, reshard
from hfnemo.errors import ConversionError

__all__ = ["convert", "plan", "reshard", "find_latest", "Report", "ConversionError"]
__version__ = "0.1.0"
