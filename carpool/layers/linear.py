"""Linear layers that know how to load their own shard (Megatron-style tensor parallelism).

Column-parallel layers split the output dimension across ranks and need no communication; row-parallel
layers split the input dimension and all-reduce their partial sums. Each parameter carries a
`weight_loader(param, loaded, shard_id=None)` that takes the checkpoint tensor (or a lazy safetensors
slice) and copies in only this rank's part, so each rank reads only its slice from disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from carpool.distributed import SINGLE, TPGroup


def load_narrow(loaded: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """`loaded[start:start+length]` along `dim`, for a tensor or a lazy safetensors slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + length)
    return loaded[tuple(index)]


def load_full(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def loaded_shape(loaded: Any) -> list[int]:
    return list(loaded.shape) if isinstance(loaded, torch.Tensor) else list(loaded.get_shape())


def default_weight_loader(param: nn.Parameter, loaded: Any) -> None:
    tensor = load_full(loaded)
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.copy_(tensor)


def _set_loader(param: nn.Parameter, loader: Any) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class LinearBase(nn.Module):
    # The kernel backend's matrix-vector product, if it has one (see ModelRunner): inputs of one row (a
    # batch-1 decode step) go to it, everything else to cuBLAS / the CPU matmul.
    gemv: Callable[..., torch.Tensor] | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.gemv is not None and x.dim() == 2 and x.shape[0] == 1:
            return self.gemv(x, self.weight, bias)
        return nn.functional.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        _set_loader(self.weight, default_weight_loader)
        if self.bias is not None:
            _set_loader(self.bias, default_weight_loader)


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's rows (outputs) split across ranks; each rank keeps its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: TPGroup = SINGLE) -> None:
        if out_features % tp.size:
            raise ValueError(f"output size {out_features} does not divide by tensor_parallel_size={tp.size}")
        self.tp = tp
        super().__init__(in_features, out_features // tp.size, bias, dtype)
        _set_loader(self.weight, self.weight_loader)
        if self.bias is not None:
            _set_loader(self.bias, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        size = param.shape[0]
        param.data.copy_(load_narrow(loaded, 0, self.tp.rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up): checkpoint shard k goes to rows
    [sum(sizes[:k]), sum(sizes[:k+1])) of this rank's slice."""

    # The backend's GEMV with SiLU-and-mul on its two outputs (see ModelRunner), for [gate, up] layers
    # on batch-1 steps; the MLP calls it through fused_silu_and_mul.
    gemv_silu_and_mul: Callable[..., torch.Tensor] | None = None

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: TPGroup = SINGLE) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        assert isinstance(shard_id, int)
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        param.data.narrow(0, offset, size).copy_(load_narrow(loaded, 0, self.tp.rank * size, size))

    def fused_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this [gate, up] projection in one kernel when the backend has one for x's
        shape (one row, no bias); None otherwise."""
        if (self.gemv_silu_and_mul is None or self.bias is not None or len(self.output_sizes) != 2
                or self.output_sizes[0] != self.output_sizes[1] or x.dim() != 2 or x.shape[0] != 1):
            return None
        return self.gemv_silu_and_mul(x, self.weight)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. Heads are split across ranks; when there are fewer KV heads
    than ranks, each KV head is replicated on the ranks that share it."""

    # The backend's GEMV with RoPE and the KV-cache store (see ModelRunner), for batch-1 steps of models
    # without a q/k norm; attention layers call it through fused_rope_and_store_kv.
    gemv_rope_and_store_kv: Callable[..., torch.Tensor] | None = None

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32, tp: TPGroup = SINGLE) -> None:
        if num_heads % tp.size:
            raise ValueError(f"num_attention_heads={num_heads} does not divide by "
                             f"tensor_parallel_size={tp.size}")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"num_key_value_heads={num_kv_heads} and tensor_parallel_size={tp.size}: "
                             "one must divide the other")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden_size, out, bias, dtype, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp.rank * q_size
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, (self.tp.rank // self.kv_replicas) * kv_size
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        param.data.narrow(0, offset, size).copy_(load_narrow(loaded, 0, start, size))

    def fused_rope_and_store_kv(self, x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                                k_cache: torch.Tensor, v_cache: torch.Tensor,
                                slot_mapping: torch.Tensor) -> torch.Tensor | None:
        """This projection, RoPE on q and k, and k and v written to the cache, in one kernel when the
        backend has one for x's shape (one row): returns q [1, heads, head_dim]; None otherwise."""
        if self.gemv_rope_and_store_kv is None or x.dim() != 2 or x.shape[0] != 1:
            return None
        return self.gemv_rope_and_store_kv(x, self.weight, self.bias, positions, cos_sin_cache, k_cache, v_cache,
                                           slot_mapping, self.num_heads, self.num_kv_heads)


class RowParallelLinear(LinearBase):
    """y = x W^T with W's columns (inputs) split across ranks; partial sums are all-reduced. The bias is
    added once, after the reduction."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: TPGroup = SINGLE, reduce_results: bool = True) -> None:
        """reduce_results=False: return this rank's partial sums; the caller reduces them (an RMSNorm built
        with the same tp fuses the all-reduce into its residual add). Only without a bias."""
        if in_features % tp.size:
            raise ValueError(f"input size {in_features} does not divide by tensor_parallel_size={tp.size}")
        if bias and not reduce_results:
            raise ValueError("reduce_results=False needs bias=False (the bias is added after the reduction)")
        self.tp = tp
        self.reduce_results = reduce_results
        super().__init__(in_features // tp.size, out_features, bias, dtype)
        _set_loader(self.weight, self.weight_loader)
        if self.bias is not None:
            _set_loader(self.bias, default_weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        size = param.shape[1]
        param.data.copy_(load_narrow(loaded, 1, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce_results and self.gemv is not None:  # batch-1 steps may push to the next norm
            pushed = self.tp.push_gemv(x, self.weight)
            if pushed is not None:
                return pushed
        y = self.matmul(x, None)
        if not self.reduce_results:
            return y
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias
