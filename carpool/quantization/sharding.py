"""Where a quantized checkpoint tensor's rank part goes in a linear layer, and how to cut it out.

A plain weight is cut by the layer's own weight_loader (layers/linear.py), along dim 0 (outputs) or 1
(inputs) in single rows and columns. A quantized layer's tensors are cut along the same logical
dimensions, but an entry may stand for several rows or columns (8 per packed int32, G per group scale,
128 per FP8 block scale) and a format may store the output dimension second (AWQ, GPTQ). `ShardSlice`
says which logical rows and columns of one checkpoint tensor this rank holds, and where they land;
`TensorLayout` says how a tensor's dims map onto them; `narrow_checkpoint_tensor` cuts it, reading only
the rank's part of a lazy safetensors slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from carpool.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    load_narrow,
    loaded_shape,
)
from carpool.utils import cdiv


@dataclass(frozen=True)
class ShardSlice:
    """This rank's part of one checkpoint tensor in logical [output, input] coordinates: the tensor's
    output rows [src_row, src_row + rows) land at the layer's rows [dst_row, dst_row + rows); its input
    columns [src_col, src_col + cols) are all of the layer's. full_rows x full_cols: the whole
    checkpoint matrix (all ranks)."""
    dst_row: int
    src_row: int
    rows: int
    src_col: int
    cols: int
    full_rows: int
    full_cols: int


def layer_shards(layer: LinearBase) -> tuple[Any, ...]:
    """The shard ids a layer's checkpoint tensors come in (q/k/v, gate/up; None: one tensor)."""
    if isinstance(layer, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(range(len(layer.output_sizes)))
    return (None,)


def shard_slice(layer: LinearBase, shard_id: Any) -> ShardSlice:
    """The slice the layer's own weight_loader would take for a plain weight with this shard id."""
    if isinstance(layer, QKVParallelLinear):
        q_size, kv_size = layer.num_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
        if shard_id == "q":
            return ShardSlice(0, layer.tp_rank * q_size, q_size, 0, layer.input_size, q_size * layer.tp_size,
                              layer.input_size)
        if shard_id in ("k", "v"):
            full = kv_size * layer.tp_size // layer.kv_replicas
            dst = q_size if shard_id == "k" else q_size + kv_size
            return ShardSlice(dst, (layer.tp_rank // layer.kv_replicas) * kv_size, kv_size, 0, layer.input_size,
                              full, layer.input_size)
        raise ValueError(f"unknown qkv shard {shard_id!r}")
    if isinstance(layer, MergedColumnParallelLinear):
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(layer.output_sizes):
            raise ValueError(f"unknown merged shard {shard_id!r}")
        size = layer.output_sizes[shard_id] // layer.tp_size
        offset = sum(layer.output_sizes[:shard_id]) // layer.tp_size
        return ShardSlice(offset, layer.tp_rank * size, size, 0, layer.input_size, layer.output_sizes[shard_id],
                          layer.input_size)
    if isinstance(layer, ColumnParallelLinear):
        n = layer.output_size
        return ShardSlice(0, layer.tp_rank * n, n, 0, layer.input_size, n * layer.tp_size, layer.input_size)
    if isinstance(layer, RowParallelLinear):
        k = layer.input_size
        return ShardSlice(0, 0, layer.output_size, layer.tp_rank * k, k, layer.output_size, k * layer.comm.size)
    return ShardSlice(0, 0, layer.output_size, 0, layer.input_size, layer.output_size, layer.input_size)


@dataclass(frozen=True)
class TensorLayout:
    """How a checkpoint tensor's dims map onto logical rows and columns: `out_dim` holds outputs, one
    entry per `out_unit` rows (None: the tensor is not split by outputs); `in_dim` likewise for inputs.
    `ceil`: the last entry may cover a partial unit (FP8 block scales)."""
    out_dim: int | None
    out_unit: int
    in_dim: int | None
    in_unit: int
    ceil: bool = False


def _entries(n: int, unit: int, ceil: bool) -> int:
    return cdiv(n, unit) if ceil else n // unit


def narrow_checkpoint_tensor(loaded: Any, layout: TensorLayout, sl: ShardSlice, what: str) -> torch.Tensor:
    """This rank's entries of a checkpoint tensor (a tensor or a lazy safetensors slice). Raises when
    the rank's rows or columns do not fall on whole entries (a tensor-parallel split inside a packed
    word, a group or a block)."""
    t = loaded
    for dim, unit, start, size, full, kind in ((layout.out_dim, layout.out_unit, sl.src_row, sl.rows, sl.full_rows,
                                                "output rows"),
                                               (layout.in_dim, layout.in_unit, sl.src_col, sl.cols, sl.full_cols,
                                                "input columns")):
        if dim is None or (start == 0 and size == full):
            continue
        last = start + size == full
        if start % unit or (size % unit and not (layout.ceil and last)):
            raise ValueError(f"{what}: this rank's {kind} [{start}, {start + size}) do not fall on whole "
                             f"entries of {unit}; the tensor-parallel split cuts inside a packed word, group or "
                             "block")
        t = load_narrow(t, dim, start // unit, _entries(size, unit, layout.ceil))
    return read_full(t)


def read_full(loaded: Any) -> torch.Tensor:
    """A tensor, or all of a lazy safetensors slice (0-d ones included)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[...]


def check_shape(loaded: Any, expected: tuple[int, ...], what: str) -> None:
    """The checkpoint tensor has the expected shape, up to dims of size 1 (a scale may be stored as [N]
    or [N, 1], a single one as [] or [1])."""
    shape = tuple(loaded_shape(loaded))
    if [d for d in shape if d != 1] != [d for d in expected if d != 1]:
        raise ValueError(f"{what}: expected shape {list(expected)}, got {list(shape)}")
