"""Quantized routed experts: the ExpertsMethods (layers/moe/experts.py) of FP8 and 4-bit mixture-of-experts
checkpoints.

FP8 (`Fp8ExpertsMethod`):

The stacks hold e4m3 values, w13_weight [E, 2I, H] and w2_weight [E, H, I], with float32 scales in the
layout of `ops.torch_ref.moe.ExpertScales`: per output channel (w13 [E, 2I], w2 [E, H]) or per 128x128
block (w13 [E, 2 ceil(I/128), ceil(H/128)], gate blocks then up blocks; w2 [E, ceil(H/128), ceil(I/128)]).
Per-tensor checkpoint scales are expanded to channels, as the dense FP8 method does.

Parameters keep the checkpoint tensors' names after the stack's (`w13_weight_scale_inv` for Hugging Face
fine-grained FP8, `w13_weight_scale` for compressed-tensors and `--quantization fp8`; Hugging Face
per-tensor FP8 in AutoFP8's naming, `weight_scale` / `input_scale`, loads through aliases of
transformers' `weight_scale_inv` / `activation_scale`, as the dense method's do), and each loader
converts one expert tensor's rank part as it arrives (quantization/sharding.py cuts it: a tensor-parallel
split of the intermediate dimension must fall on whole 128-row blocks), so no layer is held twice.

Compute (ops.*.fused_moe with `scales`) is W8A16: activations stay in the model dtype, weights are
dequantized in registers. A checkpoint's static activation scales (compressed-tensors `input_scale`)
are read and checked, and not applied: unquantized activations are the more precise of the two.

4-bit (`Int4ExpertsMethod`): AWQ GEMM, GPTQ (v1 / v2, desc_act false) and compressed-tensors
pack-quantized experts, each expert tensor converted while loading into carpool's int4 layout
(quantization/formats.py) by the dense int4 method's conversions (methods.int4_checkpoint_tensors) and
stacked: w13_{packed} [E, 2I, H/8] int32 and w2_{packed} [E, H, I/8], scales and zeros [E, rows, K/G] in
the model dtype, in `ops.torch_ref.moe.Int4ExpertScales`' layout; the parameters keep the checkpoint's
names after the stack's (`w13_qweight`, `w2_weight_packed`, ...). A tensor-parallel split of the
intermediate dimension must keep whole quantization groups of the down projections' input columns on
every rank (`check_int4_expert_split`); expert parallelism keeps whole experts. Compute is W4A16: the
torch path dequantizes each chosen expert, the Triton kernels dequantize in registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from carpool.layers.linear import loaded_shape
from carpool.layers.linear_method import set_weight_loader
from carpool.layers.moe.experts import EXPERT_KINDS, ExpertsMethod, FusedExperts
from carpool.ops.torch_ref.moe import ExpertScales, Int4ExpertScales
from carpool.quantization.config import CHANNEL_GROUP, FP8_BLOCK, Fp8Scheme, Int4Scheme
from carpool.quantization.formats import FP8_DTYPE, PACK, pack_int4, quantize_fp8_per_channel
from carpool.quantization.methods import (
    CheckpointTensor,
    check_g_idx,
    check_weight_shape,
    int4_checkpoint_tensors,
    register_alias,
)
from carpool.quantization.sharding import (
    ShardSlice,
    TensorLayout,
    check_shape,
    narrow_checkpoint_tensor,
    read_full,
)
from carpool.utils import cdiv

WHOLE = TensorLayout(0, 1, 1, 1)


class QuantizedExpertsMethod(ExpertsMethod):
    """What the quantized experts methods share: parameters that say whether a checkpoint must supply
    them; which (tensor, projection, held expert) arrived is recorded and checked after loading as for
    model-dtype experts (ExpertsMethod.check_loaded)."""

    @staticmethod
    def _param(layer: FusedExperts, name: str, data: torch.Tensor, loader: Any, required: bool = True) -> None:
        p = set_weight_loader(nn.Parameter(data, requires_grad=False), loader)
        p.checkpoint_required = required  # type: ignore[attr-defined]  # (models/loader.py: the missing check)
        layer.register_parameter(name, p)


class Fp8ExpertsMethod(QuantizedExpertsMethod):
    """FP8 e4m3 experts from a Hugging Face fine-grained FP8 checkpoint (block scales, or one per tensor),
    a compressed-tensors float-quantized one (per channel, tensor or block) or `--quantization fp8` on a
    model-dtype checkpoint (per channel, computed while loading from each whole row)."""

    def __init__(self, scheme: Fp8Scheme) -> None:
        self.scheme = scheme
        self.block = scheme.weight_strategy == "block"
        self.online = scheme.checkpoint_format == "online"
        self.scale_name = "weight_scale" if self.online else scheme.scale_suffix()
        self.input_scale_name = None if scheme.dynamic_activations else scheme.input_scale_suffix()
        self.aliases = scheme.tensor_aliases()  # (w13_weight_scale loads into w13_weight_scale_inv, ...)

    # ---- parameters ---------------------------------------------------------------------------------

    def create_weights(self, layer: FusedExperts, dtype: torch.dtype) -> None:
        e, inter, h = layer.experts_per_rank, layer.intermediate_per_rank, layer.hidden_size
        if self.block and inter < layer.intermediate_size and inter % FP8_BLOCK[0]:
            raise ValueError(f"tensor_parallel_size: the experts' {layer.intermediate_size} intermediate rows split "
                             f"into {inter} per rank, which cuts their {FP8_BLOCK[0]}x{FP8_BLOCK[1]} FP8 weight "
                             "blocks; use enable_expert_parallel (whole experts per rank) or a tensor_parallel_size "
                             f"that leaves a multiple of {FP8_BLOCK[0]} rows per rank")
        self._param(layer, "w13_weight", torch.empty(e, 2 * inter, h, dtype=FP8_DTYPE), self._weight_loader(layer))
        self._param(layer, "w2_weight", torch.empty(e, h, inter, dtype=FP8_DTYPE), self._weight_loader(layer))
        if self.block:
            bi, bh = cdiv(inter, FP8_BLOCK[0]), cdiv(h, FP8_BLOCK[0])
            shapes13, shapes2 = (e, 2 * bi, bh), (e, bh, bi)
        else:
            shapes13, shapes2 = (e, 2 * inter), (e, h)
        loader = None if self.online else self._scale_loader(layer)
        required = not self.aliases  # (either name will do: process_weights_after_loading checks)
        for name, shape in ((f"w13_{self.scale_name}", shapes13), (f"w2_{self.scale_name}", shapes2)):
            self._param(layer, name, torch.ones(shape, dtype=torch.float32), loader,
                        required=required and not self.online)
        if self.input_scale_name is not None:
            for stack in ("w13", "w2"):
                self._param(layer, f"{stack}_{self.input_scale_name}", torch.zeros(e, dtype=torch.float32),
                            self._input_scale_loader(layer), required)
        for alias, canonical in self.aliases.items():
            for stack in ("w13", "w2"):
                if hasattr(layer, f"{stack}_{canonical}"):
                    register_alias(layer, f"{stack}_{alias}", f"{stack}_{canonical}")

    # ---- loaders ----------------------------------------------------------------------------------------

    def _weight_loader(self, layer: FusedExperts) -> Callable[..., None]:
        def loader(param: nn.Parameter, loaded: Any, shard_id: Any) -> None:
            kind, expert = shard_id
            what = f"expert {expert} ({kind}) weight"
            if kind in EXPERT_KINDS:
                check_shape(loaded, tuple(layer.expected_shape(kind)), what)
            where = layer.locate(shard_id)
            if where is None:
                return  # another rank's expert: never read
            sl = where.sl
            if self.online:
                # per-channel scales from whole rows, before a rank keeps its columns of w2: every rank then
                # holds its slice of the one-process model (tensor parallelism does not change it)
                rows = narrow_checkpoint_tensor(loaded, TensorLayout(0, 1, None, 1), sl, what).to(param.device)
                q, scale = quantize_fp8_per_channel(rows)
                part = q.narrow(1, sl.src_col, sl.cols)
                name = "w2" if kind == "w2" else "w13"
                getattr(layer, f"{name}_weight_scale").data[where.local].narrow(0, sl.dst_row, sl.rows).copy_(scale)
            else:
                part = narrow_checkpoint_tensor(loaded, WHOLE, sl, what)
                if part.dtype != FP8_DTYPE:
                    raise ValueError(f"{what}: expected float8_e4m3fn values, got {part.dtype}")
            # (index_copy_ / copy_ of e4m3 on CPU go through the bytes)
            dst = param.data[where.local].narrow(0, sl.dst_row, sl.rows)
            dst.view(torch.uint8).copy_(part.to(param.device).view(torch.uint8))
            self.mark_loaded(layer, "weight", where)
        return loader

    def _scale_loader(self, layer: FusedExperts) -> Callable[..., None]:
        bn, bk = FP8_BLOCK

        def loader(param: nn.Parameter, loaded: Any, shard_id: Any) -> None:
            kind, expert = shard_id
            what = f"expert {expert} ({kind}) {self.scale_name}"
            full_rows, full_cols = layer.expected_shape(kind) if kind in EXPERT_KINDS else (0, 0)
            strategy = self.scheme.weight_strategy
            if strategy == "block":
                check_shape(loaded, (cdiv(full_rows, bn), cdiv(full_cols, bk)), what)
            elif strategy == "channel":
                check_shape(loaded, (full_rows, 1), what)
            else:
                check_shape(loaded, (), what)
            where = layer.locate(shard_id)
            if where is None:
                return
            sl, local = where.sl, param.data[where.local]
            if strategy == "block":
                part = narrow_checkpoint_tensor(loaded, TensorLayout(0, bn, 1, bk, ceil=True), sl, what).float()
                dst_row = 0 if kind != "w3" else local.shape[0] // 2
                local.narrow(0, dst_row, part.shape[0]).copy_(part)
            elif strategy == "channel":
                part = narrow_checkpoint_tensor(loaded, TensorLayout(0, 1, None, 1), sl, what).float().reshape(-1)
                local.narrow(0, sl.dst_row, sl.rows).copy_(part)
            else:  # one scale for the whole tensor: every channel of it
                local.narrow(0, sl.dst_row, sl.rows).fill_(float(read_full(loaded).float().reshape(())))
            self.mark_loaded(layer, self.scale_name, where)
        return loader

    def _input_scale_loader(self, layer: FusedExperts) -> Callable[..., None]:
        """A static activation scale per expert tensor; w1 and w3 quantize the same input, so the larger
        of theirs is kept."""
        def loader(param: nn.Parameter, loaded: Any, shard_id: Any) -> None:
            kind, expert = shard_id
            what = f"expert {expert} ({kind}) {self.input_scale_name}"
            if tuple(loaded_shape(loaded)) not in ((), (1,)):
                raise ValueError(f"{what}: expected one value, got shape {loaded_shape(loaded)}")
            where = layer.locate(shard_id)
            if where is None:
                return
            value = read_full(loaded).float().reshape(())
            if not bool(value > 0) or not bool(torch.isfinite(value)):
                raise ValueError(f"{what}: a static activation scale must be positive and finite, got {value.item()}")
            param.data[where.local] = torch.maximum(param.data[where.local], value.to(param.device))
            self.mark_loaded(layer, str(self.input_scale_name), where)
        return loader

    def process_weights_after_loading(self, layer: FusedExperts) -> None:
        """Every held expert's every projection arrived with its scales (the loader's own missing check
        sees a stack as loaded once any expert's tensor is)."""
        names = ["weight"] + ([] if self.online else [self.scale_name])
        if self.input_scale_name is not None:
            names.append(self.input_scale_name)
        self.check_loaded(layer, names, self.aliases)

    # ---- compute -----------------------------------------------------------------------------------------

    def scales(self, layer: FusedExperts) -> ExpertScales:
        return ExpertScales(getattr(layer, f"w13_{self.scale_name}"), getattr(layer, f"w2_{self.scale_name}"),
                            self.block)

    def stacks(self, layer: FusedExperts) -> tuple[torch.Tensor, torch.Tensor, ExpertScales]:
        return layer.w13_weight, layer.w2_weight, self.scales(layer)

    def dequantized_weights(self, layer: FusedExperts) -> tuple[torch.Tensor, torch.Tensor]:
        """The held experts' (w13, w2) in float32 (tests and reference checkpoints)."""
        scales = self.scales(layer)
        pairs = [scales.dequantize(layer.w13_weight, layer.w2_weight, e, torch.float32)
                 for e in range(layer.experts_per_rank)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def quantize_fp8_experts(w13: torch.Tensor, w2: torch.Tensor, block: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, ExpertScales]:
    """Model-dtype stacks w13 [E, 2I, H] and w2 [E, H, I] as FP8 stacks with their scales, each expert's
    gate, up and down projection quantized on its own (max |block| / 448 per 128x128 block, or per output
    channel), as a checkpoint stores them (benchmarks and tests of the kernels)."""
    from carpool.quantization.formats import quantize_fp8_per_block

    def quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_per_block(w, FP8_BLOCK) if block else quantize_fp8_per_channel(w)

    i = w13.shape[1] // 2
    q13, q2, s13, s2 = [], [], [], []
    for e in range(w13.shape[0]):
        (qg, sg), (qu, su), (qd, sd) = quant(w13[e, :i]), quant(w13[e, i:]), quant(w2[e])
        q13.append(torch.cat([qg, qu]))
        s13.append(torch.cat([sg, su]))
        q2.append(qd)
        s2.append(sd)
    return torch.stack(q13), torch.stack(q2), ExpertScales(torch.stack(s13), torch.stack(s2), block)


# --- 4-bit ------------------------------------------------------------------------------------------------

def check_int4_expert_split(scheme: Int4Scheme, moe_intermediate_size: int, tp_size: int,
                            expert_parallel: bool) -> None:
    """Refuse a tensor-parallel split of 4-bit experts' intermediate dimension that cuts their packing:
    each rank's rows of gate / up must be whole 8-row words (AWQ and GPTQ pack zero points, AWQ also the
    weights, along the outputs) and its columns of down whole quantization groups."""
    if expert_parallel or tp_size == 1:
        return
    inter = moe_intermediate_size // tp_size
    group = scheme.group_size
    if group != CHANNEL_GROUP and inter % group:
        raise ValueError(f"tensor_parallel_size: the model's moe_intermediate_size={moe_intermediate_size} split over "
                         f"tensor_parallel_size={tp_size} ranks leaves {inter} rows per rank, which cuts the experts' "
                         f"down projections' quantization groups (quantization_config.group_size={group}); use "
                         f"enable_expert_parallel (whole experts per rank) or a tensor_parallel_size that leaves a "
                         f"multiple of {group} rows per rank")
    if inter % PACK:
        raise ValueError(f"tensor_parallel_size: the model's moe_intermediate_size={moe_intermediate_size} split over "
                         f"tensor_parallel_size={tp_size} ranks leaves {inter} rows per rank, which cuts the experts' "
                         f"packed {PACK}-value words; use enable_expert_parallel (whole experts per rank)")


class Int4ExpertsMethod(QuantizedExpertsMethod):
    """4-bit experts in carpool's int4 layout (see the module docstring). GPTQ's per-expert g_idx is
    checked (desc_act false) and compressed-tensors' weight_shape too; neither is kept per expert. GPTQ
    stores zero points even when symmetric: zeros that are all 8 are dropped after loading (the kernels'
    zero-free path)."""

    def __init__(self, scheme: Int4Scheme) -> None:
        self.scheme = scheme
        self.specs: dict[str, CheckpointTensor] = {}

    def _group_sizes(self, layer: FusedExperts) -> tuple[int, int]:
        """Input columns per scale of w13 (over H) and of w2 (over this rank's I)."""
        if self.scheme.group_size == CHANNEL_GROUP:
            return layer.hidden_size, layer.intermediate_per_rank
        return self.scheme.group_size, self.scheme.group_size

    # ---- parameters ---------------------------------------------------------------------------------

    def create_weights(self, layer: FusedExperts, dtype: torch.dtype) -> None:
        e, inter, h = layer.experts_per_rank, layer.intermediate_per_rank, layer.hidden_size
        check_int4_expert_split(self.scheme, layer.intermediate_size, layer.intermediate_size // inter,
                                layer.expert_parallel)
        g13, g2 = self._group_sizes(layer)
        if h % g13 or layer.intermediate_size % g2:
            raise ValueError(f"quantization_config.group_size: {self.scheme.group_size} does not divide the experts' "
                             f"hidden_size={h} and moe_intermediate_size={layer.intermediate_size}")
        self.specs = int4_checkpoint_tensors(self.scheme, dtype)
        for stack, n, k, g in (("w13", 2 * inter, h, g13), ("w2", h, inter, g2)):
            for role, spec in self.specs.items():
                data = (torch.empty(e, n, k // PACK, dtype=torch.int32) if role == "packed"
                        else torch.empty(e, n, k // g, dtype=dtype))
                self._param(layer, f"{stack}_{spec.suffix}", data, self._loader(layer, spec))
            if self.scheme.checkpoint_format == "gptq":
                self._param(layer, f"{stack}_g_idx", torch.zeros(k, dtype=torch.int32), self._g_idx_loader(layer),
                            required=False)
            if self.scheme.checkpoint_format == "pack-quantized":
                self._param(layer, f"{stack}_weight_shape", torch.zeros(2, dtype=torch.int64),
                            self._weight_shape_loader(layer), required=False)

    @staticmethod
    def _whole(layer: FusedExperts, kind: str) -> ShardSlice:
        """The whole checkpoint matrix of one expert projection, as a slice (for shape checks)."""
        rows, cols = layer.expected_shape(kind)
        return ShardSlice(0, 0, rows, 0, cols, rows, cols)

    # ---- loaders ----------------------------------------------------------------------------------------

    def _loader(self, layer: FusedExperts, spec: CheckpointTensor) -> Callable[..., None]:
        def loader(param: nn.Parameter, loaded: Any, shard_id: Any) -> None:
            kind, expert = shard_id
            where = layer.locate(shard_id)
            what = f"expert {expert} ({kind}) {spec.suffix}"
            check_shape(loaded, spec.shape(self._whole(layer, kind)), what)
            if where is None:
                return  # another rank's expert: never read
            sl = where.sl
            values = spec.convert(narrow_checkpoint_tensor(loaded, spec.layout, sl, what), sl).to(param.device)
            dst = param.data[where.local].narrow(0, sl.dst_row, sl.rows)
            if values.shape != dst.shape:
                raise ValueError(f"{what}: converts to {tuple(values.shape)}, the stack holds {tuple(dst.shape)}")
            dst.copy_(values)
            self.mark_loaded(layer, spec.suffix, where)
        return loader

    def _g_idx_loader(self, layer: FusedExperts) -> Callable[..., None]:
        def loader(param: nn.Parameter, loaded: Any, shard_id: Any) -> None:
            kind, expert = shard_id
            where = layer.locate(shard_id)
            if where is not None:
                param.data.copy_(check_g_idx(loaded, where.sl, self.scheme, f"expert {expert} ({kind}) g_idx"))
        return loader

    def _weight_shape_loader(self, layer: FusedExperts) -> Callable[..., None]:
        def loader(param: nn.Parameter, loaded: Any, shard_id: Any) -> None:
            kind, expert = shard_id
            layer.locate(shard_id)  # (an unknown kind or expert id is refused)
            param.data.copy_(check_weight_shape(loaded, self._whole(layer, kind),
                                                f"expert {expert} ({kind}) weight_shape"))
        return loader

    def process_weights_after_loading(self, layer: FusedExperts) -> None:
        self.check_loaded(layer, [spec.suffix for spec in self.specs.values()])
        zeros = self.specs.get("zeros")
        if zeros is not None and all(bool((getattr(layer, f"{s}_{zeros.suffix}") == 8).all()) for s in ("w13", "w2")):
            for stack in ("w13", "w2"):
                delattr(layer, f"{stack}_{zeros.suffix}")  # symmetric: the kernels' zero-free path (zero = 8)
            del self.specs["zeros"]

    # ---- compute -----------------------------------------------------------------------------------------

    def stacks(self, layer: FusedExperts) -> tuple[torch.Tensor, torch.Tensor, Int4ExpertScales]:
        """(w13 packed, w2 packed, their scales and zeros)."""
        packed, scales, zeros = self.specs["packed"].suffix, self.specs["scales"].suffix, self.specs.get("zeros")
        return (getattr(layer, f"w13_{packed}"), getattr(layer, f"w2_{packed}"),
                Int4ExpertScales(getattr(layer, f"w13_{scales}"), getattr(layer, f"w2_{scales}"),
                                 getattr(layer, f"w13_{zeros.suffix}") if zeros else None,
                                 getattr(layer, f"w2_{zeros.suffix}") if zeros else None))

    def dequantized_weights(self, layer: FusedExperts) -> tuple[torch.Tensor, torch.Tensor]:
        """The held experts' (w13, w2) in float32 (tests and reference checkpoints)."""
        w13, w2, scales = self.stacks(layer)
        pairs = [scales.dequantize(w13, w2, e, torch.float32) for e in range(layer.experts_per_rank)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def quantize_int4_experts(w13: torch.Tensor, w2: torch.Tensor, group: int | tuple[int, int], symmetric: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, Int4ExpertScales]:
    """Model-dtype stacks w13 [E, 2I, H] and w2 [E, H, I] as packed int4 stacks with scales (and zeros
    unless symmetric) in w13's dtype, each projection quantized min-max per group of `group` input
    columns on its own (writers.quantize_int4, as the AWQ / GPTQ writers do; a pair: w13's group, w2's
    group): benchmarks and tests."""
    from carpool.quantization.writers import quantize_int4

    g13, g2 = group if isinstance(group, tuple) else (group, group)

    def quant(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, zero, scale = quantize_int4(w, g, symmetric)
        return pack_int4(q, 1), zero.to(w13.dtype), scale.to(w13.dtype)

    i = w13.shape[1] // 2
    stacks: list[list[torch.Tensor]] = [[] for _ in range(6)]  # packed, zeros, scales of w13, then of w2
    for e in range(w13.shape[0]):
        gate, up, down = quant(w13[e, :i], g13), quant(w13[e, i:], g13), quant(w2[e], g2)
        for j in range(3):
            stacks[j].append(torch.cat([gate[j], up[j]]))
            stacks[3 + j].append(down[j])
    p13, z13, s13, p2, z2, s2 = (torch.stack(t) for t in stacks)
    if symmetric:
        return p13, p2, Int4ExpertScales(s13, s2)
    return p13, p2, Int4ExpertScales(s13, s2, z13, z2)
