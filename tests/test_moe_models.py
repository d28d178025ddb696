"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral) on CPU: greedy output equals Hugging Face
transformers' token for token (float32, transformers' eager expert loop), however the engine chunks,
preempts, reuses cached prefixes or splits the model over two ranks; the family adapters read the configs
as transformers does; the fused Triton path (interpreter) gives the torch path's tokens.

The tiny checkpoints (tests/checkpoints.py) have 8 experts, a dense layer among the sparse ones (Qwen3-MoE:
mlp_only_layers, Qwen2-MoE: decoder_sparse_step) and, for Qwen2-MoE, the shared expert.
"""

from __future__ import annotations

import logging

import pytest
import torch
from checkpoints import config_for, hf_greedy, prompts_of_lengths

from carpool import LLM, SamplingParams
from carpool.config import EngineConfig, ModelConfig
from carpool.models.moe import SparseMoeBlock, parameter_counts

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral"]
MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
# 12 prompts: lengths around the 16-token block and chunk boundaries, and three that share a 40-token
# prefix (cached blocks reused within the one generate).
PROMPTS = prompts_of_lengths([1, 2, 5, 16, 17, 31, 64, 100, 150], seed=3)
PROMPTS += [PROMPTS[-1][:40] + tail for tail in prompts_of_lengths([3, 9, 20], seed=4)]

_reference: dict[str, list[list[int]]] = {}


def reference(path: str) -> list[list[int]]:
    if path not in _reference:
        _reference[path] = hf_greedy(path, PROMPTS, MAX_NEW, experts_implementation="eager")
    return _reference[path]


def greedy_tokens(llm: LLM, prompts: list[list[int]],
                  params: SamplingParams | list[SamplingParams] = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config_dict(family: str, **overrides) -> dict:
    """config.json's contents for a checkpoint of `family` (no weights needed)."""
    return {**config_for(family, **overrides).to_dict(), "architectures": [ARCHITECTURES[family]]}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_with_chunking_preemption_and_prefix_hits(checkpoint_factory, family):
    path = checkpoint_factory(family)
    # 24-token steps chunk every longer prompt; 18 blocks of 16 tokens cannot hold the batch.
    llm = LLM(path, device="cpu", num_kv_blocks=18, max_num_batched_tokens=24, enable_prefix_caching=True)
    got = greedy_tokens(llm, PROMPTS)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_hits > 0
    assert got == reference(path)


