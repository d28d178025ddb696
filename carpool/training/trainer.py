"""The training loop over carpool's own model classes.

`Trainer(cfg)` checks the config against the machine (preflight) before anything is built, then builds
the model with `ModelRuntime.for_training()` (plain differentiable ops, dense causal attention), applies
checkpointing/compile per layer and DDP or FSDP2 from outside (parallelize.py), and resumes from the
latest complete checkpoint when there is one. `run()` is the loop: steps, metrics, held-out evaluation,
checkpoints, and at the end the Hugging Face export.

Loss normalization (what makes k micro-batches equal one batch of k, and N ranks equal one): each
micro-batch's loss is the SUM of its token losses, scaled by world_size / (label tokens of the whole
global step, counted on all ranks before the first forward). DDP and FSDP average gradients over ranks,
so the gradient is exactly that of the mean loss over the global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from carpool.training.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from carpool.training.config import Preflight, TrainConfig, preflight
from carpool.training.data import PackedLoader, eval_batches
from carpool.training.loss import chunked_cross_entropy
from carpool.training.metrics import (
    MetricsLog,
    ModelShape,
    ProgressBar,
    device_peak_flops,
    estimate_memory,
    mfu,
    plot_loss_curve,
)
from carpool.training.optim import build_optimizer, build_scheduler
from carpool.training.parallelize import apply_ddp, apply_fsdp, apply_layer_transforms, device_mesh
from carpool.training.pretokenize import open_tokens


class CausalLMLoss(nn.Module):
    """A causal LM and its loss in one module, so that one forward (one FSDP root unshard) covers the
    embedding, the layers, the final norm and the LM head used by the chunked cross-entropy.

    It registers the model's own submodules under the model's own names (`model`, `lm_head`), so its
    parameter names are the model's and a state dict of it loads into the model class unchanged.
    """

    def __init__(self, lm: nn.Module, loss_chunk_size: int) -> None:
        super().__init__()
        self.model = lm.model
        self.lm_head = lm.lm_head
        self.config = lm.config
        self.loss_chunk_size = loss_chunk_size

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """input_ids, labels [B, T] -> the sum of the token losses (ignored labels excluded)."""
        from carpool.attention.dense import dense_batch

        batch = dense_batch(input_ids)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        return chunked_cross_entropy(hidden, self.lm_head.weight, labels.reshape(-1), "sum", self.loss_chunk_size)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this trainer created the process group (and destroys it in close())

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cfg: TrainConfig) -> DistContext:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); NCCL on GPUs,
    gloo on CPU. One process with ddp/fsdp gets a group of one (FSDP2 needs a device mesh)."""
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))
    rank = dist.get_rank() if initialized else int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    strategy = cfg.parallel.strategy
    if world > 1 and strategy == "none":
        raise ValueError(f"parallel.strategy: 'none' cannot run on {world} processes; choose ddp or fsdp")
    device_type = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but no CUDA device is available")
        device = torch.device("cuda", local_rank if ":" not in device_type else int(device_type.split(":")[1]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if strategy != "none" and not initialized:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        owns = True
    return DistContext(rank, world, local_rank, device, owns)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def init_weights(model: nn.Module, seed: int, std: float) -> None:
    """Hugging Face Llama's init: normal(0, std) for linear and embedding weights, norms at 1 (drawn per
    parameter from a generator seeded by its name, so the result does not depend on build order)."""
    from carpool.models.loader import init_dummy_weights

    init_dummy_weights(model, seed=seed, std=std)


def build_language_model(hf_config: dict[str, Any], cfg: TrainConfig, device: torch.device) -> nn.Module:
    """A carpool model for training, fp32 parameters (the master weights), from scratch or a checkpoint."""
    from carpool.config import ModelConfig
    from carpool.models.loader import build_model, load_weights
    from carpool.models.runtime import ModelRuntime

    mc = ModelConfig.from_hf_config(hf_config, path=cfg.model.init_from or "", dtype="float32")
    model = build_model(mc, ModelRuntime.for_training(), device)
    if cfg.model.init_from:
        load_weights(model, cfg.model.init_from)
    else:
        init_weights(model, cfg.seed, cfg.model.init_std)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


@dataclass(frozen=True)
class StepStats:
    step: int            # optimizer steps done after this one
    loss: float          # mean token loss of the global batch
    lr: float
    grad_norm: float     # before clipping
    tokens: int          # tokens of the global batch (all ranks, all micro-batches)
    seconds: float


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.pre: Preflight = preflight(cfg)
        self.dist = setup_distributed(cfg)
        self.device = self.dist.device
        self.hf_config = dict(self.pre.hf_config)
        self.shape = ModelShape.from_hf_config(self.hf_config)
        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda" and cfg.precision == "bf16":
            torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls left (none in the layers)
        lm = build_language_model(self.hf_config, cfg, self.device)
        self.module = CausalLMLoss(lm, cfg.loss_chunk_size)
        self.num_params = sum(p.numel() for p in self.module.parameters())
        apply_layer_transforms(self.module, cfg.activation_checkpointing, cfg.compile)
        bf16 = cfg.precision == "bf16"
        strategy = cfg.parallel.strategy
        if strategy == "fsdp":
            apply_fsdp(self.module, device_mesh(self.device), torch.bfloat16 if bf16 else None,
                       cfg.parallel.reshard_after_forward, cfg.parallel.explicit_prefetch)
            self.forward_module: nn.Module = self.module
        elif strategy == "ddp":
            self.forward_module = apply_ddp(self.module, self.device)
        else:
            self.forward_module = self.module
        # bf16 without FSDP: autocast (fp32 weights, bf16 matmuls); FSDP casts the gathered weights itself.
        self._use_autocast = bf16 and strategy != "fsdp"
        self.optimizer = build_optimizer(self.module, cfg.optim, self.device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.max_steps)
        tokens, meta = open_tokens(cfg.data.train)
        self.loader = PackedLoader(tokens, cfg.seq_len, cfg.micro_batch_size, cfg.seed, self.dist.rank,
                                   self.dist.world_size, meta.pad_token_id)
        self.heldout = open_tokens(cfg.data.heldout) if cfg.data.heldout else None
        self.step = 0
        self.resumed_from: str | None = None
        if cfg.checkpoint.resume:
            path = latest_checkpoint(cfg.checkpoint_dir)
            if path is not None:
                self.restore(path)

    # ---- one step -----------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self._use_autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulate_gradients(self) -> tuple[torch.Tensor, int]:
        """Forward and backward over this step's micro-batches; returns (mean token loss of the global
        batch as a device scalar, tokens of the global batch). Gradients are left in the parameters'
        .grad. Nothing here waits for the device."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        batches = [self.loader.next_batch() for _ in range(cfg.grad_accum_steps)]
        # The loss scale stays on the device: no host sync before the forward.
        num_labels = _all_reduce_sum(torch.full((), float(sum(b.num_label_tokens for b in batches)),
                                                dtype=torch.float64, device=self.device)).clamp(min=1.0)
        scale = (self.dist.world_size / num_labels).float()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        ddp = self.cfg.parallel.strategy == "ddp"
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if (last or not ddp) else self.forward_module.no_sync()  # type: ignore[operator]
            with sync:
                with self.autocast():
                    loss_sum = self.forward_module(b.input_ids.to(self.device, non_blocking=True),
                                                   b.labels.to(self.device, non_blocking=True))
                (loss_sum * scale).backward()
            total += loss_sum.detach().double()
        loss = _all_reduce_sum(total) / num_labels
        tokens = cfg.seq_len * cfg.micro_batch_size * cfg.grad_accum_steps * self.dist.world_size
        return loss, tokens

    def clip_and_step(self) -> tuple[torch.Tensor, float]:
        """Clip the global gradient norm, step AdamW and the schedule; returns (norm before clipping as a
        device scalar, lr of this step)."""
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else math.inf, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return norm, lr

    def train_step(self) -> StepStats:
        t0 = time.perf_counter()
        loss, tokens = self.accumulate_gradients()
        norm, lr = self.clip_and_step()
        # The one wait of the step, after the optimizer's kernels are queued.
        loss_value, norm_value = float(loss), float(norm)
        return StepStats(self.step, loss_value, lr, norm_value, tokens, time.perf_counter() - t0)

    # ---- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_sequences: int | None = None) -> float:
        """Mean token loss on the held-out file (its first `eval_sequences` sequences), over all ranks."""
        if self.heldout is None:
            raise ValueError("data.heldout: no held-out token file configured")
        tokens, meta = self.heldout
        n = max_sequences or self.cfg.eval_sequences
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)
        for b in eval_batches(tokens, self.cfg.seq_len, self.cfg.micro_batch_size, self.dist.rank,
                              self.dist.world_size, meta.pad_token_id, max_sequences=n):
            with self.autocast():
                sums[0] += self.module(b.input_ids.to(self.device), b.labels.to(self.device)).double()
            sums[1] += b.num_label_tokens
        _all_reduce_sum(sums)
        return float(sums[0] / sums[1].clamp(min=1))

    # ---- state -------------------------------------------------------------------------------------------------
    def trainer_state(self) -> TrainerState:
        return TrainerState(self.step, self.loader.state_dict(), self.scheduler.state_dict(), rng_state())

    def save(self) -> str:
        return save_checkpoint(self.cfg.checkpoint_dir, self.module, self.optimizer, self.trainer_state(),
                               keep=self.cfg.checkpoint.keep)

    def restore(self, path: str) -> None:
        state = load_checkpoint(path, self.module, self.optimizer)
        self.step = state.step
        self.loader.load_state_dict(state.data)
        self.scheduler.load_state_dict(state.scheduler)
        self.resumed_from = path

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model on CPU under the model's parameter names (a collective under FSDP; ranks other
        than 0 may get an empty dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's gradient, whole (a collective under FSDP)."""
        out = {}
        for name, p in self.module.named_parameters():
            g = p.grad
            if g is not None and hasattr(g, "full_tensor"):
                g = g.full_tensor()
            out[name] = None if g is None else g.detach().cpu()
        return out

    def export(self, out_dir: str, dtype: torch.dtype = torch.bfloat16) -> str:
        from carpool.training.export import export_hf_checkpoint

        state = self.full_state_dict()
        if self.dist.is_main:
            export_hf_checkpoint(state, self.hf_config, out_dir, self.cfg.data.tokenizer, dtype,
                                 self.cfg.export_max_shard_mb * 10 ** 6)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return out_dir

    def memory_estimate(self) -> dict[str, float]:
        c = self.cfg
        est = estimate_memory(self.hf_config, c.seq_len, c.micro_batch_size, c.precision, c.activation_checkpointing,
                              c.parallel.strategy, self.dist.world_size, c.parallel.reshard_after_forward,
                              c.loss_chunk_size, c.compile, c.grad_accum_steps)
        return est.to_json()

    def close(self) -> None:
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.is_main
        out = cfg.output_dir
        metrics = MetricsLog(os.path.join(out, "metrics.jsonl") if main else None)
        stop_at = cfg.max_steps
        if cfg.stop_after_steps is not None:
            stop_at = min(cfg.max_steps, self.step + cfg.stop_after_steps)
        peak = cfg.peak_flops
        if peak is None and self.device.type == "cuda":
            peak = device_peak_flops(torch.cuda.get_device_name(self.device))
        flops_per_token = self.shape.flops_per_token(cfg.seq_len)
        bar = ProgressBar(cfg.max_steps, self.step, main and cfg.progress_bar)
        profiler = self._profiler()
        losses: list[float] = []
        started = time.perf_counter()
        timed_tokens, timed_seconds = 0, 0.0
        last_saved = self.step if self.resumed_from else -1
        heldout_loss = None
        if main:
            metrics.write({"event": "start", "step": self.step, "resumed_from": self.resumed_from,
                           "num_params": self.num_params, "world_size": self.dist.world_size,
                           "memory_estimate": self.memory_estimate()})
        deadline = None if cfg.max_minutes is None else started + 60 * cfg.max_minutes
        out_of_time = False
        try:
            while self.step < stop_at and not out_of_time:
                stats = self.train_step()
                if deadline is not None:  # every rank must stop at the same step: rank 0 decides
                    flag = torch.tensor([float(time.perf_counter() > deadline)], device=self.device)
                    if dist.is_available() and dist.is_initialized():
                        dist.broadcast(flag, src=0)
                    out_of_time = bool(flag.item())
                losses.append(stats.loss)
                if len(losses) > 1:  # the first step of an invocation (compile, allocator warm-up) is not timed
                    timed_tokens += stats.tokens
                    timed_seconds += stats.seconds
                tps = stats.tokens / stats.seconds
                step_mfu = mfu(flops_per_token, tps, peak)
                bar.update(self.step, stats.loss, tps, step_mfu)
                if main and (self.step % cfg.log_interval == 0 or self.step == stop_at):
                    record: dict[str, Any] = {"step": self.step, "loss": stats.loss, "lr": stats.lr,
                                              "grad_norm": stats.grad_norm, "tokens_per_s": tps,
                                              "tokens_seen": self.step * stats.tokens, "seconds": stats.seconds}
                    if step_mfu is not None:
                        record["mfu"] = step_mfu
                    if self.device.type == "cuda":
                        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                    metrics.write(record)
                if self.heldout is not None and cfg.eval_interval and self.step % cfg.eval_interval == 0 \
                        and self.step < cfg.max_steps:
                    heldout_loss = self.evaluate()
                    if main:
                        metrics.write({"step": self.step, "heldout_loss": heldout_loss,
                                       "heldout_ppl": math.exp(min(heldout_loss, 50.0))})
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.save()
                    last_saved = self.step
                if profiler is not None:
                    profiler.step()
        finally:
            bar.close()
            if profiler is not None:
                profiler.stop()
        if last_saved != self.step:
            self.save()
        finished = self.step >= cfg.max_steps or out_of_time
        if finished and self.heldout is not None:
            heldout_loss = self.evaluate()
            if main:
                metrics.write({"step": self.step, "heldout_loss": heldout_loss,
                               "heldout_ppl": math.exp(min(heldout_loss, 50.0))})
        export_dir = None
        if finished and cfg.export:
            export_dir = self.export(os.path.join(out, "export"))
        tokens_per_step = cfg.seq_len * cfg.micro_batch_size * cfg.grad_accum_steps * self.dist.world_size
        summary = {
            "steps": self.step, "finished": finished, "stopped_by_time_limit": out_of_time, "losses": losses,
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "heldout_loss": heldout_loss,
            "heldout_ppl": math.exp(heldout_loss) if heldout_loss is not None else None,
            "tokens_seen": self.step * tokens_per_step,
            "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else None,
            "mfu": mfu(flops_per_token, timed_tokens / timed_seconds, peak) if timed_seconds else None,
            "elapsed_s": time.perf_counter() - started, "num_params": self.num_params,
            "world_size": self.dist.world_size, "device": _device_name(self.device),
            "peak_memory_gib": (torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                                if self.device.type == "cuda" else None),
            "memory_estimate": self.memory_estimate(), "export_dir": export_dir,
            "data": {"train": asdict(self.pre.train_meta)}, "config": cfg.to_dict(),
        }
        if main:
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            plot_loss_curve(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss_curve.png"))
        return summary

    def _profiler(self) -> Any:
        if not self.cfg.profile_steps:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule

        trace_dir = os.path.join(self.cfg.output_dir, "profile")
        os.makedirs(trace_dir, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        path = os.path.join(trace_dir, f"trace-rank{self.dist.rank}.json")
        prof = profile(activities=activities, schedule=schedule(wait=0, warmup=2, active=self.cfg.profile_steps,
                                                                repeat=1),
                       on_trace_ready=lambda p: p.export_chrome_trace(path), record_shapes=False)
        prof.start()
        return prof


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def train(cfg: TrainConfig) -> dict[str, Any]:
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
