"""Quantized linear methods inside a model: each checkpoint tensor lands in carpool's layout, split across
tensor-parallel ranks exactly as the plain weights are, `--quantization fp8` quantizes while loading,
loading errors name the tensor, and the Triton paths (GEMV and GEMM) agree with the torch path."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from quant_checkpoints import ENGINE_CELLS, FAMILIES, FORMATS, make_quant_checkpoint, run_prompt_logits
from safetensors.torch import load_file, save_file

from carpool.config import ModelConfig
from carpool.distributed import Communicator, TPGroup
from carpool.layers.linear import LinearBase
from carpool.models.loader import load_model
from carpool.models.registry import get_model_class
from carpool.models.runtime import ModelRuntime
from carpool.quantization.config import parse_quantization_config
from carpool.quantization.formats import quantize_fp8_per_channel
from carpool.quantization.methods import QuantizedLinearMethod


def runtime(config: ModelConfig, backend: str = "torch", quantization: str | None = None, rank: int = 0,
            size: int = 1) -> ModelRuntime:
    scheme = parse_quantization_config(config.hf_config, quantization)
    packed = get_model_class(config.architecture).packed_modules_mapping
    return ModelRuntime.for_inference(backend, Communicator(TPGroup(rank, size)), quantization=scheme,
                                      packed_modules=packed)


def dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every linear layer's logical weight (float32), dequantized by its method."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LinearBase):
            method = m.method
            out[name] = method.dequantized_weight(m) if hasattr(method, "dequantized_weight") else m.weight.float()
    return out


def load(path: str, quantization: str | None = None, rank: int = 0, size: int = 1, backend: str = "torch"):
    config = ModelConfig.from_pretrained(path, dtype="float32")
    return load_model(config, runtime(config, backend, quantization, rank, size), "cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    def make(arch: str, fmt: str, group: int = 128, **overrides) -> tuple[str, str]:
        return make_quant_checkpoint(tmp_path_factory, arch, fmt, group, **overrides)
    return make


@pytest.mark.parametrize("arch,fmt", [("llama", "awq"), ("qwen2", "gptq-asym"), ("qwen3", "ct-w4a16"),
                                      ("llama", "ct-fp8-channel"), ("qwen2", "fp8-block")])
def test_loaded_weights_equal_the_format_reference(ckpt, arch: str, fmt: str) -> None:
    """Each layer's weight, as the method stores it, dequantizes to the reference checkpoint's weight:
    merged q/k/v and gate/up shards land in their rows, scales and zeros in their groups."""
    quantized, reference = ckpt(arch, fmt)
    got = dequantized(load(quantized))
    expected = dequantized(load(reference))
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


# Every (family, format) cell that the whole engine does not run (test_quant_engine.py runs ENGINE_CELLS).
MODEL_ONLY_CELLS = [(arch, fmt) for arch in FAMILIES for fmt in FORMATS if (arch, fmt) not in ENGINE_CELLS]


@pytest.mark.parametrize("arch,fmt", MODEL_ONLY_CELLS)
def test_chunked_prefill_logits_equal_the_dequantized_reference_in_every_family(ckpt, arch: str, fmt: str) -> None:
    """Each format in each family (Qwen2's q/k/v biases, Qwen3's q/k norms and head_dim): a prompt prefilled
    in chunks of 8 through the paged cache gives, at every position, the logits and greedy token of
    transformers (float32) on the checkpoint dequantized by the format's reference."""
    quantized, reference = ckpt(arch, fmt)
    assert_chunked_prefill_logits_equal(load(quantized), reference)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_online_fp8_chunked_prefill_logits_equal_the_per_channel_reference(ckpt, tmp_path, arch: str) -> None:
    """`--quantization fp8` in the families the engine test (Llama) does not run."""
    from quant_checkpoints import write_online_fp8_reference

    path, _ = ckpt(arch, "float")
    assert_chunked_prefill_logits_equal(load(path, "fp8"), write_online_fp8_reference(path, str(tmp_path / "ref")))


