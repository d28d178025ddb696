"""What a training run reports: JSON-lines metrics, a progress bar, a loss-curve PNG, FLOPs and MFU, and
an analytic memory estimate to hold the measured peak against.

FLOPs convention (PaLM appendix B, as torchtitan counts): per token, 6·N for the matmul weights N (every
linear layer and the LM head; the embedding lookup is not a matmul) plus 12·L·heads·head_dim·T for
attention scores and values over the full T x T square, forward and backward. Recomputation by
activation checkpointing is not counted: MFU measures useful work.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

# Dense bf16 tensor-core peaks (no sparsity) from vendor data sheets, for the progress bar's MFU. The
# benchmark measures the matmul rate in its own run instead.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.0e12, "H100 NVL": 835.0e12,
    "H200": 989.4e12, "H800": 989.4e12, "A100": 312.0e12, "L40S": 362.0e12, "A10G": 70.0e12,
    "RTX 4090": 165.2e12,
}


def device_peak_flops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name (longest matching key), None if unknown."""
    best = None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name and (best is None or len(key) > len(best[0])):
            best = (key, value)
    return best[1] if best else None


# ---------------------------------------------------------------------------------------------------------
# Model arithmetic from a Hugging Face config dict


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool

    @staticmethod
    def from_hf_config(cfg: dict[str, Any]) -> "ModelShape":
        heads = int(cfg["num_attention_heads"])
        return ModelShape(int(cfg["vocab_size"]), int(cfg["hidden_size"]), int(cfg["intermediate_size"]),
                          int(cfg["num_hidden_layers"]), heads, int(cfg.get("num_key_value_heads") or heads),
                          int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                          bool(cfg.get("tie_word_embeddings", False)))

    @property
    def layer_matmul_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        return attn + 3 * h * self.intermediate_size

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: the layers' linears and the LM head."""
        return self.num_layers * self.layer_matmul_params + self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        h = self.hidden_size
        norms = (2 * self.num_layers + 1) * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_matmul_params + norms + embeddings

    def flops_per_token(self, seq_len: int) -> float:
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return 6 * self.matmul_params + attention


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None) -> float | None:
    return None if not peak_flops else flops_per_token * tokens_per_s / peak_flops


