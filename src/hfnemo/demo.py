"""`make demo`: build a small Llama-3-shaped model, convert it HF -> NeMo 2 -> HF, prove it exact.

Run as ``python -m hfnemo.demo OUT_DIR``. Needs transformers (installed by ``.[test]``); nothing is
downloaded: the model is random, built from a config shaped like Llama-3 (GQA 4:1, rope theta 5e5).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out, max_shard_size="40MB")
    return out


def main(argv: list[str]) -> int:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import hfnemo
    from hfnemo.cli import main as cli

    root = Path(argv[0] if argv else "demo-out")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    hf = build_model(root / "hf")
    print(f"built a Llama-3-shaped model in {hf}", flush=True)
    print(f"$ hfnemo plan {hf}", flush=True)
    cli(["plan", str(hf), "--max-memory", "1GiB"])
    print(f"$ hfnemo import {hf} {root / 'nemo'} --max-memory 1GiB", flush=True)
    if cli(["import", str(hf), str(root / "nemo"), "--max-memory", "1GiB"]):
        return 1
    print(f"$ hfnemo export {root / 'nemo'} {root / 'hf-back'} --max-memory 1GiB", flush=True)
    if cli(["export", str(root / "nemo"), str(root / "hf-back"), "--max-memory", "1GiB"]):
        return 1

    def state(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = state(hf), state(root / "hf-back")
    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(hf).eval()(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(root / "hf-back").eval()(ids).logits
    same_logits = torch.equal(la, lb)
    same_cfg = json.loads((hf / "config.json").read_text()) == json.loads((root / "hf-back/config.json").read_text())
    print(json.dumps({"tensors_bit_exact": exact, "tensors": len(a), "logits_identical": same_logits,
                      "config_identical": same_cfg, "nemo_checkpoint": str(root / "nemo")}))
    return 0 if exact and same_logits and same_cfg else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
