"""FLOPs, MFU and the analytic activation memory, checked against what the model and autograd do."""

from __future__ import annotations

import pytest
import torch

from carpool.training.config import ModelShapeConfig, llama_hf_config
from carpool.training.metrics import ModelShape, activation_bytes_per_token_per_layer, device_peak_flops, mfu

SHAPE = ModelShapeConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2)
HF = llama_hf_config(SHAPE, vocab_size=500, bos_token_id=0, eos_token_id=1)


def _layer_model(dtype: str):
    from carpool.config import ModelConfig
    from carpool.models.loader import build_model, init_dummy_weights
    from carpool.models.runtime import ModelRuntime

    model = build_model(ModelConfig.from_hf_config(HF, dtype=dtype), ModelRuntime.for_training(), "cpu")
    init_dummy_weights(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _saved_bytes_per_token(model, residual_dtype: torch.dtype, autocast: bool, compiled: bool = False,
                           tokens: int = 256) -> float:
    """Bytes of the distinct storages autograd saves in one decoder layer's forward, parameters excluded."""
    from carpool.attention import dense_batch
    from carpool.distributed import PartialSums

    batch = dense_batch(torch.zeros(1, tokens, dtype=torch.long))
    partial = torch.randn(tokens, SHAPE.hidden_size, dtype=residual_dtype, requires_grad=True)
    residual = torch.randn(tokens, SHAPE.hidden_size, dtype=residual_dtype, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer = model.model.layers[0]
        forward = torch.compile(layer.forward) if compiled else layer.forward
        forward(batch.positions, PartialSums(partial), residual, batch)
    return sum(storages.values()) / tokens


MODES = [
    ("float32", False, 4, 4),    # fp32 training
    ("bfloat16", False, 2, 2),   # FSDP mixed precision: the gathered weights are bf16
    ("float32", True, 2, 4),     # autocast over fp32 weights (single device, DDP)
]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("weights, autocast, compute_bytes, residual_bytes", MODES)
def test_analytic_activation_bytes_match_what_autograd_saves(weights, autocast, compute_bytes, residual_bytes,
                                                             compiled):
    model, tokens = _layer_model(weights), 256
    measured = _saved_bytes_per_token(model, torch.float32 if residual_bytes == 4 else torch.bfloat16, autocast,
                                      compiled, tokens)
    shape = ModelShape.from_hf_config(HF)
    if autocast:  # autocast's bf16 copies of the weights are saved too; the estimate counts them as weights
        measured -= shape.layer_matmul_params * 2 / tokens
    analytic = activation_bytes_per_token_per_layer(shape, compute_bytes, residual_bytes, compiled)
    assert analytic == pytest.approx(measured, rel=0.02)


def test_parameter_count_matches_the_built_model():
    model = _layer_model("float32")
    assert ModelShape.from_hf_config(HF).num_params == sum(p.numel() for p in model.parameters())


def test_flops_per_token_is_six_n_plus_attention():
    shape = ModelShape.from_hf_config(HF)
    matmul = sum(p.numel() for n, p in _layer_model("float32").named_parameters()
                 if p.dim() == 2 and "embed_tokens" not in n)
    assert shape.matmul_params == matmul
    assert shape.flops_per_token(64) == 6 * matmul + 12 * 1 * 4 * 32 * 64
    assert mfu(shape.flops_per_token(64), 1e6, 1e15) == pytest.approx(shape.flops_per_token(64) * 1e6 / 1e15)


def test_peak_flops_table_picks_the_most_specific_name():
    assert device_peak_flops("NVIDIA H100 PCIe") == 756.0e12
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert device_peak_flops("Some CPU") is None