def assert_chunked_prefill_logits_equal(model: torch.nn.Module, reference: str) -> None:
    """Every decoder projection of `model` is quantized, and a 21-token prompt prefilled in chunks of 8
    gives transformers' logits (float32) on the float checkpoint at `reference`, and its argmax tokens."""
    from transformers import AutoModelForCausalLM

    decoder_linears = [m for name, m in model.named_modules() if isinstance(m, LinearBase) and ".layers." in name]
    assert decoder_linears and all(isinstance(m.method, QuantizedLinearMethod) for m in decoder_linears)
    prompt = torch.randint(0, 256, (21,), generator=torch.Generator().manual_seed(0)).tolist()
    got = run_prompt_logits(model, model.attention_layers(), prompt, 8, torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch,fmt", [("llama", "awq"), ("qwen2", "gptq"), ("qwen3", "ct-w4a16-sym"),
                                      ("llama", "ct-fp8-tensor-static")])
def test_tensor_parallel_ranks_hold_their_slices(ckpt, arch: str, fmt: str) -> None:
    """Loaded as rank 0 or 1 of 2, each rank's dequantized weights are its slice of the single-rank model's:
    output rows for q/k/v (by heads) and gate/up, input columns for o and down. Groups of 32 columns,
    so that every rank's inputs are whole groups."""
    quantized, _ = ckpt(arch, fmt, group=32)
    assert_ranks_hold_their_slices(quantized)


def assert_ranks_hold_their_slices(path: str, quantization: str | None = None) -> None:
    whole = dequantized(load(path, quantization))
    config = ModelConfig.from_pretrained(path, dtype="float32")
    for rank in range(2):
        part = dequantized(load(path, quantization, rank=rank, size=2))
        for name, w in part.items():
            layer = name.rsplit(".", 1)[1]
            if layer in ("o_proj", "down_proj"):
                k = w.shape[1]
                torch.testing.assert_close(w, whole[name][:, rank * k:(rank + 1) * k], rtol=0, atol=0, msg=name)
            elif layer == "gate_up_proj":
                n = config.intermediate_size
                gate, up = whole[name][:n], whole[name][n:]
                half = n // 2
                expected = torch.cat([gate[rank * half:(rank + 1) * half], up[rank * half:(rank + 1) * half]])
                torch.testing.assert_close(w, expected, rtol=0, atol=0, msg=name)
            else:  # qkv_proj: 4 q heads -> 2 per rank, 2 kv heads -> 1 per rank
                d = config.head_dim
                q, k, v = whole[name].split([4 * d, 2 * d, 2 * d])
                expected = torch.cat([q[rank * 2 * d:(rank + 1) * 2 * d], k[rank * d:(rank + 1) * d],
                                      v[rank * d:(rank + 1) * d]])
                torch.testing.assert_close(w, expected, rtol=0, atol=0, msg=name)


def test_online_fp8_ranks_hold_their_slices_of_the_single_rank_weights(ckpt) -> None:
    """`--quantization fp8` under TP: a row-parallel rank's input columns keep the scale of the whole
    output row, so TP=2 serves the same quantized model as one process."""
    path, _ = ckpt("llama", "float")
    assert_ranks_hold_their_slices(path, "fp8")


def test_online_fp8_quantizes_each_weight_per_channel_while_loading(ckpt) -> None:
    path, _ = ckpt("llama", "float")
    model = load(path, quantization="fp8")
    plain = dequantized(load(path))
    for name, m in model.named_modules():
        if isinstance(m, LinearBase):
            assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.shape == (m.output_size,)
            q, scale = quantize_fp8_per_channel(plain[name])
            torch.testing.assert_close(m.method.dequantized_weight(m), q.float() * scale[:, None], rtol=0, atol=0)


