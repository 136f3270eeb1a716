"""NeMo 2 config classes as data: every constructor field, in order, with its default.

`model.yaml` lists every field of the model's config class (its defaults overlaid with the explicit
arguments) and `io.json` lists the explicit arguments in constructor order, i.e. dataclass field
order: base-class fields first, a re-defaulted field keeps its base-class place, new fields go last.
Writing either without NeMo installed needs these tables.

Sources: megatron-core tag core_v0.14.0 (model_parallel_config.py, transformer/transformer_config.py)
and NeMo branch r2.5.0 (nemo/collections/llm/gpt/model/*.py), the pair NeMo 2.5.3 runs with. The
tables were generated from those files' class bodies and agree field for field with the model.yaml
that NeMo 2.5.3 wrote for LlamaConfig, Qwen2Config and MixtralConfig8x7B
(/work/shared/reference/*/nemo/context/model.yaml; tests/test_nemo_context.py keeps them in step).
Values are YAML-ready, except PyRef / PyCall and tuples (written as lists).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class PyRef:
    """A reference to an importable Python object, e.g. PyRef("torch", "bfloat16").

    io.json stores it as a fiddle pyref, model.yaml as `{_call_: false, _target_: module.name}`.
    """

    module: str
    name: str

    @property
    def target(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class PyCall:
    """An object made by calling an importable class; model.yaml: `{_call_: true, _target_: ...}`."""

    module: str
    name: str

    @property
    def target(self) -> str:
        return f"{self.module}.{self.name}"


FP32 = PyRef("torch", "float32")
BF16 = PyRef("torch", "bfloat16")
FP16 = PyRef("torch", "float16")
SILU = PyRef("torch.nn.functional", "silu")
GELU = PyRef("torch.nn.functional", "gelu")
_BASE = "nemo.collections.llm.gpt.model.base"
DEFAULT_LAYER_SPEC = PyRef(_BASE, "default_layer_spec")
GPT_FORWARD_STEP = PyRef(_BASE, "gpt_forward_step")
GPT_DATA_STEP = PyRef(_BASE, "gpt_data_step")
# The default AttnBackend.auto is an enum member; NeMo's YAML writer renders it as its class, called.
ATTN_BACKEND_AUTO = PyCall("megatron.core.transformer.enums", "AttnBackend")

# Every field of nemo.collections.llm.gpt.model.base.GPTConfig, constructor order, GPTConfig defaults.
GPT_CONFIG_FIELDS: Mapping[str, object] = MappingProxyType({
    # megatron/core/model_parallel_config.py ModelParallelConfig
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_comm_backend": None,
    "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "sequence_parallel": False,
    "context_parallel_size": 1,
    "hierarchical_context_parallel_sizes": None,
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None,
    "moe_extended_tp": False,
    "perform_initialization": True,
    "use_cpu_initialization": False,
    "fp16": False,
    "bf16": False,
    "params_dtype": FP32,
    "timers": None,
    "finalize_model_grads_func": None,
    "grad_scale_func": None,
    "no_sync_func": None,
    "grad_sync_func": None,
    "param_sync_func": None,
    "deterministic_mode": False,
    "enable_autocast": False,
    "autocast_dtype": None,
    "num_microbatches_with_partial_activation_checkpoints": None,
    "gradient_accumulation_fusion": False,  # True only where Apex's fused kernel imports
    "async_tensor_model_parallel_allreduce": False,
    "use_te_rng_tracker": False,
    "tp_comm_overlap": False,
    "tp_comm_bulk_wgrad": True,
    "tp_comm_bulk_dgrad": True,
    "tp_comm_overlap_ag": True,
    "tp_comm_overlap_rs": True,
    "tp_comm_overlap_rs_dgrad": False,
    "tp_comm_split_ag": True,
    "tp_comm_atomic_ag": False,
    "tp_comm_split_rs": True,
    "tp_comm_atomic_rs": False,
    "cross_entropy_loss_fusion": True,
    "cross_entropy_fusion_impl": "native",
    "tp_comm_overlap_disable_qkv": False,
    "tp_comm_overlap_disable_fc1": False,
    "tp_comm_bootstrap_backend": "nccl",
    "overlap_moe_expert_parallel_comm": False,
    "delay_wgrad_compute": False,
    "pipeline_dtype": None,
    "variable_seq_lengths": False,
    "overlap_p2p_comm": False,
    "batch_p2p_comm": True,
    "batch_p2p_sync": True,
    "use_ring_exchange_p2p": False,
    "deallocate_pipeline_outputs": True,
    "defer_embedding_wgrad_compute": False,
    "wgrad_deferral_limit": 0,
    "overlap_p2p_comm_warmup_flush": False,
    "microbatch_group_size_per_vp_stage": None,
    "cpu_offloading": False,
    "cpu_offloading_num_layers": 0,
    "_cpu_offloading_context": None,
    "cpu_offloading_activations": True,
    "cpu_offloading_weights": True,
    "cpu_offloading_double_buffering": False,
    "barrier_with_L1_time": True,
    # megatron/core/transformer/transformer_config.py TransformerConfig
    "num_layers": 0,
    "mtp_num_layers": None,
    "mtp_loss_scaling_factor": None,
    "num_layers_in_first_pipeline_stage": None,
    "num_layers_in_last_pipeline_stage": None,
    "pipeline_model_parallel_layout": None,
    "account_for_embedding_in_pipeline_split": False,
    "account_for_loss_in_pipeline_split": False,
    "hidden_size": 0,
    "num_attention_heads": 0,
    "attention_backend": ATTN_BACKEND_AUTO,
    "softmax_scale": None,
    "num_query_groups": None,
    "ffn_hidden_size": None,
    "kv_channels": None,
    "hidden_dropout": 0.1,
    "attention_dropout": 0.1,
    "fp32_residual_connection": False,
    "apply_residual_connection_post_layernorm": False,
    "layernorm_epsilon": 1e-05,
    "layernorm_zero_centered_gamma": False,
    "add_bias_linear": True,
    "add_qkv_bias": False,
    "gated_linear_unit": False,
    "activation_func": GELU,
    "activation_func_fp8_input_store": False,
    "num_moe_experts": None,
    "rotary_interleaved": False,
    "window_size": None,
    "normalization": "LayerNorm",
    "qk_layernorm": False,
    "test_mode": False,
    "calculate_per_token_loss": False,
    "multi_latent_attention": False,
    "no_rope_freq": None,
    "moe_deepep_num_sms": 20,
    "init_method": None,
    "output_layer_init_method": None,
    "init_method_std": 0.02,
    "embedding_init_method": None,
    "embedding_init_method_std": None,
    "init_model_with_meta_device": False,
    "apply_query_key_layer_scaling": False,
    "attention_softmax_in_fp32": False,
    "disable_bf16_reduced_precision_matmul": False,
    "bias_activation_fusion": False,
    "masked_softmax_fusion": True,  # GPTConfig re-defaults it
    "persist_layer_norm": False,
    "memory_efficient_layer_norm": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "use_fused_weighted_squared_relu": False,
    "recompute_granularity": None,
    "recompute_method": None,
    "recompute_num_layers": None,
    "distribute_saved_activations": None,
    "recompute_modules": None,
    "fp8": None,
    "fp8_recipe": "delayed",
    "fp8_param": False,
    "fp8_margin": 0,
    "fp8_interval": 1,
    "fp8_amax_history_len": 1,
    "fp8_amax_compute_algo": "most_recent",
    "fp8_wgrad": True,
    "fp8_dot_product_attention": False,
    "fp8_multi_head_attention": False,
    "tp_only_amax_red": False,
    "first_last_layers_bf16": False,
    "num_layers_at_start_in_bf16": 1,
    "num_layers_at_end_in_bf16": 1,
    "use_kitchen": False,
    "moe_shared_expert_intermediate_size": None,
    "moe_shared_expert_overlap": False,
    "moe_layer_freq": 1,
    "moe_ffn_hidden_size": None,
    "moe_router_load_balancing_type": "aux_loss",
    "moe_router_topk": 2,
    "moe_router_topk_limited_devices": None,
    "moe_router_padding_for_fp8": False,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "moe_router_pre_softmax": False,
    "moe_router_topk_scaling_factor": None,
    "moe_router_score_function": "softmax",
    "moe_router_dtype": None,
    "moe_router_enable_expert_bias": False,
    "moe_router_bias_update_rate": 0.001,
    "moe_router_force_load_balancing": False,
    "moe_grouped_gemm": False,
    "moe_use_legacy_grouped_gemm": False,
    "moe_aux_loss_coeff": 0.0,
    "moe_z_loss_coeff": None,
    "moe_input_jitter_eps": None,
    "moe_token_dropping": False,
    "moe_token_dispatcher_type": "allgather",
    "moe_enable_deepep": False,
    "moe_per_layer_logging": False,
    "moe_expert_capacity_factor": None,
    "moe_pad_expert_input_to_capacity": False,
    "moe_token_drop_policy": "probs",
    "moe_layer_recompute": False,
    "moe_permute_fusion": False,
    "moe_router_fusion": False,
    "moe_apply_probs_on_input": False,
    "cp_comm_type": None,
    "enable_cuda_graph": False,
    "cuda_graph_use_single_mempool": False,
    "cuda_graph_retain_backward_graph": False,
    "cuda_graph_warmup_steps": 3,
    "external_cuda_graph": False,
    "cuda_graph_scope": "full",
    "clone_scatter_output_in_embedding": True,
    "disable_parameter_transpose_cache": False,
    "config_logger_dir": "",
    "flash_decode": False,
    "inference_rng_tracker": False,
    "symmetric_ar_type": None,
    "mrope_section": None,
    "is_hybrid_model": False,
    "mamba_state_dim": 128,
    "mamba_head_dim": 64,
    "mamba_num_groups": 8,
    "mamba_num_heads": None,
    "use_mamba_mem_eff_path": True,
    "mlp_chunks_for_prefill": 1,
    "heterogeneous_block_specs": False,
    "hetereogenous_dist_checkpoint": False,
    "quant_recipe": None,
    "transformer_impl": "transformer_engine",
    # nemo/collections/llm/gpt/model/base.py GPTConfig
    "fp16_lm_cross_entropy": False,
    "parallel_output": True,
    "share_embeddings_and_output_weights": True,
    "make_vocab_size_divisible_by": 128,
    "position_embedding_type": "learned_absolute",
    "rotary_base": 10000,
    "rotary_percent": 1.0,
    "seq_len_interpolation_factor": None,
    "seq_length": 1024,
    "scatter_embedding_sequence_parallel": True,
    "use_transformer_engine_full_layer_spec": False,
    "transformer_layer_spec": DEFAULT_LAYER_SPEC,
    "forward_step_fn": GPT_FORWARD_STEP,
    "data_step_fn": GPT_DATA_STEP,
    "generation_config": None,
    "vocab_size": None,
    "tp_comm_overlap_cfg": None,
})


@dataclass(frozen=True)
class ConfigClass:
    """One NeMo config class: its parent and the fields it re-defaults or adds (in its own order)."""

    target: str
    model_target: str  # the NeMo model class its family's HF importer pairs it with
    parent: str | None
    overrides: Mapping[str, object]


_GPT = "nemo.collections.llm.gpt.model"
_MODEL = {"llama": "LlamaModel", "mistral": "MistralModel", "qwen2": "Qwen2Model", "mixtral": "MixtralModel"}


def _c(family: str, name: str, parent: str, **overrides: object) -> ConfigClass:
    parent_target = f"{_GPT}.base.GPTConfig" if parent == "GPTConfig" else f"{_GPT}.{family}.{parent}"
    return ConfigClass(f"{_GPT}.{family}.{name}", f"{_GPT}.{family}.{_MODEL[family]}", parent_target,
                       MappingProxyType(overrides))


_CLASSES = (
    ConfigClass(f"{_GPT}.base.GPTConfig", f"{_GPT}.base.GPTModel", None, GPT_CONFIG_FIELDS),
    # nemo/collections/llm/gpt/model/llama.py
    _c("llama", "LlamaConfig", "GPTConfig",
        normalization="RMSNorm", activation_func=SILU, gated_linear_unit=True,
        position_embedding_type="rope", add_bias_linear=False, seq_length=4096, attention_dropout=0.0,
        hidden_dropout=0.0, share_embeddings_and_output_weights=False, bias_activation_fusion=True,
        masked_softmax_fusion=True, persist_layer_norm=True, bias_dropout_fusion=True,
        apply_rope_fusion=True, use_transformer_engine_op_fuser=None),
    _c("llama", "Llama2Config7B", "LlamaConfig",
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32, ffn_hidden_size=11008),
    _c("llama", "Llama2Config13B", "LlamaConfig",
        num_layers=40, hidden_size=5120, num_attention_heads=40, num_query_groups=40, ffn_hidden_size=13824),
    _c("llama", "Llama2Config70B", "LlamaConfig",
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8, ffn_hidden_size=28672),
    _c("llama", "Llama3Config", "LlamaConfig",
        num_query_groups=8, hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
        init_method_std=0.01, layernorm_epsilon=1e-05, add_bias_linear=False, activation_func=SILU,
        gated_linear_unit=True, bias_activation_fusion=True, masked_softmax_fusion=True,
        persist_layer_norm=True, bias_dropout_fusion=True, apply_rope_fusion=True,
        share_embeddings_and_output_weights=False, position_embedding_type="rope", rotary_percent=1.0),
    _c("llama", "Llama31Config", "Llama3Config",
        scale_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192,
        init_method_std=0.02),
    _c("llama", "Llama3Config8B", "Llama3Config",
        rotary_base=500000, seq_length=8192, num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
        num_attention_heads=32),
    _c("llama", "Llama3Config70B", "Llama3Config",
        rotary_base=500000, seq_length=8192, num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
        num_attention_heads=64, init_method_std=0.008944, make_vocab_size_divisible_by=128),
    _c("llama", "Llama31Config8B", "Llama31Config",
        rotary_base=500000, seq_length=131072, num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
        num_attention_heads=32),
    _c("llama", "Llama31Config70B", "Llama31Config",
        rotary_base=500000, seq_length=131072, num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
        num_attention_heads=64, make_vocab_size_divisible_by=128),
    _c("llama", "Llama31Config405B", "Llama31Config",
        rotary_base=500000, seq_length=131072, num_layers=126, hidden_size=16384, ffn_hidden_size=53248,
        num_attention_heads=128, make_vocab_size_divisible_by=128),
    _c("llama", "Llama32Config1B", "Llama31Config",
        scale_factor=32.0, share_embeddings_and_output_weights=True, rotary_base=500000, seq_length=131072,
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
        make_vocab_size_divisible_by=128),
    _c("llama", "Llama32Config3B", "Llama31Config",
        scale_factor=32, share_embeddings_and_output_weights=True, rotary_base=500000, seq_length=131072,
        num_layers=28, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24, num_query_groups=8,
        make_vocab_size_divisible_by=128),
    _c("llama", "CodeLlamaConfig7B", "Llama2Config7B", rotary_base=1000000, seq_length=16384),
    _c("llama", "CodeLlamaConfig13B", "Llama2Config13B", rotary_base=1000000, seq_length=16384),
    _c("llama", "CodeLlamaConfig34B", "LlamaConfig",
        num_layers=48, hidden_size=8192, num_attention_heads=64, num_query_groups=8, ffn_hidden_size=22016,
        rotary_base=1000000, seq_length=16384),
    _c("llama", "CodeLlamaConfig70B", "Llama2Config70B"),
    # nemo/collections/llm/gpt/model/mistral.py
    _c("mistral", "MistralConfig7B", "GPTConfig",
        normalization="RMSNorm", activation_func=SILU, position_embedding_type="rope", add_bias_linear=False,
        gated_linear_unit=True, num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, seq_length=32768, attention_dropout=0.0, hidden_dropout=0.0,
        share_embeddings_and_output_weights=False, init_method_std=0.02, layernorm_epsilon=1e-05,
        window_size=(4096, 0), cp_comm_type="a2a", params_dtype=BF16),
    _c("mistral", "MistralNeMoConfig12B", "MistralConfig7B",
        num_layers=40, hidden_size=5120, kv_channels=128, seq_length=4096, window_size=None,
        cp_comm_type=None, rotary_percent=1.0, rotary_base=1000000.0, params_dtype=BF16),
    _c("mistral", "MistralNeMoConfig123B", "MistralConfig7B",
        num_layers=88, hidden_size=12288, ffn_hidden_size=28672, num_attention_heads=96, kv_channels=128,
        seq_length=4096, window_size=None, cp_comm_type=None, rotary_percent=1.0, rotary_base=1000000.0,
        params_dtype=BF16),
    # nemo/collections/llm/gpt/model/qwen2.py
    _c("qwen2", "Qwen2Config", "GPTConfig",
        normalization="RMSNorm", activation_func=SILU, gated_linear_unit=True, add_bias_linear=False,
        add_qkv_bias=True, seq_length=4096, init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0,
        vocab_size=151936, share_embeddings_and_output_weights=False, layernorm_epsilon=1e-06,
        rotary_base=1000000.0, position_embedding_type="rope"),
    _c("qwen2", "Qwen2Config500M", "Qwen2Config",
        num_layers=24, hidden_size=896, num_attention_heads=14, num_query_groups=2, ffn_hidden_size=4864),
    _c("qwen2", "Qwen25Config500M", "Qwen2Config500M", seq_length=32768),
    _c("qwen2", "Qwen2Config1P5B", "Qwen2Config",
        num_layers=28, hidden_size=1536, num_attention_heads=12, num_query_groups=2, ffn_hidden_size=8960),
    _c("qwen2", "Qwen25Config1P5B", "Qwen2Config1P5B", seq_length=131072),
    _c("qwen2", "Qwen25Config3B", "Qwen2Config",
        num_layers=36, hidden_size=2048, num_attention_heads=16, num_query_groups=2, ffn_hidden_size=11008,
        vocab_size=151936, share_embeddings_and_output_weights=True),
    _c("qwen2", "Qwen2Config7B", "Qwen2Config",
        num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4, ffn_hidden_size=18944,
        vocab_size=152064),
    _c("qwen2", "Qwen25Config7B", "Qwen2Config7B", seq_length=131072),
    _c("qwen2", "Qwen25Config14B", "Qwen2Config",
        num_layers=48, hidden_size=5120, num_attention_heads=40, num_query_groups=8, ffn_hidden_size=13824,
        vocab_size=152064, layernorm_epsilon=1e-05, seq_length=131072),
    _c("qwen2", "Qwen25Config32B", "Qwen2Config",
        num_layers=64, hidden_size=5120, num_attention_heads=40, num_query_groups=8, ffn_hidden_size=27648,
        vocab_size=152064, layernorm_epsilon=1e-05, seq_length=131072),
    _c("qwen2", "Qwen2Config72B", "Qwen2Config",
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8, ffn_hidden_size=29568,
        vocab_size=152064, layernorm_epsilon=1e-05),
    _c("qwen2", "Qwen25Config72B", "Qwen2Config72B", seq_length=131072),
    # nemo/collections/llm/gpt/model/mixtral.py
    _c("mixtral", "MixtralConfig", "GPTConfig",
        normalization="RMSNorm", activation_func=SILU, position_embedding_type="rope", add_bias_linear=False,
        gated_linear_unit=True, num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, max_position_embeddings=4096, seq_length=4096, attention_dropout=0.0,
        hidden_dropout=0.0, share_embeddings_and_output_weights=False, num_moe_experts=8,
        moe_aux_loss_coeff=0.01, moe_router_topk=2, moe_router_pre_softmax=False,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        init_method_std=0.02, layernorm_epsilon=1e-05, rotary_percent=1.0, rotary_base=1000000.0, bf16=True,
        params_dtype=BF16, apply_rope_fusion=True, bias_activation_fusion=True, bias_dropout_fusion=True,
        masked_softmax_fusion=False),
    _c("mixtral", "MixtralConfig8x3B", "MixtralConfig",
        num_layers=32, hidden_size=2560, num_attention_heads=32, ffn_hidden_size=8960,
        max_position_embeddings=4096, seq_length=4096),
    _c("mixtral", "MixtralConfig8x7B", "MixtralConfig",
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, max_position_embeddings=4096,
        seq_length=4096),
    _c("mixtral", "MixtralConfig8x22B", "MixtralConfig",
        num_layers=56, hidden_size=6144, num_attention_heads=48, ffn_hidden_size=16384,
        max_position_embeddings=4096, seq_length=4096),
)
_REGISTRY: dict[str, ConfigClass] = {c.target: c for c in _CLASSES}
CONFIG_CLASSES: Mapping[str, ConfigClass] = MappingProxyType(_REGISTRY)  # a live view of _REGISTRY


def config_fields(target: str) -> dict[str, object]:
    """All fields of config class `target` with their defaults, in constructor order (KeyError if unknown)."""
    cls = CONFIG_CLASSES[target]
    # dict update keeps a re-defaulted key in place and appends new ones: the dataclass field order.
    return {**(config_fields(cls.parent) if cls.parent else {}), **cls.overrides}


def is_config_subclass(target: str, base: str) -> bool:
    """Whether config class `target` is `base` or derives from it (NeMo's exporters use isinstance)."""
    while target in CONFIG_CLASSES:
        if target == base:
            return True
        target = CONFIG_CLASSES[target].parent or ""
    return False


# Model constructor arguments besides config/optim/tokenizer, with defaults (model.yaml lists them).
_MODEL_INIT: dict[str, Mapping[str, object]] = ({
    f"{_GPT}.base.GPTModel": {"model_transform": None, "model_context_managers": ()},
    f"{_GPT}.llama.LlamaModel": {"model_transform": None, "model_context_managers": ()},
    f"{_GPT}.mistral.MistralModel": {"model_transform": None},
    f"{_GPT}.qwen2.Qwen2Model": {"model_transform": None},
    f"{_GPT}.mixtral.MixtralModel": {"model_transform": None},
})
MODEL_INIT_DEFAULTS: Mapping[str, Mapping[str, object]] = MappingProxyType(_MODEL_INIT)


def register_config_class(cls: ConfigClass, model_init_defaults: Mapping[str, object] | None = None) -> None:
    """Add a config class (and its model's extra constructor defaults) from an architecture module.

    Families NVIDIA defines (Gemma, Phi-3) and those hfnemo defines (Falcon, GPT-NeoX, Phi-2; see
    docs/formats.md) register their tables when their arch module is imported."""
    _REGISTRY[cls.target] = cls
    if model_init_defaults is not None:
        _MODEL_INIT[cls.model_target] = MappingProxyType(dict(model_init_defaults))


# What MegatronStrategy copies into the model config for a 1-device CPU import
# (nemo/lightning/_strategy_lib.py set_model_parallel_attributes, ParallelismConfig fields that
# TransformerConfig also has). io.json lists them as explicit arguments of the config.
STRATEGY_CONFIG_ARGS: tuple[tuple[str, object], ...] = (
    ("tensor_model_parallel_size", 1),
    ("pipeline_model_parallel_comm_backend", None),
    ("pipeline_model_parallel_size", 1),
    ("virtual_pipeline_model_parallel_size", None),
    ("sequence_parallel", False),
    ("context_parallel_size", 1),
    ("expert_model_parallel_size", 1),
    ("expert_tensor_parallel_size", None),
    ("moe_extended_tp", False),
    ("use_te_rng_tracker", False),
    ("pipeline_dtype", None),
    ("microbatch_group_size_per_vp_stage", 1),
    ("num_layers_in_first_pipeline_stage", None),
    ("num_layers_in_last_pipeline_stage", None),
    ("pipeline_model_parallel_layout", None),
    ("account_for_embedding_in_pipeline_split", False),
    ("account_for_loss_in_pipeline_split", False),
)

# GPTModel's default optimizer, OptimizerConfig(lr=1e-4, use_distributed_optimizer=True) (base.py),
# as io.json records it: every megatron.core.optimizer.optimizer_config.OptimizerConfig field, in order.
OPTIMIZER_CONFIG_ARGS: tuple[tuple[str, object], ...] = (
    ("optimizer", "adam"),
    ("lr", 0.0001),
    ("min_lr", None),
    ("decoupled_lr", None),
    ("decoupled_min_lr", None),
    ("weight_decay", 0.01),
    ("fp8_recipe", None),
    ("fp16", False),
    ("bf16", False),
    ("reuse_grad_buf_for_mxfp8_param_ag", False),
    ("params_dtype", FP32),
    ("use_precision_aware_optimizer", False),
    ("store_param_remainders", True),
    ("main_grads_dtype", FP32),
    ("main_params_dtype", FP32),
    ("exp_avg_dtype", FP32),
    ("exp_avg_sq_dtype", FP32),
    ("loss_scale", None),
    ("initial_loss_scale", 4294967296),
    ("min_loss_scale", 1.0),
    ("loss_scale_window", 1000),
    ("hysteresis", 2),
    ("adam_beta1", 0.9),
    ("adam_beta2", 0.999),
    ("adam_eps", 1e-08),
    ("sgd_momentum", 0.9),
    ("use_distributed_optimizer", True),
    ("overlap_param_gather", False),
    ("overlap_param_gather_with_optimizer_step", False),
    ("use_megatron_fsdp", False),
    ("optimizer_cpu_offload", False),
    ("optimizer_offload_fraction", 0.0),
    ("use_torch_optimizer_for_cpu_offload", False),
    ("overlap_cpu_optimizer_d2h_h2d", False),
    ("pin_cpu_grads", True),
    ("pin_cpu_params", True),
    ("clip_grad", 1.0),
    ("log_num_zeros_in_grad", False),
    ("barrier_with_L1_time", False),
    ("timers", None),
    ("config_logger_dir", ""),
)
# nemo.lightning.pytorch.optim.megatron.MegatronOptimizerModule arguments besides `config`.
OPTIMIZER_MODULE_DEFAULTS: Mapping[str, object] = MappingProxyType(
    {"lr_scheduler": None, "no_weight_decay_cond": None, "scale_lr_cond": None, "lr_mult": 1.0})

# nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer fields, constructor order.
TOKENIZER_FIELDS: Mapping[str, object] = MappingProxyType({
    "pretrained_model_name": None,  # required; importers pass it
    "vocab_file": None,
    "merges_file": None,
    "mask_token": None,
    "bos_token": None,
    "eos_token": None,
    "pad_token": None,
    "sep_token": None,
    "cls_token": None,
    "unk_token": None,
    "additional_special_tokens": (),
    "use_fast": True,
    "trust_remote_code": False,
    "include_special_tokens": False,
    "chat_template": None,
})