# ---------------------------------------------------------------------------------------------------------
# Analytic memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank at the peak of a training step.

    The peak is the last loss chunk of the (last) micro-batch's forward: every activation is alive and
    the loss's chunk temporaries are at their largest; backward then frees a layer's activations (about
    4x its fp32 gradient) as it makes the gradient. The one other candidate is the optimizer step
    (parameters, whole gradients, AdamW states, no activations), so `total` is the larger of the two.
    """

    params: int              # fp32 master weights (this rank's shard under FSDP)
    grads: int               # fp32 gradients alive at the forward peak: none for one micro-batch (zero_grad
                             # sets them to None), all of them when earlier micro-batches accumulated some
    optimizer: int           # AdamW exp_avg + exp_avg_sq, fp32
    gathered_params: int     # FSDP: bf16 unsharded copies alive at the peak (root + layers not resharded)
    activations: int         # tensors saved for backward (eager or torch.compile'd layers)
    loss: int                # chunked cross-entropy: the head's fp32 gradient + one chunk's temporaries

    @property
    def forward_peak(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered_params + self.activations + self.loss

    @property
    def optimizer_step(self) -> int:
        return 2 * self.params + self.optimizer  # gradients are as large as the fp32 parameters

    @property
    def total(self) -> int:
        return max(self.forward_peak, self.optimizer_step)

    def to_json(self) -> dict[str, float]:
        d = {k: v / 2 ** 30 for k, v in asdict(self).items()}
        d["optimizer_step"] = self.optimizer_step / 2 ** 30
        d["total"] = self.total / 2 ** 30
        return {f"{k}_gib": round(v, 4) for k, v in d.items()}


def activation_bytes_per_token_per_layer(shape: ModelShape, compute_bytes: int, residual_bytes: int,
                                         compiled: bool = False) -> int:
    """Bytes autograd saves for backward in one carpool Llama decoder layer, per token, without recomputation.

    compute_bytes: the matmuls' dtype (2 for bf16, 4 for fp32); residual_bytes: the residual stream's (2
    when the weights themselves are bf16, as FSDP's mixed precision gathers them; 4 under autocast, whose
    fp32 weights keep the embedding and the residual adds in fp32, and in fp32).

    Eager, per RMSNorm (torch reference, computing in fp32): the fp32 input, the normalized input in the
    residual dtype, the output as the next matmul reads it, and the fp32 1/rms. Attention: the fused q/k/v
    output (the SDPA keeps v, a view of it), q and k after RoPE, the cos/sin rows, the SDPA output and its
    fp32 log-sum-exp. MLP: the gate/up output, silu(gate), and silu(gate) * up.

    torch.compile'd layer (the min-cut partitioner recomputes elementwise ops in backward when that saves
    bytes): per RMSNorm only its input, its output (the next matmul's input) and 1/rms, the fp32 copy
    being recomputed; the MLP drops silu(gate), recomputed from the gate/up output. Attention keeps the
    same tensors, except that in fp32 (no cast of cos/sin to the compute dtype) it keeps the fp32 cos/sin
    cache rows [T, head_dim] instead of cos and sin. (Both modes matched against the tensors autograd
    saves in tests/test_training_metrics.py.)
    """
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_heads * d, shape.num_kv_heads * d
    cb, rb = compute_bytes, residual_bytes
    rope = 4 * d if (compiled and cb == 4) else 2 * d * cb
    attention = (q + 2 * kv) * cb + q * cb + kv * cb + rope + q * cb + shape.num_heads * 4
    if compiled:
        return 2 * (rb * h + cb * h + 4) + attention + 3 * i * cb
    return 2 * (4 * h + rb * h + cb * h + 4) + attention + 4 * i * cb


def loss_peak_bytes(shape: ModelShape, tokens: int, compute_bytes: int, residual_bytes: int,
                    loss_chunk_size: int) -> int:
    """The chunked cross-entropy's largest moment (loss.py), on top of the activations: the head's fp32
    gradient accumulator [V, H] and the hidden states' gradient [T, H], plus the largest of one chunk's
    (c tokens) three stages -- the compute-dtype logits while their fp32 copy is made; the fp32 logits
    while torch.logsumexp makes its fp32 temporary; the fp32 logits, their softmax in the compute dtype
    and the [V, H] head-gradient product in the compute dtype. In fp32 the casts are no-ops."""
    h, v, cb = shape.hidden_size, shape.vocab_size, compute_bytes
    c = min(loss_chunk_size, tokens)
    cast = cb if cb != 4 else 0  # a compute-dtype copy next to an fp32 one (none when both are fp32)
    stages = max(c * v * (cast + 4), c * v * 8, c * v * (4 + cast) + v * h * cb)
    return 4 * v * h + tokens * h * residual_bytes + stages


def estimate_memory(hf_config: dict[str, Any], seq_len: int, micro_batch_size: int, precision: str,
                    activation_checkpointing: str, strategy: str, world_size: int,
                    reshard_after_forward: bool, loss_chunk_size: int, compiled: bool = False,
                    grad_accum_steps: int = 1) -> MemoryEstimate:
    """Analytic peak bytes per rank (see MemoryEstimate for which moment). Parameters, gradients and AdamW
    states are fp32 (4 + 4 + 8 bytes per parameter), divided by the world size under FSDP. Activations:
    every layer's saved tensors without checkpointing -- eager or compiled, which keeps fewer (see
    activation_bytes_per_token_per_layer); a checkpointed layer keeps only its inputs (the residual stream
    and the MLP output), and one layer's tensors exist again while it is recomputed."""
    shape = ModelShape.from_hf_config(hf_config)
    n = shape.num_params
    shard = world_size if strategy == "fsdp" else 1
    bf16 = precision == "bf16"
    cb = 2 if bf16 else 4
    rb = 2 if (bf16 and strategy == "fsdp") else 4
    tokens = seq_len * micro_batch_size
    per_layer = activation_bytes_per_token_per_layer(shape, cb, rb, compiled) * tokens
    layer_inputs = 2 * shape.hidden_size * rb * tokens
    layers = shape.num_layers
    recomputed = {"on": layers, "selective": (layers + 1) // 2, "off": 0}[activation_checkpointing]
    activations = recomputed * layer_inputs + (layers - recomputed) * per_layer + (per_layer if recomputed else 0)
    # the final norm (eager, as in a layer; only the layers are compiled) and the hidden states handed to the loss
    activations += (4 * shape.hidden_size + 2 * rb * shape.hidden_size + 4) * tokens
    h = shape.hidden_size
    head = shape.vocab_size * h
    gathered = 0
    if strategy == "fsdp":
        # bf16 (or fp32) unsharded copies: the root's (embedding, head, final norm) stay gathered through
        # the forward; each layer's are freed after its forward unless reshard_after_forward is off (the
        # last layer's all-gather buffer is released only when the root's forward, the loss included, ends).
        root = head * (1 if shape.tie_word_embeddings else 2) + h
        layer = shape.layer_matmul_params + 2 * h
        gathered = (root + (1 if reshard_after_forward else layers) * layer) * cb
    elif bf16:
        gathered = shape.num_params * cb  # autocast caches the bf16 casts of the weights for the step
    loss = loss_peak_bytes(shape, tokens, cb, rb, loss_chunk_size)
    grads = 4 * n // shard if grad_accum_steps > 1 else 0
    return MemoryEstimate(params=4 * n // shard, grads=grads, optimizer=8 * n // shard,
                          gathered_params=gathered, activations=activations, loss=loss)


# ---------------------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """Appends one JSON object per line; only the process that owns it writes (rank 0)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """tqdm over optimizer steps with loss, tokens/s and MFU; a no-op when disabled (other ranks)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, mfu_value: float | None) -> None:
        if self._bar is None:
            return
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if mfu_value is not None:
            post["mfu"] = f"{mfu_value:.1%}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Throughput:
    """Tokens per second over the steps since the last `lap` (the first step, with compilation and
    allocator warm-up, is excluded by the caller calling lap after it)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def lap(self) -> float:
        now = time.perf_counter()
        rate = self._tokens / max(now - self._t, 1e-9)
        self._t, self._tokens = now, 0
        return rate


def plot_loss_curve(metrics_path: str, png_path: str) -> str | None:
    """Train (and held-out) loss against step as a PNG; None when matplotlib is not installed (it is an
    optional dependency: `pip install carpool[train]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    heldout = [(r["step"], r["heldout_loss"]) for r in records if "heldout_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train")
    if heldout:
        ax.plot(*zip(*heldout), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
