"""The mixture-of-experts MLP on GPU: each token's k chosen experts, gated MLP, weighted sum.

Op signature and result as `ops/torch_ref/moe.py` `fused_moe` (the oracle): hidden [T, H], w13
[E, 2I, H] (gate rows, then up rows), w2 [E, H, I], topk_weights / topk_ids [T, k] -> [T, H]. Under
tensor parallelism w13/w2 hold this rank's slice of every expert's intermediate dimension and the result
is this rank's partial sum. Under expert parallelism they hold whole experts, global ids
[expert_start, expert_start + E): the kernels read topk_ids as global ids and leave out every pair routed
to an expert held elsewhere (the sort gives it no slot, the GEMVs skip it), so a rank computes only its
experts' pairs and its result is again a partial sum (those pairs' rows of the per-pair buffer are zero).

Two paths, both reading only the experts that some token chose:
- Grouped GEMM (more than `small_batch_max_tokens` tokens): the T*k (token, slot) pairs are sorted by
  expert and each expert's segment padded to a multiple of BLOCK_M (`moe_align_block_size`: three small
  kernels, no host sync), so every BLOCK_M-row block of the sorted order belongs to one expert. One
  grouped GEMM computes gate and up for a block's rows against its expert's w13 and stores
  silu(gate) * up; a second multiplies that by the expert's w2 and by the pair's routing weight, and
  writes one row per pair; a sum over the k slots gives the token's output. No atomics: the result does
  not depend on scheduling (deterministic run to run).
- Per-pair GEMV (small batches; batch 1 reads 8 of 128 experts): program (pair, row block) reads its
  pair's expert rows directly from topk_ids, with no sorting, padding or M=16 tile of mostly zeros; the
  down GEMV takes a token's k pairs as rows of one tile in one program, so no sum kernel follows.

Routing (`fused_moe_routed`, KernelConfig.fused_moe_routing): the op may take the router logits instead
of a routing and compute the family's top-k itself (torch_ref.moe.select_experts: float32 softmax over
all experts, top-k with equal logits by increasing id, renormalization, the weights' dtype) in one
routing kernel (_moe_route_kernel, one program per token) before either path: a batch-1 MoE block is
the router GEMV, the routing kernel and the two GEMVs, all under PDL. Why not route inside the gate/up
GEMV (one launch fewer): every one of its small programs (2 rows of an expert) then routes before it can
issue a weight load: on an H100 the batch-1 gate/up GEMV of Qwen3-30B-A3B took 41 us per layer that way,
where gate/up and down together took 31.8 us from a given routing (benchmarks/EXPERIMENTS.md).

CUDA graphs: every launch's grid and every buffer depend only on (T, k, E, H, I) and the config; the
actual routing is read on the device (programs of blocks past the padded count exit at once).

FP8 experts (`scales`, ops/torch_ref/moe.ExpertScales): w13 / w2 hold e4m3 values with float32 scales per
output channel or per 128x128 block. Both paths are W8A16: hidden stays in the model dtype, each weight
tile is converted in registers (exactly: e4m3 values are bf16 / fp16 / fp32 values) and the scales are
applied in float32, per-channel ones to a finished sum, block ones to each 128-column k step's product
(the GEMVs scale each weight, their k steps spanning blocks). Why not W8A8: a step's experts see few
tokens each (batch 64 of Qwen3-30B-A3B: 4 pairs per expert), so the grouped GEMM reads weights, not
multiplies; halving the weight bytes is the gain, and activation quantization would add a kernel and
a rounding the torch reference does not have. Prefill-sized batches could use FP8 tensor cores (W8A8)
where measurements show it pays.

INT4 experts (`scales` an `Int4ExpertScales`): w13 / w2 hold carpool's packed int4 layout (8 values per
int32 along the input dim) with model-dtype scales and zero points per group of input columns. Both paths
are W4A16: each tile of packed words is unpacked and dequantized in registers by the int4 GEMV / GEMM's
helper (quant_gemv.dequantize_int4_tile), to float32 for the GEMVs and to the activation dtype for the
grouped GEMM's tl.dot, as the dense int4 kernels do.

Roundings, both paths: gate and up are rounded to the activation dtype, silu(gate) is rounded before
the multiply (as silu_and_mul), the down projection is rounded before the routing weight scales it and
again after (as the reference's `linear(...) * weight`); the k scaled rows of a token are summed in
float32 and rounded once. In float32 the paths match the reference to accumulation order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from carpool.ops.torch_ref.moe import (
    FP8_BLOCK,
    Int4ExpertScales,
    QuantizedExperts,
    TopKRouting,
    check_moe_inputs,
    max_padded_pairs,
)
from carpool.ops.triton import utils
from carpool.ops.triton.quant_gemv import dequantize_int4_tile
from carpool.ops.triton.utils import pdl_enter
from carpool.quantization.formats import FP8_DTYPE


@dataclass(frozen=True)
class GroupedGemmConfig:
    """Tiles of the two grouped GEMMs. block_m is also the alignment of each expert's segment."""
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8  # block rows swizzled together so neighbouring programs share weight tiles in L2
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"GroupedGemmConfig.{name} must be a power of two >= 16 (tl.dot), got {value}")
        if self.group_m < 1:
            raise ValueError(f"GroupedGemmConfig.group_m must be >= 1, got {self.group_m}")


