"""Architecture registry: explicit, lazily imported tables; every entry is a test case."""
from __future__ import annotations

import importlib

from hfnemo.arch.spec import ArchSpec
from hfnemo.errors import UnsupportedArchitecture

# HF `architectures[0]` -> (module, spec). Provenance: transformers model classes.
ARCH_TABLE: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("hfnemo.arch.llama", "LLAMA"),
    "MistralForCausalLM": ("hfnemo.arch.llama", "MISTRAL"),
    "MixtralForCausalLM": ("hfnemo.arch.mixtral", "MIXTRAL"),
    "Qwen2ForCausalLM": ("hfnemo.arch.qwen2", "QWEN2"),  # also Qwen1.5 and Qwen2.5
    # hfnemo-defined layouts (docs/formats.md): NeMo 2 has no model for these three.
    "FalconForCausalLM": ("hfnemo.arch.falcon", "FALCON"),
    "GPTNeoXForCausalLM": ("hfnemo.arch.gptneox", "GPTNEOX"),  # also Pythia
    "PhiForCausalLM": ("hfnemo.arch.phi2", "PHI2"),  # Phi-1.5 and Phi-2
    "GemmaForCausalLM": ("hfnemo.arch.gemma", "GEMMA"),  # also CodeGemma
    "Gemma2ForCausalLM": ("hfnemo.arch.gemma", "GEMMA2"),
    "Phi3ForCausalLM": ("hfnemo.arch.phi3", "PHI3"),  # Phi-3, Phi-3.5-mini, Phi-4-mini (without longrope)
}

# NeMo model class (model.yaml `_target_`'s last component) -> HF architecture.
NEMO_MODELS: dict[str, str] = {
    "LlamaModel": "LlamaForCausalLM",
    "Llama31Model": "LlamaForCausalLM",
    "Llama32Model": "LlamaForCausalLM",
    "CodeLlamaModel": "LlamaForCausalLM",
    "MistralModel": "MistralForCausalLM",
    "MixtralModel": "MixtralForCausalLM",
    "Qwen2Model": "Qwen2ForCausalLM",
    # hfnemo.nemo.* targets (docs/formats.md)
    "FalconModel": "FalconForCausalLM",
    "GPTNeoXModel": "GPTNeoXForCausalLM",
    "Phi2Model": "PhiForCausalLM",
    "GemmaModel": "GemmaForCausalLM",
    "Gemma2Model": "Gemma2ForCausalLM",
    "Phi3Model": "Phi3ForCausalLM",
}


# Families whose import is tested key by key and byte by byte against NVIDIA NeMo 2.5's own importer
# output (tests/data/nvidia/<family>, tests/test_reference.py and tests/test_arch_*.py).
CHECKED_AGAINST_NVIDIA = frozenset({"llama", "mistral", "mixtral", "qwen2", "gemma", "phi3"})


def status_table() -> list[dict[str, str]]:
    """One row per supported HF architecture: family, NeMo classes and how far it is verified."""
    rows = []
    for arch in supported():
        spec = get_spec(arch)
        nvidia_layout = spec.nemo_model.startswith("nemo.")
        if spec.name in CHECKED_AGAINST_NVIDIA:
            status = "NVIDIA layout; tensors equal NVIDIA's importer output byte for byte"
        elif nvidia_layout:
            status = "NVIDIA layout; round trips bit-exact (no NVIDIA reference yet)"
        else:
            status = "hfnemo layout (docs/formats.md: NeMo 2 has no model); round trips bit-exact"
        rows.append({"architecture": arch, "family": spec.name, "nemo_model": spec.nemo_model,
                     "nemo_config": spec.nemo_config, "directions": "import, export", "status": status})
    return rows


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