def test_greedy_matches_hf_with_async_scheduling(checkpoint_factory):
    path = checkpoint_factory("qwen3_moe")
    llm = LLM(path, device="cpu", num_kv_blocks=18, max_num_batched_tokens=24, async_scheduling=True)
    assert greedy_tokens(llm, PROMPTS) == reference(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_greedy_matches_hf(checkpoint_factory, family):
    """Two gloo ranks: every expert (and Qwen2-MoE's shared expert, and the dense layers) split along its
    intermediate dimension, half on each rank; routers and the shared-expert gate replicated."""
    path = checkpoint_factory(family)
    llm = LLM(path, device="cpu", tensor_parallel_size=2, num_kv_blocks=18, max_num_batched_tokens=24)
    try:
        layout = llm.engine.core.executor.describe()["moe_layout"]
        got = greedy_tokens(llm, PROMPTS)
        assert llm.engine.stats().num_preemptions > 0
    finally:
        llm.engine.shutdown()
    inter = ModelConfig.from_pretrained(path).moe.moe_intermediate_size
    assert layout == {"expert_parallel": False, "num_experts": 8, "experts_per_rank": 8,
                      "moe_intermediate_size_per_rank": inter // 2}
    assert got == reference(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_expert_parallel_greedy_matches_hf(checkpoint_factory, family):
    """Two gloo ranks holding four whole experts each (enable_expert_parallel): both compute the same
    routing, each only its experts' pairs, and the layer's all-reduce adds them; attention, the dense
    layer and Qwen2-MoE's shared expert stay split along their heads / intermediate dimension."""
    path = checkpoint_factory(family)
    llm = LLM(path, device="cpu", tensor_parallel_size=2, enable_expert_parallel=True, num_kv_blocks=18,
              max_num_batched_tokens=24)
    try:
        layout = llm.engine.core.executor.describe()["moe_layout"]
        got = greedy_tokens(llm, PROMPTS)
    finally:
        llm.engine.shutdown()
    assert layout == {"expert_parallel": True, "num_experts": 8, "experts_per_rank": 4,
                      "moe_intermediate_size_per_rank": ModelConfig.from_pretrained(path).moe.moe_intermediate_size}
    assert got == reference(path)


def test_expert_parallel_rank_loads_only_its_experts_tensors():
    """Rank 1 of 2 holds experts 2 and 3 of 4, whole; the checkpoint tensors of experts 0 and 1 are
    checked for shape but never read (a lazy slice that fails when indexed stands in for them)."""
    from carpool.distributed import Communicator
    from carpool.distributed.group import TPGroup
    from carpool.layers.moe import FusedExperts
    from carpool.ops.torch_ref import fused_moe

    class Unreadable:
        def __init__(self, shape: list[int]) -> None:
            self.shape = shape

        def get_shape(self) -> list[int]:
            return self.shape

        def __getitem__(self, index):
            raise AssertionError("another rank's expert tensor was read")

    rank1 = Communicator(TPGroup(rank=1, size=2))
    experts = FusedExperts(num_experts=4, hidden_size=8, intermediate_size=6, dtype=torch.float32,
                           fused_moe=fused_moe, comm=rank1, expert_parallel=True)
    assert experts.w13_weight.shape == (2, 12, 8) and experts.w2_weight.shape == (2, 8, 6)
    for expert in range(4):
        for kind, shape in (("w1", [6, 8]), ("w3", [6, 8]), ("w2", [8, 6])):
            param = experts.w2_weight if kind == "w2" else experts.w13_weight
            value = torch.full(shape, float(10 * expert + int(kind[1])))  # expert 3's w3: 33.0
            experts.weight_loader(param, value if expert >= 2 else Unreadable(shape), (kind, expert))
    assert torch.equal(experts.w13_weight[1, :6], torch.full((6, 8), 31.0))  # expert 3's gate rows
    assert torch.equal(experts.w13_weight[1, 6:], torch.full((6, 8), 33.0))  # expert 3's up rows
    assert torch.equal(experts.w2_weight[0], torch.full((8, 6), 22.0))  # expert 2's down projection


def test_expert_parallel_is_refused_for_a_dense_model_naming_the_field(checkpoint_factory):
    from carpool import EngineArgs

    with pytest.raises(ValueError, match=r"^enable_expert_parallel: .*dense"):
        EngineArgs(model=checkpoint_factory("qwen2"), device="cpu", tensor_parallel_size=2,
                   enable_expert_parallel=True).create_engine_config()


def test_experts_that_do_not_divide_among_the_ranks_are_refused_before_spawning():
    from carpool.worker.multiproc_executor import check_tensor_parallel

    model = ModelConfig.from_hf_config(hf_config_dict("qwen2_moe", num_experts=6, moe_intermediate_size=33))
    check_tensor_parallel(model, 2, expert_parallel=True)  # whole experts: the 33 rows need not divide
    with pytest.raises(ValueError, match="^enable_expert_parallel: .*num_experts=6.*tensor_parallel_size=4"):
        check_tensor_parallel(model, 4, expert_parallel=True)


def test_enable_expert_parallel_flag_reaches_the_parallel_config(checkpoint_factory):
    import argparse

    from carpool import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    path = checkpoint_factory("mixtral")
    on = EngineArgs.from_cli_args(parser.parse_args(["--model", path, "--device", "cpu", "--enable-expert-parallel"]))
    off = EngineArgs.from_cli_args(parser.parse_args(["--model", path, "--device", "cpu"]))
    assert on.create_engine_config().parallel.enable_expert_parallel is True
    assert off.create_engine_config().parallel.enable_expert_parallel is False


def test_triton_backend_gives_the_torch_tokens(checkpoint_factory, monkeypatch):
    """The fused Triton MoE inside the engine (interpreter on CPU): prefill chunks take the grouped GEMM,
    decode steps the per-pair GEMV path; the last steps decode one request alone (the batch-1 GEMVs of
    the router and the shared expert's one-row gate)."""
    import carpool.ops.triton as tri

    sizes: list[int] = []
    real = tri.fused_moe_routed  # (the op the model calls: KernelConfig.fused_moe_routing)
    monkeypatch.setattr(tri, "fused_moe_routed",
                        lambda hidden, *a, **k: sizes.append(hidden.shape[0]) or real(hidden, *a, **k))
    path = checkpoint_factory("qwen2_moe")
    prompts = [PROMPTS[5], PROMPTS[0]]  # (interpreter time: two short prompts, a few tokens)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 4)]
    tokens = {backend: greedy_tokens(LLM(path, device="cpu", kernel_backend=backend, max_num_batched_tokens=16),
                                     prompts, params) for backend in ("torch", "triton")}
    assert tokens["triton"] == tokens["torch"]
    assert max(sizes) > 4 and min(sizes) == 1  # both paths of the op ran, and a batch-1 step


@pytest.mark.parametrize("family,overrides", [
    ("qwen3_moe", dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])),
    ("qwen2_moe", dict(num_hidden_layers=4, decoder_sparse_step=1, mlp_only_layers=[0, 2])),
    ("mixtral", dict(num_hidden_layers=3)),
])
def test_sparse_layers_and_parameter_counts_are_transformers(family, overrides):
    """The same layers are sparse as in transformers' model, and the logged total / active parameter
    counts agree with it (active: all but the num_experts - top_k unchosen experts of each sparse layer)."""
    from transformers import AutoModelForCausalLM

    from carpool.models.loader import build_model
    from carpool.models.runtime import ModelRuntime

    hf = AutoModelForCausalLM.from_config(config_for(family, **overrides))
    config = ModelConfig.from_hf_config(hf_config_dict(family, **overrides))
    model = build_model(config, ModelRuntime.plain(), "meta")
    ours = [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers]
    assert ours == [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert any(ours)
    total, active = parameter_counts(config, model.qk_norm)
    assert total == hf.num_parameters() == sum(p.numel() for p in model.parameters())
    moe = config.moe
    expert = 3 * config.hidden_size * moe.moe_intermediate_size
    unchosen = sum(ours) * (moe.num_experts - moe.num_experts_per_tok) * expert
    assert active == total - unchosen


def test_startup_log_states_the_expert_parallel_layout(caplog):
    from carpool.distributed import Communicator
    from carpool.distributed.group import TPGroup
    from carpool.models.loader import build_model
    from carpool.models.runtime import ModelRuntime

    config = ModelConfig.from_hf_config(hf_config_dict("qwen3_moe"))
    runtime = ModelRuntime.for_inference("torch", Communicator(TPGroup(rank=0, size=2)), expert_parallel=True)
    with caplog.at_level(logging.INFO, logger="carpool.models.moe"):
        build_model(config, runtime, "meta")
    assert "expert parallel over 2 rank(s): 4 whole experts per rank" in caplog.text


def test_startup_log_names_experts_top_k_and_parameters(caplog):
    from carpool.models.loader import build_model
    from carpool.models.runtime import ModelRuntime

    config = ModelConfig.from_hf_config(hf_config_dict("qwen3_moe"))
    with caplog.at_level(logging.INFO, logger="carpool.models.moe"):
        build_model(config, ModelRuntime.plain(), "meta")
    total, active = parameter_counts(config, qk_norm=True)
    assert f"8 experts, top-3; {total / 1e3:.2f}K parameters, {active / 1e3:.2f}K active per token" in caplog.text


def test_family_adapters_read_the_routing_settings():
    qwen3 = ModelConfig.from_hf_config(hf_config_dict("qwen3_moe")).moe
    qwen2 = ModelConfig.from_hf_config(hf_config_dict("qwen2_moe")).moe
    mixtral = ModelConfig.from_hf_config(hf_config_dict("mixtral")).moe
    assert qwen3 and qwen2 and mixtral
    assert (qwen3.num_experts, qwen3.num_experts_per_tok, qwen3.norm_topk_prob) == (8, 3, True)
    assert (qwen2.norm_topk_prob, qwen2.shared_expert_intermediate_size, qwen2.decoder_sparse_step) == (False, 48, 2)
    assert qwen3.router_weights_in_model_dtype and qwen2.router_weights_in_model_dtype
    # Mixtral: experts of intermediate_size, always renormalized, float32 routing weights
    assert (mixtral.moe_intermediate_size, mixtral.norm_topk_prob, mixtral.router_weights_in_model_dtype) == (64, True,
                                                                                                             False)
    assert ModelConfig.from_hf_config(hf_config_dict("qwen2")).moe is None


@pytest.mark.parametrize("family,field,value,error", [
    ("qwen3_moe", "num_experts_per_tok", 9, r"num_experts_per_tok must be in \[1, num_experts=8\], got 9"),
    ("mixtral", "num_experts_per_tok", 0, r"num_experts_per_tok must be in \[1, num_experts=8\], got 0"),
    ("qwen2_moe", "moe_intermediate_size", 0, r"moe_intermediate_size must be >= 1 .*got 0"),
    ("qwen2_moe", "decoder_sparse_step", 0, r"decoder_sparse_step must be >= 1, got 0"),
])
def test_an_impossible_moe_config_is_refused_naming_the_field(family, field, value, error):
    with pytest.raises(ValueError, match=rf"^model: {error}"):
        ModelConfig.from_hf_config({**hf_config_dict(family), field: value})


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"]])
def test_help_lists_the_moe_families(capsys, argv):
    from carpool.entrypoints.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    text = "".join(capsys.readouterr().out.split())  # (argparse wraps lines at spaces)
    for architecture in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM"):
        assert architecture in text
    assert ("--enable-expert-parallel" in text) == (argv[0] == "generate")


def test_readme_supported_models_table_lists_every_architecture():
    import os

    from carpool.models.registry import SUPPORTED_ARCHITECTURES

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| `")}
    assert {"Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM"} <= set(SUPPORTED_ARCHITECTURES)
    assert set(SUPPORTED_ARCHITECTURES) <= rows


def test_engine_config_with_moe_round_trips_through_the_tp_codec():
    from carpool.config import CacheConfig, ParallelConfig, SchedulerConfig
    from carpool.worker import tp_codec

    model = ModelConfig.from_hf_config(hf_config_dict("qwen3_moe"), dtype="bfloat16")
    parallel = ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True)
    config = EngineConfig(model=model, cache=CacheConfig(), scheduler=SchedulerConfig(), parallel=parallel,
                          device="cpu", kernel_backend="torch")
    back = tp_codec.engine_config_from_dict(tp_codec.loads(tp_codec.dumps(tp_codec.engine_config_to_dict(config))))
    assert back.parallel.enable_expert_parallel is True
    assert back.model.moe == model.moe and back.model.moe is not None
    assert back.model.moe.mlp_only_layers == (1,)


def test_experts_that_do_not_split_are_refused_before_spawning():
    from carpool.worker.multiproc_executor import check_tensor_parallel

    model = ModelConfig.from_hf_config(hf_config_dict("qwen2_moe", moe_intermediate_size=33))
    with pytest.raises(ValueError, match="^tensor_parallel_size: .*moe_intermediate_size=33.*tensor_parallel_size=2"):
        check_tensor_parallel(model, 2)


FP8_CHECKPOINT_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                         "weight_block_size": [128, 128]}


def _with_quantization_config(path, dst, qc: dict, **config_overrides):
    """A weightless copy of checkpoint `path` whose config.json has `qc` as its quantization_config."""
    import json
    import shutil

    dst = shutil.copytree(path, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config_overrides, "quantization_config": qc}))
    return dst


def test_block_fp8_experts_split_inside_a_block_are_refused_naming_the_field(checkpoint_factory, tmp_path):
    """moe_intermediate_size 384 over 2 ranks leaves 192 rows each: rank 1 would start inside a 128-row
    scale block. Whole experts per rank (expert parallelism) or 256 rows (128 each) are fine."""
    from carpool import EngineArgs

    def config(inter: int, **kwargs):
        path = _with_quantization_config(checkpoint_factory("qwen3_moe"), tmp_path / f"fp8-{inter}-{sorted(kwargs)}",
                                         FP8_CHECKPOINT_CONFIG, moe_intermediate_size=inter)
        return EngineArgs(model=str(path), device="cpu", tensor_parallel_size=2, **kwargs).create_engine_config()

    with pytest.raises(ValueError, match=r"^tensor_parallel_size: .*moe_intermediate_size=384.*192 rows.*"
                                         r"enable_expert_parallel"):
        config(384)
    assert config(256).model.moe.moe_intermediate_size == 256
    assert config(384, enable_expert_parallel=True).parallel.enable_expert_parallel


def test_an_expert_tensor_of_the_wrong_shape_is_refused_naming_the_expert():
    from carpool.layers.moe import FusedExperts
    from carpool.ops.torch_ref import fused_moe

    experts = FusedExperts(num_experts=4, hidden_size=8, intermediate_size=6, dtype=torch.float32, fused_moe=fused_moe)
    experts.weight_loader(experts.w13_weight, torch.ones(6, 8), ("w3", 2))
    assert torch.equal(experts.w13_weight[2, 6:], torch.ones(6, 8))
    with pytest.raises(ValueError, match=r"expert 1 \(w2\) has shape \[6, 8\], expected \[8, 6\]"):
        experts.weight_loader(experts.w2_weight, torch.ones(6, 8), ("w2", 1))
    with pytest.raises(ValueError, match="expert 4, but the model has num_experts=4"):
        experts.weight_loader(experts.w13_weight, torch.ones(6, 8), ("w1", 4))


@pytest.mark.parametrize("family,name,error", [
    pytest.param("qwen3_moe", "model.layers.2.mlp.experts.5.up_proj.weight",
                 r"layers\.2\.mlp\.experts: .*lacks expert 5's w3 weight", id="qwen3_moe"),
    pytest.param("mixtral", "model.layers.1.block_sparse_moe.experts.0.w2.weight",
                 r"layers\.1\.mlp\.experts: .*lacks expert 0's w2 weight", id="mixtral"),
])
def test_a_missing_expert_tensor_is_refused_naming_the_expert(checkpoint_factory, tmp_path, family, name, error):
    """The stacks count as loaded once any expert's tensor is, so the loader's own missing check cannot
    see one absent expert projection; left unchecked its rows would hold uninitialized memory."""
    from checkpoints import copy_without_weight

    path = copy_without_weight(checkpoint_factory(family), str(tmp_path / "lacking"), name)
    with pytest.raises(ValueError, match=error):
        LLM(path, device="cpu")


def test_benchmark_roofline_counts_the_experts_a_decode_step_reads():
    """benchmarks/common.py's bytes for the Qwen3-30B-A3B shape agree with the model's own parameter
    counts: a batch-1 step reads the active parameters, a large batch every parameter (less the
    embedding table, which a step does not read; norms are not counted there)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from common import SHAPES, ModelArithmetic

    shape = SHAPES["qwen3-30b-a3b"]
    config = ModelConfig.from_hf_config(dict(shape), dtype="bfloat16")
    total, active = parameter_counts(config, qk_norm=True)
    embedding = config.vocab_size * config.hidden_size
    m = ModelArithmetic.of("qwen3-30b-a3b")
    assert m.expected_distinct_experts(1) == shape["num_experts_per_tok"]
    assert m.decode_weight_bytes(1) / 2 == pytest.approx(active - embedding, rel=1e-4)
    assert m.decode_weight_bytes(100_000) / 2 == pytest.approx(total - embedding, rel=1e-4)
    assert m.expected_distinct_experts(64) < m.expected_distinct_experts(256) <= shape["num_experts"]
    dense = ModelArithmetic.of("qwen3-0.6b")
    assert dense.decode_weight_bytes(1) == dense.decode_weight_bytes(256) == dense.weight_bytes


def test_benchmark_arithmetic_counts_quantized_linear_bytes_and_bf16_head_and_routers() -> None:
    """The quantized rooflines: only the decoder layers' linear weights (and routed experts) shrink; the LM
    head/embedding and routers stay bf16; an FP8 KV cache halves the K/V bytes per token."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from common import LINEAR_BYTES, SHAPES, ModelArithmetic

    for shape in ("llama3-8b", "qwen3-30b-a3b"):
        c = SHAPES[shape]
        head = c["vocab_size"] * c["hidden_size"]  # the LM head, or the tied embedding it reads
        routers = c.get("num_experts", 0) * c["hidden_size"] * c["num_hidden_layers"]
        bf16 = ModelArithmetic.of(shape)
        fp8 = ModelArithmetic.of(shape, LINEAR_BYTES["fp8"], kv_dtype_bytes=1)
        linear_params = bf16.weight_bytes / 2 - head - routers
        assert bf16.weight_bytes - fp8.weight_bytes == pytest.approx(linear_params, rel=1e-9)
        assert fp8.expert_bytes * 2 == bf16.expert_bytes
        assert fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token
        int4 = ModelArithmetic.of(shape, LINEAR_BYTES["awq"])
        assert int4.weight_bytes == pytest.approx(2 * (head + routers) + linear_params * (0.5 + 2.5 / 128), rel=1e-9)


def test_benchmark_kernel_flags_default_to_the_engines_kernel_config() -> None:
    """The benchmarks' --X/--no-X kernel flags start from KernelConfig's defaults, so a fast path that is off
    until measured (small_batch_gemv) is not switched on by every benchmark run."""
    import argparse
    import os
    import sys
    from dataclasses import fields

    from carpool.config import KernelConfig

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from common import add_engine_flags, engine_flags

    ap = argparse.ArgumentParser()
    add_engine_flags(ap)
    flags = engine_flags(ap.parse_args([]))
    defaults = {f.name: f.default for f in fields(KernelConfig)}
    assert {name: flags[name] for name in defaults if name in flags} == {
        name: value for name, value in defaults.items() if name in flags}
    assert flags["small_batch_gemv"] is False
    assert engine_flags(ap.parse_args(["--small-batch-gemv"]))["small_batch_gemv"] is True