@dataclass(frozen=True)
class FusedMoeConfig:
    """Which path a step takes and with what tiles (see the module docstring)."""
    small_batch_max_tokens: int = 4  # steps of at most this many tokens take the per-pair GEMV path
    gemv_block_n: int = 2  # output rows per GEMV program (gate/up: this many gate and as many up rows)
    gemm: GroupedGemmConfig = field(default_factory=GroupedGemmConfig)

    def __post_init__(self) -> None:
        if self.small_batch_max_tokens < 0:
            raise ValueError(f"FusedMoeConfig.small_batch_max_tokens must be >= 0, got {self.small_batch_max_tokens}")
        if self.gemv_block_n < 1 or self.gemv_block_n & (self.gemv_block_n - 1):
            raise ValueError(f"FusedMoeConfig.gemv_block_n must be a power of two, got {self.gemv_block_n}")


def default_gemm_config(num_tokens: int, top_k: int, num_experts: int) -> GroupedGemmConfig:
    """Tiles by the mean number of pairs per expert: few pairs (decode batches) want short blocks, or
    most rows of every block are padding; long segments (prefill) want large tiles for reuse."""
    per_expert = num_tokens * top_k / num_experts
    if per_expert <= 16:
        return GroupedGemmConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return GroupedGemmConfig(block_m=32, block_n=64, block_k=64, group_m=4, num_warps=4, num_stages=3)
    return GroupedGemmConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


def default_moe_config(num_tokens: int, top_k: int, num_experts: int) -> FusedMoeConfig:
    return FusedMoeConfig(gemm=default_gemm_config(num_tokens, top_k, num_experts))


# ---- sorting the pairs by expert ---------------------------------------------------------------------

# int4 grouped GEMM: each k step unpacks a [BLOCK_N, BLOCK_K] weight tile in registers; 128-column steps
# take 220-255 registers for sm_90 at 4 warps (scripts/quant_compile_check.py), 64-column ones fewer
# (as quant_gemm's int4 default). Unmeasured: benchmarks/bench_moe.py --int4 times the default tiles.
INT4_MAX_BLOCK_K = 64
FP8_BLOCK_C = tl.constexpr(FP8_BLOCK)  # (for the kernels: globals they read must be constexpr)

ALIGN_MAX_PROGRAMS = 64  # programs of the counting and scattering kernels (their [P, E] table is one tile)
ALIGN_CHUNK = 64  # pairs a program handles per loop step


@triton.jit
def _held_expert(global_id, expert_start, num_experts):
    """A global expert id as an index into the experts held from expert_start; -1 if held elsewhere."""
    local = global_id.to(tl.int32) - expert_start
    return tl.where((local >= 0) & (local < num_experts), local, -1)


@triton.jit(do_not_specialize=["num_pairs", "pairs_per_program", "expert_start"])
def _align_count_kernel(ids_ptr, counts_ptr, num_pairs, pairs_per_program, expert_start, num_experts,
                        E_PAD: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    """counts[p, e] = number of pairs of program p's range routed to held expert e."""
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    begin = pid * pairs_per_program
    for start in range(begin, begin + pairs_per_program, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        e = _held_expert(tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1), expert_start, num_experts)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + pid * E_PAD + experts, counts)


