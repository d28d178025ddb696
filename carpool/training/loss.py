"""Cross-entropy of an LM head without the full [tokens, vocab] fp32 logits.

For a 128k vocabulary and 4096 tokens the fp32 logits alone are 2 GiB, and autograd would keep them
(and their softmax) alive until backward. Here the tokens are processed `chunk_size` at a time: each
chunk's logits are computed, reduced to the chunk's loss, and turned into the chunk's gradients right
away (softmax minus one-hot, times the head), then freed. Only [chunk, vocab] logits ever exist. The
gradients are kept for backward, which only scales them by the incoming gradient: the head matmul is not
recomputed (the same trade as Liger's fused linear cross-entropy).

Precision: the head matmuls run in the compute dtype (the autocast dtype when autocast is on, else the
inputs' common dtype); logits, log-sum-exp, softmax and the head's gradient accumulate in fp32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunked_loop(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                  scale: float, want_grad_hidden: bool, want_grad_weight: bool, compute_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(sum of token losses, d(scale * loss)/d hidden, d(scale * loss)/d weight)."""
    n = hidden.shape[0]
    acc = torch.promote_types(torch.float32, compute_dtype)  # fp32, or fp64 for fp64 inputs
    w = weight.to(compute_dtype)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad_weight else None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end].to(compute_dtype)
        lbl = labels[start:end]
        valid = lbl != IGNORE_INDEX
        safe = torch.where(valid, lbl, 0)
        logits = (h @ w.t()).to(acc)
        lse = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, safe[:, None])[:, 0]
        total += torch.where(valid, lse - target, 0.0).sum()
        if grad_hidden is None and grad_weight is None:
            del logits
            continue
        # d loss / d logits = softmax - one_hot(label), zero on ignored rows; computed in place over the logits.
        probs = logits.sub_(lse[:, None]).exp_()
        probs[torch.arange(end - start, device=probs.device), safe] -= 1.0
        probs.mul_((valid.to(acc) * scale)[:, None])
        g = probs.to(compute_dtype)
        if grad_hidden is not None:
            grad_hidden[start:end] = (g @ w).to(hidden.dtype)
        if grad_weight is not None:
            grad_weight.add_(g.t() @ h)  # accumulates in fp32 without an fp32 copy of the product
        # Freed before the next chunk's logits exist: otherwise the names keep this chunk's fp32 logits and
        # softmax alive while the next chunk's are made, twice the chunk memory.
        del logits, probs, g
    return total, grad_hidden, grad_weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                chunk_size: int, scale: float, compute_dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            total, gh, gw = _chunked_loop(hidden, weight, labels, chunk_size, scale, ctx.needs_input_grad[0],
                                          ctx.needs_input_grad[1], compute_dtype)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(gh, gw)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        gh, gw = ctx.saved_tensors
        # In place: the saved gradients are used once (no double backward through a loss).
        grad_hidden = gh.mul_(grad_out.to(gh.dtype)) if gh is not None else None
        grad_weight = gw.mul_(grad_out).to(ctx.weight_dtype) if gw is not None else None
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          reduction: str = "sum", chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` (IGNORE_INDEX rows skipped).

    hidden [N, H], weight [V, H] (the LM head), labels [N]. reduction "sum" (what a trainer normalizes
    itself, by the token count of the whole global batch) or "mean" over the non-ignored labels.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden [N, H] and labels [N] expected, got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    if reduction == "sum":
        scale = 1.0
    elif reduction == "mean":
        scale = 1.0 / max(int((labels != IGNORE_INDEX).sum()), 1)
    else:
        raise ValueError(f"reduction: must be 'sum' or 'mean', got {reduction!r}")
    cdt = _compute_dtype(hidden, weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size, scale, cdt)
    with torch.autocast(hidden.device.type, enabled=False):
        total, _, _ = _chunked_loop(hidden, weight, labels, chunk_size, scale, False, False, cdt)
    return total * scale
