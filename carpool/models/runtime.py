"""ModelRuntime: how a deployment runs a model, separate from what the model computes.

A model class (models/llama.py) takes a ModelConfig (what it computes: the checkpoint's shape) and a
ModelRuntime (how: which kernels, which attention backend, which tensor-parallel communicator, which
linear method per layer). The same classes serve inference with the Triton fast paths, the CPU reference
path, and training (`ModelRuntime.for_training()`: plain PyTorch ops that autograd differentiates, dense
causal attention, no KV cache and no fast-path state).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from carpool.attention.backend import AttentionBackend, get_attention_backend
from carpool.attention.dense import DenseCausalAttentionBackend
from carpool.config import KernelConfig
from carpool.distributed import SINGLE_RANK, Communicator
from carpool.layers.linear_method import LinearMethod, UnquantizedLinearMethod
from carpool.layers.moe.experts import ExpertsMethod
from carpool.ops import KernelOps, get_kernel_ops
from carpool.quantization.config import KVCacheScheme, QuantScheme


@dataclass(frozen=True)
class ModelRuntime:
    ops: KernelOps
    attention: AttentionBackend
    comm: Communicator = field(default=SINGLE_RANK)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    # Quantized weights (quantization/config.py): None = the checkpoint's dtype. `packed_modules` is the
    # model class's packed_modules_mapping, which names the checkpoint modules a merged layer holds (for
    # a checkpoint's list of modules left unquantized).
    quantization: QuantScheme | None = None
    packed_modules: Mapping[str, tuple[str, Any]] = field(default_factory=dict)
    kv_cache: KVCacheScheme = field(default_factory=KVCacheScheme)
    # Mixture-of-experts layers: each TP rank holds whole experts (E / tp of them) rather than a slice of
    # every expert's intermediate dimension (layers/moe/experts.py); dense layers are split as always.
    expert_parallel: bool = False

    @staticmethod
    def for_inference(kernel_backend: str, comm: Communicator = SINGLE_RANK,
                      kernels: KernelConfig | None = None, quantization: QuantScheme | None = None,
                      packed_modules: Mapping[str, tuple[str, Any]] | None = None,
                      kv_cache: KVCacheScheme | None = None, expert_parallel: bool = False) -> "ModelRuntime":
        kv_cache = kv_cache or KVCacheScheme()
        kernels = kernels or KernelConfig()
        attention = get_attention_backend(kernel_backend, kv_cache, kernels.short_query_decode)
        return ModelRuntime(get_kernel_ops(kernel_backend), attention, comm, kernels, quantization,
                            dict(packed_modules or {}), kv_cache, expert_parallel)

    @staticmethod
    def plain() -> "ModelRuntime":
        """Inference with the torch reference kernels on one rank (the CPU path)."""
        return ModelRuntime.for_inference("torch")

    @staticmethod
    def for_training() -> "ModelRuntime":
        """Plain PyTorch ops (differentiable), causal attention without a KV cache, one TP rank (data
        parallelism, DDP or FSDP, is applied to the model from outside)."""
        return ModelRuntime(get_kernel_ops("torch"), DenseCausalAttentionBackend(), SINGLE_RANK, KernelConfig())

    def linear_method(self, prefix: str) -> LinearMethod:
        """The method of the linear layer named `prefix` (e.g. "model.layers.0.mlp.down_proj"): the
        quantization scheme's, unless it leaves the layer unquantized."""
        from carpool.quantization.factory import quantized_linear_method

        method = quantized_linear_method(self.quantization, prefix, self.ops.name, self.packed_modules,
                                         self.kernels.fused_gemv_silu, self.kernels.fused_act_quant)
        return method if method is not None else self.unquantized_linear_method()

    def unquantized_linear_method(self) -> LinearMethod:
        """A model-dtype weight whatever the quantization (mixture-of-experts routers), with the batch-1
        GEMV kernels of this runtime (and the multi-row ones when KernelConfig.small_batch_gemv)."""
        ops, kernels = self.ops, self.kernels
        rows = kernels.small_batch_gemv
        return UnquantizedLinearMethod(
            gemv=ops.gemv,
            gemv_silu_and_mul=ops.gemv_silu_and_mul if kernels.fused_gemv_silu else None,
            gemv_rope_and_store_kv=ops.gemv_rope_and_store_kv if kernels.fused_qkv_rope else None,
            gemv_rows=ops.gemv_rows if rows else None,
            gemv_rows_silu_and_mul=ops.gemv_rows_silu_and_mul if rows and kernels.fused_gemv_silu else None)

    def experts_method(self, prefix: str, num_experts: int, checkpoint_expert_names: tuple[str, ...]
                       ) -> ExpertsMethod | None:
        """The method of the routed experts named `prefix` (None: model-dtype stacks)."""
        from carpool.quantization.factory import quantized_experts_method

        return quantized_experts_method(self.quantization, prefix, num_experts, checkpoint_expert_names)

    def lm_head_gemv(self):  # type: ignore[no-untyped-def]
        """The GEMV for one-row LM heads, or None (plain matmul)."""
        return self.ops.gemv if self.kernels.lm_head_gemv else None
