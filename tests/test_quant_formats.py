"""Quantized checkpoint formats: reading `quantization_config` (and refusing what carpool cannot run, naming
the field), the packed layouts against hand-worked words and the formats' own reference code, and the
conversion of each into carpool's int4 layout."""

from __future__ import annotations

import pytest
import torch

from carpool.ops.torch_ref.quant import dequantize_int4
from carpool.quantization.config import (
    CHANNEL_GROUP,
    Fp8Scheme,
    Int4Scheme,
    describe_quantization,
    is_ignored,
    parse_kv_cache_dtype,
    parse_quantization_config,
)
from carpool.quantization.formats import (
    awq_qweight_to_packed,
    awq_qzeros_to_zeros,
    dequantize_awq,
    dequantize_fp8,
    dequantize_gptq,
    dequantize_pack_quantized,
    gptq_qweight_to_packed,
    gptq_qzeros_to_zeros,
    pack_int4,
    pack_quantized_zero_point_to_zeros,
    quantize_fp8_per_block,
    unpack_int4,
)
from carpool.quantization.writers import pack_awq, pack_gptq, quantize_int4

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
HF_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}


def ct(weights: dict, acts: dict | None = None, fmt: str = "pack-quantized", **extra) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ["lm_head"], **extra}


CT_W4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False}
CT_FP8_W = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}
CT_FP8_A = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}


def parse(qc: dict, quantization: str | None = None):
    return parse_quantization_config({"quantization_config": qc}, quantization)


# --- quantization_config ---------------------------------------------------------------------------------

def test_each_format_parses_to_its_scheme() -> None:
    assert parse(AWQ) == Int4Scheme("awq", 128, symmetric=False)
    assert parse(GPTQ) == Int4Scheme("gptq", 128, symmetric=True, zero_offset=1)
    assert parse({**GPTQ, "sym": False, "checkpoint_format": "gptq_v2"}) == Int4Scheme("gptq", 128, False, 0)
    assert parse(ct(CT_W4)) == Int4Scheme("pack-quantized", 128, False, ignore=("lm_head",))
    assert parse(ct({**CT_W4, "strategy": "channel", "group_size": None})).group_size == CHANNEL_GROUP
    assert parse(HF_FP8) == Fp8Scheme("fp8", "block", (128, 128), dynamic_activations=True)
    assert parse(ct(CT_FP8_W, CT_FP8_A, "float-quantized")) == Fp8Scheme(
        "compressed-tensors", "channel", None, True, ("lm_head",))
    static = ct({**CT_FP8_W, "strategy": "tensor"}, {**CT_FP8_A, "strategy": "tensor", "dynamic": False},
                "float-quantized")
    assert parse(static).dynamic_activations is False
    assert parse_quantization_config({}, None) is None
    assert parse_quantization_config({}, "fp8") == Fp8Scheme("online", "channel", None, True)


@pytest.mark.parametrize("qc,field", [
    ({"quant_method": "bitsandbytes"}, "quant_method"),
    ({**GPTQ, "desc_act": True}, "desc_act"),
    ({**GPTQ, "bits": 8}, "bits"),
    ({**GPTQ, "group_size": 256}, "group_size"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({**AWQ, "version": "gemv"}, "version"),
    ({**AWQ, "group_size": 64, "zero_point": False}, "zero_point"),
    ({**HF_FP8, "weight_block_size": [64, 64]}, "weight_block_size"),
    ({**HF_FP8, "fmt": "e5m2"}, "fmt"),
    (ct({**CT_W4, "actorder": "group"}), "actorder"),
    (ct({**CT_W4, "num_bits": 8}), "num_bits"),
    (ct(CT_FP8_W, None, "float-quantized"), "input_activations"),
    (ct(CT_W4, fmt="marlin-24"), "format"),
    ({**ct(CT_W4), "quantization_status": "frozen"}, "quantization_status"),
])
def test_unsupported_variants_are_refused_naming_the_field(qc: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"quantization_config\.\S*{field}"):
        parse(qc)


def test_config_groups_with_different_schemes_are_refused() -> None:
    qc = ct(CT_W4)
    qc["config_groups"]["group_1"] = {"targets": ["Linear"], "weights": {**CT_W4, "symmetric": True}}
    with pytest.raises(ValueError, match="config_groups"):
        parse(qc)


def test_quantizing_an_already_quantized_checkpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="already quantized"):
        parse(AWQ, quantization="fp8")
    with pytest.raises(ValueError, match="quantization: unsupported value 'int8'"):
        parse(AWQ, quantization="int8")


