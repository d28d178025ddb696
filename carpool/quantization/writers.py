"""Quantized checkpoints written from a float Hugging Face checkpoint, in formats carpool loads.

Two writers over the float weights:
- `write_fp8_channel`: compressed-tensors `float-quantized` FP8 W8A8 as llm-compressor writes it:
  `weight` e4m3 [N, K] with `weight_scale` float32 [N, 1] = max |row| / 448 per output channel, and
  activations quantized per token at run time (dynamic). Bit-identical to compressed-tensors' own
  compressor on the same float32 weights (tests/test_quant_writers.py).
- `write_int4`: 4-bit weights, min-max per group of `group_size` input columns, in AutoAWQ's GEMM packing
  (`awq`, zero points) or AutoGPTQ's (`gptq` symmetric, `gptq-asym`: v1 with zero points,
  `gptq-v2-asym`: GPTQModel's v2 zeros). The packers transcribe the tools' own packing code (named in
  each docstring); AutoAWQ and AutoGPTQ themselves need CUDA builds. Round to nearest by default (what
  AWQ's activation-aware scaling and GPTQ's error compensation improve on), or GPTQ's error
  compensation given calibration Hessians (quantization/gptq.py).

Every decoder-layer projection (LINEARS) is quantized; embeddings, norms and the LM head keep the source
checkpoint's dtype. The source may be one safetensors file or a sharded one with its index; the output is
one `model.safetensors`, with config.json's `quantization_config` set and the other files (tokenizer,
generation config) copied.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from carpool.quantization.config import SUPPORTED_GROUP_SIZES
from carpool.quantization.formats import quantize_fp8_per_channel

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIXTRAL_EXPERT_LINEARS = ("w1", "w2", "w3")
# AutoAWQ's order_map: nibble i of a packed word holds column AWQ_ORDER[i] of its eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
INT4_FORMATS = ("awq", "gptq", "gptq-asym", "gptq-v2-asym")


# --- reading and writing checkpoint directories -----------------------------------------------------------

def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at `path` (one file or the shards its index names), on the CPU."""
    from safetensors.torch import load_file

    from carpool.models.loader import checkpoint_files

    weights: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        weights.update(load_file(file))
    return weights


def linear_modules(weights: dict[str, torch.Tensor]) -> list[str]:
    """The module names of the decoder-layer projections in a float checkpoint's tensors: LINEARS, and
    Mixtral's expert projections w1 / w2 / w3 (routers, `mlp.gate`, are none of these)."""
    def projection(name: str) -> bool:
        parts = name.split(".")
        return parts[-2] in LINEARS or (parts[-2] in MIXTRAL_EXPERT_LINEARS and "experts" in parts)
    return sorted(name[:-len(".weight")] for name in weights if name.endswith(".weight") and projection(name))


def copy_side_files(src: str, dst: str) -> None:
    """Everything of `src` except its weights (config, tokenizer, generation config) into `dst`."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        full = os.path.join(src, name)
        if os.path.isfile(full) and not name.endswith(".safetensors") and not name.endswith(".index.json"):
            shutil.copy(full, os.path.join(dst, name))


def set_quantization_config(path: str, quant_config: dict[str, Any] | None) -> None:
    """Set (or, with None, remove) config.json's `quantization_config` in the checkpoint at `path`."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if quant_config is None:
        cfg.pop("quantization_config", None)
    else:
        cfg["quantization_config"] = quant_config
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def _save(weights: dict[str, torch.Tensor], src: str, dst: str, quant_config: dict[str, Any]) -> str:
    from safetensors.torch import save_file

    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"dst: {dst} is the source checkpoint; write the quantized one elsewhere")
    copy_side_files(src, dst)
    for name in os.listdir(dst):  # an earlier checkpoint's weights must not mix with these
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            os.remove(os.path.join(dst, name))
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    set_quantization_config(dst, quant_config)
    return dst


# --- FP8 --------------------------------------------------------------------------------------------------

FP8_CHANNEL_CONFIG: dict[str, Any] = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "float-quantized",
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True}}},
    "ignore": ["lm_head"], "kv_cache_scheme": None,
}


def write_fp8_channel(src: str, dst: str) -> str:
    """compressed-tensors FP8 W8A8 (per-channel weights, dynamic per-token activations) of `src` in `dst`."""
    weights = read_checkpoint(src)
    for module in linear_modules(weights):
        q, scale = quantize_fp8_per_channel(weights.pop(f"{module}.weight"))
        weights[f"{module}.weight"] = q
        weights[f"{module}.weight_scale"] = scale[:, None]
    return _save(weights, src, dst, FP8_CHANNEL_CONFIG)


# --- 4-bit quantization and the AWQ / GPTQ packers ----------------------------------------------------------

