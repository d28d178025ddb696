"""FP8 routed experts: the ExpertsMethod (layers/moe/experts.py) of FP8 mixture-of-experts checkpoints.

The stacks hold e4m3 values, w13_weight [E, 2I, H] and w2_weight [E, H, I], with float32 scales in the
layout of `ops.torch_ref.moe.ExpertScales`: per output channel (w13 [E, 2I], w2 [E, H]) or per 128x128
block (w13 [E, 2 ceil(I/128), ceil(H/128)], gate blocks then up blocks; w2 [E, ceil(H/128), ceil(I/128)]).
Per-tensor checkpoint scales are expanded to channels, as the dense FP8 method does.

Parameters keep the checkpoint tensors' names after the stack's (`w13_weight_scale_inv` for Hugging Face
fine-grained FP8, `w13_weight_scale` for compressed-tensors and `--quantization fp8`), and each loader
converts one expert tensor's rank part as it arrives (quantization/sharding.py cuts it: a tensor-parallel
split of the intermediate dimension must fall on whole 128-row blocks), so no layer is held twice.

Compute (ops.*.fused_moe with `scales`) is W8A16: activations stay in the model dtype, weights are
dequantized in registers. A checkpoint's static activation scales (compressed-tensors `input_scale`)
are read and checked, and not applied: unquantized activations are the more precise of the two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from carpool.layers.linear import loaded_shape
from carpool.layers.linear_method import set_weight_loader
from carpool.layers.moe.experts import EXPERT_KINDS, ExpertsMethod, ExpertTensor, FusedExperts
from carpool.ops.torch_ref.moe import ExpertScales
from carpool.quantization.config import FP8_BLOCK, Fp8Scheme
from carpool.quantization.formats import FP8_DTYPE, quantize_fp8_per_channel
from carpool.quantization.sharding import TensorLayout, check_shape, narrow_checkpoint_tensor, read_full
from carpool.utils import cdiv

WHOLE = TensorLayout(0, 1, 1, 1)


class Fp8ExpertsMethod(ExpertsMethod):
    """FP8 e4m3 experts from a Hugging Face fine-grained FP8 checkpoint (block scales, or one per tensor),
    a compressed-tensors float-quantized one (per channel, tensor or block) or `--quantization fp8` on a
    model-dtype checkpoint (per channel, computed while loading from each whole row)."""

    def __init__(self, scheme: Fp8Scheme) -> None:
        self.scheme = scheme
        self.block = scheme.weight_strategy == "block"
        self.online = scheme.checkpoint_format == "online"
        self.scale_name = "weight_scale" if self.online else scheme.scale_suffix()
        self.input_scale_name = None if scheme.dynamic_activations else scheme.input_scale_suffix()

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
        for name, shape in ((f"w13_{self.scale_name}", shapes13), (f"w2_{self.scale_name}", shapes2)):
            self._param(layer, name, torch.ones(shape, dtype=torch.float32), loader, required=not self.online)
        if self.input_scale_name is not None:
            for stack in ("w13", "w2"):
                self._param(layer, f"{stack}_{self.input_scale_name}", torch.zeros(e, dtype=torch.float32),
                            self._input_scale_loader(layer))

    @staticmethod
    def _param(layer: FusedExperts, name: str, data: torch.Tensor, loader: Any, required: bool = True) -> None:
        p = set_weight_loader(nn.Parameter(data, requires_grad=False), loader)
        p.checkpoint_required = required  # type: ignore[attr-defined]  # (models/loader.py: the missing check)
        layer.register_parameter(name, p)

    @staticmethod
    def _mark_loaded(layer: FusedExperts, name: str, where: ExpertTensor) -> None:
        layer.__dict__.setdefault("quant_loaded", set()).add((name, where.kind, where.local))

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
            self._mark_loaded(layer, "weight", where)
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
            self._mark_loaded(layer, self.scale_name, where)
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
            self._mark_loaded(layer, str(self.input_scale_name), where)
        return loader

    def process_weights_after_loading(self, layer: FusedExperts) -> None:
        """Every held expert's every projection arrived with its scales (the loader's own missing check
        sees a stack as loaded once any expert's tensor is)."""
        names = ["weight"] + ([] if self.online else [self.scale_name])
        if self.input_scale_name is not None:
            names.append(self.input_scale_name)
        loaded = layer.__dict__.get("quant_loaded", set())
        for name in names:
            for local in range(layer.experts_per_rank):
                for kind in EXPERT_KINDS:
                    if (name, kind, local) not in loaded:
                        raise ValueError(f"the checkpoint lacks expert {layer.expert_start + local}'s {kind} {name}")

    # ---- compute -----------------------------------------------------------------------------------------

    def scales(self, layer: FusedExperts) -> ExpertScales:
        return ExpertScales(getattr(layer, f"w13_{self.scale_name}"), getattr(layer, f"w2_{self.scale_name}"),
                            self.block)

    def apply(self, layer: FusedExperts, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        return layer.fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                               expert_start=layer.expert_start, num_global_experts=layer.num_experts,
                               scales=self.scales(layer))

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
