"""This node's tensor-parallel worker processes: where the ranks sit (node layout), how they are started
with their pipes, how a death is noticed and described, and how they are stopped and reaped.

Workers are plain subprocesses (`python -m carpool.worker.tp_worker`), not multiprocessing children:
nothing is pickled to start them, and the user's `__main__` is never re-imported (multiprocessing's
spawn would re-run a script that lacks an `if __name__ == "__main__"` guard).
"""

from __future__ import annotations

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
from carpool.config import EngineConfig
from carpool.distributed.symmetric import MULTICAST_OFF
from carpool.worker import tp_codec

SHUTDOWN_TIMEOUT_S = 5.0
LIVENESS_POLL_S = 0.1  # how often a waiting engine checks that every worker is still alive


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker failed or died; the engine cannot continue."""

    def __init__(self, message: str, value_error: str | None = None) -> None:
        super().__init__(message)
        self.value_error = value_error  # the message of a ValueError the worker raised, if it was one


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
                       **MULTICAST_OFF, CARPOOL_TP_PIPE_FD=str(theirs.fileno()),
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