def test_ignore_list_matches_names_suffixes_and_patterns_and_all_of_a_merged_layer() -> None:
    scheme = Int4Scheme("pack-quantized", 128, True, ignore=("lm_head", "re:.*mlp\\.down_proj$"))
    assert is_ignored(scheme, "lm_head")
    assert is_ignored(scheme, "model.layers.0.mlp.down_proj")
    assert not is_ignored(scheme, "model.layers.0.mlp.up_proj")
    partial = Int4Scheme("pack-quantized", 128, True, ignore=("model.layers.0.self_attn.q_proj",))
    names = tuple(f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))
    with pytest.raises(ValueError, match="only some are left unquantized"):
        is_ignored(partial, "model.layers.0.self_attn.qkv_proj", names)


def test_an_ignore_list_naming_some_experts_is_refused_with_a_short_message() -> None:
    """A routed-experts layer merges every expert's three projections: the message names a few of each
    side and their counts, not all 384 modules."""
    scheme = Int4Scheme("pack-quantized", 128, True, ignore=("model.layers.0.mlp.experts.3.gate_proj",))
    names = tuple(f"model.layers.0.mlp.experts.{e}.{p}" for e in range(128) for p in ("gate_proj", "up_proj",
                                                                                        "down_proj"))
    with pytest.raises(ValueError, match=r"^quantization_config\.ignore: .*384 checkpoint modules.*experts\.3\."
                                         r"gate_proj;.*\(383 in all\)") as err:
        is_ignored(scheme, "model.layers.0.mlp.experts", names)
    assert len(str(err.value)) < 400


def test_kv_cache_dtype_and_description() -> None:
    assert parse_kv_cache_dtype("fp8_e4m3").is_fp8 and not parse_kv_cache_dtype("auto").is_fp8
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        parse_kv_cache_dtype("int8")
    assert describe_quantization({"quantization_config": AWQ}, None, "fp8", torch.float16) == {
        "quantization": "awq", "kv_cache_dtype": "float8_e4m3fn"}
    assert describe_quantization({}, None, "auto", torch.bfloat16) == {"quantization": None,
                                                                          "kv_cache_dtype": "bfloat16"}


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_help_lists_the_quantization_and_kv_cache_dtype_choices(command: str) -> None:
    from carpool.entrypoints.cli import build_parser
    from carpool.quantization.config import KV_CACHE_DTYPES, QUANTIZATION_CHOICES

    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    text = " ".join(sub.format_help().split())
    for flag, choices in (("--quantization", QUANTIZATION_CHOICES), ("--kv-cache-dtype", KV_CACHE_DTYPES)):
        assert f"{flag} {{{','.join(choices)}}}" in text, flag


@pytest.mark.parametrize("scheme,kv,named", [
    (Fp8Scheme("compressed-tensors", "channel", None, True), "auto", "quantization fp8"),
    (None, "fp8", "kv_cache_dtype fp8"),
    (Int4Scheme("awq", 128, symmetric=False), "fp8", "kv_cache_dtype fp8")])
def test_fp8_on_a_gpu_older_than_compute_capability_8_9_is_refused_naming_the_setting(
        monkeypatch: pytest.MonkeyPatch, scheme, kv: str, named: str) -> None:
    from carpool.quantization.factory import check_device_support

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=rf"^{named}: .*8\.9 or newer; this one is 8\.0"):
        check_device_support(scheme, parse_kv_cache_dtype(kv), "triton", "cuda")
    # the torch backend runs it dequantized; an 8.9 GPU runs the kernels
    check_device_support(scheme, parse_kv_cache_dtype(kv), "torch", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    check_device_support(scheme, parse_kv_cache_dtype(kv), "triton", "cuda")


# --- packed layouts -----------------------------------------------------------------------------------------

def test_awq_word_unpacks_in_the_interleaved_order() -> None:
    """AWQ's packer puts column order_map[i] = [0, 2, 4, 6, 1, 3, 5, 7][i] into nibble i: a word whose
    nibble i holds i reads, by column, 0 4 1 5 2 6 3 7."""
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_int4(word, 1, (0, 2, 4, 6, 1, 3, 5, 7)).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]
    assert unpack_int4(word, 1).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]  # natural order (GPTQ, compressed-tensors)


