"""Which LinearMethod a layer gets under a quantization scheme, and whether the device can run it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from carpool.layers.linear_method import LinearMethod
from carpool.layers.moe.experts import ExpertsMethod
from carpool.quantization.config import Fp8Scheme, KVCacheScheme, QuantScheme, is_ignored
from carpool.quantization.methods import Fp8LinearMethod, Int4WeightOnlyLinearMethod
from carpool.quantization.moe_methods import Fp8ExpertsMethod, Int4ExpertsMethod

FP8_MIN_CAPABILITY = (8, 9)  # e4m3 tensor-core products and conversions: Ada and Hopper or newer


def checkpoint_module_names(prefix: str, packed_modules: Mapping[str, tuple[str, Any]]) -> tuple[str, ...]:
    """The checkpoint modules a carpool layer holds: "model.layers.0.self_attn.qkv_proj" holds q_proj,
    k_proj and v_proj by the model's packed_modules_mapping (checkpoint part -> (our part, shard))."""
    head, _, last = prefix.rpartition(".")
    parts = [ckpt for ckpt, (ours, _) in packed_modules.items() if ours == last]
    return tuple(f"{head}.{p}" if head else p for p in parts) or (prefix,)


def quantized_linear_method(scheme: QuantScheme | None, prefix: str, kernel_backend: str,
                            packed_modules: Mapping[str, tuple[str, Any]] | None = None,
                            fused_gemv_silu: bool = False, fused_act_quant: bool = False) -> LinearMethod | None:
    """The method of the linear layer named `prefix`, or None where it runs unquantized (no scheme, or
    the checkpoint's ignore list names it). fused_gemv_silu, fused_act_quant: KernelConfig's (the GEMV
    with SiLU-and-mul for merged gate/up layers; FP8 activations written by the op before the layer)."""
    if scheme is None:
        return None
    if is_ignored(scheme, prefix, checkpoint_module_names(prefix, packed_modules or {})):
        return None
    if isinstance(scheme, Fp8Scheme):
        return Fp8LinearMethod(scheme, kernel_backend, fused_gemv_silu, fused_act_quant)
    return Int4WeightOnlyLinearMethod(scheme, kernel_backend, fused_gemv_silu)


def quantized_experts_method(scheme: QuantScheme | None, prefix: str, num_experts: int,
                             checkpoint_expert_names: tuple[str, ...]) -> ExpertsMethod | None:
    """The method of the routed experts named `prefix` ("model.layers.0.mlp.experts"), or None where they
    run unquantized. The checkpoint modules are `{prefix}.{e}.{name}` for each expert e and projection
    name; an ignore list must name all of them or none."""
    if scheme is None:
        return None
    modules = tuple(f"{prefix}.{e}.{name}" for e in range(num_experts) for name in checkpoint_expert_names)
    if is_ignored(scheme, prefix, modules):
        return None
    if isinstance(scheme, Fp8Scheme):
        return Fp8ExpertsMethod(scheme)
    return Int4ExpertsMethod(scheme)


def check_device_support(scheme: QuantScheme | None, kv_cache: KVCacheScheme, kernel_backend: str,
                         device: torch.device | str) -> None:
    """Refuse, before loading, a quantization the device's kernels cannot run: FP8 Triton kernels (weights
    or KV cache) need compute capability 8.9 or newer. The torch backend (and the CPU) runs everything."""
    device = torch.device(device)
    if kernel_backend != "triton" or device.type != "cuda":
        return
    fp8 = isinstance(scheme, Fp8Scheme) or kv_cache.is_fp8
    capability = torch.cuda.get_device_capability(device)
    if fp8 and capability < FP8_MIN_CAPABILITY:
        what = "quantization fp8" if isinstance(scheme, Fp8Scheme) else "kv_cache_dtype fp8"
        raise ValueError(f"{what}: FP8 kernels need a GPU of compute capability 8.9 or newer; this one is "
                         f"{capability[0]}.{capability[1]} (use --kernel-backend torch to run it dequantized)")
