"""GPTQ (Frantar et al., 2022): 4-bit weights that compensate each column's rounding error in the columns
not yet quantized, weighted by the inverse Hessian of the layer's output error on calibration inputs,
H = 2 X^T X / n. Follows the reference implementation (IST-DASLab/gptq, `GPTQ.fasterquant`): blocks of
128 columns, group parameters found when a group starts (from the weights as updated so far), 1% damping
of the mean diagonal, no act-order.

`collect_hessians` runs the float model (transformers, plain PyTorch) once over the calibration
sequences and accumulates every projection's X^T X from its inputs: the non-sequential variant (each
layer's inputs come from the float model, not from the already-quantized layers before it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from carpool.quantization.writers import LINEARS


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, group: int, symmetric: bool = False,
                  damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N, K] in [0, 15], zero [N, K/G], scale [N, K/G] float16): the contract of
    writers.quantize_int4, with W ~ (q - zero) * scale minimizing the output error on the inputs whose
    X^T X is `hessian` [K, K] rather than the weight error. `block` must be a multiple of `group` (a group
    never straddles two blocks)."""
    from carpool.quantization.writers import quantize_int4

    n, k = w.shape
    if k % group or block % group:
        raise ValueError(f"group_size: {group} must divide the {k} input columns and the block of {block}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian: expected [{k}, {k}], got {tuple(hessian.shape)}")
    dev = hessian.device
    W = w.to(dev, torch.float32).clone()
    H = hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that never fire: any value works, zero keeps the group range small
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, device=dev)
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads over the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(n, k, dtype=torch.long, device=dev)
    zeros = torch.zeros(n, k // group, dtype=torch.long, device=dev)
    scales = torch.zeros(n, k // group, dtype=torch.float16, device=dev)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1 = W[:, b0:b1].clone()
        err = torch.zeros_like(W1)
        h1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:  # this group's grid, from its weights as the errors so far left them
                _, z, s = quantize_int4(W1[:, i:i + group], group, symmetric)
                zeros[:, col // group], scales[:, col // group] = z[:, 0], s[:, 0]
            z, s = zeros[:, col // group].float(), scales[:, col // group].float()
            q = torch.clamp(torch.round(W1[:, i] / s) + z, 0, 15)
            Q[:, col] = q.long()
            e = (W1[:, i] - (q - z) * s) / h1[i, i]
            W1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        W[:, b1:] -= err @ hinv[b0:b1, b1:]
    return Q.cpu(), zeros.cpu(), scales.cpu()


@torch.no_grad()
def collect_hessians(model_dir: str, sequences: Sequence[Sequence[int]], device: str = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """{module name: 2 X^T X / n (float32, on `device`)} for every decoder projection (LINEARS) of the
    float checkpoint at `model_dir`, over the tokens of `sequences` (each run as one causal sequence)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def accumulate(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in LINEARS:
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        for seq in sequences:
            model(torch.tensor([list(seq)], device=device))
    finally:
        for h in handles:
            h.remove()
    return {name: 2 * s / counts[name] for name, s in sums.items()}
