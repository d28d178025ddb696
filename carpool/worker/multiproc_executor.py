"""Tensor-parallel executor: one worker process per rank, driven from the engine's process.

Layout. The engine process (the "driver") runs the scheduler and starts one worker process per local
rank (`python -m carpool.worker.tp_worker`); it is not itself a rank. It sends each command as JSON bytes
over a pipe to rank 0, which broadcasts it to every rank through torch.distributed and replies with
rank 0's result.
Keeping the driver outside torch.distributed is deliberate:
- it never enters a collective, so it always notices a dead worker (it polls their exit status) and
  raises, where a rank stuck in an NCCL all-reduce with a dead peer would hang;
- torch.distributed's one-default-group-per-process state stays out of the user's process, so several
  engines can live in one process (tests, notebooks) and TP=1 is untouched.
The price is one pipe round trip per step.

Multi-node (torch.distributed `env://` rendezvous): set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on
every node. Node 0 runs the engine as usual; every other node runs
`python -m carpool.worker.multiproc_executor --model M -tp N [engine flags]`, which starts that node's
ranks and waits. Each node holds N / NNODES ranks; rank 0 (and the scheduler) are on node 0. With one
node (NNODES unset) the rendezvous is on 127.0.0.1 at a free port and MASTER_* are ignored.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any

import torch

import carpool
from carpool.config import EngineConfig, ModelConfig
from carpool.core.sched_output import ModelRunnerOutput, SchedulerOutput
from carpool.worker import tp_codec
from carpool.worker.executor import Executor

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 5.0
LIVENESS_POLL_S = 0.1  # how often a waiting engine checks that every worker is still alive


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker failed or died; the engine cannot continue."""

    def __init__(self, message: str, value_error: str | None = None) -> None:
        super().__init__(message)
        self.value_error = value_error  # the message of a ValueError the worker raised, if it was one


def check_tensor_parallel(model: ModelConfig, tp_size: int) -> None:
    """Refuse, before any process starts, a model that cannot be split `tp_size` ways."""
    heads, kv_heads = model.num_attention_heads, model.num_key_value_heads
    if heads % tp_size:
        raise ValueError(f"tensor_parallel_size: the model's num_attention_heads={heads} does not divide "
                         f"by tensor_parallel_size={tp_size}")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"tensor_parallel_size: the model's num_key_value_heads={kv_heads} and "
                         f"tensor_parallel_size={tp_size} must divide one another (KV heads are split "
                         "across ranks, or replicated when there are fewer than ranks)")
    if model.intermediate_size % tp_size:
        raise ValueError(f"tensor_parallel_size: the model's intermediate_size={model.intermediate_size} "
                         f"does not divide by tensor_parallel_size={tp_size}")


def node_layout(tp_size: int, device: str) -> tuple[int, int, str, int]:
    """(nnodes, node_rank, master_addr, master_port) from the environment; one node by default."""
    nnodes, node_rank = int(os.environ.get("NNODES", "1")), int(os.environ.get("NODE_RANK", "0"))
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"NNODES={nnodes}, NODE_RANK={node_rank}: need NNODES >= 1 and 0 <= NODE_RANK < NNODES")
    if tp_size % nnodes:
        raise ValueError(f"tensor_parallel_size: {tp_size} does not divide by NNODES={nnodes}")
    local = tp_size // nnodes
    if device.startswith("cuda") and local > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size: {local} ranks on this node need {local} GPUs, "
                         f"found {torch.cuda.device_count()}")
    if nnodes == 1:
        return 1, 0, "127.0.0.1", free_port()
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ValueError("multi-node tensor parallelism needs MASTER_ADDR and MASTER_PORT (node 0's address "
                         "and a free port on it) set on every node")
    return nnodes, node_rank, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalWorkers:
    """This node's worker processes and their pipes; the only code that starts or stops them.

    Workers are plain subprocesses (`python -m carpool.worker.tp_worker`), not multiprocessing children:
    nothing is pickled to start them, and the user's `__main__` is never re-imported (multiprocessing's
    spawn would re-run a script that lacks an `if __name__ == "__main__"` guard).
    """

    def __init__(self, config: EngineConfig, nnodes: int, node_rank: int, addr: str, port: int) -> None:
        tp_size = config.parallel.tensor_parallel_size
        local = tp_size // nnodes
        config_bytes = tp_codec.dumps(tp_codec.engine_config_to_dict(config))
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(carpool.__file__)))
        self.ranks: list[int] = []
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        # Stops the workers if the owner is garbage-collected or the interpreter exits without stop().
        self.finalizer = weakref.finalize(self, stop_processes, self.procs, self.conns)
        for local_rank in range(local):
            rank = node_rank * local + local_rank
            ours, theirs = socket.socketpair()
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(tp_size),
                       LOCAL_WORLD_SIZE=str(local), MASTER_ADDR=addr, MASTER_PORT=str(port),
                       NCCL_NVLS_ENABLE="0", CARPOOL_TP_PIPE_FD=str(theirs.fileno()),
                       CARPOOL_TP_PARENT_PID=str(os.getpid()),
                       PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
            if nnodes == 1 and sys.platform.startswith("linux"):
                # One host: gloo on loopback, not whatever interface the hostname resolves to (if any).
                env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            proc = subprocess.Popen([sys.executable, "-m", "carpool.worker.tp_worker"], env=env,
                                    pass_fds=[theirs.fileno()])
            theirs.close()
            conn = Connection(ours.detach())
            self.ranks.append(rank)
            self.procs.append(proc)
            self.conns.append(conn)
            conn.send_bytes(config_bytes)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def dead(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.poll() is not None]

    def describe_death(self, i: int) -> str:
        proc = self.procs[i]
        code = proc.poll()
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        reported = self.pending_error(i)
        return (f"tensor-parallel worker rank {self.ranks[i]} (pid {proc.pid}) died ({how})"
                + (f": {reported}" if reported else ""))

    def pending_error(self, i: int) -> str | None:
        """The error a worker reported on its pipe before exiting, if any."""
        conn = self.conns[i]
        try:
            while conn.poll(0):
                msg = tp_codec.loads(conn.recv_bytes())
                if "error" in msg:
                    return str(msg["error"])
        except (EOFError, OSError):
            pass
        return None

    def recv(self, i: int, timeout: float | None = None) -> dict[str, Any]:
        """The next message from local worker i. Raises TPWorkerError as soon as (within LIVENESS_POLL_S)
        any local worker dies, however long the reply would have taken."""
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self.conns[i]
        while not conn.poll(LIVENESS_POLL_S):
            dead = self.dead()
            if dead:
                time.sleep(LIVENESS_POLL_S)  # let a dying rank 0 finish writing its error report
                raise TPWorkerError("; ".join(self.describe_death(j) for j in dead))
            if deadline is not None and time.monotonic() > deadline:
                raise TPWorkerError(f"tensor-parallel worker rank {self.ranks[i]} did not answer within {timeout} s")
        try:
            msg = tp_codec.loads(conn.recv_bytes())
        except (EOFError, OSError):
            wait_quietly(self.procs[i], 1.0)
            raise TPWorkerError(self.describe_death(i)) from None
        if "error" in msg:
            # A peer that died mid-collective is the cause, rank i's "connection reset" the symptom.
            time.sleep(LIVENESS_POLL_S)
            causes = [self.describe_death(j) for j in self.dead() if j != i]
            raise TPWorkerError("; ".join([*causes, f"tensor-parallel worker rank {self.ranks[i]} failed: "
                                                     f"{msg['error']}"]),
                                value_error=msg.get("message") if msg.get("type") == "ValueError" else None)
        return msg

    def stop(self) -> None:
        self.finalizer()


