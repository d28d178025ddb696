"""Quantized GEMV / GEMM / activation-quantization Triton kernels against their torch twins
(ops/torch_ref/quant.py), under the Triton interpreter on CPU (float32 activations), compiled on a GPU.

Sizes are odd (rows and columns that fill no tile) and int4 groups change inside a tile, so a kernel
that mis-masks a tail or reads the wrong group's scale fails. Outputs are allocated poisoned with NaN.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from carpool.ops.torch_ref import quant as ref  # noqa: E402
from carpool.ops.triton import utils  # noqa: E402
from carpool.ops.triton.quant_gemm import (  # noqa: E402
    QuantGemmConfig,
    dequantize_int4,
    fp8_gemm,
    fp8_gemm_backend,
    int4_dequant_mm,
    int4_gemm,
    int4_gemm_backend,
    quantize_fp8_act,
    split_k_for,
)
from carpool.ops.triton.quant_gemv import (  # noqa: E402
    QuantGemvConfig,
    fp8_gemv,
    fp8_gemv_silu_and_mul,
    int4_gemv,
    int4_gemv_silu_and_mul,
)
from carpool.quantization.formats import (  # noqa: E402
    dequantize_gptq,
    gptq_qweight_to_packed,
    gptq_qzeros_to_zeros,
    pack_int4,
    quantize_fp8_per_block,
    quantize_fp8_per_channel,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
gpu = pytest.mark.gpu
BLOCK = (128, 128)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(utils, "empty_output", poisoned)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def int4_weights(n: int, k: int, group: int, asym: bool, seed: int = 0):
    """(packed [N, K/8], scales, zeros or None) of random 4-bit values in carpool's layout."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = 0.01 + 0.1 * torch.rand(n, k // group, generator=gen)
    zeros = torch.randint(0, 16, (n, k // group), generator=gen).float() if asym else None
    return pack_int4(q, 1), scales, zeros


def dev(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


# --- GEMV (1-8 rows) --------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("blocks", [False, True])
def test_fp8_gemv_matches_reference(m: int, blocks: bool) -> None:
    n, k = 131, 200  # a partial 128-block in both dims, a partial column step
    w = rand(n, k)
    wq, s = quantize_fp8_per_block(w, BLOCK) if blocks else quantize_fp8_per_channel(w)
    x, bias = rand(m, k, seed=1), rand(n, seed=2)
    expected = ref.fp8_linear(x, wq, s, BLOCK if blocks else None, bias)
    config = None if m == 1 else QuantGemvConfig(block_n=8, block_k=64)  # default: whole rows per step
    got = fp8_gemv(*dev(x, wq, s, bias), config=config)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("asym", [False, True])
def test_int4_gemv_matches_reference_across_group_boundaries(m: int, asym: bool) -> None:
    n, k, group = 37, 224, 32  # 7 groups, several per step; the last step is partial
    packed, scales, zeros = int4_weights(n, k, group, asym)
    x, bias = rand(m, k, seed=1), rand(n, seed=2)
    expected = ref.int4_linear(x, packed, scales, zeros, group, bias)
    for config in (None, QuantGemvConfig(block_n=2, block_k=128)):
        got = int4_gemv(*dev(x, packed, scales, zeros), group, bias.to(DEVICE), config=config)
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-5)


def test_int4_gemv_group_128_with_steps_longer_than_a_group() -> None:
    n, k, group = 9, 384, 128
    packed, scales, zeros = int4_weights(n, k, group, asym=True, seed=4)
    x = rand(2, k, seed=5)
    got = int4_gemv(*dev(x, packed, scales, zeros), group, config=QuantGemvConfig(block_k=256))
    torch.testing.assert_close(got.cpu(), ref.int4_linear(x, packed, scales, zeros, group), atol=1e-4, rtol=1e-5)


def test_fp8_block_gemv_scales_each_128_column_slice_of_a_step_with_its_own_block() -> None:
    n, k = 131, 300  # two 128-column slices per 256-column step; the second step is partial, as is row block 2
    wq, s = quantize_fp8_per_block(rand(n, k), BLOCK)
    x = rand(2, k, seed=1)
    got = fp8_gemv(*dev(x, wq, s), config=QuantGemvConfig(block_n=4, block_k=256))
    torch.testing.assert_close(got.cpu(), ref.fp8_linear(x, wq, s, BLOCK), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("k,group", [(288, 96), (224, 224)])  # a group that is not a power of two; one per row
def test_int4_gemv_matches_reference_for_groups_that_are_not_powers_of_two(k: int, group: int) -> None:
    n = 19
    packed, scales, zeros = int4_weights(n, k, group, asym=True, seed=6)
    x = rand(3, k, seed=7)
    got = int4_gemv(*dev(x, packed, scales, zeros), group, config=QuantGemvConfig(block_n=8, block_k=128))
    torch.testing.assert_close(got.cpu(), ref.int4_linear(x, packed, scales, zeros, group), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("k,group,silu", [(224, 32, False), (384, 128, True), (288, 96, False), (64, 16, True),
                                          (48, 8, False)])
def test_int4_one_row_kernel_matches_reference_and_the_rows_kernel(k: int, group: int, silu: bool) -> None:
    """Batch 1 takes the one-row kernel (per-thread sums, next step's words loaded early): steps longer and
    shorter than a group, a partial last step, groups narrower than its 4-word slices (16: 2 words, 8: 1)."""
    n = 38
    packed, scales, zeros = int4_weights(n, k, group, asym=True, seed=8)
    x = rand(1, k, seed=9)
    expected = ref.int4_linear(x, packed, scales, zeros, group)
    op = int4_gemv_silu_and_mul if silu else int4_gemv
    expected = silu_and_mul_ref(expected) if silu else expected
    for block_n, block_k in ((2, 128), (8, 256), (4, 64)):
        got = op(*dev(x, packed, scales, zeros), group, config=QuantGemvConfig(block_n=block_n, block_k=block_k))
        rows = op(*dev(x, packed, scales, zeros), group,
                  config=QuantGemvConfig(block_n=block_n, block_k=block_k, one_row=False))
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got, rows, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k,blocks,silu", [(202, False, False), (300, True, False), (200, True, True)])
def test_fp8_one_row_kernel_matches_reference(k: int, blocks: bool, silu: bool, monkeypatch) -> None:
    """bf16 x of one row (what the one-row kernel takes: x as bf16 pairs, the weight as e4m3 pairs): K not a
    multiple of the 8-column slice, block scales changing inside a step, gate/up pairs whose up rows start
    in another 128-row scale block."""
    from carpool.ops.triton import quant_gemv

    launched = []
    kernel = quant_gemv._fp8_gemv_one_row_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(quant_gemv, "_fp8_gemv_one_row_kernel", Spy())
    n = 262 if silu else 131
    w = rand(n, k) / 4
    wq, s = quantize_fp8_per_block(w, BLOCK) if blocks else quantize_fp8_per_channel(w)
    x = rand(1, k, seed=3).bfloat16()
    expected = ref.fp8_linear(x.float(), wq, s, BLOCK if blocks else None)
    op = fp8_gemv_silu_and_mul if silu else fp8_gemv
    expected = silu_and_mul_ref(expected) if silu else expected
    for block_n, block_k in ((2, 64), (8, 256)):
        got = op(*dev(x, wq, s), config=QuantGemvConfig(block_n=block_n, block_k=block_k))
        # bf16 outputs (and with SiLU-and-mul, gate, up and silu(gate) rounded to bf16 on the way): within
        # a few bf16 steps of float32, and within one of the 1-8-row kernel, which rounds the same way
        torch.testing.assert_close(got.float().cpu(), expected, atol=2e-2, rtol=3e-2)
        rows = op(*dev(x, wq, s), config=QuantGemvConfig(block_n=block_n, block_k=block_k, one_row=False))
        torch.testing.assert_close(got.float(), rows.float(), atol=1e-2, rtol=8e-3)
    assert len(launched) == 2
    op(*dev(rand(1, k + 1, seed=3).bfloat16(), *quantize_fp8_per_channel(rand(n, k + 1))),
       config=QuantGemvConfig(block_n=2, block_k=64))
    assert len(launched) == 2  # odd K: the 1-8-row kernel


@pytest.mark.parametrize("field,kwargs", [("block_n", {"block_n": 3}), ("block_k", {"block_k": 8}),
                                          ("num_warps", {"num_warps": 3})])
def test_quant_gemv_config_refuses_a_bad_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=field):
        QuantGemvConfig(**kwargs)


def test_gemv_refuses_more_than_eight_rows() -> None:
    wq, s = quantize_fp8_per_channel(rand(16, 32))
    with pytest.raises(ValueError, match=r"M <= 8"):
        fp8_gemv(*dev(rand(9, 32), wq, s))


# --- GEMV with SiLU-and-mul (merged gate/up weights) -----------------------------------------------------------

def silu_and_mul_ref(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("m,blocks,d,block_n", [
    (1, False, 37, 2),  # one gate and one up row per program, as on a GPU
    (3, True, 131, None),  # up rows start inside a 128-row scale block; the interpreter's wide programs
    (8, True, 131, 8)])
def test_fp8_gemv_silu_and_mul_matches_reference(m: int, blocks: bool, d: int, block_n: int | None) -> None:
    k = 200  # a partial 128-column block, a partial column step
    w = rand(2 * d, k) / 4  # gate values of a few units: no exp overflow
    wq, s = quantize_fp8_per_block(w, BLOCK) if blocks else quantize_fp8_per_channel(w)
    x = rand(m, k, seed=1)
    expected = silu_and_mul_ref(ref.fp8_linear(x, wq, s, BLOCK if blocks else None))
    config = None if block_n is None else QuantGemvConfig(block_n=block_n, block_k=64 if m == 1 else 128)
    got = fp8_gemv_silu_and_mul(*dev(x, wq, s), config=config)
    assert got.shape == (m, d)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m,asym,block_n", [(1, True, 2), (5, False, None)])
def test_int4_gemv_silu_and_mul_matches_reference_across_group_boundaries(m: int, asym: bool,
                                                                          block_n: int | None) -> None:
    d, k, group = 37, 224, 32  # 7 groups, several per step; the last step is partial
    packed, scales, zeros = int4_weights(2 * d, k, group, asym)
    x = rand(m, k, seed=1)
    expected = silu_and_mul_ref(ref.int4_linear(x, packed, scales, zeros, group))
    config = None if block_n is None else QuantGemvConfig(block_n=block_n, block_k=128)
    got = int4_gemv_silu_and_mul(*dev(x, packed, scales, zeros), group, config=config)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_quantized_gemv_silu_and_mul_equals_the_gemv_then_silu_and_mul_bit_for_bit() -> None:
    """float16 activations: gate and up are rounded as the GEMV stores them and silu(gate) before the
    multiply, as the two-kernel path does."""
    from carpool.ops import triton as tri

    d, k, group = 21, 96, 32
    x = rand(2, k, seed=1).half()
    wq, s = quantize_fp8_per_channel(rand(2 * d, k) / 4)
    packed, scales, zeros = int4_weights(2 * d, k, group, asym=True)
    scales, zeros = scales.half(), zeros.half()
    for config in (None, QuantGemvConfig(block_n=2, block_k=64)):
        assert torch.equal(fp8_gemv_silu_and_mul(*dev(x, wq, s), config=config),
                           tri.silu_and_mul(fp8_gemv(*dev(x, wq, s), config=config)))
        assert torch.equal(int4_gemv_silu_and_mul(*dev(x, packed, scales, zeros), group, config=config),
                           tri.silu_and_mul(int4_gemv(*dev(x, packed, scales, zeros), group, config=config)))


def test_gemv_silu_and_mul_refuses_an_odd_weight_or_unpaired_programs() -> None:
    wq, s = quantize_fp8_per_channel(rand(9, 32))
    with pytest.raises(ValueError, match="gate and up"):
        fp8_gemv_silu_and_mul(*dev(rand(1, 32), wq, s))
    wq, s = quantize_fp8_per_channel(rand(8, 32))
    with pytest.raises(ValueError, match="block_n"):
        fp8_gemv_silu_and_mul(*dev(rand(1, 32), wq, s), config=QuantGemvConfig(block_n=1))


# --- activation quantization -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["token", "group", "static"])
def test_fp8_activation_quantization_equals_reference_bit_for_bit(mode: str) -> None:
    x = 3 * rand(5, 300)
    x[2] = 0.0  # an all-zero row: a finite scale, zeros out
    kwargs = {"token": {}, "group": {"group_size": 128}, "static": {"static_scale": torch.tensor([0.02])}}[mode]
    expected_q, expected_s = ref.quantize_fp8_activations(x, **kwargs)
    on_device = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    got_q, got_s = quantize_fp8_act(*dev(x), **on_device)
    assert torch.equal(got_q.cpu().view(torch.uint8), expected_q.view(torch.uint8))
    assert torch.equal(got_s.cpu(), expected_s)


@pytest.mark.parametrize("op", ["norm", "add_norm", "silu"])
@pytest.mark.parametrize("mode,d", [("token", 300), ("group", 300), ("group", 2100), ("static", 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_silu_written_as_fp8_equal_the_op_then_the_quantization(op: str, mode: str, d: int,
                                                                          dtype: torch.dtype) -> None:
    """rms_norm_fp8 / silu_and_mul_fp8 give the bytes and scales of the model-dtype op followed by
    quantize_fp8_act, padding rows included: 300 columns end inside a 128-column group, 2,100 spread
    17 groups over programs of 8, one row is all zeros, and a residual's sum comes back unchanged."""
    from carpool.ops.triton import elementwise as ew

    m, rows = 5, 8
    x = (3 * rand(m, 2 * d if op == "silu" else d)).to(dtype)
    x[2] = 0.0
    residual = (rand(m, d, seed=1) if op == "add_norm" else torch.zeros(0)).to(dtype)
    if op == "add_norm":
        residual[2] = 0.0
    weight = (1 + rand(d, seed=2) / 4).to(dtype)
    group = 128 if mode == "group" else None
    static = torch.tensor([0.02]).to(DEVICE) if mode == "static" else None
    x, residual, weight = dev(x, residual, weight)
    if op == "silu":
        expected_in = ew.silu_and_mul(x)
        got_q, got_s = ew.silu_and_mul_fp8(x, group, static, rows)
    else:
        res = residual if op == "add_norm" else None
        expected_in, expected_res = ew.fused_add_rms_norm(x, res, weight, 1e-6) if res is not None else (
            ew.rms_norm(x, weight, 1e-6), None)
        got_q, got_s, got_res = ew.rms_norm_fp8(x, res, weight, 1e-6, group, static, rows)
        assert (got_res is None) == (res is None)
        if res is not None:
            assert torch.equal(got_res, expected_res)
    expected_q, expected_s = quantize_fp8_act(expected_in, group, static, rows)
    assert got_q.shape == (rows, d) and torch.equal(got_q.cpu().view(torch.uint8), expected_q.cpu().view(torch.uint8))
    assert got_s.stride() == expected_s.stride() and torch.equal(got_s.cpu(), expected_s.cpu())
    assert torch.equal(got_q[m:].cpu().float(), torch.zeros(rows - m, d))


def test_norm_and_silu_written_as_fp8_refuse_too_few_rows_or_a_weight_of_another_dtype() -> None:
    from carpool.ops.triton import elementwise as ew

    x, weight = dev(rand(4, 64), rand(32))
    with pytest.raises(ValueError, match="rows must be >= M = 4"):
        ew.silu_and_mul_fp8(x, None, None, 3)
    with pytest.raises(ValueError, match="weight must be in x's dtype"):
        ew.rms_norm_fp8(x[:, :32], None, weight.to(torch.bfloat16), 1e-6, None, None, 4)


def test_fp8_rounding_matches_torch_over_the_whole_range() -> None:
    """Round to nearest even, saturating at +-448: every e4m3 interval, ties, subnormals and overflow."""
    x = torch.cat([torch.linspace(-460, 460, 9983), torch.logspace(-12, 2.66, 2000), -torch.logspace(-12, 2.66, 2000),
                   torch.tensor([0.0, 124.0, 120.0 + 4.0, 2.0 ** -10, 3 * 2.0 ** -10])])
    x = torch.nn.functional.pad(x, (0, -x.numel() % 128)).reshape(-1, 128)
    one = torch.tensor([1.0])
    expected = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    got, _ = quantize_fp8_act(*dev(x), static_scale=one.to(DEVICE))
    assert torch.equal(got.cpu().view(torch.uint8), expected.view(torch.uint8))


# --- GEMM --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activations", ["token", "static"])
def test_fp8_gemm_with_channel_scales_matches_reference(activations: str) -> None:
    m, n, k = 19, 50, 264
    wq, s = quantize_fp8_per_channel(rand(n, k))
    x, bias = rand(m, k, seed=1), rand(n, seed=2)
    static = torch.tensor([0.01]) if activations == "static" else None
    xq, xs = ref.quantize_fp8_activations(x, static_scale=static)
    expected = ref.w8a8_linear(xq, xs, wq, s, None, torch.float32, bias)
    got = fp8_gemm(*dev(xq, xs, wq, s), torch.float32, bias.to(DEVICE))
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-5)


def test_fp8_gemm_with_block_scales_matches_reference() -> None:
    m, n, k = 33, 150, 300  # partial blocks in N and K
    wq, s = quantize_fp8_per_block(rand(n, k), BLOCK)
    x = rand(m, k, seed=1)
    xq, xs = ref.quantize_fp8_activations(x, group_size=128)
    expected = ref.w8a8_linear(xq, xs, wq, s, BLOCK, torch.float32)
    for config in (None, QuantGemmConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=1)):
        got = fp8_gemm(*dev(xq, xs, wq, s), torch.float32, config=config)
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("asym", [False, True])
def test_int4_gemm_matches_reference_across_group_boundaries(asym: bool) -> None:
    m, n, k, group = 21, 45, 192, 32
    packed, scales, zeros = int4_weights(n, k, group, asym, seed=7)
    x, bias = rand(m, k, seed=1), rand(n, seed=2)
    expected = ref.int4_linear(x, packed, scales, zeros, group, bias)
    got = int4_gemm(*dev(x, packed, scales, zeros), group, bias.to(DEVICE),
                    config=QuantGemmConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=1))
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("swap_ab", [False, True])
def test_int4_gemm_split_k_matches_reference_with_uneven_splits_and_tails(swap_ab: bool) -> None:
    """7 K steps of 32 columns (the last holding 24) in 3 splits of 3, 3 and 1 steps, rows and channels
    that fill no tile, and the bias added once by the reduction, not per split."""
    m, n, k, group = 19, 45, 216, 72  # group 72: no power-of-two divisor >= 16, scales gathered per column
    packed, scales, zeros = int4_weights(n, k, group, asym=True, seed=3)
    x, bias = rand(m, k, seed=1), rand(n, seed=2)
    expected = ref.int4_linear(x, packed, scales, zeros, group, bias)
    config = QuantGemmConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1, split_k=3,
                             swap_ab=swap_ab)
    got = int4_gemm(*dev(x, packed, scales, zeros), group, bias.to(DEVICE), config=config)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-5)


def test_int4_gemm_with_one_group_per_step_matches_reference_symmetric() -> None:
    """Group 64 with 32-column steps: the aligned path (one scale row per step), zeros = 8."""
    m, n, k, group = 33, 40, 256, 64
    packed, scales, _ = int4_weights(n, k, group, asym=False, seed=5)
    x = rand(m, k, seed=6)
    config = QuantGemmConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1, swap_ab=True)
    got = int4_gemm(*dev(x, packed, scales), None, group, config=config)
    torch.testing.assert_close(got.cpu(), ref.int4_linear(x, packed, scales, None, group), atol=1e-4, rtol=1e-5)


def test_int4_gemm_reads_gptq_v1_zeros_as_autogptq_does() -> None:
    """A GPTQ v1 checkpoint (zeros stored minus one, nibbles up to 15, so zero points up to 16) converted
    to carpool's layout multiplies as AutoGPTQ's dequantization says."""
    n, k, group, m = 24, 128, 32, 17
    gen = torch.Generator().manual_seed(8)
    qweight = pack_int4(torch.randint(0, 16, (k, n), generator=gen), 0)  # [K/8, N], packed along K
    qzeros = pack_int4(torch.randint(0, 16, (k // group, n), generator=gen), 1)  # [K/G, N/8]
    scales = 0.01 + 0.1 * torch.rand(k // group, n, generator=gen)
    g_idx = torch.arange(k) // group
    expected = rand(m, k, seed=9) @ dequantize_gptq(qweight, qzeros, scales, g_idx, zero_offset=1).t()
    packed, zeros = gptq_qweight_to_packed(qweight), gptq_qzeros_to_zeros(qzeros, 1, torch.float32)
    config = QuantGemmConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1, split_k=2)
    got = int4_gemm(*dev(rand(m, k, seed=9), packed, scales.t().contiguous(), zeros), group, config=config)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("group", [32, 72])
def test_int4_dequantization_kernel_equals_reference_bit_for_bit(group: int) -> None:
    n, k = 37, 288  # group 72: 64-column steps with per-column scales, the last step partial
    packed, scales, zeros = int4_weights(n, k, group, asym=True, seed=10)
    got = dequantize_int4(*dev(packed, scales, zeros), group, torch.float32)
    assert torch.equal(got.cpu(), ref.dequantize_int4(packed, scales, zeros, group))


def test_int4_dequant_mm_matches_reference() -> None:
    m, n, k, group = 9, 30, 128, 32
    packed, scales, zeros = int4_weights(n, k, group, asym=True, seed=11)
    x, bias = rand(m, k, seed=1), rand(n, seed=2)
    got = int4_dequant_mm(*dev(x, packed, scales, zeros), group, bias.to(DEVICE))
    torch.testing.assert_close(got.cpu(), ref.int4_linear(x, packed, scales, zeros, group, bias), atol=1e-5,
                               rtol=1e-5)


def test_int4_backend_dequantizes_whole_weights_only_for_prefill_sized_batches() -> None:
    from carpool.ops.triton.quant_gemm import INT4_DEQUANT_MM_MIN_ROWS

    assert int4_gemm_backend(64, 4096, 4096) == "triton"
    assert int4_gemm_backend(INT4_DEQUANT_MM_MIN_ROWS - 1, 4096, 4096) == "triton"
    assert int4_gemm_backend(INT4_DEQUANT_MM_MIN_ROWS, 4096, 4096) == "dequant_mm"


@pytest.mark.parametrize("tiles,k_steps", [(32, 64), (48, 32), (32, 224), (7, 5), (200, 64)])
def test_split_k_leaves_no_split_empty_and_splits_only_below_one_wave(tiles: int, k_steps: int) -> None:
    split = split_k_for(tiles, k_steps, sms=132)
    per_split = -(-k_steps // split)
    assert (split - 1) * per_split < k_steps  # the last split has steps
    assert split == 1 if tiles >= 132 else 1 <= split and tiles * split <= 2 * 132 + tiles


def test_group_activation_scales_are_m_major_and_padding_rows_quantize_zeros() -> None:
    x = rand(5, 300)
    xq, scale = quantize_fp8_act(*dev(x), group_size=128, rows=8)
    assert scale.shape == (8, 3) and scale.stride() == (1, 8)  # (torch._scaled_mm's 1x128 layout)
    expected_q, expected_s = ref.quantize_fp8_activations(x, group_size=128)
    assert torch.equal(xq[:5].cpu().view(torch.uint8), expected_q.view(torch.uint8))
    assert torch.equal(scale[:5].cpu(), expected_s)
    assert torch.equal(xq[5:].cpu().float(), torch.zeros(3, 300))


def test_fp8_gemm_with_block_scales_and_tiles_wider_than_a_scale_block_matches_reference() -> None:
    """block_n 256: a tile spans two 128-row scale blocks (scales per column), not one value per step."""
    m, n, k = 17, 300, 256
    wq, s = quantize_fp8_per_block(rand(n, k), BLOCK)
    xq, xs = ref.quantize_fp8_activations(rand(m, k, seed=1), group_size=128)
    got = fp8_gemm(*dev(xq, xs, wq, s), torch.float32,
                   config=QuantGemmConfig(block_m=16, block_n=256, block_k=128, num_warps=4, num_stages=1))
    torch.testing.assert_close(got.cpu(), ref.w8a8_linear(xq, xs, wq, s, BLOCK, torch.float32), atol=1e-4, rtol=1e-5)


def test_fp8_block_scales_take_scaled_mm_only_where_it_has_block_scaling() -> None:
    assert fp8_gemm_backend(64, 4096, 4096, block_scales=True, out_dtype=torch.bfloat16,
                            block_scaled_mm=True) == "scaled_mm"
    assert fp8_gemm_backend(64, 4096, 4096, block_scales=True, out_dtype=torch.bfloat16,
                            block_scaled_mm=False) == "triton"
    assert fp8_gemm_backend(64, 4096, 4100, block_scales=True, out_dtype=torch.bfloat16,
                            block_scaled_mm=True) == "triton"


def test_quant_gemm_config_refuses_tiles_tl_dot_cannot_take() -> None:
    with pytest.raises(ValueError, match="block_k"):
        QuantGemmConfig(block_k=8)
    with pytest.raises(ValueError, match="split_k"):
        QuantGemmConfig(split_k=0)


def test_fp8_gemm_backend_sends_block_scales_and_unaligned_shapes_to_triton() -> None:
    assert fp8_gemm_backend(64, 4096, 4096, block_scales=True, out_dtype=torch.bfloat16) == "triton"
    assert fp8_gemm_backend(64, 4096, 4100, block_scales=False, out_dtype=torch.bfloat16) == "triton"
    assert fp8_gemm_backend(64, 4096, 4096, block_scales=False, out_dtype=torch.float32) == "triton"
    assert fp8_gemm_backend(64, 4096, 4096, block_scales=False, out_dtype=torch.bfloat16) == "scaled_mm"


# --- bf16 on a GPU -------------------------------------------------------------------------------------------

@gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU")
def test_bf16_quantized_kernels_match_reference_on_gpu() -> None:
    from carpool.ops.triton.quant_gemm import fp8_scaled_mm

    m, n, k = 40, 512, 1024
    x = rand(m, k).to("cuda", torch.bfloat16)
    wq, s = quantize_fp8_per_channel(rand(n, k))
    wq, s = wq.cuda(), s.cuda()
    xq, xs = quantize_fp8_act(x)
    expected = ref.w8a8_linear(xq.cpu(), xs.cpu(), wq.cpu(), s.cpu(), None, torch.float32)
    # Hopper's FP8 tensor cores accumulate with fewer mantissa bits than fp32, so the error follows the size
    # of the partial sums (outputs here are ~N(0, 32^2)), not of each output: absolute tolerance 1e-3 of the
    # largest output (a wrong scale or tile is off by far more).
    atol = 1e-3 * expected.abs().max().item()
    for got in (fp8_gemm(xq, xs, wq, s, torch.bfloat16), fp8_scaled_mm(xq, xs, wq, s, torch.bfloat16)):
        torch.testing.assert_close(got.float().cpu(), expected, atol=atol, rtol=2e-2)
    torch.testing.assert_close(fp8_gemv(x[:4], wq, s).float().cpu(),
                               ref.fp8_linear(x[:4].float().cpu(), wq.cpu(), s.cpu()), atol=2e-2, rtol=2e-2)
    packed, scales, zeros = int4_weights(n, k, 128, asym=True)
    packed, scales, zeros = packed.cuda(), scales.cuda().bfloat16(), zeros.cuda().bfloat16()
    # Each kernel against its own arithmetic in float32: the GEMM rounds each dequantized weight to bf16 for
    # the tensor cores (2^-8 relative: over K = 1024 products that moves outputs of ~N(0, 14^2) by ~0.02, up to
    # 0.11 near zero, so a float32-weight reference would need a tolerance as loose as a wrong zero point's
    # error); the GEMV keeps float32 weights. Left: fp32 accumulation order (1e-4 of the largest output)
    # and the bf16 output's rounding (half an ulp, 2^-8 relative; rtol one ulp). A wrong zero point or a
    # group's scale read for the next group moves outputs by ~0.5 and more.
    xf, zf = x.float().cpu(), zeros.float().cpu()
    w_bf16 = ref.dequantize_int4(packed.cpu(), scales.cpu(), zeros.cpu(), 128, torch.bfloat16).float()
    expected = xf @ w_bf16.t()
    atol = 1e-4 * expected.abs().max().item()
    torch.testing.assert_close(int4_gemm(x, packed, scales, zeros, 128).float().cpu(), expected, atol=atol,
                               rtol=2 ** -7)
    expected = ref.int4_linear(xf[:8], packed.cpu(), scales.float().cpu(), zf, 128)
    torch.testing.assert_close(int4_gemv(x[:8], packed, scales, zeros, 128).float().cpu(), expected, atol=atol,
                               rtol=2 ** -7)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [16, 40, 64, 200, 1024])
def test_bf16_int4_linear_and_block_fp8_linear_match_reference_on_gpu(m: int) -> None:
    """The dispatch's GEMMs at their defaults: int4 split-K / swap_ab tiles (16-64 rows), 128-row tiles (200)
    and dequantize-then-cuBLAS (1024); block FP8 through torch._scaled_mm's block scaling where the probe
    found it (rows padded), else Triton."""
    from carpool.ops.triton.quant_gemm import block_scaled_mm_rows, fp8_linear, int4_linear

    n, k = 768, 2048
    x = rand(m, k).to("cuda", torch.bfloat16)
    packed, scales, zeros = int4_weights(n, k, 128, asym=True)
    scales, zeros = scales.bfloat16(), zeros.bfloat16()
    # Against the GEMMs' own arithmetic: each dequantized weight rounded to bf16 for the tensor cores (a
    # float32-weight reference differs from it by up to ~0.19 here, more than a tolerance that still catches a
    # wrong zero point); left are the fp32 accumulation order and the bf16 output's rounding, as above.
    expected = x.float().cpu() @ ref.dequantize_int4(packed, scales, zeros, 128, torch.bfloat16).float().t()
    got = int4_linear(x, packed.cuda(), scales.cuda(), zeros.cuda(), 128)
    torch.testing.assert_close(got.float().cpu(), expected, atol=1e-4 * expected.abs().max().item(), rtol=2 ** -7)
    wq, s = quantize_fp8_per_block(rand(n, k), BLOCK)
    xq, xs = ref.quantize_fp8_activations(x.float().cpu(), group_size=128)
    expected = ref.w8a8_linear(xq, xs, wq, s, BLOCK, torch.float32)
    got = fp8_linear(x, wq.cuda(), s.cuda())
    assert block_scaled_mm_rows(x.device) in (0, 1, 16)
    torch.testing.assert_close(got.float().cpu(), expected, atol=1e-3 * expected.abs().max().item(), rtol=2e-2)


def test_quant_benchmark_imports_on_cpu_and_counts_bytes_per_method() -> None:
    """benchmarks/bench_quant.py's dry run (no GPU): FP8 reads about half of bf16's bytes at batch 1, INT4
    (group 128, with scales and zeros) about a quarter plus 3%."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_quant.py")
    spec = importlib.util.spec_from_file_location("bench_quant", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    report = bench.dry_run()
    bytes_at_1 = {row["method"]: row["bytes"] for row in report["decode"] if row["batch"] == 1}
    assert 0.49 < bytes_at_1["fp8"] / bytes_at_1["bf16"] < 0.51
    assert 0.25 < bytes_at_1["int4"] / bytes_at_1["bf16"] < 0.28
