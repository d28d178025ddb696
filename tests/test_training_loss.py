"""The chunked cross-entropy equals the full-logits cross-entropy, in value and in gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from carpool.training.loss import IGNORE_INDEX, chunked_cross_entropy


def _inputs(n: int = 37, h: int = 16, v: int = 50, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[3, 10, n - 1]] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
def test_chunked_loss_and_gradients_equal_full_cross_entropy(reduction, chunk_size):
    hidden, weight, labels = _inputs()
    ours = chunked_cross_entropy(hidden, weight, labels, reduction, chunk_size)
    ours_grads = torch.autograd.grad(ours * 1.7, (hidden, weight))
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction=reduction, ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref * 1.7, (hidden, weight))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_loss_without_grad_equals_full_cross_entropy():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        ours = chunked_cross_entropy(hidden, weight, labels, "mean", 5)
        ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_chunked_loss_under_bf16_autocast_stays_close_and_keeps_fp32_gradients():
    hidden, weight, labels = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_cross_entropy(hidden, weight, labels, "mean", 8)
    ours.backward()
    ref = F.cross_entropy(hidden.detach() @ weight.detach().t(), labels, ignore_index=IGNORE_INDEX)
    assert ours.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)  # bf16 matmul inputs: ~3 significant digits


def test_chunked_loss_never_holds_more_than_one_chunk_of_logits():
    """Forward and backward create no tensor of [tokens, vocab] (or larger): at most [chunk, vocab]."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    n, h, v, chunk = 64, 8, 500, 16
    hidden, weight, labels = _inputs(n, h, v, dtype=torch.float32)
    with LargestOutput():
        chunked_cross_entropy(hidden, weight, labels, "mean", chunk).backward()
    assert chunk * v <= LargestOutput.largest < n * v  # the chunk's logits exist, the whole logits never do
