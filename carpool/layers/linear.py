"""Linear layers that know how to load their own shard (Megatron-style tensor parallelism).

Column-parallel layers split the output dimension across ranks and need no communication; row-parallel
layers split the input dimension and return their partial sums, which the caller reduces (see
distributed/communicator.py). Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that
takes the checkpoint tensor (or a lazy safetensors slice) and copies in only this rank's part, so each
rank reads only its slice from disk.

How the weights are stored and multiplied is the layer's `method` (layers/linear_method.py), chosen when
the model is built: the layer decides which slice, the method decides the format and the kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from carpool.distributed import SINGLE_RANK, Communicator, PartialSums
from carpool.layers.linear_method import LinearMethod, QuantizedActivation, UnquantizedLinearMethod, set_weight_loader

if TYPE_CHECKING:
    from carpool.ops.triton.quant_gemm import Fp8ActivationPlan


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


class LinearBase(nn.Module):
    """y = x W^T (+ b) for this rank's part of W, computed by `method`."""

    weight: nn.Parameter  # (for the unquantized method; other methods register their own parameters)

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 method: LinearMethod | None) -> None:
        super().__init__()
        self.input_size = in_features
        self.output_size = out_features
        self.method = method or UnquantizedLinearMethod()
        self.method.create_weights(self, in_features, out_features, dtype)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)  # type: ignore[arg-type]

    def input_quantization(self, num_tokens: int, dtype: torch.dtype) -> Fp8ActivationPlan | None:
        """The method's plan for quantizing an input of num_tokens rows (LinearMethod.input_quantization)."""
        return self.method.input_quantization(self, num_tokens, dtype)


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's rows (outputs) split across ranks; each rank keeps its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, comm: Communicator = SINGLE_RANK,
                 method: LinearMethod | None = None) -> None:
        if out_features % comm.size:
            raise ValueError(f"output size {out_features} does not divide by tensor_parallel_size={comm.size}")
        self.tp_rank, self.tp_size = comm.rank, comm.size
        super().__init__(in_features, out_features // comm.size, bias, dtype, method)
        if self.bias is not None:
            set_weight_loader(self.bias, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        size = param.shape[0]
        param.data.copy_(load_narrow(loaded, 0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up): checkpoint shard k goes to rows
    [sum(sizes[:k]), sum(sizes[:k+1])) of this rank's slice."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, comm: Communicator = SINGLE_RANK,
                 method: LinearMethod | None = None) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype, comm, method)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        assert isinstance(shard_id, int)
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(load_narrow(loaded, 0, self.tp_rank * size, size))

    def silu_and_mul(self, x: torch.Tensor | QuantizedActivation, silu_and_mul: Any,
                     fp8_plan: Fp8ActivationPlan | None = None) -> torch.Tensor | QuantizedActivation:
        """silu(gate) * up of this [gate, up] projection: one kernel when the method has one for x (a
        batch-1 GPU step), else the projection then `silu_and_mul` (a SiluAndMul: with fp8_plan, the next
        layer's input quantization, it may return the result quantized so)."""
        if (isinstance(x, torch.Tensor) and self.bias is None and len(self.output_sizes) == 2
                and self.output_sizes[0] == self.output_sizes[1]):
            fused = self.method.apply_silu_and_mul(self, x)
            if fused is not None:
                return fused
        return silu_and_mul(self(x)) if fp8_plan is None else silu_and_mul(self(x), fp8_plan)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. Heads are split across ranks; when there are fewer KV heads
    than ranks, each KV head is replicated on the ranks that share it."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32, comm: Communicator = SINGLE_RANK,
                 method: LinearMethod | None = None) -> None:
        if num_heads % comm.size:
            raise ValueError(f"num_attention_heads={num_heads} does not divide by "
                             f"tensor_parallel_size={comm.size}")
        if num_kv_heads % comm.size and comm.size % num_kv_heads:
            raise ValueError(f"num_key_value_heads={num_kv_heads} and tensor_parallel_size={comm.size}: "
                             "one must divide the other")
        self.head_dim = head_dim
        self.num_heads = num_heads // comm.size
        self.num_kv_heads = max(1, num_kv_heads // comm.size)
        self.kv_replicas = max(1, comm.size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * comm.size
        super().__init__(hidden_size, out, bias, dtype, comm, method)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp_rank * q_size
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, (self.tp_rank // self.kv_replicas) * kv_size
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        param.data.narrow(0, offset, size).copy_(load_narrow(loaded, 0, start, size))

    def rope_and_store_kv(self, x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
                          ) -> torch.Tensor | None:
        """This projection, RoPE on q and k, and k and v written to the cache, in one kernel when the
        method has one for x (a batch-1 GPU step): returns q [1, heads, head_dim]; None otherwise."""
        return self.method.apply_rope_and_store_kv(self, x, positions, cos_sin_cache, k_cache, v_cache,
                                                   slot_mapping, self.num_heads, self.num_kv_heads)


class RowParallelLinear(LinearBase):
    """y = x W^T with W's columns (inputs) split across ranks: each rank computes partial sums
    (`PartialSums`), which the caller reduces (the next norm, through the communicator). With a bias the
    layer reduces itself (the bias is added once, after the reduction)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, comm: Communicator = SINGLE_RANK,
                 method: LinearMethod | None = None) -> None:
        if in_features % comm.size:
            raise ValueError(f"input size {in_features} does not divide by tensor_parallel_size={comm.size}")
        self.comm = comm
        self.tp_rank = comm.rank
        super().__init__(in_features // comm.size, out_features, bias, dtype, method)
        if self.bias is not None:
            set_weight_loader(self.bias, default_weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        size = param.shape[1]
        param.data.copy_(load_narrow(loaded, 1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor | QuantizedActivation) -> PartialSums:  # type: ignore[override]
        if self.bias is None:
            if isinstance(x, torch.Tensor):
                pushed = self.comm.push_gemv(x, self.method.dense_weight(self))  # batch-1 TP steps
                if pushed is not None:
                    return pushed
            return PartialSums(self.method.apply(self, x, None))  # type: ignore[arg-type]
        y = self.comm.all_reduce(self.method.apply(self, x, None))
        return PartialSums(y + self.bias, reduced=True)
