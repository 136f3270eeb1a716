"""(Copied from this workplace's peer recipe, /work/shared/peer, plus §7 for Gemma.)

Runtime shims so that NeMo 2.5.3 / megatron-core 0.14.0 run on a CPU-only box without
Transformer Engine (TE) / Apex. Import this BEFORE using nemo.collections.llm.

Without TE, NeMo falls back to megatron-core's *local* layer spec. The shims below only make that
fallback produce what the TE path (the one NVIDIA actually runs) produces; none of them changes
a tensor value or shape:

1. apply_rope_fusion / persist_layer_norm are switched off when the fused kernels are absent
   (otherwise TransformerConfig.__post_init__ / WrappedTorchNorm raise).
2. WrappedTorchNorm (torch.nn.RMSNorm/LayerNorm) is created in config.params_dtype, as TE's norms
   are (otherwise norms stay fp32 and NeMo's dtype assertion in apply_transforms fires).
3. NeMo's HF<->NeMo mappings hard-code TE's fused names
   (`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`). The local
   spec calls these `input_layernorm.weight` / `pre_mlp_layernorm.weight` in its (non-sharded)
   state_dict, so the wildcard patterns silently match nothing and the layer norms would be left
   at their random init (!). We rewrite the patterns on the Megatron side of apply_transforms.
   On disk, megatron's sharded_state_dict_keys_map renames them back to the TE names.
4. For MoE layers megatron's local spec maps `pre_mlp_layernorm.` -> `mlp.linear_fc1.layer_norm_`
   on disk, whereas the TE spec keeps a separate `pre_mlp_layernorm` for MoE layers; we drop that
   mapping entry for MoE so that the on-disk key names equal the TE layout.
"""
import warnings

warnings.filterwarnings("ignore", message="Apex is not installed")

from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.models.gpt import gpt_layer_specs  # noqa: E402
from megatron.core.transformer import torch_norm  # noqa: E402

HAVE_TE = gpt_layer_specs.HAVE_TE

# ---- 1. config fusions --------------------------------------------------------------------------
_orig_post_init = TransformerConfig.__post_init__


def _cpu_post_init(self):
    if getattr(self, "apply_rope_fusion", False):
        from megatron.core.models.common.embeddings.rope_utils import (
            fused_apply_rotary_pos_emb, fused_apply_rotary_pos_emb_thd)
        if fused_apply_rotary_pos_emb is None and fused_apply_rotary_pos_emb_thd is None:
            self.apply_rope_fusion = False
    if not HAVE_TE and getattr(self, "persist_layer_norm", False):
        self.persist_layer_norm = False
    _orig_post_init(self)


TransformerConfig.__post_init__ = _cpu_post_init

# ---- 2. norms in params_dtype -------------------------------------------------------------------
_orig_norm_new = torch_norm.WrappedTorchNorm.__new__


def _norm_new(cls, config, *args, **kwargs):
    m = _orig_norm_new(cls, config, *args, **kwargs)
    dt = getattr(config, "params_dtype", None)
    return m.to(dt) if dt is not None else m


torch_norm.WrappedTorchNorm.__new__ = _norm_new

# ---- 4. TE-identical on-disk names for MoE pre-MLP norm -----------------------------------------
_orig_local_spec = gpt_layer_specs.get_gpt_layer_local_spec


def _local_spec(*args, **kwargs):
    spec = _orig_local_spec(*args, **kwargs)
    num_experts = kwargs.get("num_experts", args[0] if args else None)
    if num_experts:
        km = dict(spec.submodules.sharded_state_dict_keys_map)
        km.pop("pre_mlp_layernorm.", None)
        spec.submodules.sharded_state_dict_keys_map = km
    return spec


gpt_layer_specs.get_gpt_layer_local_spec = _local_spec

# ---- 3. mapping patterns on the Megatron side ---------------------------------------------------
from nemo.lightning import io as _nio  # noqa: E402
from nemo.lightning.io import state as _nstate  # noqa: E402

_TE2LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def _mcore_keys(obj):
    from megatron.core.transformer.module import MegatronModule
    m = obj.module if hasattr(obj, "module") and isinstance(obj.module, MegatronModule) else obj
    if not isinstance(m, MegatronModule):
        return None
    return set(m.state_dict().keys())


def _rewrite(pat, keys):
    if isinstance(pat, str):
        for te, loc in _TE2LOCAL.items():
            if pat.endswith(te) and not any(k.endswith(te) for k in keys) and any(k.endswith(loc) for k in keys):
                return pat[: -len(te)] + loc
        return pat
    if isinstance(pat, tuple):
        return tuple(_rewrite(p, keys) for p in pat)
    if isinstance(pat, dict):
        return {k: _rewrite(v, keys) for k, v in pat.items()}
    return pat


_orig_apply = _nstate.apply_transforms


def _apply_transforms(source, target, mapping, transforms=[], *args, **kwargs):
    skeys, tkeys = _mcore_keys(source), _mcore_keys(target)
    new_map = {}
    for k, v in mapping.items():
        new_map[_rewrite(k, skeys) if skeys else k] = _rewrite(v, tkeys) if tkeys else v
    for t in transforms or []:
        if hasattr(t, "source_key") and skeys:
            t.source_key = _rewrite(t.source_key, skeys)
        if hasattr(t, "target_key") and tkeys:
            t.target_key = _rewrite(t.target_key, tkeys)
    return _orig_apply(source, target, new_map, transforms, *args, **kwargs)


import os as _os

if not HAVE_TE and not _os.environ.get("PEER_NO_TE_NAME_REWRITE"):  # env var: demonstrate the bug
    _nstate.apply_transforms = _apply_transforms
    _nio.apply_transforms = _apply_transforms

# ---- 5. synchronous dist-ckpt save on CPU -------------------------------------------------------
# NeMo's MegatronStrategy defaults to ckpt_async_save=True; megatron's async path calls
# torch.cuda.synchronize()/torch.cuda.current_device(). Save synchronously when there is no CUDA.
import torch as _torch  # noqa: E402
from nemo.lightning.io.connector import ModelConnector as _MC  # noqa: E402

if not _torch.cuda.is_available():
    _orig_nemo_setup = _MC.nemo_setup

    def _nemo_setup(self, model, trainer=None, *args, **kwargs):
        if trainer is None:
            kwargs.setdefault("ckpt_async_save", False)
        return _orig_nemo_setup(self, model, trainer, *args, **kwargs)

    _MC.nemo_setup = _nemo_setup

# ---- 6. megatron dist-ckpt (sync path too) calls torch.cuda.synchronize(); make it a no-op -------
if not _torch.cuda.is_available():
    _torch.cuda.synchronize = lambda *a, **k: None
    # megatron dist-ckpt builds small gloo all-reduce flags with device=torch.cuda.current_device()
    _torch.cuda.current_device = lambda: "cpu"
    # NeMo's MegatronParallel.init_model_parallel wraps init_ddp in torch.cuda.stream(torch.cuda.Stream())
    import contextlib as _contextlib
    _torch.cuda.Stream = lambda *a, **k: None
    _torch.cuda.stream = lambda *a, **k: _contextlib.nullcontext()
    # NeMo's dist-ckpt load asserts torch.cuda.is_initialized() in _fix_tensors_device (export path)
    from nemo.lightning.io import pl as _npl
    _npl._fix_tensors_device = lambda ckpt: ckpt

# ---- 7. Gemma's zero-centred norms without TE ---------------------------------------------------
# megatron-core's torch norm (the non-TE fallback) refuses layernorm_zero_centered_gamma=True
# (GemmaConfig's setting) outright. Hand the norm constructor a copy of the config with the flag
# off: the flag only changes the forward pass (x * (1 + w)) and w's initial value; import and
# export copy w as stored, so no tensor read or written changes. The config that io.json /
# model.yaml record is the original object. (tests/data/nvidia/gemma/nemo_import_gemma.py made the
# frozen Gemma reference with the same shim.)
import copy as _copy  # noqa: E402

_norm_new_dtype = torch_norm.WrappedTorchNorm.__new__


def _zero_centred_ok(cls, config, *args, **kwargs):
    if getattr(config, "layernorm_zero_centered_gamma", False):
        config = _copy.copy(config)
        config.layernorm_zero_centered_gamma = False
    return _norm_new_dtype(cls, config, *args, **kwargs)


torch_norm.WrappedTorchNorm.__new__ = _zero_centred_ok
