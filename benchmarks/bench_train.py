"""Training throughput of `carpool train` on a ~1B Llama shape (Llama-3.2-1B: hidden 2048, 16 layers, 32
heads / 8 KV heads, vocab 128256, tied embeddings), sequence 4096, bf16 with fp32 master weights, FSDP2
on one GPU — side by side with a plain PyTorch FSDP2 loop over a plain PyTorch Llama of the same shape
and batch (the torchtitan recipe: nn.Linear q/k/v/o, SDPA, full-logits cross-entropy; torchtitan itself
is not installed on the GPU machine). Prints one JSON object.

    python benchmarks/bench_train.py [--micro-batch-size 2] [--steps 10] [--compile] [--activation-checkpointing on]
    python benchmarks/bench_train.py --tiny --device cpu --steps 2     # the CPU-runnable toy version

MFU = (6·N + 12·L·heads·head_dim·T) · tokens/s over the bf16 matmul rate measured in the same run (an
8192^3 torch.mm), and over the data-sheet peak. Peak memory (torch.cuda.max_memory_allocated over the
timed steps) is reported beside carpool's analytic estimate (carpool/training/metrics.py) of the mode that
ran: eager, or with --compile the compiled layers, which save fewer activations (the partitioner recomputes
the norms' fp32 input and silu(gate) in backward: 10.0 instead of 14.0 GiB at this shape and batch). The
estimate's peak is the forward's last loss chunk: fp32 master weights and AdamW states, no gradients
(zero_grad frees them; one micro-batch), the root's gathered bf16 weights, every activation, and the
loss's head gradient plus its largest chunk stage (the fp32 logits next to logsumexp's fp32 temporary).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import socket
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, emit, measure_matmul_flops  # noqa: E402

from carpool.training.config import ModelShapeConfig, TrainConfig, llama_hf_config  # noqa: E402
from carpool.training.metrics import ModelShape, device_peak_flops  # noqa: E402
from carpool.training.pretokenize import write_token_file  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_rate(device: torch.device) -> float:
    if device.type == "cuda":
        return measure_matmul_flops(str(device))
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(10):
        torch.mm(a, b)
    return 10 * 2 * 512 ** 3 / (time.perf_counter() - t)


def _timed(step, device: torch.device, warmup: int, steps: int) -> tuple[float, list[float]]:  # noqa: ANN001
    """Seconds per step over `steps` after `warmup`, and the losses of all steps."""
    losses = [step() for _ in range(warmup)]
    _release(device)
    _sync(device)
    t = time.perf_counter()
    losses += [step() for _ in range(steps)]
    _sync(device)
    return (time.perf_counter() - t) / steps, losses


def _profile(step, device: torch.device, path: str, steps: int = 2) -> None:  # noqa: ANN001
    """A chrome trace of `steps` more steps (open in chrome://tracing or ui.perfetto.dev)."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    prof.export_chrome_trace(path)


def _memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------------
# carpool train


def run_carpool(shape: dict[str, Any], args: argparse.Namespace, device: torch.device, workdir: str) -> dict:
    from carpool.training.trainer import Trainer

    rng = np.random.default_rng(0)
    tokens_needed = (args.warmup + args.steps + 1) * args.micro_batch_size * (args.seq_len + 1)
    prefix = os.path.join(workdir, "tokens")
    write_token_file(rng.integers(0, shape["vocab_size"], tokens_needed), prefix, shape["vocab_size"], 0, 1, 2)
    model = {k: v for k, v in shape.items() if k != "vocab_size"}
    cfg = TrainConfig.from_dict({
        "data": {"train": prefix}, "model": {**model, "vocab_size": shape["vocab_size"]},
        "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size, "max_steps": args.warmup + args.steps,
        "precision": args.precision, "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile, "loss_chunk_size": args.loss_chunk_size, "device": device.type,
        "parallel": {"strategy": "fsdp", "reshard_after_forward": not args.no_reshard},
        "optim": {"lr": 3e-4, "warmup_steps": 1}, "output_dir": os.path.join(workdir, "carpool"),
        "checkpoint": {"resume": False}, "export": False, "progress_bar": False})
    trainer = Trainer(cfg)
    try:
        step_s, losses = _timed(lambda: trainer.train_step().loss, device, args.warmup, args.steps)
        estimate = trainer.memory_estimate()
        peak = _memory(device)
        num_params = trainer.num_params
        if args.profile:
            _profile(lambda: trainer.train_step(), device, os.path.join(args.profile, "carpool_trace.json"))
    finally:
        trainer.close()
    return {"step_s": step_s, "losses": losses, "peak_memory_gib": peak, "memory_estimate": estimate,
            "num_params": num_params}


# ---------------------------------------------------------------------------------------------------------
# The peer: a plain PyTorch Llama and training loop with FSDP2 (torchtitan's recipe)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PeerBlock(nn.Module):
    def __init__(self, s: dict[str, Any]) -> None:
        super().__init__()
        h, hd = s["hidden_size"], s["head_dim"]
        self.nh, self.nkv, self.hd = s["num_attention_heads"], s["num_key_value_heads"], hd
        self.attention_norm = nn.RMSNorm(h, eps=s["rms_norm_eps"])
        self.wq = nn.Linear(h, self.nh * hd, bias=False)
        self.wk = nn.Linear(h, self.nkv * hd, bias=False)
        self.wv = nn.Linear(h, self.nkv * hd, bias=False)
        self.wo = nn.Linear(self.nh * hd, h, bias=False)
        self.ffn_norm = nn.RMSNorm(h, eps=s["rms_norm_eps"])
        self.w1 = nn.Linear(h, s["intermediate_size"], bias=False)
        self.w3 = nn.Linear(h, s["intermediate_size"], bias=False)
        self.w2 = nn.Linear(s["intermediate_size"], h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attention_norm(x)
        q = _rope(self.wq(h).view(b, t, self.nh, self.hd), cos, sin).transpose(1, 2)
        k = _rope(self.wk(h).view(b, t, self.nkv, self.hd), cos, sin).transpose(1, 2)
        v = self.wv(h).view(b, t, self.nkv, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        x = x + self.wo(o.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class PeerLlama(nn.Module):
    def __init__(self, s: dict[str, Any], seq_len: int) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(s["vocab_size"], s["hidden_size"])
        self.layers = nn.ModuleList([PeerBlock(s) for _ in range(s["num_hidden_layers"])])
        self.norm = nn.RMSNorm(s["hidden_size"], eps=s["rms_norm_eps"])
        self.output = nn.Linear(s["hidden_size"], s["vocab_size"], bias=False)
        self.output.weight = self.tok_embeddings.weight
        hd = s["head_dim"]
        inv = 1.0 / (s["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(seq_len).float(), inv)
        self.register_buffer("cos", torch.cat([freqs.cos()] * 2, -1)[None, :, None, :], persistent=False)
        self.register_buffer("sin", torch.cat([freqs.sin()] * 2, -1)[None, :, None, :], persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))


def run_peer(shape: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = PeerLlama(shape, args.seq_len)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
        if args.activation_checkpointing != "off":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            every = 1 if args.activation_checkpointing == "on" else 2
            for i in range(0, len(model.layers), every):
                model.layers[i] = checkpoint_wrapper(model.layers[i])
        if args.compile:
            for i, layer in enumerate(model.layers):
                model.layers[i] = torch.compile(layer)
        mesh = init_device_mesh(device.type, (1,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=not args.no_reshard)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not args.no_reshard)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                **({"fused": True} if device.type == "cuda" else {"foreach": True}))
        g = torch.Generator(device="cpu").manual_seed(0)

        def step() -> float:
            tokens = torch.randint(0, shape["vocab_size"], (args.micro_batch_size, args.seq_len + 1), generator=g)
            tokens = tokens.to(device)
            opt.zero_grad(set_to_none=True)
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            return float(loss)

        step_s, losses = _timed(step, device, args.warmup, args.steps)
        peak = _memory(device)
        if args.profile:
            _profile(step, device, os.path.join(args.profile, "peer_trace.json"))
    finally:
        if own_group:
            dist.destroy_process_group()
    return {"step_s": step_s, "losses": losses, "peak_memory_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a toy shape (CPU smoke test)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--seq-len", type=int, default=None, help="default 4096 (64 with --tiny)")
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--activation-checkpointing", default="off", choices=["off", "on", "selective"])
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (both sides)")
    ap.add_argument("--no-reshard", action="store_true", help="FSDP reshard_after_forward=False (both sides)")
    ap.add_argument("--loss-chunk-size", type=int, default=4096, help="carpool's chunked cross-entropy")
    ap.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default bf16 (fp32 on CPU)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="after timing, write chrome traces of 2 more steps (carpool_trace.json, peer_trace.json)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    args.seq_len = args.seq_len or (64 if args.tiny else 4096)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    shape = TINY if args.tiny else LLAMA_1B
    hf = llama_hf_config(ModelShapeConfig(**{k: v for k, v in shape.items() if k != "vocab_size"}),
                         shape["vocab_size"], 0, 1)
    arithmetic = ModelShape.from_hf_config(hf)
    flops_per_token = arithmetic.flops_per_token(args.seq_len)
    tokens_per_step = args.micro_batch_size * args.seq_len
    rate = matmul_rate(device)
    datasheet = device_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def summarize(r: dict) -> dict:
        tps = tokens_per_step / r["step_s"]
        out = {**r, "tokens_per_s": tps, "mfu_vs_measured_matmul": flops_per_token * tps / rate,
               "mfu_vs_datasheet": flops_per_token * tps / datasheet if datasheet else None,
               "final_loss_finite": all(math.isfinite(x) for x in r["losses"])}
        return out

    result: dict[str, Any] = {
        "benchmark": "train", "device": device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "shape": shape, "num_params": arithmetic.num_params, "seq_len": args.seq_len,
        "micro_batch_size": args.micro_batch_size, "tokens_per_step": tokens_per_step, "precision": args.precision,
        "parallelism": "fsdp2 (1 rank), reshard_after_forward=" + str(not args.no_reshard),
        "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
        "steps": args.steps, "warmup": args.warmup, "flops_per_token": flops_per_token,
        "flops_convention": "6*N(matmul weights incl. LM head) + 12*L*heads*head_dim*T; recomputation not counted",
        "matmul_flops_measured": rate, "matmul_flops_datasheet": datasheet,
    }
    with tempfile.TemporaryDirectory() as workdir:
        result["carpool"] = summarize(run_carpool(shape, args, device, workdir))
    _release(device)
    est = result["carpool"]["memory_estimate"]["total_gib"]
    peak = result["carpool"]["peak_memory_gib"]
    result["carpool"]["peak_over_estimate"] = peak / est if peak else None
    if not args.skip_peer:
        result["peer_plain_fsdp2"] = summarize(run_peer(shape, args, device))
        result["carpool_over_peer_tokens_per_s"] = (result["carpool"]["tokens_per_s"]
                                                    / result["peer_plain_fsdp2"]["tokens_per_s"])
    emit(result, args.out)


if __name__ == "__main__":
    main()
