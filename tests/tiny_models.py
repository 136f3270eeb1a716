"""Tiny random HF checkpoints shaped like real Llama/Mistral models, built offline.

Import from tests as ``from tiny_models import make_tiny_hf, SHAPES`` (``tests/`` is on sys.path
because it has no ``__init__.py``; pytest's default rootdir-prepend import mode puts it there).

transformers 5.x notes (checked against 5.24):
* ``save_pretrained`` writes the 5.x config dialect: ``dtype`` (not ``torch_dtype``) and
  ``rope_parameters`` = {rope_type, rope_theta, ...scaling fields}; no ``rope_theta``/``rope_scaling``.
* It still *reads* the 4.x dialect: ``torch_dtype`` -> ``config.dtype`` (with a deprecation warning),
  ``rope_theta`` + ``rope_scaling`` are folded into ``config.rope_parameters``
  (``rope_type: "default"`` when ``rope_scaling`` is null).  ``config.rope_scaling`` is an alias that
  returns ``rope_parameters``; ``config.rope_theta`` no longer exists as an attribute.
* Tied models (``tie_word_embeddings``) save no ``lm_head.weight`` tensor.
* Tokenizers save with ``tokenizer_class: TokenizersBackend`` and the chat template in a separate
  ``chat_template.jinja``; dialect "4" rewrites this into the 4.x Hub layout
  (``PreTrainedTokenizerFast``, inline ``chat_template``, ``special_tokens_map.json``).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HF4_VERSION = "4.53.3"
BOS_ID, EOS_ID, PAD_ID = 1, 2, 3
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
TOKENIZER_VOCAB = 300  # never equal to any SHAPES vocab_size (real checkpoints pad the embedding)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_COMMON: dict[str, Any] = dict(hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02,
                               bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)

# Named configs (5.x-style kwargs; ``rope_theta``/``rope_scaling`` are folded into rope_parameters).
# Ratios follow the real model: heads:kv heads, intermediate/hidden, rope settings, tying.
# max_position_embeddings must exceed original_max_position_embeddings (8192) for llama3 rope,
# otherwise transformers warns; it costs nothing since rotary tables are computed per forward.
SHAPES: dict[str, dict[str, Any]] = {
    # Llama-2-7B: MHA, 11008/4096 = 2.6875, theta 1e4, vocab 32000 -> 320.
    "llama2_mha": dict(arch="LlamaForCausalLM", vocab_size=320, hidden_size=128, intermediate_size=344,
                       num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4, rope_scaling=None,
                       max_position_embeddings=256, tie_word_embeddings=False),
    # Llama-3-8B: GQA 4:1, 14336/4096 = 3.5, theta 5e5.
    "llama3_gqa": dict(arch="LlamaForCausalLM", vocab_size=1000, hidden_size=256, intermediate_size=896,
                       num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5, rope_scaling=None,
                       max_position_embeddings=512, tie_word_embeddings=False),
    # Llama-3.1-8B: llama3 rope scaling factor 8, odd vocab (exercises padding / uneven TP splits).
    "llama31_rope": dict(arch="LlamaForCausalLM", vocab_size=1031, hidden_size=128, intermediate_size=448,
                         num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5,
                         rope_scaling=dict(_LLAMA31_ROPE), max_position_embeddings=16384,
                         tie_word_embeddings=False),
    # Llama-3.2-1B: tied embeddings, factor 32; head_dim 32 != 96 // 6 = 16 (explicit head_dim).
    "llama32_tied": dict(arch="LlamaForCausalLM", vocab_size=1024, hidden_size=96, intermediate_size=352,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=32, rope_theta=5e5,
                         rope_scaling={**_LLAMA31_ROPE, "factor": 32.0}, max_position_embeddings=16384,
                         tie_word_embeddings=True),
    # CodeLlama-34B: GQA 8:1, theta 1e6, 22016/8192 = 2.6875, vocab 32000 -> 336.
    "codellama": dict(arch="LlamaForCausalLM", vocab_size=336, hidden_size=256, intermediate_size=688,
                      num_attention_heads=16, num_key_value_heads=2, rope_theta=1e6, rope_scaling=None,
                      max_position_embeddings=512, tie_word_embeddings=False),
    # Mistral-7B-v0.1: sliding window, GQA 4:1, 14336/4096 = 3.5, theta 1e4.
    "mistral": dict(arch="MistralForCausalLM", vocab_size=320, hidden_size=128, intermediate_size=448,
                    num_attention_heads=8, num_key_value_heads=2, rope_theta=1e4, rope_scaling=None,
                    sliding_window=64, max_position_embeddings=256, tie_word_embeddings=False),
}
# Not in SHAPES (so parametrizations over SHAPES stay converter-agnostic): a Llama with all biases on.
EXTRA_SHAPES: dict[str, dict[str, Any]] = {
    "llama_bias": {**SHAPES["llama3_gqa"], "hidden_size": 128, "intermediate_size": 448,
                   "attention_bias": True, "mlp_bias": True},
}


def shape_config(shape: str, num_layers: int = 2) -> "transformers.PretrainedConfig":  # noqa: F821
    """transformers config object for a named shape."""
    import transformers

    spec = dict({**SHAPES, **EXTRA_SHAPES}[shape])
    arch = spec.pop("arch")
    theta, scaling = spec.pop("rope_theta"), spec.pop("rope_scaling")
    rope = {**(scaling or {"rope_type": "default"}), "rope_theta": theta}
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return cls(**_COMMON, **spec, rope_parameters=rope, num_hidden_layers=num_layers, architectures=[arch])


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Byte-level BPE trained offline on inline text (deterministic), serialized."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = ("the quick brown fox jumps over the lazy dog while a tiny llama converts checkpoints "
             "between hugging face safetensors and nemo megatron formats bit exactly with rotary "
             "embeddings grouped query attention sliding windows tied weights and odd vocabularies "
             "hello world user assistant system message answer question code python def return")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([words] * 20, trainer)
    return tok.to_str()


def save_tokenizer(out_dir: Path, dialect: str = "4") -> None:
    """Save the tiny tokenizer (bos <s>=1, eos </s>=2, pad <pad>=3, with a chat template)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    if dialect == "4":
        _tokenizer_to_v4(Path(out_dir))


