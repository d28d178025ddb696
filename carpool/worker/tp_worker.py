"""One tensor-parallel rank, in its own process: a ModelRunner over its shard of the model.

Every rank runs the same command loop over the same commands, in the same order. On the engine's node
each rank reads them from its own pipe (the engine writes every command to every local rank); ranks on
other nodes get them from rank 0 over a gloo group (`CommandSource`). Only rank 0 replies. The model's
own collectives (all-reduce after row-parallel layers, all-gather of the vocab-parallel logits) use the
main group: gloo on CPU, NCCL on GPU, with small all-reduces through symmetric memory when available
(carpool/distributed/).

Steps overlap: the reply to step N is sent after step N+1 has been launched (see `TPWorker.serve`), the
same one-step-in-flight scheme as the single-process runner, so the engine's host work and every
rank's input preparation hide under the device's work on the step before.

Sampling agrees across ranks by construction: rank 0 samples and broadcasts the token ids on the device,
and every rank feeds those to the next step (pending-token fixup) and appends them to its request
state, so every rank's next-step inputs are identical. The one exception is a step whose rows are all
greedy without penalties: there every rank takes the argmax of the same gathered logits itself, which is
exact (a comparison of equal values, ties to the lowest id) and so equal on every rank, and the
broadcast (a collective in every rank's step, ~5 us at batch 1 on two H200s) is left out. Random,
top-p and penalized sampling would need bitwise-equal arithmetic on every GPU, which nothing promises:
those steps keep the broadcast. Every rank decides the same way, from the same request state.

A worker that fails reports the error on its pipe and exits at once with a non-zero
code; the engine sees the exit and takes every other rank down. Nothing here tries to recover: a rank
that failed mid-step may have left its peers inside a collective.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from carpool.config import EngineConfig
from carpool.core.sched_output import TokenLogprobs
from carpool.distributed import TPGroup
from carpool.distributed.startup import establish_custom_all_reduce
from carpool.distributed.symmetric import disable_multicast
from carpool.layers.embedding import vocab_shard_size
from carpool.platform import dist_backend_for
from carpool.profiling import device_activity, device_kernel_times, device_timeline, ms_stats, step_timings_summary
from carpool.sampling_params import SamplingParams
from carpool.worker import tp_codec
from carpool.worker.model_runner import ModelRunner, PendingStep

logger = logging.getLogger(__name__)

# Followers wait in the control broadcast for as long as the engine sits idle, so that group's timeout
# must outlast any idle period; a dead rank 0 still ends the wait at once (gloo sees the socket close).
CONTROL_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int


class ControlChannel:
    """Rank 0 -> the ranks on other nodes: one byte string per call, as a uint8 tensor over a CPU
    (gloo) group.

    The first broadcast is a fixed-size buffer holding the length (8 bytes) and, usually, the whole
    payload; a payload that does not fit follows in a second broadcast of exactly the missing bytes.
    A decode step thus costs one small broadcast.
    """

    FIRST = 16 * 1024

    def __init__(self, group: Any, rank: int) -> None:
        self.group = group
        self.rank = rank

    def broadcast(self, payload: bytes | None) -> bytes:
        first = torch.zeros(self.FIRST, dtype=torch.uint8)
        room = self.FIRST - 8
        if self.rank == 0:
            assert payload is not None
            head = len(payload).to_bytes(8, "little") + payload[:room]
            first[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dist.broadcast(first, src=0, group=self.group)
        size = int.from_bytes(first[:8].numpy().tobytes(), "little")
        data = first[8:8 + min(size, room)].numpy().tobytes()
        if size > room:
            rest = torch.empty(size - room, dtype=torch.uint8)
            if self.rank == 0:
                assert payload is not None
                rest.copy_(torch.frombuffer(bytearray(payload[room:]), dtype=torch.uint8))
            dist.broadcast(rest, src=0, group=self.group)
            data += rest.numpy().tobytes()
        return data


class TPModelRunner(ModelRunner):
    """A ModelRunner whose sampled tokens come from rank 0 (see the module docstring)."""

    def sample(self, logits: torch.Tensor, rows: np.ndarray, output_offsets: np.ndarray | None = None
               ) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        """Plain sampling and a verification's candidates alike (the walk then runs on every rank's host
        over the same tokens)."""
        if self.samples_on_every_rank(rows):
            tokens, logprobs = super().sample(logits, rows, output_offsets)
            return tokens.to(torch.long), logprobs if self.tp.rank == 0 else [None] * len(rows)
        if self.tp.rank == 0:
            tokens, logprobs = super().sample(logits, rows, output_offsets)
            tokens = tokens.to(torch.long).contiguous()
        else:
            tokens = torch.empty(len(rows), dtype=torch.long, device=self.device)
            logprobs = [None] * len(rows)
        dist.broadcast(tokens, src=0)  # NCCL: enqueued on the device, the host does not wait
        return tokens, logprobs

    def samples_on_every_rank(self, rows: np.ndarray) -> bool:
        return samples_on_every_rank([self.input_batch.params[r] for r in rows])


def samples_on_every_rank(params: list[SamplingParams | None]) -> bool:
    """Whether every rank samples a step of these rows itself (module docstring): all greedy, none
    penalized. Depends only on request state, which every rank holds alike. Relies on every rank's
    logits being the same bits: a gather of the ranks' vocab shards (ParallelLMHead), as they are."""
    return all(p is not None and p.greedy and not p.has_penalties for p in params)