def _edited_copy(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    weights = load_file(os.path.join(dst, "model.safetensors"))
    edit(weights)
    save_file(weights, os.path.join(dst, "model.safetensors"))
    return dst


def test_a_missing_scale_of_a_merged_shard_is_named(ckpt, tmp_path) -> None:
    quantized, _ = ckpt("llama", "awq")
    path = _edited_copy(quantized, str(tmp_path / "c"), lambda w: w.pop("model.layers.1.self_attn.k_proj.scales"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj: .*lacks .*scales for its shard 'k'"):
        load(path)


def test_a_scale_of_the_wrong_shape_is_named(ckpt, tmp_path) -> None:
    quantized, _ = ckpt("qwen2", "gptq")
    name = "model.layers.0.mlp.down_proj.scales"
    path = _edited_copy(quantized, str(tmp_path / "c"), lambda w: w.update({name: w[name][:1]}))
    expected = rf"checkpoint tensor '{name}': scales: expected shape \[2, 128\], got \[1, 128\]"
    with pytest.raises(ValueError, match=expected):
        load(path)


def _drop(name: str):
    return lambda w: w.pop(name)


def _reshape(name: str, shape: tuple[int, ...]):
    return lambda w: w.update({name: torch.ones(shape)})


@pytest.mark.parametrize("arch,fmt,edit,expected", [
    ("llama", "ct-fp8-tensor-static", _drop("model.layers.0.self_attn.v_proj.input_scale"),
     r"^model\.layers\.0\.self_attn\.qkv_proj: .*lacks .*input_scale for its shard 'v'"),
    ("llama", "ct-fp8-tensor-static", _reshape("model.layers.0.mlp.down_proj.input_scale", (2,)),
     r"'model\.layers\.0\.mlp\.down_proj\.input_scale': input_scale: expected one value, got shape \[2\]"),
    ("qwen3", "fp8-block", _drop("model.layers.1.mlp.up_proj.weight_scale_inv"),
     r"^model\.layers\.1\.mlp\.gate_up_proj: .*lacks .*weight_scale_inv for its shard 1"),
    ("qwen3", "fp8-block", _reshape("model.layers.1.mlp.down_proj.weight_scale_inv", (1, 1)),
     r"'model\.layers\.1\.mlp\.down_proj\.weight_scale_inv': weight_scale_inv: expected shape \[1, 2\], got \[1, 1\]"),
    ("qwen2", "autofp8-static", _drop("model.layers.1.self_attn.k_proj.weight_scale"),
     r"^model\.layers\.1\.self_attn\.qkv_proj: .*lacks .*weight_scale_inv \(or weight_scale\) for its shard 'k'"),
], ids=["missing-input-scale", "misshapen-input-scale", "missing-block-scale", "misshapen-block-scale",
        "missing-autofp8-scale"])
def test_a_missing_or_misshapen_fp8_scale_is_named(ckpt, tmp_path, arch: str, fmt: str, edit, expected: str) -> None:
    quantized, _ = ckpt(arch, fmt)
    with pytest.raises(ValueError, match=expected):
        load(_edited_copy(quantized, str(tmp_path / "c"), edit))


def test_an_act_order_g_idx_is_refused(ckpt, tmp_path) -> None:
    quantized, _ = ckpt("qwen2", "gptq")
    name = "model.layers.0.mlp.down_proj.g_idx"  # two groups of 128 columns: flipped, not column // 128
    path = _edited_copy(quantized, str(tmp_path / "c"), lambda w: w.update({name: w[name].flip(0)}))
    with pytest.raises(ValueError, match=rf"'{name}': g_idx: .*act-order"):
        load(path)


def test_unquantized_weights_under_a_quantized_config_are_refused(ckpt, tmp_path) -> None:
    """A float checkpoint whose config claims FP8: its bf16/fp32 `weight` is not e4m3."""
    path, _ = ckpt("llama", "float")
    dst = str(tmp_path / "c")
    shutil.copytree(path, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": None}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"\.weight': weight: expected float8_e4m3fn values, got torch\.float32"):
        load(dst)


def test_block_scales_across_a_tensor_parallel_split_inside_a_block_are_refused(ckpt) -> None:
    quantized, _ = ckpt("llama", "fp8-block")  # k_proj's 128 rows: 64 per rank, half a 128-row block
    expected = r"k_proj\.weight_scale_inv'.*rows \[0, 64\) do not fall on whole entries of 128"
    with pytest.raises(ValueError, match=expected):
        load(quantized, rank=0, size=2)


@pytest.mark.parametrize("fmt", ["awq", "ct-fp8-channel"])
def test_triton_gemv_and_gemm_paths_agree_with_the_torch_path(ckpt, fmt: str) -> None:
    """The Triton backend, under the interpreter on CPU, against the torch path's logits: a 12-token
    prefill (the GEMM; FP8 quantizes activations there, so its logits move by up to a few e4m3 steps)
    and 1-token steps (the GEMV, activations unquantized: equal up to summation order). One layer: the
    interpreter is slow; the kernels' own tests cover block scales and static activation scales."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    quantized, _ = ckpt("llama", fmt, num_hidden_layers=1)
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    plain, tri = load(quantized), load(quantized, backend="triton")
    for chunk, tokens in ((12, prompt), (1, prompt[:3])):
        expected = run_prompt_logits(plain, plain.attention_layers(), tokens, chunk, torch.float32)
        got = run_prompt_logits(tri, tri.attention_layers(), tokens, chunk, torch.float32)
        quantized_acts = fmt != "awq" and chunk > 8
        tol = 0.1 * expected.abs().max().item() if quantized_acts else 1e-4
        torch.testing.assert_close(got, expected, rtol=0, atol=tol, msg=f"{chunk}-token steps")


@pytest.mark.parametrize("arch,fmt", [("llama", "ct-fp8-channel"), ("qwen2", "ct-fp8-tensor-static"),
                                      ("qwen3", "fp8-block")])
def test_fp8_activations_written_by_the_norms_and_silu_give_the_separate_quantizations_logits(
        ckpt, monkeypatch, arch: str, fmt: str) -> None:
    """KernelConfig.fused_act_quant: on the GEMM path (more than 8 rows) both norms and SiLU-and-mul of each
    layer write the FP8 activations their projection asked for, and the logits are exactly those of the
    model-dtype ops followed by the projections' own quantization (per token, static, 128-column
    groups). Triton backend under the interpreter, two layers, a 12-token prefill then 1-token steps
    (the GEMV: nothing fused)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    import carpool.ops.triton as tri
    from carpool.config import KernelConfig

    calls = {"rms_norm_fp8": 0, "silu_and_mul_fp8": 0}

    def counting(name: str):
        op = getattr(tri, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return counted
    for name in calls:
        monkeypatch.setattr(tri, name, counting(name))
    quantized, _ = ckpt(arch, fmt, num_hidden_layers=2)
    config = ModelConfig.from_pretrained(quantized, dtype="float32")
    models = {}
    for fused in (True, False):
        rt = runtime(config, "triton")
        rt = ModelRuntime.for_inference("triton", rt.comm, kernels=KernelConfig(fused_act_quant=fused),
                                        quantization=rt.quantization, packed_modules=rt.packed_modules)
        models[fused] = load_model(config, rt, "cpu")
    prompt = torch.randint(0, 256, (14,), generator=torch.Generator().manual_seed(0)).tolist()
    got = {fused: [run_prompt_logits(m, m.attention_layers(), prompt[:n], chunk, torch.float32)
                   for n, chunk in ((12, 12), (2, 1))]
           for fused, m in models.items()}
    assert calls == {"rms_norm_fp8": 2 * 2, "silu_and_mul_fp8": 2}  # the 12-token step of the fused model
    for chunked, unfused in zip(got[True], got[False], strict=True):
        assert torch.equal(chunked, unfused)


def test_an_fp8_layer_asks_for_quantized_input_only_on_the_triton_gemm_path_with_fused_act_quant_on() -> None:
    """input_quantization: a plan for more than 8 rows on the Triton backend (per token for channel scales),
    None for the GEMV's rows, the torch path, or with KernelConfig.fused_act_quant off; a plan's rows must
    match the activations handed to the product."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from carpool.config import KernelConfig
    from carpool.ops.triton.quant_gemm import fp8_linear_quantized
    from carpool.quantization.config import Fp8Scheme

    scheme = Fp8Scheme("compressed-tensors", "channel", None, dynamic_activations=True)
    weight, scale = quantize_fp8_per_channel(torch.randn(24, 40, generator=torch.Generator().manual_seed(0)))
    layer = SimpleNamespace(weight=weight, weight_scale=scale)

    def method(backend: str, fused: bool):
        rt = ModelRuntime.for_inference(backend, kernels=KernelConfig(fused_act_quant=fused), quantization=scheme)
        return rt.linear_method("model.layers.0.mlp.down_proj")

    plan = method("triton", True).input_quantization(layer, 9, torch.float32)
    assert plan is not None and plan.group_size is None and plan.rows == 9 and plan.dtype == torch.float32
    assert method("triton", True).input_quantization(layer, 8, torch.float32) is None
    assert method("triton", False).input_quantization(layer, 9, torch.float32) is None
    assert method("torch", True).input_quantization(layer, 9, torch.float32) is None
    with pytest.raises(ValueError, match="the plan quantizes 9 rows, got 10"):  # (refused before any launch)
        fp8_linear_quantized(plan, torch.zeros(10, 40, dtype=torch.float8_e4m3fn), torch.ones(10, 1), 9, weight, scale)


def fp8_gate_up(backend: str, fused_gemv_silu: bool):
    """(the method ModelRuntime gives a merged gate/up layer, a layer holding its FP8 weights [2d, K])."""
    from types import SimpleNamespace

    from carpool.config import KernelConfig
    from carpool.quantization.config import Fp8Scheme

    scheme = Fp8Scheme("compressed-tensors", "channel", None, dynamic_activations=True)
    rt = ModelRuntime.for_inference(backend, kernels=KernelConfig(fused_gemv_silu=fused_gemv_silu),
                                    quantization=scheme)
    weight, scale = quantize_fp8_per_channel(torch.randn(2 * 24, 40, generator=torch.Generator().manual_seed(0)) / 4)
    return rt.linear_method("model.layers.0.mlp.gate_up_proj"), SimpleNamespace(weight=weight, weight_scale=scale)


def test_a_quantized_gate_up_layer_takes_the_fused_gemv_silu_for_up_to_8_rows() -> None:
    """With fused_gemv_silu on, 1-8 rows get silu(gate) * up from one kernel (the result of the GEMV then
    silu_and_mul); 9 rows are the GEMM's, and the method declines them."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter on CPU")
    from carpool.ops import torch_ref

    method, layer = fp8_gate_up("triton", True)
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(1))
    for m in (1, 8):
        got = method.apply_silu_and_mul(layer, x[:m])
        assert got is not None, f"{m} rows should take the fused GEMV"
        torch.testing.assert_close(got, torch_ref.silu_and_mul(method.apply(layer, x[:m], None)), atol=1e-5, rtol=1e-5)
    assert method.apply_silu_and_mul(layer, x) is None


@pytest.mark.parametrize("backend,fused", [("triton", False), ("torch", True)])
def test_a_quantized_gate_up_layer_declines_the_fused_gemv_silu_when_off_or_on_the_torch_path(backend: str,
                                                                                              fused: bool) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    method, layer = fp8_gate_up(backend, fused)
    assert method.apply_silu_and_mul(layer, torch.randn(1, 40)) is None
