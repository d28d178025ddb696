"""Training throughput of `carpool train` on a ~1B Llama shape (Llama-3.2-1B: hidden 2048, 16 layers, 32
heads / 8 KV heads, vocab 128256, tied embeddings), sequence 4096, bf16 with fp32 master weights, FSDP2
on one GPU — side by side with torchtitan's own training loop on the same shape and batch, and with a plain
PyTorch FSDP2 loop over a plain PyTorch Llama (nn.Linear q/k/v/o, SDPA, full-logits cross-entropy). Prints
one JSON object with tokens/s and MFU of each and carpool's tokens/s over each peer's.

    python benchmarks/bench_train.py [--micro-batch-size 2] [--steps 10] [--compile] [--activation-checkpointing on]
                                     [--peers torchtitan,plain]
    python benchmarks/bench_train.py --tiny --device cpu --steps 2     # the CPU-runnable toy version

torchtitan: version 0.2.2, the newest release that runs on torch 2.11 (the GPU machine's). 0.3.0 imports
DataParallelMeshDims from torch.distributed.fsdp (and ShardPlacementResult from its _fully_shard package)
at module load in torchtitan/distributed/fsdp.py and full_dtensor.py, which torch 2.11 lacks, and it needs
torch_checkpointing's dtensor_resharder, which torch_checkpointing 0.1.1 (the newest) lacks; 0.2.2's
imports all resolve on 2.11. Its Trainer (config parsed by its ConfigManager from command-line overrides,
`torchtitan_cli`) runs its Llama-3 model, activation checkpointing, per-block compile, AdamW, LR schedule,
cross-entropy and train_step unchanged; three substitutions make it the same job (`_torchtitan_train_spec`):
the output projection tied to the embedding, FSDP2 applied at one rank (torchtitan shards only at more than
one and otherwise trains under autocast), synthetic token ids instead of a tokenizer and dataset. On the GPU
machine its wheels travel in .whl (`bash scripts/gpu_wheels.sh train`); datasets and tensorboard, imported
at load for features left off here, are stubbed in this process where absent (the JSON lists them). Where
torchtitan is not installed its entry says so and the other runs go on.

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
import contextlib
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


# ---------------------------------------------------------------------------------------------------------
# The peer: torchtitan's own Trainer, Llama model and parallelize function


TORCHTITAN_VERSION = "0.2.2"  # the newest release that runs on the GPU machine's torch 2.11 (module docstring)


def _stub_unused_imports() -> list[str]:
    """Stand-ins for two heavy packages that torchtitan 0.2.2 imports at module load only for features this
    run leaves off: TensorBoard logging (torchtitan.components.metrics imports torch.utils.tensorboard,
    which imports tensorboard) and the Hugging Face text dataloader (torchtitan.hf_datasets.text_datasets,
    imported by torchtitan.models.llama3, imports datasets). Stubbed only where the real package is absent;
    returns the stubbed module names, which the JSON reports."""
    import importlib.util
    import types

    stubbed = []
    if importlib.util.find_spec("tensorboard") is None:
        class SummaryWriter:  # never constructed: metrics.enable_tensorboard stays False
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise RuntimeError("tensorboard is not installed (stubbed by bench_train.py)")

        sys.modules["torch.utils.tensorboard"] = types.ModuleType("torch.utils.tensorboard")
        sys.modules["torch.utils.tensorboard"].SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
        stubbed.append("torch.utils.tensorboard")
    if importlib.util.find_spec("datasets") is None:
        def unavailable(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("datasets is not installed (stubbed by bench_train.py)")

        datasets = types.ModuleType("datasets")
        datasets.Dataset = type("Dataset", (), {})  # type: ignore[attr-defined]
        datasets.IterableDataset = type("IterableDataset", (), {})  # type: ignore[attr-defined]
        datasets.load_dataset = unavailable  # type: ignore[attr-defined]
        distributed = types.ModuleType("datasets.distributed")
        distributed.split_dataset_by_node = unavailable  # type: ignore[attr-defined]
        datasets.distributed = distributed  # type: ignore[attr-defined]
        sys.modules.update({"datasets": datasets, "datasets.distributed": distributed})
        stubbed.append("datasets")
    return stubbed


def _torchtitan_on_cpu() -> None:
    """torchtitan 0.2.2 picks its device at import (tools.utils.device_type falls back to "cuda" with no
    accelerator), and five modules bind that name; point them at the CPU for the CPU smoke run, with the
    memory queries its metrics make answered with zeros."""
    import importlib
    import types

    cpu = types.SimpleNamespace(
        set_device=lambda device: None, current_device=lambda: 0, synchronize=lambda: None,
        get_device_name=lambda device=None: "cpu", empty_cache=lambda: None,
        get_device_properties=lambda device=None: types.SimpleNamespace(total_memory=1),
        reset_peak_memory_stats=lambda device=None: None, memory_stats=lambda device=None: {})
    for name in ("torchtitan.tools.utils", "torchtitan.components.metrics", "torchtitan.distributed.utils",
                 "torchtitan.distributed.parallel_dims", "torchtitan.tools.profiling"):
        module = importlib.import_module(name)
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = cpu


def _torchtitan_args(shape: dict[str, Any]) -> Any:  # noqa: ANN401
    """torchtitan's TransformerModelArgs for `shape`. Its FFN width is round_up(int(m * int(8 * dim / 3)),
    multiple_of): with multiple_of = intermediate_size and m = intermediate_size / int(8 * dim / 3) that is
    intermediate_size (Llama-3.2-1B's own m = 1.5, multiple_of = 256 give the same 8192); its head_dim is
    dim / n_heads, which must match the shape's."""
    from torchtitan.models.llama3 import TransformerModelArgs

    dim, heads = shape["hidden_size"], shape["num_attention_heads"]
    if dim // heads != shape["head_dim"]:
        raise ValueError(f"torchtitan's Llama needs head_dim = hidden_size / heads, got {shape['head_dim']}")
    base = int(8 * dim / 3)
    return TransformerModelArgs(dim=dim, n_layers=shape["num_hidden_layers"], n_heads=heads,
                                n_kv_heads=shape["num_key_value_heads"], vocab_size=shape["vocab_size"],
                                multiple_of=shape["intermediate_size"],
                                ffn_dim_multiplier=shape["intermediate_size"] / base, norm_eps=shape["rms_norm_eps"],
                                rope_theta=shape["rope_theta"])


def _torchtitan_train_spec(shape: dict[str, Any], args: argparse.Namespace, device: torch.device) -> Any:  # noqa: ANN401
    """torchtitan's Llama-3 TrainSpec with three substitutions, none of which touches its model code,
    training step, loss or optimizer:
    - tied embeddings (the shape's; torchtitan's Llama 3 has none): the output projection shares the
      embedding's Parameter, as torchtitan's Qwen3 does with enable_weight_tying;
    - FSDP2 on one rank: torchtitan applies fully_shard only when the data-parallel shard degree is > 1 and
      otherwise trains under autocast. parallelize_llama still applies its activation checkpointing and
      per-block compile; then every block gets its own fully_shard and the root (embedding, final norm and
      the tied head, so the shared Parameter lives in one FSDP group) the last one — carpool's layout.
    - synthetic data: uniform random token ids (the same distribution as the other two runs), no tokenizer.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.config import TORCH_DTYPE_MAP
    from torchtitan.models.llama3 import Transformer, get_train_spec, parallelize_llama

    class TiedTransformer(Transformer):
        def __init__(self, model_args: Any) -> None:  # noqa: ANN401
            super().__init__(model_args)
            self.output.weight = self.tok_embeddings.weight

        def init_weights(self, buffer_device: torch.device | None = None) -> None:
            super().init_weights(buffer_device=buffer_device)
            assert self.output.weight is self.tok_embeddings.weight, "the tie must survive FSDP and to_empty"

    def parallelize(model: nn.Module, parallel_dims: Any, job_config: Any) -> nn.Module:  # noqa: ANN401
        model = parallelize_llama(model, parallel_dims, job_config)
        if parallel_dims.fsdp_enabled:
            raise RuntimeError("bench_train.py runs torchtitan on one rank")
        mesh = init_device_mesh(device.type, (1,))
        mp = MixedPrecisionPolicy(param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
                                  reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce])
        for block in model.layers.values():
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not args.no_reshard)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not args.no_reshard)
        return model

    class RandomTokens(BaseDataLoader):
        def __init__(self, job_config: Any) -> None:  # noqa: ANN401
            self.batch, self.seq_len = job_config.training.local_batch_size, job_config.training.seq_len
            self.generator = torch.Generator(device="cpu").manual_seed(0)

        def __iter__(self):  # noqa: ANN204
            while True:
                tokens = torch.randint(0, shape["vocab_size"], (self.batch, self.seq_len + 1), generator=self.generator)
                yield {"input": tokens[:, :-1]}, tokens[:, 1:]

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            pass

    spec = get_train_spec()
    spec.model_cls = TiedTransformer
    spec.model_args = {"bench": _torchtitan_args(shape)}
    spec.parallelize_fn = parallelize
    spec.pipelining_fn = None
    spec.build_tokenizer_fn = None
    spec.build_dataloader_fn = lambda dp_world_size, dp_rank, tokenizer, job_config: RandomTokens(job_config)
    spec.build_validator_fn = None
    spec.state_dict_adapter = None
    return spec


def torchtitan_cli(args: argparse.Namespace, device: torch.device, dump_folder: str) -> list[str]:
    """torchtitan's command-line overrides for this run (its ConfigManager parses them, as torchtitan's
    train.py does from sys.argv): same sequence, micro-batch, steps, AdamW (lr 3e-4, betas 0.9/0.95,
    weight decay 0.1, fused on CUDA), one warmup step, gradient clipping at 1.0, activation checkpointing
    and compile choice; bf16 parameters (fp32 on CPU) over fp32 master weights, fp32 gradient reduction."""
    ac = {"off": "none", "on": "full", "selective": "selective"}[args.activation_checkpointing]
    cli = ["--model.name", "carpool_bench", "--model.flavor", "bench", "--job.dump_folder", dump_folder,
           "--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(args.micro_batch_size),
           "--training.steps", str(args.warmup + args.steps + (2 if args.profile else 0)),
           "--training.mixed_precision_param", "bfloat16" if args.precision == "bf16" else "float32",
           "--training.max_norm", "1.0", "--parallelism.data_parallel_shard_degree", "1",
           "--optimizer.name", "AdamW", "--optimizer.lr", "3e-4", "--optimizer.beta1", "0.9",
           "--optimizer.beta2", "0.95", "--optimizer.weight_decay", "0.1",
           "--optimizer.implementation", "fused" if device.type == "cuda" else "foreach",
           "--lr_scheduler.warmup_steps", "1", "--metrics.log_freq", "1000000",
           "--activation_checkpoint.mode", ac, "--activation_checkpoint.selective_ac_option", "2"]
    if args.compile:
        cli += ["--compile.enable", "--compile.components", "model"]
    return cli


def run_torchtitan(shape: dict[str, Any], args: argparse.Namespace, device: torch.device, workdir: str) -> dict:
    """torchtitan's Trainer.train_step, timed like the other runs, with torchtitan's own gc handling per step
    as in its Trainer.train (torchtitan disables automatic gc and collects every gc_freq steps)."""
    stubbed = _stub_unused_imports()
    import torchtitan
    from torchtitan.config import ConfigManager
    from torchtitan.protocols.train_spec import _extra_train_specs, register_train_spec
    from torchtitan.train import Trainer

    if torchtitan.__version__ != TORCHTITAN_VERSION:
        raise RuntimeError(f"expected torchtitan {TORCHTITAN_VERSION}, found {torchtitan.__version__}")
    if device.type == "cpu":
        _torchtitan_on_cpu()
    _extra_train_specs.pop("carpool_bench", None)
    register_train_spec("carpool_bench", _torchtitan_train_spec(shape, args, device))
    job_config = ConfigManager().parse_args(torchtitan_cli(args, device, os.path.join(workdir, "torchtitan")))

    losses: list[torch.Tensor] = []

    class BenchTrainer(Trainer):
        def forward_backward_step(self, **kwargs: Any) -> torch.Tensor:
            loss = super().forward_backward_step(**kwargs)
            losses.append(loss.detach())
            return loss

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    own_group = not dist.is_initialized()
    trainer = None
    try:
        torch.manual_seed(0)
        trainer = BenchTrainer(job_config)
        # FSDP's MixedPrecisionPolicy casts (parallelize above); torchtitan would add autocast at one rank.
        trainer.maybe_enable_amp = contextlib.nullcontext()
        data_iterator = trainer.batch_generator(trainer.dataloader)

        def step() -> float:
            trainer.step += 1
            trainer.gc_handler.run(trainer.step)
            trainer.train_step(data_iterator)
            return float(losses[-1])

        step_s, step_losses = _timed(step, device, args.warmup, args.steps)
        peak = _memory(device)
        num_params = sum(p.numel() for p in trainer.model_parts[0].parameters())
        if args.profile:
            _profile(step, device, os.path.join(args.profile, "torchtitan_trace.json"))
    finally:
        if trainer is not None:
            trainer.close()
        gc.enable()  # torchtitan's GarbageCollection disabled automatic collection for its own steps
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"step_s": step_s, "losses": step_losses, "peak_memory_gib": peak, "num_params": num_params,
            "torchtitan_version": torchtitan.__version__, "stubbed_modules": stubbed,
            "activation_checkpointing_layers": "every 2nd layer from the second (selective_ac_option 2)"
            if args.activation_checkpointing == "selective" else args.activation_checkpointing}


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
    ap.add_argument("--peers", default="torchtitan,plain",
                    help="comma-separated peers: torchtitan (its Trainer; skipped with the reason where it is not "
                         "installed), plain (a plain PyTorch FSDP2 loop)")
    ap.add_argument("--skip-peer", action="store_true", help="run carpool alone")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="after timing, write chrome traces of 2 more steps (carpool_trace.json, "
                         "torchtitan_trace.json, peer_trace.json)")
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
    peers = [] if args.skip_peer else [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := set(peers) - {"torchtitan", "plain"}:
        raise SystemExit(f"--peers: unknown {sorted(unknown)}; choose from torchtitan, plain")
    if "torchtitan" in peers:
        import importlib.util

        if importlib.util.find_spec("torchtitan") is None:
            result["torchtitan"] = {"skipped": f"torchtitan is not installed (pip install torchtitan=="
                                               f"{TORCHTITAN_VERSION}, or on the GPU machine: "
                                               "bash scripts/gpu_wheels.sh train, carrying .whl)"}
        else:
            with tempfile.TemporaryDirectory() as workdir:
                result["torchtitan"] = summarize(run_torchtitan(shape, args, device, workdir))
            _release(device)
            result["carpool_over_torchtitan_tokens_per_s"] = (result["carpool"]["tokens_per_s"]
                                                              / result["torchtitan"]["tokens_per_s"])
    if "plain" in peers:
        result["peer_plain_fsdp2"] = summarize(run_peer(shape, args, device))
        result["carpool_over_peer_tokens_per_s"] = (result["carpool"]["tokens_per_s"]
                                                    / result["peer_plain_fsdp2"]["tokens_per_s"])
    emit(result, args.out)


if __name__ == "__main__":
    main()