class CommandSource:
    """Where a rank's commands come from.

    Ranks on the engine's node read their own pipe: the engine writes every command to each of them, so
    a step costs no collective before it starts. Ranks on other nodes have no pipe to the engine; rank 0
    passes each command on to them over a gloo group of rank 0 and those ranks (ControlChannel). That
    group exists only in multi-node runs.
    """

    def __init__(self, conn: Connection, info: RankInfo) -> None:
        self.conn = conn
        self.on_engine_node = info.rank < info.local_world_size  # node 0 holds ranks 0 .. local - 1
        self.forward_to_remote = info.rank == 0 and info.world_size > info.local_world_size
        self.remote: ControlChannel | None = None
        if info.world_size > info.local_world_size:
            # new_group is collective over the whole world, members or not
            group = dist.new_group([0, *range(info.local_world_size, info.world_size)], backend="gloo",
                                   timeout=CONTROL_TIMEOUT)
            if info.rank == 0 or not self.on_engine_node:
                self.remote = ControlChannel(group, info.rank)

    def recv(self) -> bytes:
        if not self.on_engine_node:
            assert self.remote is not None
            return self.remote.broadcast(None)
        payload = self.conn.recv_bytes()
        if self.forward_to_remote:
            assert self.remote is not None
            self.remote.broadcast(payload)
        return payload


@dataclass
class WorkerStats:
    """Rank 0's host-side timings per step, for benchmarks: where a step's wall time goes outside the
    runner (waiting for the engine's next command, decoding it, replying)."""

    enabled: bool = False
    recv_wait_s: list[float] = field(default_factory=list)  # idle, waiting for the engine's next command
    decode_s: list[float] = field(default_factory=list)  # JSON -> SchedulerOutput
    reply_s: list[float] = field(default_factory=list)  # resolve wait excluded: encode + send of a reply

    def summary(self, runner: ModelRunner) -> dict[str, Any]:
        return {**step_timings_summary(runner.timings), "recv_wait_ms": ms_stats(self.recv_wait_s),
                "decode_ms": ms_stats(self.decode_s), "reply_ms": ms_stats(self.reply_s)}

    def reset(self, runner: ModelRunner, enabled: bool) -> None:
        self.enabled = enabled
        runner.collect_timings = enabled
        runner.timings.clear()
        for values in (self.recv_wait_s, self.decode_s, self.reply_s):
            values.clear()