def quantize_int4(w: torch.Tensor, group: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N, K] in [0, 15], zero [N, K/G], scale [N, K/G] float16) with W ~ (q - zero) * scale, min-max per
    group (the range always holds 0); symmetric: zero 8 and scale 2 max|w| / 15 (GPTQ's symmetric
    quantizer)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"group_size: {group} does not divide a projection's {k} input columns")
    g = w.float().reshape(n, k // group, group)
    if symmetric:
        scale = (2 * g.abs().amax(-1) / 15).clamp(min=1e-8)
        zero = torch.full_like(scale, 8.0)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(0, 15)
    scale = scale.half()
    q = torch.clamp(torch.round(g / scale.float()[..., None]) + zero[..., None], 0, 15)
    return q.reshape(n, k).long(), zero.long(), scale


def _or_nibbles(columns: list[np.ndarray]) -> np.ndarray:
    """uint32 words whose nibble i (bits 4i..4i+3) is columns[i] (each masked to 4 bits), as int32."""
    word = np.zeros_like(columns[0], dtype=np.uint32)
    for i, c in enumerate(columns):
        word |= (c.astype(np.uint32) & 0xF) << np.uint32(4 * i)
    return word.view(np.int32)


def pack_awq(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoAWQ's WQLinear_GEMM.from_linear packing (awq/modules/linear/gemm.py): intweight = q^T [K, N];
    for each word column c, `qweight[:, c] |= intweight[:, 8c + order_map[i]] << 4i` with order_map =
    [0, 2, 4, 6, 1, 3, 5, 7]; qzeros packed from zeros^T [K/G, N] the same way; scales^T [K/G, N]."""
    def pack(m: np.ndarray) -> np.ndarray:  # [R, N] -> [R, N/8]
        return np.stack([_or_nibbles([m[:, 8 * c + AWQ_ORDER[i]] for i in range(8)])
                         for c in range(m.shape[1] // 8)], axis=1)
    return {"qweight": torch.from_numpy(pack(q.t().numpy())), "qzeros": torch.from_numpy(pack(zero.t().numpy())),
            "scales": scale.t().contiguous()}


def pack_gptq(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group: int,
              v1: bool) -> dict[str, torch.Tensor]:
    """AutoGPTQ's QuantLinear.pack (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py): intweight = q^T
    [K, N]; `qweight[r] |= intweight[8r + j] << 4j` (packed along K); v1 stores `zeros -= 1` before
    packing qzeros along N, `qzeros[:, c] |= zeros[:, 8c + j] << 4j` (a zero of 0 wraps to 15: the v1
    format's known asymmetric flaw, read back as 16 by AutoGPTQ's kernels); gptq_v2 (GPTQModel) stores
    the zeros themselves. g_idx[k] = k // G (desc_act false)."""
    qt, zt = q.t().numpy(), zero.t().numpy() - (1 if v1 else 0)
    k, n = qt.shape
    qweight = np.stack([_or_nibbles([qt[8 * r + j] for j in range(8)]) for r in range(k // 8)], axis=0)
    qzeros = np.stack([_or_nibbles([zt[:, 8 * c + j] for j in range(8)]) for c in range(n // 8)], axis=1)
    return {"qweight": torch.from_numpy(qweight), "qzeros": torch.from_numpy(qzeros), "scales": scale.t().contiguous(),
            "g_idx": (torch.arange(k) // group).to(torch.int32)}


def int4_quantization_config(fmt: str, group: int) -> dict[str, Any]:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": fmt == "gptq",
            "checkpoint_format": "gptq_v2" if fmt == "gptq-v2-asym" else "gptq"}


def write_int4(src: str, dst: str, fmt: str = "awq", group: int = 128,
               hessians: Mapping[str, torch.Tensor] | None = None) -> str:
    """`src` with every projection quantized to 4 bits and packed as `fmt` (INT4_FORMATS), in `dst`:
    round to nearest (min-max per group of `group` input columns), or with `hessians` (one per module,
    gptq.collect_hessians) GPTQ's error compensation on the same grids."""
    if fmt not in INT4_FORMATS:
        raise ValueError(f"fmt: unknown 4-bit format {fmt!r}; choose one of {', '.join(INT4_FORMATS)}")
    if isinstance(group, bool) or group not in SUPPORTED_GROUP_SIZES:  # (what the written checkpoint must load with)
        raise ValueError(f"group_size: must be one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}, got {group!r}")
    weights = read_checkpoint(src)
    out: dict[str, torch.Tensor] = {}
    for module in linear_modules(weights):
        w = weights.pop(f"{module}.weight")
        if w.shape[0] % 8:
            raise ValueError(f"{module}.weight: {w.shape[0]} output channels do not fill whole 8-nibble words")
        if hessians is None:
            q, zero, scale = quantize_int4(w, group, symmetric=fmt == "gptq")
        elif module not in hessians:
            raise ValueError(f"hessians: none for {module}; calibrate every projection of the checkpoint")
        else:
            from carpool.quantization.gptq import gptq_quantize

            q, zero, scale = gptq_quantize(w, hessians[module], group, symmetric=fmt == "gptq")
        packed = pack_awq(q, zero, scale) if fmt == "awq" else pack_gptq(q, zero, scale, group, fmt != "gptq-v2-asym")
        out.update({f"{module}.{k}": v for k, v in packed.items()})
    out.update(weights)
    return _save(out, src, dst, int4_quantization_config(fmt, group))