def wait_quietly(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def stop_processes(procs: list[subprocess.Popen], conns: list[Connection]) -> None:
    """SIGTERM, then SIGKILL whatever is still alive; reap everything."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        wait_quietly(p, SHUTDOWN_TIMEOUT_S)
        if p.poll() is None:
            p.kill()
            p.wait()
    for c in conns:
        c.close()


class MultiprocExecutor(Executor):
    """The engine's side of tensor parallelism (see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        tp_size = config.parallel.tensor_parallel_size
        check_tensor_parallel(config.model, tp_size)
        nnodes, node_rank, addr, port = node_layout(tp_size, config.device)
        if node_rank != 0:
            raise ValueError(f"NODE_RANK={node_rank}: the engine runs on node 0; on other nodes run "
                             "`python -m carpool.worker.multiproc_executor` with the same flags")
        self.workers = LocalWorkers(config, nnodes, node_rank, addr, port)
        self._failure: str | None = None
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

    def _call(self, msg: dict[str, Any]) -> Any:
        if self._failure is not None:
            raise TPWorkerError(f"the engine is down: {self._failure}")
        try:
            dead = self.workers.dead()
            if dead:
                raise TPWorkerError("; ".join(self.workers.describe_death(j) for j in dead))
            try:
                self.workers.conns[0].send_bytes(tp_codec.dumps(msg))
            except OSError:
                wait_quietly(self.workers.procs[0], 1.0)
                raise TPWorkerError(self.workers.describe_death(0)) from None
            return self.workers.recv(0)["result"]
        except TPWorkerError as e:
            self._failure = str(e)
            self.workers.stop()
            raise TPWorkerError(f"{e}; the engine cannot continue") from None
        except BaseException:
            # Interrupted while rank 0 works: its late reply would answer the next command. Stop here.
            self._failure = "interrupted in the middle of a command"
            self.workers.stop()
            raise

    def determine_num_blocks(self) -> int:
        return int(self._call({"method": "determine_num_blocks"}))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call({"method": "initialize_kv_cache", "num_blocks": num_blocks})

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        result = self._call({"method": "execute_model",
                             "scheduler_output": tp_codec.scheduler_output_to_dict(scheduler_output)})
        return tp_codec.runner_output_from_dict(result)

    def shutdown(self) -> None:
        """Ask the ranks to leave their loop (rank 0 passes it on), then make sure every process is gone."""
        if self._failure is None and not self.workers.dead():
            self._failure = "shut down"
            try:
                self.workers.conns[0].send_bytes(tp_codec.dumps({"method": "shutdown"}))
                self.workers.recv(0, timeout=SHUTDOWN_TIMEOUT_S)
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
    check_tensor_parallel(config.model, tp_size)
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
