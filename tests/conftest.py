"""Shared pytest setup: offline HF, determinism, cached tiny checkpoints."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # must precede any transformers / huggingface_hub import
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

torch.manual_seed(0)
torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_hf_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(shape, dtype=torch.bfloat16, dialect="4", **make_tiny_hf_kwargs) -> Path``.

    Each combination is built once per session; treat the returned directory as read-only
    (copy it first if a test needs to modify it).
    """
    from tiny_models import make_tiny_hf
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cache: dict[tuple, Path] = {}

    def factory(shape: str, dtype: torch.dtype = torch.bfloat16, dialect: str = "4", **kw: Any) -> Path:
        key = (shape, dtype, dialect, tuple(sorted(kw.items())))
        if key not in cache:
            name = f"{shape}-{str(dtype).removeprefix('torch.')}-d{dialect}"
            out = tmp_path_factory.mktemp(name)
            cache[key] = make_tiny_hf(out, shape, dtype=dtype, dialect=dialect, **kw)
        return cache[key]

    return factory


# ---------------------------------------------------------------------------------------------
# Fixtures for other test modules go below this line.
# ---------------------------------------------------------------------------------------------