class TPWorker:
    def __init__(self, config: EngineConfig, info: RankInfo, conn: Connection) -> None:
        self.info = info
        self.conn = conn
        if config.device.startswith("cuda"):
            torch.cuda.set_device(info.local_rank)
            self.device = torch.device("cuda", info.local_rank)
        else:
            self.device = torch.device("cpu")
            # Ranks on one host share its cores; without this each would start one thread per core.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
        backend = dist_backend_for(config.device)
        kwargs: dict[str, Any] = {"device_id": self.device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                                **kwargs)
        self.cpu_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.commands = CommandSource(conn, info)
        custom = None
        if backend == "nccl" and not config.parallel.disable_custom_all_reduce:
            if config.kernel_backend == "triton":  # the self-tests launch their kernels as the model will
                from carpool.ops.triton import utils as triton_utils

                triton_utils.choose_pdl(self.device, not config.kernels.pdl)
            # The LM head's logits can be gathered by push only from its GEMV (ParallelLMHead).
            head_rows = vocab_shard_size(config.model.vocab_size, info.world_size) if config.kernels.lm_head_gemv else 0
            custom = establish_custom_all_reduce(
                self.device, config.model.dtype, info.rank, info.local_rank, info.world_size, info.local_world_size,
                self.cpu_group, config.kernels,
                model_shape=(config.model.hidden_size, config.model.intermediate_size, head_rows),
                push=config.kernel_backend == "triton")
        torch.manual_seed(config.seed)  # rank 0's unseeded sampling draws the same stream as TP=1
        self.runner = TPModelRunner(config, TPGroup(info.rank, info.world_size, custom), self.device)
        self.stats = WorkerStats()
        self.profiler: Any = None

    # ---- commands (each runs on every rank; rank 0's return value is the reply) -----------------------
    def determine_num_blocks(self, _: dict[str, Any]) -> int:
        """Every rank sizes its own KV memory; all must hold the same block ids, so take the minimum."""
        num = torch.tensor([self.runner.determine_num_blocks()], dtype=torch.long)
        dist.all_reduce(num, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(num.item())

    def initialize_kv_cache(self, msg: dict[str, Any]) -> None:
        self.runner.initialize_kv_cache(int(msg["num_blocks"]))

    def describe(self, _: dict[str, Any]) -> dict[str, Any]:
        """The paths this rank actually runs (asked for in config.kernels, and agreed at start-up)."""
        custom = self.runner.tp.custom_all_reduce
        push = custom.push if custom is not None else None
        return {"custom_all_reduce": custom is not None,
                "custom_all_reduce_max_bytes": custom.max_bytes if custom is not None else 0,
                "fused_all_reduce_norm": custom is not None and custom.exchange is not None,
                "push_all_reduce": push is not None,
                "push_logits": push is not None and push.logit_slots is not None,
                "cuda_graphs": self.runner.graph_runner is not None,
                "kernels": dataclasses.asdict(self.runner.config.kernels),
                **{k: v for k, v in self.runner.describe().items()
                   if k in ("quantization", "kv_cache_dtype", "moe_layout", "speculative")}}

    def timings(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's per-step timings since the last call; `enable` switches collection on or off."""
        summary = self.stats.summary(self.runner)
        self.stats.reset(self.runner, bool(msg.get("enable", False)))
        return summary

    def profile(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """torch.profiler on rank 0 between a `start` and a `stop`; `stop` returns the device kernels as
        [name, device microseconds, calls] rows (the other ranks run the same kernels) and the device's
        span, busy time and idle time by transition between kernel names (profiling.device_activity)."""
        if self.info.rank != 0 or self.device.type != "cuda":
            return None
        from torch.profiler import ProfilerActivity, profile

        if msg["action"] == "start":
            torch.cuda.synchronize()
            self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.profiler.__enter__()
            return None
        torch.cuda.synchronize()
        prof, self.profiler = self.profiler, None
        prof.__exit__(None, None, None)
        activity = device_activity(prof, lambda name: name)
        idle = sorted(activity.idle_by_transition.items(), key=lambda kv: -kv[1])[:200]
        return {"kernels": [list(k) for k in device_kernel_times(prof)[:80]], "span_us": activity.span,
                "busy_us": activity.busy, "idle_by_transition_us": dict(idle),
                "timeline": device_timeline(prof)}

    def _reply(self, payload: dict[str, Any]) -> None:
        if self.info.rank == 0:
            self.conn.send_bytes(tp_codec.dumps(payload))

    def _finish(self, step: PendingStep) -> None:
        """Wait for a launched step's tokens (every rank appends them to its requests) and reply."""
        output = step.resolve()
        start = time.perf_counter()
        if self.info.rank == 0:
            self._reply({"result": tp_codec.runner_output_to_dict(output)})
        if self.stats.enabled:
            self.stats.reply_s.append(time.perf_counter() - start)

    def serve(self) -> None:
        """The command loop; returns after a shutdown command.

        A step's reply waits for the next command: `execute_model` N+1 is launched (its inputs take N's
        sampled tokens on the device) before N is resolved and answered, so the device always has the
        next step queued while the host waits for the current one. Any other command, `flush` included,
        first answers the step held back. Replies therefore leave in command order."""
        held: PendingStep | None = None
        handlers = {"determine_num_blocks": self.determine_num_blocks,
                    "initialize_kv_cache": self.initialize_kv_cache, "describe": self.describe,
                    "timings": self.timings, "profile": self.profile}
        while True:
            wait_start = time.perf_counter()
            payload = self.commands.recv()
            decode_start = time.perf_counter()
            msg = tp_codec.loads(payload)
            method = msg["method"]
            if method == "execute_model":
                so = tp_codec.scheduler_output_from_dict(msg["scheduler_output"])
                if self.stats.enabled:
                    self.stats.recv_wait_s.append(decode_start - wait_start)
                    self.stats.decode_s.append(time.perf_counter() - decode_start)
                step = self.runner.launch(so)
                if held is not None:
                    self._finish(held)
                held = step
                continue
            if held is not None:
                self._finish(held)
                held = None
            if method == "flush":
                continue
            if method == "shutdown":
                self._reply({"result": None})
                return
            if method not in handlers:
                raise ValueError(f"unknown tensor-parallel command {method!r}")
            self._reply({"result": handlers[method](msg)})


def exit_with_parent(parent_pid: int) -> None:
    """A worker whose engine vanished (killed, crashed) must not linger holding a GPU: poll the parent."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)
    threading.Thread(target=watch, name="carpool-parent-watch", daemon=True).start()


def rank_info_from_env() -> RankInfo:
    """torchrun's variable names, so the env:// rendezvous reads the same ones."""
    env = os.environ
    return RankInfo(rank=int(env["RANK"]), local_rank=int(env["LOCAL_RANK"]), world_size=int(env["WORLD_SIZE"]),
                    local_world_size=int(env["LOCAL_WORLD_SIZE"]), master_addr=env["MASTER_ADDR"],
                    master_port=int(env["MASTER_PORT"]))


def main() -> None:
    """Entry point of `python -m carpool.worker.tp_worker`, started by the executor (or, on another node,
    by `python -m carpool.worker.multiproc_executor`) with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, CARPOOL_TP_PIPE_FD and CARPOOL_TP_PARENT_PID set. The engine config comes
    as the first message on the pipe; every message is JSON."""
    exit_with_parent(int(os.environ["CARPOOL_TP_PARENT_PID"]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle; it stops us
    info = rank_info_from_env()
    logging.basicConfig(level=logging.WARNING, format=f"[rank {info.rank}] %(levelname)s %(name)s: %(message)s")
    disable_multicast()  # NVLink multicast stays off: mandatory on the shared GPU hosts
    conn = Connection(int(os.environ["CARPOOL_TP_PIPE_FD"]))
    try:
        config = tp_codec.engine_config_from_dict(tp_codec.loads(conn.recv_bytes()))
        worker = TPWorker(config, info, conn)
        conn.send_bytes(tp_codec.dumps({"ready": True}))
        worker.serve()
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - any failure ends this rank, and with it the engine
        traceback.print_exc(file=sys.stderr)
        try:
            conn.send_bytes(tp_codec.dumps({"error": f"{type(e).__name__}: {e}", "type": type(e).__name__,
                                            "message": str(e)}))
        except OSError:
            pass
        sys.stderr.flush()
        # os._exit: peers may be stuck in a collective with us; atexit handlers could wait on them.
        os._exit(1)


if __name__ == "__main__":
    main()
