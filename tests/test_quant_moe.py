"""Quantized mixture-of-experts checkpoints (CPU, float32).

FP8: Qwen3-MoE in the Hugging Face fine-grained FP8 format (128x128 blocks, `weight_scale_inv`, written by
transformers' own quantizer) and in compressed-tensors FP8 (per-channel `weight_scale`, dynamic per-token
activations, written by compressed-tensors' own compressor), Qwen2-MoE in compressed-tensors per-tensor
FP8 with static activation scales, Qwen3-MoE and Mixtral in Hugging Face per-tensor FP8 under both of its
namings (transformers' `weight_scale_inv`, written by its own quantizer, and AutoFP8's `weight_scale` /
`input_scale` with static activation scales, the neuralmagic FP8 releases' format), and `--quantization
fp8` on a float checkpoint.
4-bit: Qwen3-MoE in AutoAWQ's GEMM packing (zero points) and GPTQ v1 symmetric, Mixtral in GPTQ v1
asymmetric, group 128, written by carpool's packers (quantization/writers.py, which transcribe the tools'
packing code), and Qwen3-MoE in compressed-tensors pack-quantized (with and without zero points, written
by compressed-tensors' own compressor).

Greedy tokens equal transformers' on the same model with the weights dequantized by the format's
reference, with chunked prefill and prefix-cache hits; each tensor-parallel rank (split experts or whole
experts) holds its slice of the quantized experts and their scales, and TP=2 on gloo gives the tokens of
one rank. The routers stay unquantized (the formats leave them so); the experts are held as e4m3 or
packed int4 stacks with their scales, never as a model-dtype copy."""

from __future__ import annotations

import pytest
import torch
from checkpoints import prompts_of_lengths
from quant_checkpoints import (
    MAX_DEFICIT,
    greedy_logprob_deficits,
    hf_agrees_with_greedy,
    make_quant_checkpoint,
    write_online_fp8_reference,
)

from carpool import LLM, EngineArgs, SamplingParams
from carpool.config import ModelConfig
from carpool.distributed import Communicator, TPGroup
from carpool.layers.moe import FusedExperts
from carpool.models.loader import build_model, load_model
from carpool.models.registry import get_model_class
from carpool.models.runtime import ModelRuntime
from carpool.quantization.config import parse_quantization_config
from carpool.quantization.formats import FP8_DTYPE

MAX_NEW = 5
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
GPU_KV_BYTES = 1 << 28  # a GPU engine's KV cache: enough for the prompts, not 0.9 of the card
EAGER = dict(experts_implementation="eager")  # transformers' expert loop: carpool's CPU path, in its order
# Chunks of 16 tokens; the last two prompts share a 32-token prefix (two whole blocks: cache hits).
SCHEDULING = dict(max_num_batched_tokens=16, enable_prefix_caching=True)