def test_gptq_v1_zero_offset_and_layouts_on_a_hand_worked_layer() -> None:
    """One output column, K = 8 rows of one group: qweight word r holds rows 8r..8r+7 (nibble j = row j);
    v1 stores zero - 1, so a stored 7 is a zero of 8: W[k] = s * (k - 8)."""
    qweight = torch.tensor([[0x76543210]], dtype=torch.int32).expand(1, 8).contiguous()  # [K/8, N=8]
    qzeros = torch.tensor([[0x77777777]], dtype=torch.int32)  # [K/G=1, N/8=1]
    scales = torch.full((1, 8), 0.5)
    w = dequantize_gptq(qweight, qzeros, scales, torch.zeros(8, dtype=torch.int32), zero_offset=1)
    assert w.shape == (8, 8) and w[0].tolist() == [0.5 * (k - 8) for k in range(8)]
    assert dequantize_gptq(qweight, qzeros, scales, torch.zeros(8, dtype=torch.int32), 0)[0, 0] == -3.5


@pytest.mark.parametrize("dim", [0, 1])
def test_pack_int4_round_trips(dim: int) -> None:
    q = torch.randint(0, 16, (16, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4(q, dim), dim), q)
    assert torch.equal(unpack_int4(pack_int4(q, dim, (0, 2, 4, 6, 1, 3, 5, 7)), dim, (0, 2, 4, 6, 1, 3, 5, 7)), q)


def _layer(n: int = 24, k: int = 256, group: int = 128, symmetric: bool = False, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return quantize_int4(w, group, symmetric)


def test_awq_packer_agrees_with_the_reference_dequantization() -> None:
    q, zero, scale = _layer()
    packed = pack_awq(q, zero, scale)
    expected = (q - zero.repeat_interleave(128, 1)) * scale.float().repeat_interleave(128, 1)
    torch.testing.assert_close(dequantize_awq(packed["qweight"], packed["qzeros"], packed["scales"], 128), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("v1", [True, False])
def test_gptq_packer_agrees_with_the_reference_dequantization(v1: bool) -> None:
    q, zero, scale = _layer(symmetric=False)
    zero[0, 0] = 0  # v1 stores -1 here: read back as 16 (the v1 format's flaw, as AutoGPTQ reads it)
    p = pack_gptq(q, zero, scale, 128, v1)
    got = dequantize_gptq(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], 1 if v1 else 0)
    z = zero.clone().float()
    if v1:
        z[0, 0] = 16
    torch.testing.assert_close(got, (q - z.repeat_interleave(128, 1)) * scale.float().repeat_interleave(128, 1),
                               rtol=0, atol=0)


def test_awq_and_gptq_convert_to_the_internal_layout_losslessly() -> None:
    q, zero, scale = _layer(seed=1)
    awq = pack_awq(q, zero, scale)
    internal = dequantize_int4(awq_qweight_to_packed(awq["qweight"]), awq["scales"].t().float(),
                               awq_qzeros_to_zeros(awq["qzeros"], torch.float32), 128)
    assert torch.equal(internal, dequantize_awq(awq["qweight"], awq["qzeros"], awq["scales"], 128))
    gptq = pack_gptq(q, zero, scale, 128, v1=True)
    internal = dequantize_int4(gptq_qweight_to_packed(gptq["qweight"]), gptq["scales"].t().float(),
                               gptq_qzeros_to_zeros(gptq["qzeros"], 1, torch.float32), 128)
    assert torch.equal(internal, dequantize_gptq(gptq["qweight"], gptq["qzeros"], gptq["scales"], gptq["g_idx"], 1))


def test_pack_quantized_matches_compressed_tensors_own_decompression() -> None:
    """compressed-tensors packs its int4 layer; its decompressor and carpool's reading agree exactly."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=128, symmetric=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    g = w.unflatten(-1, (-1, 128))
    scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
    c = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero}, scheme)
    expected = PackedQuantizationCompressor.decompress(dict(c), scheme)["weight"]
    got = dequantize_pack_quantized(c["weight_packed"], c["weight_scale"], c["weight_zero_point"], 128)
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=0)
    internal = dequantize_int4(c["weight_packed"], c["weight_scale"],
                               pack_quantized_zero_point_to_zeros(c["weight_zero_point"], torch.float32), 128)
    torch.testing.assert_close(internal, expected.float(), rtol=0, atol=0)


def test_fp8_block_dequantization_matches_transformers() -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(3))  # partial blocks in both dims
    q, scale = quantize_fp8_per_block(w, (128, 128))
    expected = _dequantize_fp8_weight(q, scale, [128, 128], torch.float32)
    torch.testing.assert_close(dequantize_fp8(q, scale, (128, 128)), expected, rtol=0, atol=0)
    assert (dequantize_fp8(q, scale, (128, 128)) - w).abs().max() <= w.abs().max() / 16
