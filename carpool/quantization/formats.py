"""Checkpoint layouts of quantized weights: their reference dequantization, and their conversion to the
one layout carpool's int4 kernels read.

carpool's int4 layout (`Int4Weights`), shared by every 4-bit format after loading:
  packed [N, K/8] int32: nibble i (bits 4i..4i+3) of word j holds q[n, 8j + i], unsigned in [0, 15];
  scales [N, K/G]       : model dtype;
  zeros  [N, K/G] | None: the zero point as a float (None = symmetric: 8);
  W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G].
Rows are output channels and each row is contiguous in K, like a plain `weight` [N, K]: a GEMV streams
whole rows and tensor-parallel sharding narrows dim 0 (outputs) or dim 1 (inputs) as for plain weights.
It is compressed-tensors' `pack-quantized` 4-bit layout (weight_packed) with the zero unpacked.

The checkpoint formats (each `dequantize_*` follows the format's own reference code, named there):
- AWQ GEMM (AutoAWQ `WQLinear_GEMM`): qweight [K, N/8] int32 packed along N in the interleaved order
  AWQ_PACK_ORDER (nibble i of word j holds column 8j + AWQ_PACK_ORDER[i]); qzeros [K/G, N/8] packed
  the same way; scales [K/G, N]; W^T[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n].
- GPTQ (AutoGPTQ `QuantLinear`, GPTQModel): qweight [K/8, N] int32 packed along K (nibble i of word r
  holds row 8r + i); qzeros [K/G, N/8] packed along N in natural order; scales [K/G, N]; g_idx [K]
  (the group of each input row; k // G when desc_act is false). v1 checkpoints store zero - 1 (AutoGPTQ's
  packer subtracts 1 and its kernels add it back); gptq_v2 stores the zero.
- compressed-tensors pack-quantized int4: weight_packed [N, K/8] (carpool's layout, values stored as
  q + 8 of a signed q in [-8, 7]), weight_scale [N, K/G], optional weight_zero_point [N/8, K/G] packed
  along dim 0 (zero + 8), weight_shape [2] = (N, K); W = (q - zero) * scale.
- FP8 e4m3: weight [N, K] float8_e4m3fn with weight_scale_inv [ceil(N/128), ceil(K/128)] (Hugging Face
  fine-grained; multiplied, despite its name) or weight_scale of one value, [N] / [N, 1] per channel, or
  blocks (compressed-tensors); W = weight * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# AutoAWQ's GEMM packing: nibble i of a word holds column AWQ_PACK_ORDER[i] of its 8 columns.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
PACK = 8  # 4-bit values per int32 word
_SHIFTS = tuple(4 * i for i in range(PACK))


@dataclass(frozen=True)
class Int4Weights:
    """One layer's (or shard's) int4 weights in carpool's layout (see the module docstring)."""
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int

    def __post_init__(self) -> None:
        n, kw = self.packed.shape
        k = kw * PACK
        if self.packed.dtype != torch.int32:
            raise ValueError(f"int4 packed weight: expected int32, got {self.packed.dtype}")
        if k % self.group_size or tuple(self.scales.shape) != (n, k // self.group_size):
            raise ValueError(f"int4 scales: expected [{n}, {k // self.group_size}] for K={k}, G={self.group_size}, "
                             f"got {tuple(self.scales.shape)}")
        if self.zeros is not None and self.zeros.shape != self.scales.shape:
            raise ValueError(f"int4 zeros: expected the shape of the scales {tuple(self.scales.shape)}, got "
                             f"{tuple(self.zeros.shape)}")


# --- bit packing ---------------------------------------------------------------------------------------

def unpack_int4(words: torch.Tensor, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned 4-bit values of int32 `words`, unpacked along `dim` (which grows 8-fold), as int32.
    With `order`, nibble i of a word holds element order[i] of its eight (AWQ); else element i."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed 4-bit tensor: expected int32, got {words.dtype}")
    dim = dim % words.dim()
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=words.device)
    w = words.movedim(dim, -1)
    q = (w.unsqueeze(-1) >> shifts) & 0xF  # [..., words, nibble]
    if order is not None:
        inverse = [0] * PACK
        for nibble, element in enumerate(order):
            inverse[element] = nibble
        q = q[..., inverse]  # [..., words, element]
    return q.flatten(-2).movedim(-1, dim).contiguous()


