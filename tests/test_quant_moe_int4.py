"""4-bit mixture-of-experts checkpoints (CPU, float32): Qwen3-MoE in AutoAWQ's GEMM packing (zero points)
and GPTQ v1 symmetric, Mixtral in GPTQ v1 asymmetric, all group 128 and written by carpool's packers
(quantization/writers.py, which transcribe the tools' packing code; the routers `mlp.gate` stay float, as
the tools leave them). Greedy tokens equal transformers' on the same model with the weights dequantized
by the format's reference (quantization/formats.py), with chunked prefill and prefix-cache hits; each
tensor-parallel rank (split experts or whole experts) holds its slice of the packed experts, and TP=2 on
gloo gives the tokens of one rank.

The experts are held as packed int32 stacks with their group scales and zeros, never as a model-dtype
copy; the torch path dequantizes each chosen expert, the Triton path (interpreter here) in registers."""

from __future__ import annotations

import pytest
import torch
from checkpoints import prompts_of_lengths
from quant_checkpoints import hf_agrees_with_greedy, make_quant_checkpoint

from carpool import LLM, EngineArgs, SamplingParams
from carpool.config import ModelConfig
from carpool.distributed import Communicator, TPGroup
from carpool.layers.moe import FusedExperts
from carpool.models.loader import load_model
from carpool.models.registry import get_model_class
from carpool.models.runtime import ModelRuntime
from carpool.quantization.config import parse_quantization_config

MAX_NEW = 5
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
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


def experts_of(model: torch.nn.Module) -> list[FusedExperts]:
    return [m for m in model.modules() if isinstance(m, FusedExperts)]


@pytest.mark.parametrize("arch,fmt,method", [
    ("qwen3_moe", "awq", "awq"),
    ("qwen3_moe", "gptq", "gptq"),
    ("mixtral", "gptq-asym", "gptq"),
])
def test_int4_moe_greedy_tokens_equal_the_dequantized_reference_with_chunking_and_prefix_hits(
        ckpt, arch: str, fmt: str, method: str) -> None:
    quantized, reference = ckpt(arch, fmt)
    llm = LLM(quantized, device="cpu", dtype="float32", **SCHEDULING)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], GREEDY, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert llm.engine.stats().prefix_cache_hits > 0
    assert llm.engine.core.executor.describe()["quantization"] == method
    model = llm.engine.core.executor.runner.model
    experts = experts_of(model)
    assert experts and all(e.w13_qweight.dtype == e.w2_qweight.dtype == torch.int32 for e in experts)
    assert not any(hasattr(e, "w13_weight") for e in experts)  # no model-dtype copy of the experts
    routers = [m.gate.weight for m in model.modules() if hasattr(m, "routing")]
    assert routers and all(w.dtype == torch.float32 for w in routers)
    assert all(len(tokens) == MAX_NEW for tokens in got)
    assert hf_agrees_with_greedy(reference, prompts(), got, **EAGER)


def _rank_experts(path: str, rank: int, size: int, expert_parallel: bool) -> list[FusedExperts]:
    config = ModelConfig.from_pretrained(path, dtype="float32")
    runtime = ModelRuntime.for_inference("torch", Communicator(TPGroup(rank, size)),
                                         quantization=parse_quantization_config(config.hf_config),
                                         packed_modules=get_model_class(config.architecture).packed_modules_mapping,
                                         expert_parallel=expert_parallel)
    return experts_of(load_model(config, runtime, "cpu"))


@pytest.mark.parametrize("fmt", ["awq", "gptq-asym"])
def test_each_tensor_parallel_rank_holds_its_slice_of_the_int4_experts(ckpt, fmt: str) -> None:
    """Rank r of 2 dequantizes to the reference's experts cut as the rank holds them: every expert's
    intermediate rows [128 r, 128 r + 128) (gate and up rows, and down's columns: one whole 128-column
    group), or, with expert parallelism, experts 4r..4r+3 whole."""
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
                assert torch.equal(w13, torch.cat([gate, up], dim=1))
                assert torch.equal(w2, ref.w2_weight[experts, :, i:i + inter])


