"""One tensor-parallel rank, in its own process: a ModelRunner over its shard of the model.

Every rank runs the same command loop. Rank 0 reads each command (JSON bytes) from the engine's pipe
and broadcasts it to the other ranks over a gloo group on CPU (`ControlChannel`); then every rank runs
it, and rank 0 writes the reply back. The model's own collectives (all-reduce after row-parallel
layers, all-gather of the vocab-parallel logits) use the main group: gloo on CPU, NCCL on GPU.

Sampling agrees across ranks by construction: rank 0 samples and broadcasts the token ids, and every
rank appends those to its request state, so the next step's inputs are identical everywhere.

A worker that fails reports the error on its pipe and exits at once with a non-zero
code; the engine sees the exit and takes every other rank down. Nothing here tries to recover: a rank
that failed mid-step may have left its peers inside a collective.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from carpool.config import EngineConfig
from carpool.core.sched_output import TokenLogprobs
from carpool.distributed import TPGroup
from carpool.platform import dist_backend_for
from carpool.worker import tp_codec
from carpool.worker.model_runner import ModelRunner

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
    """Rank 0 -> all ranks: one byte string per call, as a uint8 tensor over a CPU (gloo) group.

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

    def sample(self, logits: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        if self.tp.rank == 0:
            tokens, logprobs = super().sample(logits, rows)
            tokens = tokens.to(torch.long).contiguous()
        else:
            tokens = torch.empty(len(rows), dtype=torch.long, device=self.device)
            logprobs = [None] * len(rows)
        dist.broadcast(tokens, src=0)
        return tokens, logprobs


class TPWorker:
    def __init__(self, config: EngineConfig, info: RankInfo) -> None:
        self.info = info
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
        self.control = ControlChannel(dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT), info.rank)
        torch.manual_seed(config.seed)  # rank 0's unseeded sampling draws the same stream as TP=1
        self.runner = TPModelRunner(config, TPGroup(info.rank, info.world_size), self.device)

    # ---- commands (each runs on every rank; rank 0's return value is the reply) -----------------------
    def determine_num_blocks(self, _: dict[str, Any]) -> int:
        """Every rank sizes its own KV memory; all must hold the same block ids, so take the minimum."""
        num = torch.tensor([self.runner.determine_num_blocks()], dtype=torch.long)
        dist.all_reduce(num, op=dist.ReduceOp.MIN, group=self.control.group)
        return int(num.item())

    def initialize_kv_cache(self, msg: dict[str, Any]) -> None:
        self.runner.initialize_kv_cache(int(msg["num_blocks"]))

    def execute_model(self, msg: dict[str, Any]) -> dict[str, Any]:
        so = tp_codec.scheduler_output_from_dict(msg["scheduler_output"])
        return tp_codec.runner_output_to_dict(self.runner.execute_model(so))

    def serve(self, conn: Connection) -> None:
        """The command loop; returns after a shutdown command. Only rank 0 reads commands from its pipe."""
        rank0 = self.info.rank == 0
        while True:
            payload = conn.recv_bytes() if rank0 else None
            msg = tp_codec.loads(self.control.broadcast(payload))
            method = msg["method"]
            if method == "shutdown":
                result = None
            elif method in ("determine_num_blocks", "initialize_kv_cache", "execute_model"):
                result = getattr(self, method)(msg)
            else:
                raise ValueError(f"unknown tensor-parallel command {method!r}")
            if rank0:
                conn.send_bytes(tp_codec.dumps({"result": result}))
            if method == "shutdown":
                return


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
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off: mandatory on the shared GPU hosts
    conn = Connection(int(os.environ["CARPOOL_TP_PIPE_FD"]))
    try:
        config = tp_codec.engine_config_from_dict(tp_codec.loads(conn.recv_bytes()))
        worker = TPWorker(config, info)
        conn.send_bytes(tp_codec.dumps({"ready": True}))
        worker.serve(conn)
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
