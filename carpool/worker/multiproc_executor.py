"""Tensor-parallel executor: one worker process per rank, driven from the engine's process.

Layout. The engine process (the "driver") runs the scheduler and starts one worker process per local
rank (`python -m carpool.worker.tp_worker`, see tp_processes.py); it is not itself a rank. It writes
each command as JSON bytes to every local rank's pipe (no collective is needed to hand out a step) and
reads rank 0's replies.
Keeping the driver outside torch.distributed is deliberate:
- it never enters a collective, so it always notices a dead worker (it polls their exit status) and
  raises, where a rank stuck in an NCCL all-reduce with a dead peer would hang;
- torch.distributed's one-default-group-per-process state stays out of the user's process, so several
  engines can live in one process (tests, notebooks) and TP=1 is untouched.

Steps overlap (async scheduling): `launch` writes step N+1 before the engine resolves step N, and the
ranks launch N+1 on the device before they wait for N's tokens, so the pipe round trip, the JSON and
the scheduler's work hide under the device's work, as with one process. The engine keeps at most one
step in flight.

Multi-node (torch.distributed `env://` rendezvous): set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on
every node. Node 0 runs the engine as usual; every other node runs
`python -m carpool.worker.multiproc_executor --model M -tp N [engine flags]`, which starts that node's
ranks and waits. Each node holds N / NNODES ranks; rank 0 (and the scheduler) are on node 0. With one
node (NNODES unset) the rendezvous is on 127.0.0.1 at a free port and MASTER_* are ignored.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from carpool.config import EngineConfig, ModelConfig
from carpool.core.sched_output import ModelRunnerOutput, SchedulerOutput
from carpool.profiling import ms_stats
from carpool.worker import tp_codec
from carpool.worker.executor import Executor
from carpool.worker.tp_processes import (
    LIVENESS_POLL_S,
    SHUTDOWN_TIMEOUT_S,
    LocalWorkers,
    TPWorkerError,
    node_layout,
    wait_quietly,
)

logger = logging.getLogger(__name__)


def check_tensor_parallel(model: ModelConfig, tp_size: int, expert_parallel: bool = False,
                          setting: str = "tensor_parallel_size", whose: str = "the model's") -> None:
    """Refuse, before any process starts, a model that cannot be split `tp_size` ways (with expert
    parallelism, its routed experts whole, E / tp_size per rank); the message starts with `setting`, the
    setting that asked for the split."""
    heads, kv_heads = model.num_attention_heads, model.num_key_value_heads
    if heads % tp_size:
        raise ValueError(f"{setting}: {whose} num_attention_heads={heads} does not divide by {setting}={tp_size}")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"{setting}: {whose} num_key_value_heads={kv_heads} and {setting}={tp_size} must divide "
                         "one another (KV heads are split across ranks, or replicated when there are fewer "
                         "than ranks)")
    if model.intermediate_size % tp_size:
        raise ValueError(f"{setting}: {whose} intermediate_size={model.intermediate_size} does not divide by "
                         f"{setting}={tp_size}")
    if expert_parallel and model.moe is not None and model.moe.num_experts % tp_size:
        raise ValueError(f"enable_expert_parallel: {whose} num_experts={model.moe.num_experts} does not divide "
                         f"by {setting}={tp_size}")
    # experts split like dense MLPs (routed experts only without expert parallelism; shared ones always)
    names = ("shared_expert_intermediate_size",) if expert_parallel else (
        "moe_intermediate_size", "shared_expert_intermediate_size")
    for name in names:
        size = getattr(model.moe, name, 0)
        if size % tp_size:
            raise ValueError(f"{setting}: {whose} {name}={size} does not divide by {setting}={tp_size}")


@dataclass
class DriverStats:
    """The engine side of a step's time: encoding and writing a command, and waiting for replies."""

    send_s: list[float] = field(default_factory=list)
    reply_wait_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"send_ms": ms_stats(self.send_s), "reply_wait_ms": ms_stats(self.reply_wait_s)}


class TPStep:
    """A step sent to the ranks; resolving it reads its reply (asking for it first if it is held back)."""

    def __init__(self, executor: "MultiprocExecutor", seq: int) -> None:
        self.executor = executor
        self.seq = seq

    def resolve(self) -> ModelRunnerOutput:
        return tp_codec.runner_output_from_dict(self.executor._result(self.seq))


