"""carpool.quantization.gptq: GPTQ's error compensation lowers the layer's output error below round to
nearest on correlated inputs, is round to nearest when the inputs are uncorrelated, and its Hessians are
2 X^T X / n of each projection's actual inputs."""

from __future__ import annotations

import pytest
import torch
from quant_checkpoints import QUANT_DIMS

from carpool.quantization.gptq import collect_hessians, gptq_quantize
from carpool.quantization.writers import quantize_int4, write_int4

N, K, G = 64, 256, 128


def _dequantize(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q - zero.repeat_interleave(G, 1)) * scale.float().repeat_interleave(G, 1)


def _layer_and_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)  # correlated input features
    return w, torch.randn(1024, K, generator=g) @ mix


def test_gptq_has_lower_output_error_than_round_to_nearest_on_correlated_inputs():
    w, x = _layer_and_inputs()
    gptq = _dequantize(*gptq_quantize(w, 2 * x.t() @ x / len(x), G))
    rtn = _dequantize(*quantize_int4(w, G, symmetric=False))
    gptq_err, rtn_err = ((x @ (gptq - w).t()) ** 2).mean(), ((x @ (rtn - w).t()) ** 2).mean()
    assert gptq_err < 0.75 * rtn_err


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(symmetric):
    w, _ = _layer_and_inputs(seed=1)
    got = gptq_quantize(w, torch.eye(K), G, symmetric=symmetric)
    for a, b in zip(got, quantize_int4(w, G, symmetric=symmetric)):
        assert torch.equal(a, b)


def test_hessians_are_each_projections_input_gram_matrix(checkpoint_factory):
    from transformers import AutoModelForCausalLM

    path = checkpoint_factory("llama", **QUANT_DIMS)
    seqs = [[1, 5, 9, 200, 7], [3, 4]]
    hessians = collect_hessians(path, seqs)
    assert len(hessians) == 2 * 7  # every projection of both layers
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    with torch.no_grad():
        x = torch.cat([layer.input_layernorm(model.model.embed_tokens(torch.tensor(s))) for s in seqs])
    expected = 2 * x.t() @ x / len(x)
    for proj in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(hessians[f"model.layers.0.self_attn.{proj}"], expected, rtol=1e-5, atol=1e-6)


def test_gptq_writer_needs_a_hessian_for_every_projection(checkpoint_factory, tmp_path):
    path = checkpoint_factory("llama", **QUANT_DIMS)
    with pytest.raises(ValueError, match="^hessians: none for model.layers.0.mlp.down_proj"):
        write_int4(path, str(tmp_path / "gptq"), "gptq-v2-asym", 128, hessians={})
