"""Quantized LinearMethods (layers/linear_method.py): FP8 W8A8 and 4-bit weight-only.

Parameters keep the names of the checkpoint tensors they are loaded from (`qweight`, `scales`,
`weight_scale_inv`, ...), so the loader maps checkpoint names to parameters one to one, but they hold
carpool's layout (quantization/formats.py): each weight_loader cuts the rank's part of its checkpoint
tensor (quantization/sharding.py) and converts it while loading, so no layer is ever held in two
layouts and no model-sized copy is made (`--quantization fp8` quantizes each bf16 tensor as it arrives).

Backends: "torch" dequantizes and multiplies in the activation dtype (the CPU path: in float32 a
quantized checkpoint gives the tokens of the same model with its weights dequantized); "triton" runs
the GEMV for 1-8 rows and the GEMM above (ops/triton/quant_gemv.py, quant_gemm.py), and with
`fused_gemv_silu` (KernelConfig) a merged gate/up layer's 1-8 rows through the GEMV that applies
SiLU-and-mul in its epilogue, as the bf16 path does at batch 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from carpool.layers.linear import LinearBase, loaded_shape
from carpool.layers.linear_method import LinearMethod, QuantizedActivation, set_weight_loader
from carpool.ops.torch_ref import quant as ref
from carpool.quantization.config import CHANNEL_GROUP, FP8_BLOCK, Fp8Scheme, Int4Scheme
from carpool.quantization.formats import (
    FP8_DTYPE,
    PACK,
    awq_qweight_to_packed,
    awq_qzeros_to_zeros,
    gptq_qweight_to_packed,
    gptq_qzeros_to_zeros,
    pack_quantized_zero_point_to_zeros,
    quantize_fp8_per_channel,
)
from carpool.quantization.sharding import (
    ShardSlice,
    TensorLayout,
    check_shape,
    layer_shards,
    narrow_checkpoint_tensor,
    read_full,
    shard_slice,
)
from carpool.utils import cdiv

if TYPE_CHECKING:
    from carpool.ops.triton.quant_gemm import Fp8ActivationPlan

MAX_GEMV_ROWS = 8  # rows of x up to which the Triton path takes the GEMV (ops/triton/quant_gemv.py)


@dataclass(frozen=True)
class CheckpointTensor:
    """One checkpoint tensor of a quantized layer (its name suffix is the parameter's name): how its
    dims map onto the layer's rows and columns, its whole shape, and the conversion of the rank's part
    into rows of the parameter (`row_unit` logical rows per parameter row)."""
    suffix: str
    layout: TensorLayout
    shape: Callable[[ShardSlice], tuple[int, ...]]  # the whole checkpoint tensor's shape
    convert: Callable[[torch.Tensor, ShardSlice], torch.Tensor]
    row_unit: int = 1
    required: bool = True  # False: a checkpoint may omit it (then the parameter is derived or unused)


def _param(layer: nn.Module, name: str, tensor: torch.Tensor, loader: Any, required: bool = True) -> nn.Parameter:
    p = set_weight_loader(nn.Parameter(tensor, requires_grad=False), loader)
    p.checkpoint_required = required  # type: ignore[attr-defined]  # (models/loader.py: the missing check)
    layer.register_parameter(name, p)
    return p


def register_alias(layer: nn.Module, alias: str, canonical: str) -> None:
    """Checkpoint tensors named `alias` load into the parameter `canonical` (through its loader, so
    they are checked and marked loaded under that name). The alias parameter itself is empty: it only
    gives the model loader a parameter of that name."""
    target = getattr(layer, canonical)

    def loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        target.weight_loader(target, loaded, shard_id)

    _param(layer, alias, torch.empty(0), loader, required=False)


def alias_note(aliases: Mapping[str, str], name: str) -> str:
    """The text ' (or X)' for each alias X of `name` (aliases: alias -> name): a missing-tensor error
    names every spelling a checkpoint may use."""
    return "".join(f" (or {a})" for a, c in aliases.items() if c == name)


class QuantizedLinearMethod(LinearMethod):
    """Loading machinery shared by the quantized methods: each checkpoint tensor is loaded shard by
    shard (q/k/v, gate/up), and after loading every shard of every required tensor must have arrived,
    or the error names the missing tensor (a merged layer's parameter counts as loaded as soon as one
    shard is, so the generic missing check cannot see a lost k_proj scale)."""

    def __init__(self, backend: str, fused_gemv_silu: bool = False) -> None:
        if backend not in ("torch", "triton"):
            raise ValueError(f"kernel backend: unknown {backend!r}")
        self.backend = backend
        self.fused_gemv_silu = fused_gemv_silu
        self.aliases: dict[str, str] = {}  # other checkpoint names of a tensor -> the parameter it loads into

    def takes_gemv(self, x: torch.Tensor) -> bool:
        """x goes through the Triton GEMV (1 to MAX_GEMV_ROWS rows), not the GEMM or the torch path."""
        return self.backend == "triton" and x.dim() == 2 and 1 <= x.shape[0] <= MAX_GEMV_ROWS

    def takes_gemm(self, num_tokens: int) -> bool:
        """An input of num_tokens rows goes through the Triton GEMM path (more than MAX_GEMV_ROWS rows)."""
        return self.backend == "triton" and num_tokens > MAX_GEMV_ROWS

    def takes_fused_silu(self, x: torch.Tensor) -> bool:
        """apply_silu_and_mul takes x: the GEMV's rows, with the fused path switched on."""
        return self.fused_gemv_silu and self.takes_gemv(x)

    def _register_tensor(self, layer: LinearBase, spec: CheckpointTensor, param_data: torch.Tensor) -> None:
        def loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
            sl = shard_slice(layer, shard_id)
            what = spec.suffix if shard_id is None else f"{spec.suffix} (shard {shard_id!r})"
            check_shape(loaded, spec.shape(sl), what)
            part = narrow_checkpoint_tensor(loaded, spec.layout, sl, what)
            rows = spec.convert(part, sl).to(param.device)
            if spec.row_unit > 1 and (sl.dst_row % spec.row_unit
                                      or (sl.rows % spec.row_unit and sl.dst_row + sl.rows != layer.output_size)):
                raise ValueError(f"{what}: rows [{sl.dst_row}, {sl.dst_row + sl.rows}) of the layer do not fall on "
                                 f"{spec.row_unit}-row scale blocks; merged shards must start on a block")
            dst = param.data.narrow(0, sl.dst_row // spec.row_unit, rows.shape[0])
            if rows.shape != dst.shape:
                raise ValueError(f"{what}: converts to {tuple(rows.shape)}, the parameter holds {tuple(dst.shape)}")
            dst.copy_(rows)
            self._mark_loaded(layer, spec.suffix, shard_id)

        _param(layer, spec.suffix, param_data, loader, spec.required)

    @staticmethod
    def _mark_loaded(layer: LinearBase, name: str, shard_id: Any) -> None:
        loaded = layer.__dict__.setdefault("quant_loaded", set())
        loaded.add((name, shard_id))

    def check_loaded(self, layer: LinearBase, names: list[str]) -> None:
        loaded = layer.__dict__.get("quant_loaded", set())
        for name in names:
            for shard in layer_shards(layer):
                if (name, shard) not in loaded:
                    which = "" if shard is None else f" for its shard {shard!r}"
                    raise ValueError(f"the checkpoint lacks the quantized layer's {name}"
                                     f"{alias_note(self.aliases, name)}{which}")


# --- FP8 -------------------------------------------------------------------------------------------------

class Fp8LinearMethod(QuantizedLinearMethod):
    """FP8 e4m3 weights with float32 scales per output channel or per 128x128 block. Triton: rows of x up
    to 8 through the FP8 weight GEMV (activations unquantized), more through activation quantization
    (per token, per 128-column group with block weights, or the checkpoint's static scale) and the W8A8
    GEMM (torch._scaled_mm or Triton, ops/triton/quant_gemm.fp8_linear). With fused_act_quant
    (KernelConfig's), GEMM-sized inputs may arrive quantized by the op that produced them
    (input_quantization)."""

    def __init__(self, scheme: Fp8Scheme, backend: str, fused_gemv_silu: bool = False,
                 fused_act_quant: bool = False) -> None:
        super().__init__(backend, fused_gemv_silu)
        self.fused_act_quant = fused_act_quant
        self.scheme = scheme
        self.block = scheme.weight_strategy == "block"
        self.scale_name = "weight_scale" if scheme.checkpoint_format == "online" else scheme.scale_suffix()
        self.input_scale_name = None if scheme.dynamic_activations else scheme.input_scale_suffix()
        self.aliases = scheme.tensor_aliases()

    def create_weights(self, layer: LinearBase, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        n, k = output_size, input_size
        required = not self.aliases  # (either name will do: process_weights_after_loading checks)
        whole = TensorLayout(0, 1, 1, 1)
        if self.scheme.checkpoint_format == "online":
            _param(layer, "weight", torch.empty(n, k, dtype=FP8_DTYPE), self._online_loader(layer))
            _param(layer, "weight_scale", torch.ones(n, dtype=torch.float32), None, required=False)
            return
        self._register_tensor(layer, CheckpointTensor(
            "weight", whole, lambda sl: (sl.full_rows, sl.full_cols), _fp8_weight), torch.empty(n, k, dtype=FP8_DTYPE))
        if self.block:
            bn, bk = FP8_BLOCK
            spec = CheckpointTensor(self.scale_name, TensorLayout(0, bn, 1, bk, ceil=True),
                                    lambda sl: (cdiv(sl.full_rows, bn), cdiv(sl.full_cols, bk)),
                                    lambda t, sl: t.float(), row_unit=bn)
            self._register_tensor(layer, spec, torch.ones(cdiv(n, bn), cdiv(k, bk), dtype=torch.float32))
        elif self.scheme.weight_strategy == "channel":
            spec = CheckpointTensor(self.scale_name, TensorLayout(0, 1, None, 1), lambda sl: (sl.full_rows, 1),
                                    lambda t, sl: t.float().reshape(-1))
            self._register_tensor(layer, spec, torch.ones(n, dtype=torch.float32))
        else:  # one scale per checkpoint tensor: per channel here, so merged q/k/v keep their own
            spec = CheckpointTensor(self.scale_name, TensorLayout(None, 1, None, 1), lambda sl: (),
                                    lambda t, sl: t.float().reshape(()).expand(sl.rows), required=required)
            self._register_tensor(layer, spec, torch.ones(n, dtype=torch.float32))
        if self.input_scale_name is not None:
            _param(layer, self.input_scale_name, torch.zeros(1, dtype=torch.float32), self._input_scale_loader(layer),
                   required)
        for alias, canonical in self.aliases.items():
            if hasattr(layer, canonical):
                register_alias(layer, alias, canonical)

    def _online_loader(self, layer: LinearBase) -> Callable[..., None]:
        """`--quantization fp8`: each bf16 checkpoint tensor (a shard's rows) quantized per output channel
        as it is loaded; the scales are derived, not read. A channel's scale comes from its whole row,
        all input columns, before a row-parallel rank keeps its columns: every rank then holds its slice
        of the one-process weights, so tensor parallelism does not change the quantized model."""
        def loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
            sl = shard_slice(layer, shard_id)
            what = "weight" if shard_id is None else f"weight (shard {shard_id!r})"
            check_shape(loaded, (sl.full_rows, sl.full_cols), what)
            rows = narrow_checkpoint_tensor(loaded, TensorLayout(0, 1, None, 1), sl, what).to(param.device)
            q, scale = quantize_fp8_per_channel(rows)
            param.data.narrow(0, sl.dst_row, sl.rows).copy_(q.narrow(1, sl.src_col, sl.cols))
            layer.weight_scale.data.narrow(0, sl.dst_row, sl.rows).copy_(scale)
            self._mark_loaded(layer, "weight", shard_id)
        return loader

    def _input_scale_loader(self, layer: LinearBase) -> Callable[..., None]:
        """A static per-tensor activation scale. The shards of a merged layer quantize the same input, so
        the largest of theirs is kept (it clips none of them)."""
        def loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
            what = str(self.input_scale_name)
            if tuple(loaded_shape(loaded)) not in ((), (1,)):
                raise ValueError(f"{what}: expected one value, got shape {loaded_shape(loaded)}")
            value = read_full(loaded).float().reshape(1)
            if not bool(value > 0) or not bool(torch.isfinite(value)):
                raise ValueError(f"{what}: a static activation scale must be positive and finite, got {value.item()}")
            param.data.copy_(torch.maximum(param.data, value.to(param.device)))
            self._mark_loaded(layer, what, shard_id)
        return loader

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        names = ["weight"] + ([] if self.scheme.checkpoint_format == "online" else [self.scale_name])
        if self.input_scale_name is not None:
            names.append(self.input_scale_name)
        self.check_loaded(layer, names)

    def _scale(self, layer: LinearBase) -> torch.Tensor:
        return getattr(layer, self.scale_name)

    def _static_scale(self, layer: LinearBase) -> torch.Tensor | None:
        return getattr(layer, self.input_scale_name) if self.input_scale_name is not None else None

    def input_quantization(self, layer: LinearBase, num_tokens: int, dtype: torch.dtype) -> Fp8ActivationPlan | None:
        """fp8_linear's plan for num_tokens rows, where they take the GEMM and fused_act_quant is on."""
        if not (self.fused_act_quant and self.takes_gemm(num_tokens)):
            return None
        from carpool.ops.triton import quant_gemm

        return quant_gemm.fp8_activation_plan(num_tokens, layer.weight, self._scale(layer), dtype,
                                              self._static_scale(layer))

    def apply(self, layer: LinearBase, x: torch.Tensor | QuantizedActivation,
              bias: torch.Tensor | None) -> torch.Tensor:
        weight, scale = layer.weight, self._scale(layer)
        if isinstance(x, QuantizedActivation):  # (only where input_quantization gave its plan: Triton)
            from carpool.ops.triton import quant_gemm

            return quant_gemm.fp8_linear_quantized(x.plan, x.values, x.scale, x.num_tokens, weight, scale, bias)
        block = FP8_BLOCK if self.block else None
        if self.backend == "torch" or x.shape[0] == 0:
            return ref.fp8_linear(x, weight, scale, block, bias)
        from carpool.ops.triton import quant_gemm, quant_gemv

        x = x if x.stride(-1) == 1 else x.contiguous()
        if self.takes_gemv(x):
            return quant_gemv.fp8_gemv(x, weight, scale, bias)
        return quant_gemm.fp8_linear(x, weight, scale, bias, self._static_scale(layer))

    def apply_silu_and_mul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor | None:
        if not self.takes_fused_silu(x):
            return None
        from carpool.ops.triton import quant_gemv

        x = x if x.stride(-1) == 1 else x.contiguous()
        return quant_gemv.fp8_gemv_silu_and_mul(x, layer.weight, self._scale(layer))

    def dequantized_weight(self, layer: LinearBase) -> torch.Tensor:
        """The layer's logical weight in float32 (tests and reference checkpoints)."""
        from carpool.quantization.formats import dequantize_fp8

        return dequantize_fp8(layer.weight, self._scale(layer), FP8_BLOCK if self.block else None)


def _fp8_weight(t: torch.Tensor, sl: ShardSlice) -> torch.Tensor:
    if t.dtype != FP8_DTYPE:
        raise ValueError(f"weight: expected float8_e4m3fn values, got {t.dtype}")
    return t


# --- int4 weight-only ---------------------------------------------------------------------------------------

class Int4WeightOnlyLinearMethod(QuantizedLinearMethod):
    """4-bit weights (AWQ, GPTQ, compressed-tensors pack-quantized), repacked while loading into
    carpool's int4 layout: packed [N, K/8] int32, scales and zeros [N, K/G] in the model dtype
    (quantization/formats.py). The parameters keep the checkpoint's names: AWQ and GPTQ `qweight`,
    `scales`, `qzeros` (GPTQ also `g_idx`, checked against desc_act false), compressed-tensors
    `weight_packed`, `weight_scale`, `weight_zero_point`, `weight_shape` (checked). Symmetric weights
    whose zeros are all 8 (GPTQ stores them anyway) drop them after loading."""

    def __init__(self, scheme: Int4Scheme, backend: str, fused_gemv_silu: bool = False) -> None:
        super().__init__(backend, fused_gemv_silu)
        self.scheme = scheme
        fmt = scheme.checkpoint_format
        self.packed_name, self.scales_name, self.zeros_name = {
            "awq": ("qweight", "scales", "qzeros"), "gptq": ("qweight", "scales", "qzeros"),
            "pack-quantized": ("weight_packed", "weight_scale", "weight_zero_point")}[fmt]
        if fmt == "pack-quantized" and scheme.symmetric:
            self.zeros_name = None

    def group_size(self, layer: LinearBase) -> int:
        """Input columns per scale in this rank's part: the scheme's group, or all of them per channel."""
        return layer.input_size if self.scheme.group_size == CHANNEL_GROUP else self.scheme.group_size

    def create_weights(self, layer: LinearBase, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        n, k = output_size, input_size
        g = k if self.scheme.group_size == CHANNEL_GROUP else self.scheme.group_size
        if k % PACK or k % g:
            raise ValueError(f"quantization: a {self.scheme.name} layer's input size {k} (per rank) must be a multiple "
                             f"of 8 and of the group size {g}")
        fmt = self.scheme.checkpoint_format
        specs = int4_checkpoint_tensors(self.scheme, dtype)
        data = {"packed": torch.empty(n, k // PACK, dtype=torch.int32), "scales": torch.empty(n, k // g, dtype=dtype),
                "zeros": torch.empty(n, k // g, dtype=dtype)}
        for role, spec in specs.items():
            self._register_tensor(layer, spec, data[role])
        if fmt == "gptq":
            _param(layer, "g_idx", torch.zeros(k, dtype=torch.int32), self._g_idx_loader(layer), required=False)
        if fmt == "pack-quantized":
            _param(layer, "weight_shape", torch.zeros(2, dtype=torch.int64), self._weight_shape_loader(layer),
                   required=False)

    def _g_idx_loader(self, layer: LinearBase) -> Callable[..., None]:
        """GPTQ's group of each input column must be column // group size (desc_act false): anything
        else is an act-order checkpoint whose config says otherwise."""
        def loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
            param.data.copy_(check_g_idx(loaded, shard_slice(layer, shard_id), self.scheme, "g_idx"))
        return loader

    def _weight_shape_loader(self, layer: LinearBase) -> Callable[..., None]:
        def loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
            param.data.copy_(check_weight_shape(loaded, shard_slice(layer, shard_id), "weight_shape"))
        return loader

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        names = [self.packed_name, self.scales_name] + ([self.zeros_name] if self.zeros_name else [])
        self.check_loaded(layer, names)
        if self.zeros_name is not None and bool((getattr(layer, self.zeros_name) == 8).all()):
            delattr(layer, self.zeros_name)  # symmetric: the kernels' zero-free path (zero = 8)
            self.zeros_name = None

    def weights(self, layer: LinearBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return (getattr(layer, self.packed_name), getattr(layer, self.scales_name),
                getattr(layer, self.zeros_name) if self.zeros_name else None)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        packed, scales, zeros = self.weights(layer)
        g = self.group_size(layer)
        if self.backend == "torch" or x.shape[0] == 0:
            return ref.int4_linear(x, packed, scales, zeros, g, bias)
        from carpool.ops.triton import quant_gemm, quant_gemv

        x = x if x.stride(-1) == 1 else x.contiguous()
        if self.takes_gemv(x):
            return quant_gemv.int4_gemv(x, packed, scales, zeros, g, bias)
        return quant_gemm.int4_linear(x, packed, scales, zeros, g, bias)

    def apply_silu_and_mul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor | None:
        if not self.takes_fused_silu(x):
            return None
        from carpool.ops.triton import quant_gemv

        packed, scales, zeros = self.weights(layer)
        x = x if x.stride(-1) == 1 else x.contiguous()
        return quant_gemv.int4_gemv_silu_and_mul(x, packed, scales, zeros, self.group_size(layer))

    def dequantized_weight(self, layer: LinearBase) -> torch.Tensor:
        """The layer's logical weight in float32 (tests and reference checkpoints)."""
        packed, scales, zeros = self.weights(layer)
        return ref.dequantize_int4(packed, scales, zeros, self.group_size(layer))


def int4_checkpoint_tensors(scheme: Int4Scheme, dtype: torch.dtype) -> dict[str, CheckpointTensor]:
    """The checkpoint tensors of one 4-bit projection in `scheme`'s format, by the role of what they
    become in carpool's int4 layout ("packed" [N, K/8] int32, "scales" and "zeros" [N, K/G] in `dtype`),
    each with its layout and conversion of a rank's part. Shared by dense layers and routed experts (a
    symmetric compressed-tensors checkpoint has no zeros)."""
    fmt = scheme.checkpoint_format
    channel = scheme.group_size == CHANNEL_GROUP
    gs = scheme.group_size
    # Scale-shaped tensors: one entry per group of input columns, or one for all of them (per channel,
    # the same on every input shard of a row-parallel layer).
    groups_in = None if channel else 0

    def n_groups(sl: ShardSlice) -> int:
        return 1 if channel else sl.full_cols // gs

    if fmt == "awq":
        return {
            "packed": CheckpointTensor("qweight", TensorLayout(1, PACK, 0, 1),
                                       lambda sl: (sl.full_cols, sl.full_rows // PACK),
                                       lambda t, sl: awq_qweight_to_packed(_int32(t, "qweight"))),
            "scales": CheckpointTensor("scales", TensorLayout(1, 1, groups_in, gs),
                                       lambda sl: (n_groups(sl), sl.full_rows), lambda t, sl: t.t().to(dtype)),
            "zeros": CheckpointTensor("qzeros", TensorLayout(1, PACK, groups_in, gs),
                                      lambda sl: (n_groups(sl), sl.full_rows // PACK),
                                      lambda t, sl: awq_qzeros_to_zeros(_int32(t, "qzeros"), dtype))}
    if fmt == "gptq":
        offset = scheme.zero_offset
        return {
            "packed": CheckpointTensor("qweight", TensorLayout(1, 1, 0, PACK),
                                       lambda sl: (sl.full_cols // PACK, sl.full_rows),
                                       lambda t, sl: gptq_qweight_to_packed(_int32(t, "qweight"))),
            "scales": CheckpointTensor("scales", TensorLayout(1, 1, groups_in, gs),
                                       lambda sl: (n_groups(sl), sl.full_rows), lambda t, sl: t.t().to(dtype)),
            "zeros": CheckpointTensor("qzeros", TensorLayout(1, PACK, groups_in, gs),
                                      lambda sl: (n_groups(sl), sl.full_rows // PACK),
                                      lambda t, sl: gptq_qzeros_to_zeros(_int32(t, "qzeros"), offset, dtype))}
    specs = {  # compressed-tensors pack-quantized
        "packed": CheckpointTensor("weight_packed", TensorLayout(0, 1, 1, PACK),
                                   lambda sl: (sl.full_rows, sl.full_cols // PACK),
                                   lambda t, sl: _int32(t, "weight_packed")),
        "scales": CheckpointTensor("weight_scale", TensorLayout(0, 1, None if channel else 1, gs),
                                   lambda sl: (sl.full_rows, n_groups(sl)), lambda t, sl: t.to(dtype))}
    if not scheme.symmetric:
        specs["zeros"] = CheckpointTensor("weight_zero_point", TensorLayout(0, PACK, None if channel else 1, gs),
                                          lambda sl: (sl.full_rows // PACK, n_groups(sl)),
                                          lambda t, sl: pack_quantized_zero_point_to_zeros(
                                              _int32(t, "weight_zero_point"), dtype))
    return specs


def check_g_idx(loaded: Any, sl: ShardSlice, scheme: Int4Scheme, what: str) -> torch.Tensor:
    """GPTQ's g_idx of the rank's input columns, int32. The group of each input column must be column //
    group size (desc_act false): anything else is an act-order checkpoint whose config says otherwise."""
    check_shape(loaded, (sl.full_cols,), what)
    part = narrow_checkpoint_tensor(loaded, TensorLayout(None, 1, 0, 1), sl, what).to(torch.int64)
    g = sl.full_cols if scheme.group_size == CHANNEL_GROUP else scheme.group_size
    expected = torch.arange(sl.src_col, sl.src_col + sl.cols) // g
    if not torch.equal(part.cpu(), expected):
        raise ValueError(f"{what}: groups are not column // group_size; act-order (desc_act) GPTQ "
                         "checkpoints are not supported")
    return part.to(torch.int32)


def check_weight_shape(loaded: Any, sl: ShardSlice, what: str) -> torch.Tensor:
    """compressed-tensors' weight_shape, which must be the whole checkpoint matrix [rows, cols]."""
    shape = read_full(loaded).reshape(-1).tolist()
    if shape != [sl.full_rows, sl.full_cols]:
        raise ValueError(f"{what}: the checkpoint says {shape}, the model's layer is [{sl.full_rows}, {sl.full_cols}]")
    return torch.tensor(shape)


def _int32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.int32:
        raise ValueError(f"{what}: expected packed int32 values, got {t.dtype}")
    return t
