"""How a linear layer stores its weights and computes with them: the seam quantization plugs into.

A linear layer (layers/linear.py) decides *what* it computes (which slice of which matrix, under tensor
parallelism); its `LinearMethod`, chosen when the model is built, decides *how*: which parameters hold
the weights (a bf16 matrix today; FP8 or packed int4 with scales tomorrow) and which kernel multiplies.
A new weight format is a new LinearMethod, never a branch inside the layers.

Invariant: `apply(layer, x, bias)` equals `x @ W.T + bias` for the layer's logical (dequantized) W, for
any number of rows; the optional fused entry points return None whenever they do not take the input,
and the caller then composes the plain ops, so every fast path has an exact slow twin.

A method that quantizes its input (FP8 W8A8) may say how, before the input exists
(`input_quantization`): the op producing the input (RMSNorm, SiLU-and-mul) then hands it a
`QuantizedActivation`, the bytes the method's own quantization would have made, and `apply` takes that
in place of x. Only a method that asked receives one; any method still takes a plain x.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from carpool.layers.linear import LinearBase
    from carpool.ops.triton.quant_gemm import Fp8ActivationPlan


@dataclass(frozen=True)
class QuantizedActivation:
    """A linear layer's input already quantized as its method asked (input_quantization's plan): e4m3
    values [plan.rows, K] (rows past num_tokens are padding), their float32 scales, and the plan."""

    values: torch.Tensor
    scale: torch.Tensor
    num_tokens: int
    plan: "Fp8ActivationPlan"


class LinearMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: "LinearBase", input_size: int, output_size: int, dtype: torch.dtype) -> None:
        """Register this method's parameters on `layer` for an [output_size, input_size] matrix (this
        rank's part). Each gets the layer's `weight_loader`, so checkpoint shards land where the layer's
        tensor-parallel split says."""

    @abstractmethod
    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, input_size] -> x W^T (+ bias) [T, output_size]. A method whose input_quantization returns
        plans also takes a QuantizedActivation as x."""

    def input_quantization(self, layer: "LinearBase", num_tokens: int,
                           dtype: torch.dtype) -> "Fp8ActivationPlan | None":
        """How `apply` would quantize an input of num_tokens rows of dtype, where the op producing it may
        write it so (a QuantizedActivation); None: pass the plain tensor (the default)."""
        return None

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        """Repack or check the loaded parameters (quantized formats); nothing for plain weights."""

    def dense_weight(self, layer: "LinearBase") -> torch.Tensor | None:
        """The layer's weight as one plain [output_size, input_size] matrix when it is stored that way
        (kernels that read it directly, such as the TP push GEMV, need it); None otherwise."""
        return None

    # Fused batch-1 entry points. None: not available for this input.
    def apply_silu_and_mul(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor | None:
        """silu(x @ gate.T) * (x @ up.T) for a merged [gate; up] layer without bias."""
        return None

    def apply_rope_and_store_kv(self, layer: "LinearBase", x: torch.Tensor, positions: torch.Tensor,
                                cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int
                                ) -> torch.Tensor | None:
        """The q/k/v projection, RoPE on q and k and the KV-cache store of k and v; returns q."""
        return None


def set_weight_loader(param: nn.Parameter, loader: Any) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


MAX_GEMV_ROWS = 16  # rows of x up to which gemv_rows takes a step (ops/triton/gemv.py MAX_GEMV_ROWS)


class UnquantizedLinearMethod(LinearMethod):
    """One plain weight matrix in the model dtype. With kernels given (the Triton backend on a GPU),
    one-row inputs (batch-1 decode) take the GEMV, which beats cuBLAS there and launches under PDL; with
    gemv_rows given (KernelConfig.small_batch_gemv), inputs of 2-16 rows (small-batch decode, speculative
    verification) take the multi-row GEMV, and merged gate/up layers its SiLU-and-mul variant."""

    def __init__(self, gemv: Callable[..., torch.Tensor] | None = None,
                 gemv_silu_and_mul: Callable[..., torch.Tensor] | None = None,
                 gemv_rope_and_store_kv: Callable[..., torch.Tensor] | None = None,
                 gemv_rows: Callable[..., torch.Tensor] | None = None,
                 gemv_rows_silu_and_mul: Callable[..., torch.Tensor] | None = None) -> None:
        self.gemv = gemv
        self.gemv_silu_and_mul = gemv_silu_and_mul
        self.gemv_rope_and_store_kv = gemv_rope_and_store_kv
        self.gemv_rows = gemv_rows
        self.gemv_rows_silu_and_mul = gemv_rows_silu_and_mul

    def create_weights(self, layer: "LinearBase", input_size: int, output_size: int, dtype: torch.dtype) -> None:
        layer.weight = set_weight_loader(
            nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False),
            layer.weight_loader)

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.gemv is not None and x.dim() == 2 and x.shape[0] == 1:
            return self.gemv(x, layer.weight, bias)
        if self.gemv_rows is not None and x.dim() == 2 and 2 <= x.shape[0] <= MAX_GEMV_ROWS:
            return self.gemv_rows(x, layer.weight, bias)
        return nn.functional.linear(x, layer.weight, bias)

    def dense_weight(self, layer: "LinearBase") -> torch.Tensor | None:
        return layer.weight

    def apply_silu_and_mul(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor | None:
        if x.dim() != 2:
            return None
        if self.gemv_silu_and_mul is not None and x.shape[0] == 1:
            return self.gemv_silu_and_mul(x, layer.weight)
        if self.gemv_rows_silu_and_mul is not None and 2 <= x.shape[0] <= MAX_GEMV_ROWS:
            return self.gemv_rows_silu_and_mul(x, layer.weight)
        return None

    def apply_rope_and_store_kv(self, layer: "LinearBase", x: torch.Tensor, positions: torch.Tensor,
                                cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int
                                ) -> torch.Tensor | None:
        if self.gemv_rope_and_store_kv is None or x.dim() != 2 or x.shape[0] != 1:
            return None
        return self.gemv_rope_and_store_kv(x, layer.weight, layer.bias, positions, cos_sin_cache, k_cache, v_cache,
                                           slot_mapping, num_heads, num_kv_heads)
