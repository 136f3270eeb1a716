"""How gemma/nemo/ was made: NVIDIA's importer (NeMo 2.5.3) on a CPU box, via the peer runner
(/work/shared/peer/nemo_import.py + cpu_compat.py) plus one more shim.

Without Transformer Engine, megatron-core builds norms as WrappedTorchNorm, which refuses
layernorm_zero_centered_gamma=True (GemmaConfig's setting) outright. The shim hands the norm
constructor a copy of the config with the flag off. The flag only changes the forward pass
(x * (1 + w)) and the initial value of w; the importer overwrites w with the HF weight, so no
stored tensor changes, and the config that io.json / model.yaml record is the original object.
usage: python nemo_import_gemma.py HF_DIR OUT_DIR   (with the peer venv's python)
"""
import copy
import runpy
import sys

sys.path.insert(0, "/work/shared/peer")
import cpu_compat  # noqa: E402,F401  (installs the peer shims first)
from megatron.core.transformer import torch_norm  # noqa: E402

_norm_new = torch_norm.WrappedTorchNorm.__new__


def _zero_centred_ok(cls, config, *args, **kwargs):
    if getattr(config, "layernorm_zero_centered_gamma", False):
        config = copy.copy(config)
        config.layernorm_zero_centered_gamma = False
    return _norm_new(cls, config, *args, **kwargs)


torch_norm.WrappedTorchNorm.__new__ = _zero_centred_ok

if __name__ == "__main__":  # the checkpoint writer forks workers
    sys.argv = ["nemo_import.py", *sys.argv[1:]]
    runpy.run_path("/work/shared/peer/nemo_import.py", run_name="__main__")
