"""Import a local HF checkpoint with NVIDIA NeMo's own importer, choosing the importer by architecture.
usage: python nemo_import.py HF_DIR OUT_DIR      (with the peer venv's python)"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import cpu_compat  # noqa: E402,F401
from nemo.collections import llm  # noqa: E402

# The model class only picks the importer; the config comes from the HF config.json.
MODELS = {
    "LlamaForCausalLM": lambda: llm.LlamaModel(llm.Llama32Config1B()),
    "MistralForCausalLM": lambda: llm.MistralModel(llm.MistralConfig7B()),
    "MixtralForCausalLM": lambda: llm.MixtralModel(llm.MixtralConfig8x7B()),
    "Qwen2ForCausalLM": lambda: llm.Qwen2Model(llm.Qwen2Config500M()),
    "GemmaForCausalLM": lambda: llm.GemmaModel(llm.GemmaConfig2B()),
    "Phi3ForCausalLM": lambda: llm.Phi3Model(llm.Phi3ConfigMini()),
}


def import_hf(src, out) -> str:
    src, out = Path(src).resolve(), Path(out).resolve()
    arch = json.load(open(src / "config.json"))["architectures"][0]
    llm.import_ckpt(model=MODELS[arch](), source=f"hf://{src}", output_path=out, overwrite=True)
    return arch


def main():
    t = time.time()
    arch = import_hf(sys.argv[1], sys.argv[2])
    print(f"IMPORT_DONE {arch} {time.time() - t:.1f}s")


if __name__ == "__main__":  # the checkpoint writer forks workers
    main()