def _tokenizer_to_v4(out_dir: Path) -> None:
    """Rewrite tokenizer_config.json into the 4.x Hub layout."""
    cfg_path, jinja = out_dir / "tokenizer_config.json", out_dir / "chat_template.jinja"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["clean_up_tokenization_spaces"] = False
    cfg["added_tokens_decoder"] = {str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                                single_word=False, special=True)
                                   for i, t in enumerate(SPECIAL_TOKENS)}
    if jinja.exists():
        cfg["chat_template"] = jinja.read_text()
        jinja.unlink()
    _write_json(cfg_path, cfg)
    _write_json(out_dir / "special_tokens_map.json",
                {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def config_to_v4(cfg: dict[str, Any]) -> dict[str, Any]:
    """Translate a 5.x config.json dict into the 4.x dialect (rope_theta/rope_scaling/torch_dtype)."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = float(rope.pop("rope_theta", 10000.0))
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = HF4_VERSION
    return cfg


def make_tiny_hf(out_dir: Path, shape: str, *, dtype: torch.dtype = torch.bfloat16, dialect: str = "4",
                 seed: int = 0, num_layers: int = 2, max_shard_size: str | None = None,
                 tokenizer: bool = True) -> Path:
    """Build, randomize and save a tiny HF checkpoint; returns ``out_dir``.

    Norm weights become ``1 + 0.1*randn`` and biases ``0.02*randn`` so that a dropped/mis-mapped norm or
    bias is visible in logits.  ``dialect`` is "4" (Hub-style config.json) or "5" (as 5.x writes it).
    """
    import transformers

    if dialect not in ("4", "5"):
        raise ValueError(f"dialect must be '4' or '5', got {dialect!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = shape_config(shape, num_layers)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    return save_tiny(model, out_dir, dtype=dtype, dialect=dialect, tokenizer=tokenizer, **kw)


def save_tiny(model: Any, out_dir: Path, *, dtype: torch.dtype, dialect: str, tokenizer: bool = True,
              to_v4: Callable[[dict], dict] | None = None, edit_config: Callable[[dict], dict] | None = None,
              **save_kw: Any) -> Path:
    """Cast ``model``, save it with a generation config (bos/eos/pad ids), rewrite config.json
    (``edit_config``, then the 4.x dialect with ``to_v4`` when dialect is "4") and add the tokenizer:
    the common tail of every tiny-model builder."""
    import transformers

    model = model.to(dtype).eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                                            pad_token_id=PAD_ID)
    model.save_pretrained(out_dir, safe_serialization=True, **save_kw)
    cfg_path = out_dir / "config.json"
    if edit_config is not None or dialect == "4":
        cfg = json.loads(cfg_path.read_text())
        cfg = edit_config(cfg) if edit_config is not None else cfg
        _write_json(cfg_path, (to_v4 or config_to_v4)(cfg) if dialect == "4" else cfg)
    if dialect == "4":
        gen_path = out_dir / "generation_config.json"
        _write_json(gen_path, {**json.loads(gen_path.read_text()), "transformers_version": HF4_VERSION})
    if tokenizer:
        save_tokenizer(out_dir, dialect)
        assert TOKENIZER_VOCAB != model.config.vocab_size
    return out_dir


def load_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of every ``*.safetensors`` file in ``hf_dir``."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        part = load_file(str(f))
        assert not state.keys() & part.keys(), f"duplicate tensors in {f}"
        state.update(part)
    return state


def saved_dtype(hf_dir: Path) -> torch.dtype:
    """dtype recorded in config.json (``torch_dtype`` in 4.x, ``dtype`` in 5.x)."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    return getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")


def hf_logits(hf_dir: Path, input_ids: torch.Tensor, attn_implementation: str = "eager") -> torch.Tensor:
    """float32 logits of the HF model in ``hf_dir`` (loaded in its saved dtype, eval, no grad)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=saved_dtype(hf_dir),
                                                 attn_implementation=attn_implementation).eval()
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    with torch.inference_mode():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def fixed_input_ids(vocab_size: int, n: int = 16, seed: int = 0) -> torch.Tensor:
    """Deterministic ``[1, n]`` int64 token ids in ``[4, vocab_size)`` (skips special ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (1, n), generator=g, dtype=torch.long)