@triton.jit(do_not_specialize=["num_pairs", "num_programs", "num_blocks"])
def _align_offsets_kernel(counts_ptr, offsets_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs,
                          num_programs, num_blocks, num_experts, E_PAD: tl.constexpr, P_PAD: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr, USE_PDL: tl.constexpr):
    """One program: where each expert's segment starts (padded to BLOCK), where each counting program's
    pairs of each expert go (offsets[p, e]), the padding slots of every segment, the expert of every
    block and the padded total."""
    pdl_enter(USE_PDL)
    experts = tl.arange(0, E_PAD)
    progs = tl.arange(0, P_PAD)
    counts = tl.load(counts_ptr + progs[:, None] * E_PAD + experts[None, :], mask=(progs < num_programs)[:, None],
                     other=0)
    totals = tl.sum(counts, axis=0)
    padded = (totals + BLOCK - 1) // BLOCK * BLOCK
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    # Program p's pairs of expert e follow those of programs < p: the scatter is a stable sort.
    before = tl.cumsum(counts, axis=0) - counts
    tl.store(offsets_ptr + progs[:, None] * E_PAD + experts[None, :], starts[None, :] + before,
             mask=(progs < num_programs)[:, None])
    tail = tl.arange(0, BLOCK)
    pad_slots = (starts + totals)[:, None] + tail[None, :]
    tl.store(sorted_ptr + pad_slots, tl.full([E_PAD, BLOCK], 0, tl.int32) + num_pairs,
             mask=pad_slots < ends[:, None])
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    for b0 in range(0, num_blocks, BLOCKS_PER_STEP):
        blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
        # The expert of a block is the number of segments that end at or before its first row (empty
        # segments end where they start, so they are skipped).
        expert = tl.sum((ends[None, :] <= (blocks * BLOCK)[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.minimum(expert, num_experts - 1), mask=blocks < num_blocks)


@triton.jit(do_not_specialize=["num_pairs", "pairs_per_program", "expert_start"])
def _align_scatter_kernel(ids_ptr, offsets_ptr, sorted_ptr, num_pairs, pairs_per_program, expert_start,
                          num_experts, E_PAD: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    """Write each pair of program p's range at its sorted slot: offsets[p, e] plus the number of earlier
    pairs of the range routed to e (pairs of experts held elsewhere have no slot)."""
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    running = tl.load(offsets_ptr + pid * E_PAD + experts)
    begin = pid * pairs_per_program
    for start in range(begin, begin + pairs_per_program, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        e = _held_expert(tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1), expert_start, num_experts)
        valid = (offs < num_pairs) & (e >= 0)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, axis=0) - onehot
        dest = tl.sum(onehot * (running[None, :] + rank), axis=1)
        tl.store(sorted_ptr + dest, offs, mask=valid)
        running += tl.sum(onehot, axis=0)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_start: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton twin of `torch_ref.moe.moe_align_block_size` (same outputs, see its docstring)."""
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    ids = topk_ids.contiguous().view(-1)
    num_pairs = ids.numel()
    device = ids.device
    max_padded = max_padded_pairs(num_pairs, num_experts, block_size)
    num_blocks = max_padded // block_size
    e_pad = triton.next_power_of_2(num_experts)
    per_program = triton.cdiv(triton.cdiv(num_pairs, ALIGN_MAX_PROGRAMS), ALIGN_CHUNK) * ALIGN_CHUNK
    num_programs = max(1, triton.cdiv(num_pairs, per_program))
    counts = torch.empty(num_programs, e_pad, dtype=torch.int32, device=device)
    offsets = torch.empty_like(counts)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    pdl = dict(USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    _align_count_kernel[(num_programs,)](ids, counts, num_pairs, per_program, expert_start, num_experts,
                                         E_PAD=e_pad, CHUNK=ALIGN_CHUNK, **pdl)
    _align_offsets_kernel[(1,)](counts, offsets, sorted_ids, expert_ids, num_padded, num_pairs, num_programs,
                                num_blocks, num_experts, E_PAD=e_pad, P_PAD=triton.next_power_of_2(num_programs),
                                BLOCK=block_size, BLOCKS_PER_STEP=64, num_warps=8, **pdl)
    _align_scatter_kernel[(num_programs,)](ids, offsets, sorted_ids, num_pairs, per_program, expert_start,
                                           num_experts, E_PAD=e_pad, CHUNK=ALIGN_CHUNK, **pdl)
    return sorted_ids, expert_ids, num_padded


# ---- grouped GEMMs over the sorted pairs --------------------------------------------------------------

@triton.jit
def _scale_rows(s_ptr, expert, cols, up_row0, stride_se, stride_sn, SCALES: tl.constexpr):
    """Pointers to the scale rows of output columns `cols` (+ up_row0: w13's up projection) of an FP8
    expert: one scale per column (SCALES == 1), the row of 128-column blocks of its 128-row block
    (SCALES == 2; the caller adds the block column), or the row of int4 group scales (SCALES == 3)."""
    if SCALES == 2:
        rows = cols // FP8_BLOCK_C
    else:
        rows = cols
    return s_ptr + expert * stride_se + (up_row0 + rows).to(tl.int64) * stride_sn


@triton.jit
def _int4_rows(w_rows, s_rows, z_rows, row_ok, k0, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) of BLOCK_N rows of packed int4 weights, dequantized to float32
    [BLOCK_N, BLOCK_K]. w_rows / s_rows / z_rows: [BLOCK_N] pointers to each row's words, scales and zeros;
    K: the columns that exist (0 reads nothing)."""
    w_idx = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    w_ok = row_ok[:, None] & (w_idx < K // 8)[None, :]
    words = tl.load(w_rows[:, None] + w_idx[None, :], mask=w_ok, other=0)
    return dequantize_int4_tile(words, s_rows[:, None], z_rows[:, None], w_idx, w_ok, GROUP, BLOCK_N, BLOCK_K,
                                HAS_ZEROS)


@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])
def _moe_gemm_kernel(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, topk_w_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr,
                     num_pairs, num_m_blocks, N, K, stride_am, stride_we, stride_wn, stride_om, stride_se, stride_sn,
                     stride_sk, up_row0, A_ROW_DIV: tl.constexpr, GATE_UP: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     SCALES: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
                     USE_PDL: tl.constexpr):
    """Rows of one sorted block (one expert) times that expert's weight, row r of the block being pair
    p = sorted[r] and reading A row p // A_ROW_DIV (a token of hidden for gate/up, the pair's own row of
    the intermediate for down); the result goes to out row p.

    GATE_UP: N = I; the program computes gate columns n and up columns n + N of w13 and stores
    silu(gate) * up. MUL_WEIGHT: the result is scaled by the pair's routing weight.

    SCALES (FP8 weights, W8A16): 0 none; 1 per output channel, applied to the finished sums; 2 per
    128x128 block, applied to each k step's product (BLOCK_K divides 128, so a step lies in one block
    column). e4m3 values convert exactly to the activation dtype, so tl.dot runs on unscaled weights.
    3: int4 words (K counts values; GROUP columns per scale and zero, HAS_ZEROS), dequantized to the
    activation dtype before the dot (as quant_gemm.int4_gemm)."""
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    # Swizzle: GROUP_M block rows share each column block in turn (L2 reuse of A across column blocks).
    per_group = GROUP_M * num_n_blocks
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    a_rows = a_ptr + (pairs // A_ROW_DIV).to(tl.int64)[:, None] * stride_am
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # w[expert, n, k] read as a [BLOCK_K, BLOCK_N] tile of w^T.
    w_cols = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_dtype = a_ptr.dtype.element_ty
    s_gate = _scale_rows(s_ptr, expert, cols, 0, stride_se, stride_sn, SCALES)
    s_up = _scale_rows(s_ptr, expert, cols, up_row0, stride_se, stride_sn, SCALES)
    # (int4: zeros share the scales' strides; w rows of packed words)
    z_gate = _scale_rows(z_ptr, expert, cols, 0, stride_se, stride_sn, SCALES)
    z_up = _scale_rows(z_ptr, expert, cols, up_row0, stride_se, stride_sn, SCALES)
    w_rows = w_ptr + expert * stride_we + cols.to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if SCALES == 3:
            w = _int4_rows(w_rows, s_gate, z_gate, col_ok, k0, K, GROUP, BLOCK_N, BLOCK_K, HAS_ZEROS)
            acc = tl.dot(a, tl.trans(w.to(a_dtype)), acc, input_precision=PRECISION)
            if GATE_UP:
                w = _int4_rows(w_rows + N * stride_wn, s_up, z_up, col_ok, k0, K, GROUP, BLOCK_N, BLOCK_K, HAS_ZEROS)
                acc_up = tl.dot(a, tl.trans(w.to(a_dtype)), acc_up, input_precision=PRECISION)
        else:
            w = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if SCALES == 2:
                s_col = (k0 // FP8_BLOCK_C) * stride_sk
                s = tl.load(s_gate + s_col, mask=col_ok, other=0.0)
                acc += tl.dot(a, w.to(a_dtype), input_precision=PRECISION) * s[None, :]
            else:
                acc = tl.dot(a, w.to(a_dtype), acc, input_precision=PRECISION)
            if GATE_UP:
                w_up = tl.load(w_cols + N * stride_wn + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if SCALES == 2:
                    s = tl.load(s_up + (k0 // FP8_BLOCK_C) * stride_sk, mask=col_ok, other=0.0)
                    acc_up += tl.dot(a, w_up.to(a_dtype), input_precision=PRECISION) * s[None, :]
                else:
                    acc_up = tl.dot(a, w_up.to(a_dtype), acc_up, input_precision=PRECISION)
    if SCALES == 1:
        acc = acc * tl.load(s_gate, mask=col_ok, other=0.0)[None, :]
        if GATE_UP:
            acc_up = acc_up * tl.load(s_up, mask=col_ok, other=0.0)[None, :]
    dtype = out_ptr.dtype.element_ty
    if GATE_UP:
        gate = acc.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        res = act * acc_up.to(dtype).to(tl.float32)
    else:
        res = acc
    if MUL_WEIGHT:
        weight = tl.load(topk_w_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
        res = res.to(dtype).to(tl.float32) * weight[:, None]
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, res.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class _StackQuant:
    """One weight stack's format as kernel arguments: SCALES (0 none, 1 FP8 per channel, 2 FP8 128x128
    blocks, 3 int4 groups), the scale and zero tensors (the weights stand in as dummy pointers) with the
    scales' strides (int4 zeros share them), w13's first up-projection scale row, the int4 group and
    whether there are zeros, and `pack`, weight values per stored element."""
    kind: int = 0
    s: torch.Tensor | None = None
    z: torch.Tensor | None = None
    stride_se: int = 0
    stride_sn: int = 0
    stride_sk: int = 0
    up_row0: int = 0
    group: int = 8
    has_zeros: bool = False

    @property
    def pack(self) -> int:
        return 8 if self.kind == 3 else 1

    def scale_ptr(self, w: torch.Tensor) -> torch.Tensor:
        return self.s if self.s is not None else w

    def zero_ptr(self, w: torch.Tensor) -> torch.Tensor:
        return self.z if self.z is not None else self.scale_ptr(w)


def _stack_quant(scales: QuantizedExperts | None, w13: torch.Tensor, w2: torch.Tensor, stack: str) -> _StackQuant:
    """The kernel arguments of stack "w13" or "w2" (see _StackQuant)."""
    if scales is None:
        return _StackQuant()
    inter = w13.shape[1] // 2
    if isinstance(scales, Int4ExpertScales):
        g13, g2 = scales.group_sizes(w13, w2)
        s, z = (scales.w13, scales.w13_zeros) if stack == "w13" else (scales.w2, scales.w2_zeros)
        if z is not None and z.stride() != s.stride():
            raise ValueError("fused_moe: int4 zeros must have the strides of their scales")
        return _StackQuant(3, s, z, s.stride(0), s.stride(1), 0, inter if stack == "w13" else 0,
                           g13 if stack == "w13" else g2, z is not None)
    s = scales.w13 if stack == "w13" else scales.w2
    if scales.block:
        return _StackQuant(2, s, None, s.stride(0), s.stride(1), s.stride(2), s.shape[1] // 2 if stack == "w13" else 0)
    return _StackQuant(1, s, None, s.stride(0), s.stride(1), 0, inter if stack == "w13" else 0)


def _launch_gemm(a: torch.Tensor, w: torch.Tensor, q: _StackQuant, out: torch.Tensor, topk_weights: torch.Tensor,
                 sorted_ids: torch.Tensor, expert_ids: torch.Tensor, num_padded: torch.Tensor, num_pairs: int, n: int,
                 a_row_div: int, gate_up: bool, cfg: GroupedGemmConfig) -> None:
    num_m_blocks = expert_ids.numel()
    grid = (num_m_blocks * triton.cdiv(n, cfg.block_n),)
    _moe_gemm_kernel[grid](
        a, w, q.scale_ptr(w), q.zero_ptr(w), out, topk_weights, sorted_ids, expert_ids, num_padded, num_pairs,
        num_m_blocks, n, w.shape[2] * q.pack, a.stride(0), w.stride(0), w.stride(1), out.stride(0), q.stride_se,
        q.stride_sn, q.stride_sk, q.up_row0, A_ROW_DIV=a_row_div, GATE_UP=gate_up, MUL_WEIGHT=not gate_up,
        SCALES=q.kind, GROUP=q.group, HAS_ZEROS=q.has_zeros, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, PRECISION=_precision(a.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())


def _precision(dtype: torch.dtype) -> str:
    # float32 models are the exactness runs: no TF32 rounding of the operands.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- routing: softmax, top-k and renormalization ------------------------------------------------------

@triton.jit
def _route_token(logits_ptr, token, stride_lt, num_experts, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                 E_PAD: tl.constexpr, RENORMALIZE: tl.constexpr):
    """Token `token`'s routing from its router logits (torch_ref.moe.select_experts): (ids [K_PAD] int32,
    weights [K_PAD] float32), slot j < TOP_K holding the j-th largest logit (equal logits by increasing
    id) and its float32 softmax probability over all num_experts experts, divided by the chosen ones'
    sum if RENORMALIZE; slots >= TOP_K hold 0. The caller rounds the weights to their dtype on store.

    Ranking logits ranks the probabilities (softmax is increasing), and the ranking does not depend on
    the exp's last bit. K rounds of (max, lowest id at the max) over E_PAD lanes: 2 K reductions of one
    row, a few hundred cycles for Qwen3-30B-A3B's 8 of 128."""
    experts = tl.arange(0, E_PAD)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + token.to(tl.int64) * stride_lt + experts, mask=valid,
                     other=float("-inf")).to(tl.float32)
    top = tl.max(logits, axis=0)
    exps = tl.where(valid, tl.exp(logits - top), 0.0)
    denom = tl.sum(exps, axis=0)
    slots = tl.arange(0, K_PAD)
    ids = tl.zeros([K_PAD], dtype=tl.int32)
    weights = tl.zeros([K_PAD], dtype=tl.float32)
    free = valid
    for j in tl.static_range(TOP_K):
        cand = tl.where(free, logits, float("-inf"))
        best = tl.max(cand, axis=0)
        pick = tl.min(tl.where(free & (cand == best), experts, E_PAD), axis=0)
        chosen = experts == pick
        free = free & ~chosen
        prob = tl.sum(tl.where(chosen, exps, 0.0), axis=0) / denom
        ids = tl.where(slots == j, pick, ids)
        weights = tl.where(slots == j, prob, weights)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)
    return ids, weights


@triton.jit
def _moe_route_kernel(logits_ptr, ids_ptr, topk_w_ptr, stride_lt, num_experts, TOP_K: tl.constexpr,
                      K_PAD: tl.constexpr, E_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, USE_PDL: tl.constexpr):
    """Program t: token t's routing into ids[t, :TOP_K] and topk_weights[t, :TOP_K] (in their dtype)."""
    pdl_enter(USE_PDL)
    token = tl.program_id(0)
    ids, weights = _route_token(logits_ptr, token, stride_lt, num_experts, TOP_K, K_PAD, E_PAD, RENORMALIZE)
    slots = tl.arange(0, K_PAD)
    dst = token.to(tl.int64) * TOP_K + slots
    tl.store(ids_ptr + dst, ids, mask=slots < TOP_K)
    tl.store(topk_w_ptr + dst, weights.to(topk_w_ptr.dtype.element_ty), mask=slots < TOP_K)


def _routing_buffers(router_logits: torch.Tensor, routing: TopKRouting) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = router_logits.shape[0]
    dtype = router_logits.dtype if routing.weights_in_logits_dtype else torch.float32
    return (utils.empty_output((num_tokens, routing.top_k), dtype=dtype, device=router_logits.device),
            utils.empty_output((num_tokens, routing.top_k), dtype=torch.int32, device=router_logits.device))


def _check_router_logits(router_logits: torch.Tensor, routing: TopKRouting) -> None:
    if router_logits.dim() != 2 or router_logits.stride(1) != 1 or not 1 <= routing.top_k <= router_logits.shape[1]:
        raise ValueError(f"router_logits: expected [tokens, num_experts >= top_k={routing.top_k}] contiguous in "
                         f"its last dim, got {tuple(router_logits.shape)}")


def select_experts(router_logits: torch.Tensor, routing: TopKRouting) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton twin of `torch_ref.moe.select_experts` in one kernel (torch's softmax, topk, sum,
    divide and cast are five): (topk_weights [T, k] in the logits' dtype or float32, topk_ids [T, k]
    int32)."""
    _check_router_logits(router_logits, routing)
    weights, ids = _routing_buffers(router_logits, routing)
    if router_logits.shape[0]:
        num_experts = router_logits.shape[1]
        _moe_route_kernel[(router_logits.shape[0],)](
            router_logits, ids, weights, router_logits.stride(0), num_experts, TOP_K=routing.top_k,
            K_PAD=triton.next_power_of_2(routing.top_k), E_PAD=triton.next_power_of_2(num_experts),
            RENORMALIZE=routing.renormalize, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return weights, ids


# ---- per-pair GEMVs for small batches -----------------------------------------------------------------

@triton.jit
def _gemv_weights(w_ptrs, s_rows, rows, cols, mask, stride_sk, SCALES: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] weight tile in float32; with block scales (SCALES == 2) each weight times its
    block's scale (a tile may span block columns), per-channel scales are applied to the sums instead."""
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    if SCALES == 2:
        w = w * tl.load(s_rows[:, None] + (cols // FP8_BLOCK_C)[None, :] * stride_sk, mask=mask, other=0.0)
    return w


@triton.jit(do_not_specialize=["expert_start"])
def _moe_gemv_gate_up_kernel(x_ptr, w_ptr, s_ptr, z_ptr, ids_ptr, out_ptr, INTER, H, stride_xt, stride_we,
                             stride_wn, stride_se, stride_sn, stride_sk, up_row0, expert_start, num_experts,
                             TOP_K: tl.constexpr, SCALES: tl.constexpr, GROUP: tl.constexpr,
                             HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             USE_PDL: tl.constexpr):
    """Program (pair, row block): out[pair, rows] = silu(x_t . gate_e[rows]) * (x_t . up_e[rows]) with
    t = pair // TOP_K and e = topk_ids[pair] (nothing for a pair of an expert held elsewhere: the down
    kernel skips it). SCALES: as _moe_gemm_kernel (FP8 or int4 weights dequantized in registers)."""
    pdl_enter(USE_PDL)
    pair = tl.program_id(0)
    expert = _held_expert(tl.load(ids_ptr + pair), expert_start, num_experts).to(tl.int64)
    if expert < 0:
        return
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < INTER
    gate_base = w_ptr + expert * stride_we + rows.to(tl.int64) * stride_wn
    up_base = gate_base + INTER * stride_wn
    s_gate = _scale_rows(s_ptr, expert, rows, 0, stride_se, stride_sn, SCALES)
    s_up = _scale_rows(s_ptr, expert, rows, up_row0, stride_se, stride_sn, SCALES)
    z_gate = _scale_rows(z_ptr, expert, rows, 0, stride_se, stride_sn, SCALES)
    z_up = _scale_rows(z_ptr, expert, rows, up_row0, stride_se, stride_sn, SCALES)
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xt
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SCALES == 3:
            acc_gate += _int4_rows(gate_base, s_gate, z_gate, row_ok, k0, H, GROUP, BLOCK_N, BLOCK_K, HAS_ZEROS) * x
            acc_up += _int4_rows(up_base, s_up, z_up, row_ok, k0, H, GROUP, BLOCK_N, BLOCK_K, HAS_ZEROS) * x
        else:
            acc_gate += _gemv_weights(gate_base[:, None] + cols[None, :], s_gate, rows, cols, mask, stride_sk,
                                      SCALES) * x
            acc_up += _gemv_weights(up_base[:, None] + cols[None, :], s_up, rows, cols, mask, stride_sk, SCALES) * x
    dtype = out_ptr.dtype.element_ty
    gate = tl.sum(acc_gate, axis=1)
    up = tl.sum(acc_up, axis=1)
    if SCALES == 1:
        gate = gate * tl.load(s_gate, mask=row_ok, other=0.0)
        up = up * tl.load(s_up, mask=row_ok, other=0.0)
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + pair.to(tl.int64) * INTER + rows, (act * up).to(dtype), mask=row_ok)


@triton.jit(do_not_specialize=["expert_start"])
def _moe_gemv_down_kernel(inter_ptr, w_ptr, s_ptr, z_ptr, ids_ptr, topk_w_ptr, out_ptr, INTER, H, stride_we,
                          stride_wn, stride_se, stride_sn, stride_sk, expert_start, num_experts, TOP_K: tl.constexpr,
                          K_PAD: tl.constexpr, SCALES: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (token, row block): out[t, rows] = sum over the token's pairs p of
    weight[p] * (down_e[rows] . inter[p]), e = topk_ids[p], summed in float32; a pair of an expert held
    elsewhere (or a slot past TOP_K, K_PAD its power of two) adds zero and reads nothing.

    The token's K_PAD slots are rows of one tile: tile row r is slot r // BLOCK_N's expert row
    rows[r % BLOCK_N], so each k step issues the loads of all k experts at once (a loop over the slots
    waited for each expert's weights in turn, and ran at 0.58 of the copy bandwidth at batch 1)."""
    pdl_enter(USE_PDL)
    token = tl.program_id(0)
    R: tl.constexpr = K_PAD * BLOCK_N
    flat = tl.arange(0, R)
    slot = flat // BLOCK_N
    rows = tl.program_id(1) * BLOCK_N + flat % BLOCK_N
    pair = token * TOP_K + slot
    slot_ok = slot < TOP_K
    # (a slot past TOP_K reads id -1, which no rank holds: expert -1)
    expert = _held_expert(tl.load(ids_ptr + pair, mask=slot_ok, other=-1), expert_start, num_experts).to(tl.int64)
    row_ok = (rows < H) & (expert >= 0)
    weight = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    e = tl.maximum(expert, 0)
    w_base = w_ptr + e * stride_we + rows.to(tl.int64) * stride_wn
    s_rows = _scale_rows(s_ptr, e, rows, 0, stride_se, stride_sn, SCALES)
    z_rows = _scale_rows(z_ptr, e, rows, 0, stride_se, stride_sn, SCALES)
    v_rows = inter_ptr + pair.to(tl.int64) * INTER
    acc = tl.zeros([R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < INTER)[None, :]
        v = tl.load(v_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if SCALES == 3:
            acc += _int4_rows(w_base, s_rows, z_rows, row_ok, k0, INTER, GROUP, R, BLOCK_K, HAS_ZEROS) * v
        else:
            acc += _gemv_weights(w_base[:, None] + cols[None, :], s_rows, rows, cols, mask, stride_sk, SCALES) * v
    dtype = out_ptr.dtype.element_ty
    y = tl.sum(acc, axis=1)
    if SCALES == 1:
        y = y * tl.load(s_rows, mask=row_ok, other=0.0)
    y = (y.to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
    total = tl.sum(tl.reshape(tl.where(row_ok, y, 0.0), (K_PAD, BLOCK_N)), axis=0)
    out_rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + token.to(tl.int64) * H + out_rows, total.to(dtype), mask=out_rows < H)


def _gemv_block_k(k: int) -> int:
    # One step for rows of up to 2048 columns (Qwen3-30B-A3B's gate/up rows).
    return min(2048, max(16, triton.next_power_of_2(k)))


def _down_block_k(k: int) -> int:
    # The down tile has k * BLOCK_N rows: 256-column steps keep its float32 accumulator at 32 registers a
    # thread (16 rows, 4 warps), and divide Qwen3-30B-A3B's 768 columns into three steps with no masked lane.
    return min(256, max(16, triton.next_power_of_2(k)))


# ---- the op -------------------------------------------------------------------------------------------

def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: FusedMoeConfig | None = None, *, expert_start: int = 0,
              num_global_experts: int | None = None, scales: QuantizedExperts | None = None) -> torch.Tensor:
    """sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, k] -> [T, H]
    in hidden's dtype, over the pairs whose expert w13/w2 hold (global experts [expert_start,
    expert_start + E) of num_global_experts, default all). With `scales`, w13 / w2 are e4m3
    (ExpertScales) or packed int4 (Int4ExpertScales) and are dequantized in registers (W8A16 / W4A16:
    hidden is not quantized). Weights must be contiguous in their last dim; topk_ids must be valid global
    expert ids (not checked on the device: that would sync)."""
    pack = scales.pack if scales is not None else 1
    check_moe_inputs(hidden, w13, w2, topk_weights, topk_ids, expert_start, num_global_experts, pack)
    if hidden.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe: hidden, w13 and w2 must be contiguous in their last dim")
    if scales is None:
        want, what = hidden.dtype, "hidden dtype"
    elif isinstance(scales, Int4ExpertScales):
        want, what = torch.int32, "packed int4"
    else:
        want, what = FP8_DTYPE, "FP8 with scales"
    if w13.dtype != want or w2.dtype != want:
        raise ValueError(f"fused_moe: weights must be {want} ({what}), got {w13.dtype} and {w2.dtype}")
    if scales is not None:
        scales.check(w13, w2)
    num_tokens, h = hidden.shape
    num_experts, two_i = w13.shape[:2]
    inter_size, top_k = two_i // 2, topk_ids.shape[1]
    if num_tokens == 0:
        return hidden.new_empty(0, h)
    total_experts = num_experts if num_global_experts is None else num_global_experts
    # (tiles by the pairs per expert, T k / total, the same whether or not the experts are spread over ranks)
    config = config or default_moe_config(num_tokens, top_k, total_experts)
    q13, q2 = _stack_quant(scales, w13, w2, "w13"), _stack_quant(scales, w13, w2, "w2")
    ids, weights = topk_ids.contiguous(), topk_weights.contiguous()
    num_pairs = num_tokens * top_k
    inter = utils.empty_output((num_pairs, inter_size), dtype=hidden.dtype, device=hidden.device)
    pdl = dict(USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    if num_tokens <= config.small_batch_max_tokens:
        bn = config.gemv_block_n
        _moe_gemv_gate_up_kernel[(num_pairs, triton.cdiv(inter_size, bn))](
            hidden, w13, q13.scale_ptr(w13), q13.zero_ptr(w13), ids, inter, inter_size, h, hidden.stride(0),
            w13.stride(0), w13.stride(1), q13.stride_se, q13.stride_sn, q13.stride_sk, q13.up_row0, expert_start,
            num_experts, TOP_K=top_k, SCALES=q13.kind, GROUP=q13.group, HAS_ZEROS=q13.has_zeros, BLOCK_N=bn,
            BLOCK_K=_gemv_block_k(h), num_warps=4, **pdl)
        out = utils.empty_output((num_tokens, h), dtype=hidden.dtype, device=hidden.device)
        _moe_gemv_down_kernel[(num_tokens, triton.cdiv(h, bn))](
            inter, w2, q2.scale_ptr(w2), q2.zero_ptr(w2), ids, weights, out, inter_size, h, w2.stride(0),
            w2.stride(1), q2.stride_se, q2.stride_sn, q2.stride_sk, expert_start, num_experts, TOP_K=top_k,
            K_PAD=triton.next_power_of_2(top_k), SCALES=q2.kind, GROUP=q2.group, HAS_ZEROS=q2.has_zeros, BLOCK_N=bn,
            BLOCK_K=_down_block_k(inter_size), num_warps=4, **pdl)
        return out
    cfg = config.gemm
    if q13.kind == 2 and cfg.block_k > FP8_BLOCK:  # a k step must lie within one column of scale blocks
        cfg = dataclasses.replace(cfg, block_k=FP8_BLOCK)
    if q13.kind == 3 and cfg.block_k > INT4_MAX_BLOCK_K:
        cfg = dataclasses.replace(cfg, block_k=INT4_MAX_BLOCK_K)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, num_experts, cfg.block_m, expert_start)
    _launch_gemm(hidden, w13, q13, inter, weights, sorted_ids, expert_ids, num_padded, num_pairs, inter_size,
                 a_row_div=top_k, gate_up=True, cfg=cfg)
    if total_experts == num_experts:
        scaled = utils.empty_output((num_pairs, h), dtype=hidden.dtype, device=hidden.device)
    else:  # the rows of pairs held elsewhere are never written: they must add zero to the sum below
        scaled = torch.zeros((num_pairs, h), dtype=hidden.dtype, device=hidden.device)
    _launch_gemm(inter, w2, q2, scaled, weights, sorted_ids, expert_ids, num_padded, num_pairs, h, a_row_div=1,
                 gate_up=False, cfg=cfg)
    # (torch sums a bf16 tensor in float32 and rounds once, as the GEMV path does.)
    return scaled.view(num_tokens, top_k, h).sum(dim=1)


def fused_moe_routed(hidden: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     routing: TopKRouting, config: FusedMoeConfig | None = None, *, expert_start: int = 0,
                     num_global_experts: int | None = None, scales: QuantizedExperts | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_moe` from router logits [T, num_global_experts] (the router GEMV's output) rather than a
    routing: (output [T, H], topk_weights [T, k], topk_ids [T, k] int32), as torch_ref's twin
    (`select_experts` then `fused_moe`; equal logits ordered by increasing id).

    Launches: the routing kernel (_moe_route_kernel), then fused_moe's. Torch's routing is five kernels
    (softmax, topk, sum, divide, cast) that do not launch under PDL, so each also waits for its
    predecessor to finish and delays the next kernel's launch; at batch 1 of Qwen3-30B-A3B that is 48
    layers x 5 of the ~3-4 us a small kernel costs in a CUDA graph without PDL (benchmarks/bench_moe.py
    times both)."""
    total = w13.shape[0] if num_global_experts is None else num_global_experts
    if router_logits.shape != (hidden.shape[0], total):
        raise ValueError(f"router_logits: expected [T={hidden.shape[0]}, num_experts={total}], got "
                         f"{tuple(router_logits.shape)}")
    weights, ids = select_experts(router_logits, routing)
    return fused_moe(hidden, w13, w2, weights, ids, config, expert_start=expert_start,
                     num_global_experts=num_global_experts, scales=scales), weights, ids
