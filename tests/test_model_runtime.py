"""The extension seams: the same model classes built for training (plain PyTorch, dense causal attention,
no KV cache) equal transformers in logits and gradients; kernel choices are typed config fields that
travel from the CLI to the TP workers; a linear layer computes through the method it was given."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from carpool.attention import dense_batch
from carpool.config import KernelConfig, ModelConfig
from carpool.engine.arg_utils import EngineArgs
from carpool.models.loader import build_model, load_weights
from carpool.models.runtime import ModelRuntime


def training_model(path: str) -> torch.nn.Module:
    config = ModelConfig.from_pretrained(path, dtype="float32")
    model = build_model(config, ModelRuntime.for_training(), "cpu")
    load_weights(model, path)
    return model.requires_grad_(True)


def hf_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_training_runtime_gives_transformers_logits_and_gradients(checkpoint_factory, arch: str) -> None:
    """Two sequences of 24 tokens through the dense backend: logits equal transformers' (fp32), and the
    gradients of the same loss equal transformers' for every weight they share a name with."""
    path = checkpoint_factory(arch)
    ours, theirs = training_model(path), hf_model(path)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = dense_batch(ids)
    logits = ours.compute_logits(ours(batch.input_ids, batch.positions, batch)).view(2, 24, -1)
    ref = theirs(ids).logits
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)

    logits.float().logsumexp(-1).mean().backward()
    ref.float().logsumexp(-1).mean().backward()
    grads = dict(theirs.named_parameters())
    checked = 0
    for name, param in ours.named_parameters():
        if name in grads and grads[name].grad is not None:
            torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-5, rtol=1e-3)
            checked += 1
    assert checked >= 5  # the embedding, norms and the unfused projections at least
    q_grad = ours.model.layers[0].self_attn.qkv_proj.weight.grad[:ours.model.layers[0].self_attn.q_size]
    torch.testing.assert_close(q_grad, theirs.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5, rtol=1e-3)


def test_training_runtime_keeps_sequences_apart(checkpoint_factory) -> None:
    """Each packed sequence attends only within itself: a sequence's logits do not depend on its batch."""
    model = training_model(checkpoint_factory("llama"))
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batch = dense_batch(ids)
        together = model.compute_logits(model(batch.input_ids, batch.positions, batch)).view(3, 16, -1)
        alone = dense_batch(ids[1:2])
        single = model.compute_logits(model(alone.input_ids, alone.positions, alone))
    torch.testing.assert_close(together[1], single, atol=1e-5, rtol=1e-5)


def test_dense_batch_refuses_a_flat_tensor() -> None:
    with pytest.raises(ValueError, match="input_ids: expected \\[batch, seq_len\\]"):
        dense_batch(torch.zeros(8, dtype=torch.long))


def test_kernel_flags_reach_the_engine_config_and_the_tp_codec(checkpoint_factory) -> None:
    from carpool.worker import tp_codec

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--model", checkpoint_factory("llama"), "--no-fused-gemv-silu", "--no-pdl",
                            "--small-batch-gemv", "--device", "cpu"])  # (small_batch_gemv: off by default)
    config = EngineArgs.from_cli_args(ns).create_engine_config()
    assert config.kernels == KernelConfig(fused_gemv_silu=False, pdl=False, small_batch_gemv=True)
    assert tp_codec.engine_config_from_dict(tp_codec.loads(tp_codec.dumps(
        tp_codec.engine_config_to_dict(config)))).kernels == config.kernels


def test_linear_layers_compute_through_the_method_they_were_given() -> None:
    """A layer's method owns its weights and its matmul: a method that scales its output is what the
    layer returns, for any number of rows, with the layer's own tensor-parallel weight loading."""
    from carpool.layers.linear import ColumnParallelLinear
    from carpool.layers.linear_method import UnquantizedLinearMethod

    class Doubled(UnquantizedLinearMethod):
        def apply(self, layer, x, bias):  # type: ignore[no-untyped-def]
            return 2 * super().apply(layer, x, bias)

    layer = ColumnParallelLinear(8, 4, bias=True, method=Doubled())
    full = torch.randn(4, 8)
    layer.weight.weight_loader(layer.weight, full)
    layer.bias.weight_loader(layer.bias, torch.ones(4))
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), 2 * (x @ full.T + 1))


def test_small_batch_gemv_takes_steps_of_2_to_16_rows_and_only_those() -> None:
    """With KernelConfig.small_batch_gemv the unquantized method sends 2-16-row inputs (and merged gate/up
    layers' SiLU-and-mul) to the multi-row GEMV ops, one row to the GEMV, more rows to the matmul."""
    from carpool.layers.linear import MergedColumnParallelLinear
    from carpool.ops import get_kernel_ops

    pytest.importorskip("triton")
    calls: list[tuple[str, int]] = []

    def recording(name: str, fn):  # type: ignore[no-untyped-def]
        def call(x, *args):  # type: ignore[no-untyped-def]
            calls.append((name, x.shape[0]))
            return fn(x, *args)
        return call

    ops = get_kernel_ops("triton")
    ops = dataclasses.replace(ops, gemv=recording("gemv", ops.gemv), gemv_rows=recording("rows", ops.gemv_rows),
                              gemv_silu_and_mul=None,
                              gemv_rows_silu_and_mul=recording("rows_silu", ops.gemv_rows_silu_and_mul))
    runtime = dataclasses.replace(ModelRuntime.plain(), ops=ops, kernels=KernelConfig(small_batch_gemv=True))
    layer = MergedColumnParallelLinear(32, [8, 8], bias=False, method=runtime.unquantized_linear_method())
    layer.weight.data.copy_(torch.randn(16, 32))
    for m in (1, 2, 16, 17):
        x = torch.randn(m, 32)
        torch.testing.assert_close(layer(x), x @ layer.weight.T, atol=1e-5, rtol=1e-5)
        gate, up = (x @ layer.weight.T).chunk(2, dim=-1)
        torch.testing.assert_close(layer.silu_and_mul(x, ops.silu_and_mul), torch.nn.functional.silu(gate) * up,
                                   atol=1e-5, rtol=1e-5)
    assert calls == [("gemv", 1), ("gemv", 1), ("rows", 2), ("rows_silu", 2), ("rows", 16), ("rows_silu", 16)]
    default = dataclasses.replace(runtime, kernels=KernelConfig()).unquantized_linear_method()
    assert default.gemv_rows is None and default.gemv_rows_silu_and_mul is None  # type: ignore[attr-defined]


def test_model_families_are_adapters_not_name_checks(checkpoint_factory) -> None:
    """Qwen2 puts biases on q/k/v only; Llama's attention_bias covers o_proj too (models/registry.py)."""
    qwen2 = ModelConfig.from_pretrained(checkpoint_factory("qwen2"))
    llama = ModelConfig.from_pretrained(checkpoint_factory("llama", attention_bias=True))
    assert (qwen2.qkv_bias, qwen2.o_proj_bias) == (True, False)
    assert (llama.qkv_bias, llama.o_proj_bias) == (True, True)
