"""Export a NeMo 2.x checkpoint back to HF with NVIDIA NeMo's own exporter (CPU).

usage: python nemo_export.py NEMO_DIR HF_OUT_DIR [--fix-dtype]     (with the peer venv's python)
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def fix_exporter_dtypes() -> None:
    """NeMo 2.5.3 bug (not CPU related): the Mixtral, Phi-3 and Gemma exporters' init() build the HF
    model without a dtype (-> fp32), so exporting a bf16 checkpoint dies in apply_transforms' dtype
    assertion. Build it in the checkpoint's dtype instead, as HFLlamaExporter does (every parameter
    is then replaced by the converted tensor, as before)."""
    from nemo.collections.llm.gpt.model import gemma as _gemma
    from nemo.collections.llm.gpt.model import mixtral as _mx
    from nemo.collections.llm.gpt.model import phi3mini as _phi3
    from nemo.collections.llm.gpt.model.base import torch_dtype_from_mcore_config
    from nemo.lightning import io as _io

    def patch(cls):
        orig = cls.init
        if getattr(orig, "_peer_dtype_fix", False):
            return

        def _init(self):
            dt = torch_dtype_from_mcore_config(_io.load_context(str(self), subpath="model.config"))
            return orig(self).to(dt)

        _init._peer_dtype_fix = True
        cls.init = _init

    for cls in (_mx.HFMixtralExporter, _phi3.HFPhi3Exporter, _gemma.HFGemmaExporter):
        patch(cls)


fix_mixtral_dtype = fix_exporter_dtypes  # the name /work/shared/peer used


def export_hf(src, out):
    from nemo.collections import llm
    return llm.export_ckpt(path=Path(src).resolve(), target="hf", output_path=Path(out).resolve(),
                           overwrite=True)


def main():
    import cpu_compat  # noqa: F401
    if "--fix-dtype" in sys.argv or "--fix-mixtral-dtype" in sys.argv:
        fix_exporter_dtypes()
    t0 = time.time()
    res = export_hf(sys.argv[1], sys.argv[2])
    print(f"EXPORT_DONE {res} in {time.time()-t0:.2f}s")


if __name__ == "__main__":
    main()