class MultiprocExecutor(Executor):
    """The engine's side of tensor parallelism (see the module docstring).

    Commands carry sequence numbers on this side only: ranks answer strictly in command order, except
    that the reply to an `execute_model` is held back until the next command arrives (the ranks launch
    that one first). Resolving the newest step therefore sends `flush` to release its reply.
    """

    def __init__(self, config: EngineConfig) -> None:
        tp_size = config.parallel.tensor_parallel_size
        check_tensor_parallel(config.model, tp_size, config.parallel.enable_expert_parallel)
        nnodes, node_rank, addr, port = node_layout(tp_size, config.device)
        if node_rank != 0:
            raise ValueError(f"NODE_RANK={node_rank}: the engine runs on node 0; on other nodes run "
                             "`python -m carpool.worker.multiproc_executor` with the same flags")
        self.workers = LocalWorkers(config, nnodes, node_rank, addr, port)
        self._failure: str | None = None
        self._next_seq = 0  # sequence number of the next command that gets a reply
        self._next_reply = 0  # sequence number of the next reply to read
        self._held: int | None = None  # an execute_model whose reply the ranks hold back
        self._results: dict[int, Any] = {}
        self.collect_timings = False
        self.driver_stats = DriverStats()
        try:
            for i in range(len(self.workers.procs)):
                self.workers.recv(i)  # {"ready": true} once the rank has loaded its shard
        except TPWorkerError as e:
            self.workers.stop()
            if e.value_error is not None:  # a bad checkpoint or setting: the same error as with one process
                raise ValueError(e.value_error) from None
            raise TPWorkerError(f"tensor-parallel startup failed: {e}") from None
        except BaseException:  # Ctrl-C while the shards load
            self.workers.stop()
            raise

    @property
    def worker_pids(self) -> list[int]:
        return self.workers.pids

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Any failure while talking to the ranks ends the engine: the ranks are stopped, and every later
        call raises at once."""
        if self._failure is not None:
            raise TPWorkerError(f"the engine is down: {self._failure}")
        try:
            yield
        except TPWorkerError as e:
            self._failure = str(e)
            self.workers.stop()
            raise TPWorkerError(f"{e}; the engine cannot continue") from None
        except BaseException:
            # Interrupted mid-command: a late reply would answer the next command. Stop here.
            self._failure = "interrupted in the middle of a command"
            self.workers.stop()
            raise

    def _write(self, payload: bytes) -> None:
        """The same bytes to every local rank (ranks on other nodes get them from rank 0)."""
        dead = self.workers.dead()
        if dead:
            raise TPWorkerError("; ".join(self.workers.describe_death(j) for j in dead))
        for i, conn in enumerate(self.workers.conns):
            try:
                conn.send_bytes(payload)
            except OSError:
                wait_quietly(self.workers.procs[i], 1.0)
                raise TPWorkerError(self.workers.describe_death(i)) from None

    def _send(self, msg: dict[str, Any]) -> int:
        """Send a command that gets a reply; returns its sequence number."""
        with self._guard():
            start = time.perf_counter()
            self._write(tp_codec.dumps(msg))
            if self.collect_timings and msg["method"] == "execute_model":
                self.driver_stats.send_s.append(time.perf_counter() - start)
        seq = self._next_seq
        self._next_seq += 1
        self._held = seq if msg["method"] == "execute_model" else None
        return seq

    def _result(self, seq: int) -> Any:
        if seq in self._results:
            return self._results.pop(seq)
        with self._guard():
            start = time.perf_counter()
            if self._held is not None and self._held <= seq:
                self._write(tp_codec.dumps({"method": "flush"}))
                self._held = None
            while self._next_reply <= seq:
                self._results[self._next_reply] = self.workers.recv(0)["result"]
                self._next_reply += 1
            if self.collect_timings:
                self.driver_stats.reply_wait_s.append(time.perf_counter() - start)
        return self._results.pop(seq)

    def _call(self, msg: dict[str, Any]) -> Any:
        return self._result(self._send(msg))

    def determine_num_blocks(self) -> int:
        return int(self._call({"method": "determine_num_blocks"}))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call({"method": "initialize_kv_cache", "num_blocks": num_blocks})

    def launch(self, scheduler_output: SchedulerOutput) -> TPStep:
        return TPStep(self, self._send({"method": "execute_model",
                                        "scheduler_output": tp_codec.scheduler_output_to_dict(scheduler_output)}))

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.launch(scheduler_output).resolve()

    # ---- introspection for benchmarks --------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What rank 0 runs with (custom all-reduce on or off, CUDA graphs)."""
        return dict(self._call({"method": "describe"}))

    def timings(self, enable: bool) -> dict[str, Any]:
        """Per-step timings since the last call (rank 0's and this side's); then collect or not."""
        summary = {"rank0": self._call({"method": "timings", "enable": enable}),
                   "engine": self.driver_stats.summary()}
        self.collect_timings = enable
        self.driver_stats = DriverStats()
        return summary

    def profile(self, action: str) -> dict[str, Any] | None:
        """torch.profiler on rank 0: `start`, then `stop` returns its kernels ([kernel name, device us,
        calls] rows) and device activity (TPWorker.profile)."""
        return self._call({"method": "profile", "action": action})

    def shutdown(self) -> None:
        """Ask the ranks to leave their loop (rank 0 passes it on), then make sure every process is gone."""
        if self._failure is None and not self.workers.dead():
            try:
                seq = self._send({"method": "shutdown"})
                self._failure = "shut down"
                while self._next_reply <= seq:
                    self.workers.recv(0, timeout=SHUTDOWN_TIMEOUT_S)
                    self._next_reply += 1
                for p in self.workers.procs:
                    wait_quietly(p, SHUTDOWN_TIMEOUT_S)
            except (TPWorkerError, OSError):
                pass
        self._failure = self._failure or "shut down"
        self.workers.stop()


def run_node(argv: list[str] | None = None) -> int:
    """A non-zero node of a multi-node run: start this node's ranks and wait for them to finish."""
    from carpool.engine.arg_utils import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser(
        prog="python -m carpool.worker.multiproc_executor",
        description="Run this node's tensor-parallel ranks (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set)."))
    config = EngineArgs.from_cli_args(parser.parse_args(argv)).create_engine_config()
    tp_size = config.parallel.tensor_parallel_size
    check_tensor_parallel(config.model, tp_size, config.parallel.enable_expert_parallel)
    nnodes, node_rank, addr, port = node_layout(tp_size, config.device)
    if node_rank == 0:
        raise SystemExit("NODE_RANK=0 runs the engine itself (carpool serve/generate, or LLM(...))")
    workers = LocalWorkers(config, nnodes, node_rank, addr, port)
    try:
        while True:
            failed = [i for i in workers.dead() if workers.procs[i].returncode != 0]
            if failed:
                logger.error("%s", "; ".join(workers.describe_death(i) for i in failed))
                return 1
            if len(workers.dead()) == len(workers.procs):
                return 0  # every rank left its loop on rank 0's shutdown command
            time.sleep(LIVENESS_POLL_S)
    finally:
        workers.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(run_node())
