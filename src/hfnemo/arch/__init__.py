"""Architecture registry: explicit, lazily imported tables; every entry is a test case."""
from __future__ import annotations

import importlib

from hfnemo.arch.spec import ArchSpec
from hfnemo.errors import UnsupportedArchitecture

# HF `architectures[0]` -> (module, spec). Provenance: transformers model classes.
ARCH_TABLE: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("hfnemo.arch.llama", "LLAMA"),
    "MistralForCausalLM": ("hfnemo.arch.llama", "MISTRAL"),
}

# NeMo model class (model.yaml `_target_`'s last component) -> HF architecture.
NEMO_MODELS: dict[str, str] = {
    "LlamaModel": "LlamaForCausalLM",
    "Llama31Model": "LlamaForCausalLM",
    "Llama32Model": "LlamaForCausalLM",
    "CodeLlamaModel": "LlamaForCausalLM",
    "MistralModel": "MistralForCausalLM",
}


def supported() -> list[str]:
    return sorted(ARCH_TABLE)


def get_spec(hf_architecture: str, *, where: str | None = None) -> ArchSpec:
    if hf_architecture not in ARCH_TABLE:
        raise UnsupportedArchitecture(
            f"architecture {hf_architecture!r} is not supported; supported: {', '.join(supported())}",
            file=where, fix="convert one of the supported architectures, or open an issue for this one")
    module, attr = ARCH_TABLE[hf_architecture]
    return getattr(importlib.import_module(module), attr)


def spec_for_nemo_model(target: str, *, where: str | None = None) -> ArchSpec:
    cls = target.rsplit(".", 1)[-1]
    if cls not in NEMO_MODELS:
        raise UnsupportedArchitecture(
            f"NeMo model {target!r} is not supported; supported: {', '.join(sorted(NEMO_MODELS))}",
            file=where, fix="export one of the supported model classes, or open an issue for this one")
    return get_spec(NEMO_MODELS[cls], where=where)