def test_symmetric_gptq_experts_drop_their_stored_zero_points(ckpt) -> None:
    """GPTQ v1 stores zero - 1 = 7 for symmetric weights; read back as 8 everywhere, the zeros are dropped
    and the kernels take their zero-free path. Asymmetric experts keep theirs."""
    sym, _ = ckpt("qwen3_moe", "gptq")
    asym, _ = ckpt("qwen3_moe", "gptq-asym")
    assert all(not hasattr(e, "w13_qzeros") and e.method.stacks(e)[2].w13_zeros is None
               for e in _rank_experts(sym, 0, 1, False))
    assert all(e.method.stacks(e)[2].w2_zeros is not None for e in _rank_experts(asym, 0, 1, False))


def test_a_split_that_cuts_a_quantization_group_is_refused_naming_the_field(ckpt) -> None:
    """moe_intermediate_size 256 over 4 ranks leaves 64 rows each, half of a 128-column group of the down
    projections: refused with the engine config, before any process starts; expert parallelism is not."""
    quantized, _ = ckpt("qwen3_moe", "awq")
    with pytest.raises(ValueError, match=r"^tensor_parallel_size: .*leaves 64 rows per rank.*group_size=128"):
        EngineArgs(model=quantized, device="cpu", tensor_parallel_size=4).create_engine_config()
    EngineArgs(model=quantized, device="cpu", tensor_parallel_size=4, enable_expert_parallel=True
               ).create_engine_config()


def test_split_and_expert_parallel_ranks_give_the_single_rank_tokens(ckpt) -> None:
    """TP=2 on CPU (gloo), AWQ experts split along their intermediate dimension (128 rows and one group
    of down's columns per rank) or whole per rank (expert parallelism): the tokens of one rank."""
    quantized, _ = ckpt("qwen3_moe", "awq")
    requests = [{"prompt_token_ids": p} for p in prompts()[1:3]]
    runs = []
    for parallel in ({}, {"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "enable_expert_parallel": True}):
        llm = LLM(quantized, device="cpu", dtype="float32", **parallel)
        try:
            runs.append([o.outputs[0].token_ids for o in llm.generate(requests, GREEDY, use_tqdm=False)])
        finally:
            llm.engine.shutdown()
    assert runs[1] == runs[0] and runs[2] == runs[0]


def test_triton_fused_moe_on_int4_experts_gives_the_torch_tokens(ckpt, monkeypatch) -> None:
    """The fused Triton MoE reading packed int4 experts inside the engine (interpreter on CPU): 8-token
    prefill chunks take the grouped GEMM, decode steps of one or two tokens the per-pair GEMVs. Small
    experts (32 rows, one group of 32) keep the interpreter's program count down."""
    import carpool.ops.triton as tri

    sizes: list[int] = []
    real = tri.fused_moe
    monkeypatch.setattr(tri, "fused_moe",
                        lambda hidden, *a, **k: sizes.append(hidden.shape[0]) or real(hidden, *a, **k))
    quantized, _ = ckpt("qwen3_moe", "awq", group=32, moe_intermediate_size=32, num_hidden_layers=2)
    requests = [{"prompt_token_ids": p} for p in (prompts()[0], prompts()[1][:12])]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 3)]
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(quantized, device="cpu", dtype="float32", kernel_backend=backend, max_num_batched_tokens=8)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(requests, params, use_tqdm=False)]
    assert tokens["triton"] == tokens["torch"]
    assert max(sizes) > 4 and min(sizes) == 1  # both paths of the op ran, and a batch-1 step


def test_a_quantized_router_is_refused_naming_the_tensor() -> None:
    from checkpoints import config_for

    from carpool.models.loader import build_model

    config = ModelConfig.from_hf_config({**config_for("qwen3_moe").to_dict(), "architectures": ["Qwen3MoeForCausalLM"]})
    model = build_model(config, ModelRuntime.plain(), "meta")
    assert model.checkpoint_name_map("model.layers.0.mlp.experts.3.down_proj.qzeros") == (
        "model.layers.0.mlp.experts.w2_qzeros", ("w2", 3))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate\.qweight'.*quantizes a router"):
        model.checkpoint_name_map("model.layers.0.mlp.gate.qweight")


def test_a_missing_expert_zero_point_is_refused_naming_the_expert(ckpt, tmp_path) -> None:
    from checkpoints import copy_without_weight

    quantized, _ = ckpt("qwen3_moe", "awq")
    name = "model.layers.2.mlp.experts.5.up_proj.qzeros"
    path = copy_without_weight(quantized, str(tmp_path / "lacking"), name)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts: .*lacks expert 5's w3 qzeros"):
        LLM(path, device="cpu", dtype="float32")