def prompts() -> list[list[int]]:
    shared = prompts_of_lengths([32], seed=1)[0]
    return prompts_of_lengths([5, 37]) + [shared + p for p in prompts_of_lengths([3, 9], seed=2)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    def make(arch: str, fmt: str, **overrides) -> tuple[str, str]:
        return make_quant_checkpoint(tmp_path_factory, arch, fmt, **overrides)
    return make


def generate(path: str, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, device="cpu", dtype="float32", **SCHEDULING, **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def experts_of(llm: LLM) -> list[FusedExperts]:
    return [m for m in llm.engine.core.executor.runner.model.modules() if isinstance(m, FusedExperts)]


@pytest.mark.parametrize("arch,fmt,method,weight,scale", [
    ("qwen3_moe", "fp8-block", "fp8", "weight", "weight_scale_inv"),
    ("qwen3_moe", "ct-fp8-channel", "compressed-tensors-fp8", "weight", "weight_scale"),
    ("qwen2_moe", "ct-fp8-tensor-static", "compressed-tensors-fp8", "weight", "weight_scale"),
    ("qwen3_moe", "fp8-tensor", "fp8", "weight", "weight_scale_inv"),
    ("qwen3_moe", "autofp8-static", "fp8", "weight", "weight_scale_inv"),
    ("mixtral", "fp8-tensor", "fp8", "weight", "weight_scale_inv"),
    ("mixtral", "autofp8-static", "fp8", "weight", "weight_scale_inv"),
    ("qwen3_moe", "awq", "awq", "qweight", "scales"),
    ("qwen3_moe", "gptq", "gptq", "qweight", "scales"),
    ("mixtral", "gptq-asym", "gptq", "qweight", "scales"),
    ("qwen3_moe", "ct-w4a16", "compressed-tensors-w4a16", "weight_packed", "weight_scale"),
])
def test_quantized_moe_greedy_tokens_equal_the_dequantized_reference_with_chunking_and_prefix_hits(
        ckpt, arch: str, fmt: str, method: str, weight: str, scale: str) -> None:
    quantized, reference = ckpt(arch, fmt)
    got, llm = generate(quantized)
    assert llm.engine.stats().prefix_cache_hits > 0
    assert llm.engine.core.executor.describe()["quantization"] == method
    experts = experts_of(llm)
    stored = FP8_DTYPE if weight == "weight" else torch.int32  # e4m3 values, or 4-bit values packed in int32
    assert experts and all(getattr(e, f"w13_{weight}").dtype == getattr(e, f"w2_{weight}").dtype == stored
                           for e in experts)
    assert all(getattr(e, f"w13_{scale}").dtype == torch.float32 for e in experts)
    routers = [m.gate.weight for m in llm.engine.core.executor.runner.model.modules() if hasattr(m, "routing")]
    assert routers and all(w.dtype == torch.float32 for w in routers)
    assert all(len(tokens) == MAX_NEW for tokens in got)
    assert hf_agrees_with_greedy(reference, prompts(), got, **EAGER)


def test_online_fp8_moe_greedy_tokens_equal_the_per_channel_quantized_reference(ckpt, tmp_path) -> None:
    """--quantization fp8 on a float MoE checkpoint: every projection, each expert's three included,
    becomes its weight rounded to e4m3 with a per-output-channel scale; the routers stay as they are."""
    path, _ = ckpt("qwen3_moe", "float")
    reference = write_online_fp8_reference(path, str(tmp_path / "ref"))
    got, llm = generate(path, quantization="fp8")
    assert all(e.w13_weight.dtype == FP8_DTYPE for e in experts_of(llm))
    assert hf_agrees_with_greedy(reference, prompts(), got, **EAGER)


def _rank_experts(path: str, rank: int, size: int, expert_parallel: bool) -> list[FusedExperts]:
    config = ModelConfig.from_pretrained(path, dtype="float32")
    runtime = ModelRuntime.for_inference("torch", Communicator(TPGroup(rank, size)),
                                         quantization=parse_quantization_config(config.hf_config),
                                         packed_modules=get_model_class(config.architecture).packed_modules_mapping,
                                         expert_parallel=expert_parallel)
    model = load_model(config, runtime, "cpu")
    return [m for m in model.modules() if isinstance(m, FusedExperts)]


@pytest.mark.parametrize("fmt", ["fp8-block", "ct-fp8-channel", "awq", "gptq-asym", "ct-w4a16-sym"])
def test_each_tensor_parallel_rank_holds_its_slice_of_the_quantized_experts(ckpt, fmt: str) -> None:
    """Rank r of 2 dequantizes to the reference's experts cut as the rank holds them: every expert's
    intermediate rows [128 r, 128 r + 128) (gate, up and down's columns, with their scale blocks, or
    down's one 128-column group and gate's and up's packed zero points), or, with expert parallelism,
    experts 4r..4r+3 whole."""
    quantized, reference = ckpt("qwen3_moe", fmt)
    whole = _rank_experts(reference, 0, 1, False)
    for expert_parallel in (False, True):
        for rank in (0, 1):
            for mine, ref in zip(_rank_experts(quantized, rank, 2, expert_parallel), whole):
                w13, w2 = mine.method.dequantized_weights(mine)
                inter, i = mine.intermediate_per_rank, mine.intermediate_start
                experts = slice(mine.expert_start, mine.expert_start + mine.experts_per_rank)
                half = ref.intermediate_per_rank
                gate, up = ref.w13_weight[experts, i:i + inter], ref.w13_weight[experts, half + i:half + i + inter]
                want13 = torch.cat([gate, up], dim=1)
                assert torch.equal(w13, want13)
                assert torch.equal(w2, ref.w2_weight[experts, :, i:i + inter])


@pytest.mark.parametrize("fmt", ["fp8-block", "awq"])
def test_split_and_expert_parallel_ranks_give_the_single_rank_tokens(ckpt, fmt: str) -> None:
    """TP=2 on CPU (gloo), block-scaled FP8 or AWQ experts split along their intermediate dimension (128
    rows per rank: one scale block, or one group of down's columns) or whole per rank (expert
    parallelism): the tokens of one rank."""
    quantized, _ = ckpt("qwen3_moe", fmt)
    requests = [{"prompt_token_ids": p} for p in prompts()[1:3]]
    runs = []
    for parallel in ({}, {"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "enable_expert_parallel": True}):
        llm = LLM(quantized, device="cpu", dtype="float32", **parallel)
        try:
            runs.append([o.outputs[0].token_ids for o in llm.generate(requests, GREEDY, use_tqdm=False)])
        finally:
            llm.engine.shutdown()
    assert runs[1] == runs[0] and runs[2] == runs[0]


@pytest.mark.parametrize("fmt,group", [("ct-fp8-channel", 128), ("awq", 32)])
def test_triton_fused_moe_on_quantized_experts_gives_the_torch_tokens(ckpt, monkeypatch, fmt: str, group: int) -> None:
    """The fused Triton MoE reading e4m3 or packed int4 experts inside the engine (interpreter on CPU):
    8-token prefill chunks take the grouped GEMM, decode steps of one or two tokens the per-pair GEMVs;
    the dense FP8 projections stay at <= 8 rows, in their GEMV (W8A16, as the torch path). Small experts
    (32 rows; 4-bit: one group of 32) keep the interpreter's program count down."""
    import carpool.ops.triton as tri

    sizes: list[int] = []
    real = tri.fused_moe_routed  # (the op the model calls: KernelConfig.fused_moe_routing)
    monkeypatch.setattr(tri, "fused_moe_routed",
                        lambda hidden, *a, **k: sizes.append(hidden.shape[0]) or real(hidden, *a, **k))
    quantized, _ = ckpt("qwen3_moe", fmt, group=group, moe_intermediate_size=32, num_hidden_layers=2)
    requests = [{"prompt_token_ids": p} for p in (prompts()[0], prompts()[1][:12])]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 3)]
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(quantized, device="cpu", dtype="float32", kernel_backend=backend, max_num_batched_tokens=8)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(requests, params, use_tqdm=False)]
    assert tokens["triton"] == tokens["torch"]
    assert max(sizes) > 4 and min(sizes) == 1  # both paths of the op ran, and a batch-1 step


@pytest.mark.parametrize("expert_tensor,router_tensor", [("weight_scale_inv", "weight_scale"), ("qzeros", "qweight")])
def test_a_quantized_router_is_refused_naming_the_tensor(expert_tensor: str, router_tensor: str) -> None:
    from checkpoints import config_for

    config = ModelConfig.from_hf_config({**config_for("qwen3_moe").to_dict(), "architectures": ["Qwen3MoeForCausalLM"]})
    model = build_model(config, ModelRuntime.plain(), "meta")
    assert model.checkpoint_name_map(f"model.layers.0.mlp.experts.3.up_proj.{expert_tensor}") == (
        f"model.layers.0.mlp.experts.w13_{expert_tensor}", ("w3", 3))
    with pytest.raises(ValueError, match=rf"'model\.layers\.0\.mlp\.gate\.{router_tensor}'.*quantizes a router"):
        model.checkpoint_name_map(f"model.layers.0.mlp.gate.{router_tensor}")


@pytest.mark.parametrize("fmt,tensor,named", [
    ("fp8-block", "weight_scale_inv", "weight_scale_inv"),
    ("awq", "qzeros", "qzeros"),
    # Hugging Face per-tensor FP8 under either naming: the error names both spellings
    ("autofp8-static", "weight_scale", r"weight_scale_inv \(or weight_scale\)"),
    ("autofp8-static", "input_scale", r"activation_scale \(or input_scale\)"),
])
def test_a_missing_expert_scale_is_refused_naming_the_expert(ckpt, tmp_path, fmt: str, tensor: str,
                                                              named: str) -> None:
    from checkpoints import copy_without_weight

    quantized, _ = ckpt("qwen3_moe", fmt)
    name = f"model.layers.2.mlp.experts.5.up_proj.{tensor}"
    path = copy_without_weight(quantized, str(tmp_path / "lacking"), name)
    with pytest.raises(ValueError, match=rf"model\.layers\.2\.mlp\.experts: .*lacks expert 5's w3 {named}"):
        LLM(path, device="cpu", dtype="float32")


def test_symmetric_gptq_experts_drop_their_stored_zero_points(ckpt) -> None:
    """GPTQ v1 stores zero - 1 = 7 for symmetric weights; read back as 8 everywhere, the zeros are dropped
    and the kernels take their zero-free path. Asymmetric experts keep theirs."""
    sym, _ = ckpt("qwen3_moe", "gptq")
    asym, _ = ckpt("qwen3_moe", "gptq-asym")
    assert all(not hasattr(e, "w13_qzeros") and e.method.stacks(e)[2].w13_zeros is None
               for e in _rank_experts(sym, 0, 1, False))
    assert all(e.method.stacks(e)[2].w2_zeros is not None for e in _rank_experts(asym, 0, 1, False))


def test_a_split_that_cuts_a_4bit_group_is_refused_naming_the_field(ckpt) -> None:
    """moe_intermediate_size 256 over 4 ranks leaves 64 rows each, half of a 128-column group of the down
    projections: refused with the engine config, before any process starts; expert parallelism is not."""
    quantized, _ = ckpt("qwen3_moe", "awq")
    with pytest.raises(ValueError, match=r"^tensor_parallel_size: .*leaves 64 rows per rank.*group_size=128"):
        EngineArgs(model=quantized, device="cpu", tensor_parallel_size=4).create_engine_config()
    config = EngineArgs(model=quantized, device="cpu", tensor_parallel_size=4,
                        enable_expert_parallel=True).create_engine_config()
    assert config.parallel.enable_expert_parallel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt,kv", [("fp8-block", "auto"), ("ct-fp8-channel", "fp8"), ("awq", "auto")])
def test_gpu_engine_runs_quantized_moe_checkpoints_in_cuda_graphs(ckpt, fmt: str, kv: str) -> None:
    """The fused Triton MoE on FP8 or int4 experts in the engine (per-pair GEMVs at decode inside CUDA graphs, the
    grouped GEMM for prefill) in bf16: every greedy token is the dequantized reference's greedy choice on the
    same prefix or within MAX_DEFICIT of it (quant_checkpoints.py says why), the reference being the same
    engine in bf16 with the same KV cache dtype, teacher-forced on the tokens under test."""
    quantized, reference = ckpt("qwen3_moe", fmt)
    llm = LLM(quantized, device="cuda", dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory_bytes=GPU_KV_BYTES)
    assert llm.engine.core.executor.describe()["cuda_graphs"]
    requests = [{"prompt_token_ids": p} for p in prompts()]
    got = [o.outputs[0].token_ids for o in llm.generate(requests, GREEDY, use_tqdm=False)]
    llm.engine.shutdown()  # its weights and KV cache go before the reference engine profiles memory
    ref = LLM(reference, device="cuda", dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory_bytes=GPU_KV_BYTES)
    deficits = greedy_logprob_deficits(ref, prompts(), got)
    assert max(max(d) for d in deficits) <= MAX_DEFICIT, (got, deficits)