def pack_int4(q: torch.Tensor, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of unpack_int4: values in [0, 15] packed 8 per int32 along `dim` (a multiple of 8 long)."""
    dim = dim % q.dim()
    if q.shape[dim] % PACK:
        raise ValueError(f"4-bit packing: dim {dim} of {tuple(q.shape)} is not a multiple of {PACK}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("4-bit packing: values must lie in [0, 15]")
    v = q.to(torch.int32).movedim(dim, -1).unflatten(-1, (-1, PACK))  # [..., words, element]
    if order is not None:
        v = v[..., list(order)]  # [..., words, nibble]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=q.device)
    # Nibbles occupy disjoint bits, so the sum is their bitwise or (int32 wraps for nibble 7 >= 8).
    words = (v << shifts).sum(-1, dtype=torch.int64)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


# --- checkpoint formats -> carpool's int4 layout ---------------------------------------------------------
# Each takes one checkpoint tensor (or its rank's part: a slice along whole words and groups) and
# returns it in carpool's orientation [outputs, inputs...]; the loader narrows and places it.

def awq_qweight_to_packed(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ qweight [K, N/8] -> packed [N, K/8]."""
    return pack_int4(unpack_int4(qweight, 1, AWQ_PACK_ORDER).t(), 1)


def awq_qzeros_to_zeros(qzeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """AWQ qzeros [K/G, N/8] -> zeros [N, K/G]."""
    return unpack_int4(qzeros, 1, AWQ_PACK_ORDER).t().to(dtype).contiguous()


def gptq_qweight_to_packed(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight [K/8, N] -> packed [N, K/8]: the same words, transposed (both pack along K)."""
    if qweight.dtype != torch.int32:
        raise ValueError(f"GPTQ qweight: expected int32, got {qweight.dtype}")
    return qweight.t().contiguous()


def gptq_qzeros_to_zeros(qzeros: torch.Tensor, zero_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """GPTQ qzeros [K/G, N/8] -> zeros [N, K/G], with v1's offset added back (a stored nibble of 15
    then reads as 16, as AutoGPTQ's own kernels read it)."""
    return (unpack_int4(qzeros, 1) + zero_offset).t().to(dtype).contiguous()


def pack_quantized_zero_point_to_zeros(zero_point: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors weight_zero_point [N/8, K/G] (packed along dim 0) -> zeros [N, K/G]."""
    return unpack_int4(zero_point, 0).to(dtype)


# --- reference dequantization of each checkpoint format ---------------------------------------------------

def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [N, K] float32 of an AWQ GEMM layer, as AutoAWQ's `dequantize_gemm` (awq/utils/packing_utils.py)
    computes it: unpack along N, undo the interleaved order, (q - z) * s per group of K rows, transposed."""
    q = unpack_int4(qweight, 1, AWQ_PACK_ORDER).float()  # [K, N]
    z = unpack_int4(qzeros, 1, AWQ_PACK_ORDER).float().repeat_interleave(group_size, 0)
    s = scales.float().repeat_interleave(group_size, 0)
    return ((q - z) * s).t().contiguous()


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    zero_offset: int) -> torch.Tensor:
    """W [N, K] float32 of a GPTQ layer, as AutoGPTQ's torch path (`QuantLinear.forward` without its CUDA
    kernels) computes it: W^T[k, n] = s[g, n] * (q[k, n] - (z[g, n] + offset)) with g = g_idx[k]."""
    q = unpack_int4(qweight, 0).float()  # [K, N]
    z = unpack_int4(qzeros, 1).float() + zero_offset  # [K/G, N]
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g])).t().contiguous()


def dequantize_pack_quantized(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                              weight_zero_point: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """W [N, K] float32 of a compressed-tensors pack-quantized int4 layer (PackedQuantizationCompressor's
    decompress): signed q = stored - 8, zero likewise (0 when symmetric), W = (q - zero) * scale."""
    q = unpack_int4(weight_packed, 1).float() - 8
    k = q.shape[1]
    group = k if group_size < 0 else group_size
    s = weight_scale.float().repeat_interleave(group, 1)
    if weight_zero_point is None:
        return q * s
    z = (unpack_int4(weight_zero_point, 0).float() - 8).repeat_interleave(group, 1)
    return (q - z) * s


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor,
                   block_size: tuple[int, int] | None = None) -> torch.Tensor:
    """W [N, K] float32 of FP8 weights: weight * scale, the scale per tensor (one value), per output
    channel ([N] or [N, 1]) or per block ([ceil(N/bn), ceil(K/bk)], block_size = (bn, bk))."""
    w = weight.float()
    s = scale.float()
    if block_size is not None:
        bn, bk = block_size
        s = s.repeat_interleave(bn, 0)[:w.shape[0]].repeat_interleave(bk, 1)[:, :w.shape[1]]
        return w * s
    if s.numel() == 1:
        return w * s.reshape(())
    return w * s.reshape(-1, 1)


# --- quantization (online FP8, and test checkpoints) ------------------------------------------------------

def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight e4m3 [N, K], scale float32 [N]) with scale = max |row| / 448 (1 for an all-zero row), so
    each row uses e4m3's whole range and nothing clips. Rows are independent: a shard of a merged layer
    quantizes alone to the same values."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_fp8_per_block(w: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight e4m3 [N, K], scale float32 [ceil(N/bn), ceil(K/bk)]): one scale per block, max |block| / 448."""
    bn, bk = block_size
    n, k = w.shape
    wf = w.float()
    padded = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = wf
    blocks = padded.unflatten(0, (-1, bn)).unflatten(2, (-1, bk))  # [nb, bn, kb, bk]
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (wf / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
