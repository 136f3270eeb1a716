"""One error tree for everything hfnemo refuses to do.

Every error carries the file and tensor it is about and the fix, so that the CLI can print one
message and exit 2 (tracebacks only with -v). Mirrors safetensors' one-enum style: one class per
kind of failure, never a bare ValueError escaping to the user.
"""
from __future__ import annotations

from pathlib import Path


class ConversionError(Exception):
    """Base class: a conversion that cannot proceed. The CLI maps it to exit code 2."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        tensor: str | None = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        self.fix = fix

    def __str__(self) -> str:
        lines = [self.message]
        if self.file:
            lines.append(f"  file:   {self.file}")
        if self.tensor:
            lines.append(f"  tensor: {self.tensor}")
        if self.fix:
            lines.append(f"  fix:    {self.fix}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, str | None]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "file": self.file,
            "tensor": self.tensor,
            "fix": self.fix,
        }


class UsageError(ConversionError):
    """Bad command-line or API arguments."""


class UnsupportedArchitecture(ConversionError):
    """The checkpoint's architecture has no spec in hfnemo.arch."""


class UnmappedTensors(ConversionError):
    """Source tensors that no rule claims, or that several rules claim, or that a rule needs but are absent."""


class ShapeMismatch(ConversionError):
    """A tensor's shape or dtype contradicts the model config."""


class ConfigError(ConversionError):
    """config.json / model.yaml missing, unreadable, or missing a required field."""


class CorruptCheckpoint(ConversionError):
    """A file whose bytes contradict its own format (truncated, bad header, bad offsets)."""


class BudgetExceeded(ConversionError):
    """The memory budget is too small for the smallest unit of work."""


class OutputExists(ConversionError):
    """The output directory exists and --overwrite was not given, or it lies inside the input."""


class InsufficientDisk(ConversionError):
    """Not enough free space for the planned output."""


class OutputNotWritable(ConversionError):
    """The output's directory cannot be created or written (permissions, read-only filesystem)."""


class WriteFailed(ConversionError):
    """An I/O error (disk full, file too large, device error) while the output was being written.
    The staging directory and its journal are kept: the same command resumes."""


class ResumeMismatch(ConversionError):
    """The staging directory beside the output holds an interrupted conversion of something else."""
