"""The engine core in a process of its own: it steps flat out while the server's frontend handles HTTP.

Why a process: in one process the event loop's per-token work for hundreds of streams and the step loop
share one GIL, and the step loop (which keeps the GPU fed) starves. Here the core owns the scheduler and
the executor (and, under tensor parallelism, its worker processes are its children) and does nothing
but step; text, stop strings and HTTP stay in the frontend (core_client.py).

The loop: apply every command that has arrived (acknowledging adds at once, so admission never waits
for a step), run one step, send its results as one frame. Sending never blocks: frames the frontend has
not read yet wait in an outbox while stepping goes on. With nothing to run the loop blocks on its
socket, so an idle core costs nothing and a new request is picked up at once.

Lifecycle. Started as `python -m carpool.engine.core_proc` (a plain subprocess: nothing pickled, the
user's __main__ never re-imported) with CARPOOL_CORE_PIPE_FD and CARPOOL_CORE_PARENT_PID set; the
engine config is the first frame. It exits 0 after a shutdown command or when the frontend's end of
the socket closes, and non-zero (after an "error" frame) if a step raises. Ctrl-C belongs to the
frontend, which shuts the core down in order; SIGTERM stops it after freeing its workers; a vanished
parent makes it exit on its own.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import traceback
import weakref
from typing import Any

import carpool
from carpool.engine import core_protocol as proto
from carpool.engine.core import CoreStepResult, EngineCore, QueueFullError
from carpool.request import RequestStatus
from carpool.worker import tp_codec

logger = logging.getLogger(__name__)

STARTUP_POLL_S = 0.1
SHUTDOWN_TIMEOUT_S = 10.0
RECV_BYTES = 1 << 20


class CoreDiedError(RuntimeError):
    """The core process exited (or failed) before it was ready."""


class _FrontendGone(Exception):
    """The frontend closed its end of the socket."""


class CoreServer:
    """The core process's loop around one EngineCore (see the module docstring)."""

    def __init__(self, core: EngineCore, sock: socket.socket) -> None:
        self.core = core
        self.sock = sock
        self.sock.setblocking(False)
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.stopping = False

    def run(self) -> None:
        """Serve until a shutdown command or the frontend goes away; then abort whatever still runs."""
        try:
            while not self.stopping:
                self._receive(block=not self.core.has_unfinished_requests())
                if not self.stopping and self.core.has_unfinished_requests():
                    self._send_step(self.core.step())
        except _FrontendGone:
            return
        self.core.finish_requests(list(self.core.scheduler.requests))
        self._flush(wait=True)

    # ---- input ---------------------------------------------------------------------------------------
    def _receive(self, block: bool) -> None:
        """Read and apply every command that has arrived; with `block`, first wait until one does."""
        if block:
            self._wait_readable()
        while True:
            try:
                data = self.sock.recv(RECV_BYTES)
            except BlockingIOError:
                break
            except ConnectionError:
                raise _FrontendGone from None
            if not data:
                raise _FrontendGone
            self.inbox += data
        commands = [c for batch in proto.split_frames(self.inbox) for c in batch]
        if commands:
            self._apply(commands)

    def _wait_readable(self) -> None:
        """Block until a command arrives, moving the outbox along meanwhile."""
        while True:
            r, w, _ = select.select([self.sock], [self.sock] if self.outbox else [], [])
            if w:
                self._flush()
            if r:
                return

    def _apply(self, commands: list[dict[str, Any]]) -> None:
        reply: dict[str, Any] = {}
        for cmd in commands:
            op = cmd["op"]
            if op == "add":
                reply.setdefault("acks", []).append(self._add(cmd))
            elif op == "finish":
                stop = cmd.get("stop")
                status = RequestStatus.FINISHED_ABORTED if stop is None else RequestStatus.FINISHED_STOPPED
                self.core.finish_requests(cmd["ids"], status, stop_reason=stop)
            elif op == "call":
                if cmd["method"] != "reset_prefix_cache":
                    raise ValueError(f"unknown core call {cmd['method']!r}")
                reply.setdefault("replies", []).append([cmd["k"], self.core.reset_prefix_cache()])
            elif op == "shutdown":
                self.stopping = True
            else:
                raise ValueError(f"unknown core command {op!r}")
        reply["stats"] = proto.stats_to_list(self.core.stats())
        self._send(reply)

    def _add(self, cmd: dict[str, Any]) -> list[Any]:
        try:
            self.core.add_requests(proto.requests_from_add(cmd))
        except (ValueError, QueueFullError) as e:
            return [cmd["k"], type(e).__name__, str(e)]
        return [cmd["k"], None, None]

    # ---- output --------------------------------------------------------------------------------------
    def _send_step(self, result: CoreStepResult) -> None:
        msg: dict[str, Any] = {}
        proto.encode_outputs(result, msg)
        msg["stats"] = proto.stats_to_list(self.core.stats())
        self._send(msg)

    def _send(self, msg: dict[str, Any]) -> None:
        self.outbox += proto.frame(msg)
        self._flush()

    def _flush(self, wait: bool = False) -> None:
        """Write what the socket takes now; with `wait`, until the outbox is empty (or the peer is gone)."""
        while self.outbox:
            try:
                sent = self.sock.send(self.outbox)
            except BlockingIOError:
                if not wait:
                    return
                select.select([], [self.sock], [], 1.0)
                continue
            except OSError:  # the frontend is gone: nobody to tell
                self.outbox.clear()
                return
            del self.outbox[:sent]


# ---- the process -------------------------------------------------------------------------------------
def _send_blocking(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.setblocking(True)
    sock.sendall(proto.frame(msg))


def _recv_blocking(sock: socket.socket, buffer: bytearray) -> Any:
    while True:
        messages = proto.split_frames(buffer)
        if messages:
            assert len(messages) == 1, "one frame expected during the handshake"
            return messages[0]
        data = sock.recv(RECV_BYTES)
        if not data:
            raise _FrontendGone
        buffer += data


def _raise_system_exit(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    from carpool.worker.tp_worker import exit_with_parent

    exit_with_parent(int(os.environ["CARPOOL_CORE_PARENT_PID"]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the frontend's; it shuts us down in order
    signal.signal(signal.SIGTERM, _raise_system_exit)  # unwind, so the TP workers are stopped too
    logging.basicConfig(level=logging.WARNING, format="[engine core] %(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=int(os.environ["CARPOOL_CORE_PIPE_FD"]))
    core: EngineCore | None = None
    try:
        buffer = bytearray()
        config = tp_codec.engine_config_from_dict(_recv_blocking(sock, buffer))
        core = EngineCore(config)
        gc.collect()
        gc.freeze()  # the model's and libraries' objects: a full collection would walk them mid-step
        _send_blocking(sock, {"ready": {"num_kv_blocks": core.kv_cache_manager.num_blocks},
                              "stats": proto.stats_to_list(core.stats())})
        server = CoreServer(core, sock)
        server.inbox += buffer
        server.run()
    except _FrontendGone:
        pass
    except BaseException as e:  # noqa: BLE001 - report, then exit non-zero
        if not (isinstance(e, SystemExit) and e.code == 128 + signal.SIGTERM):
            traceback.print_exc(file=sys.stderr)
            try:
                _send_blocking(sock, {"error": f"{type(e).__name__}: {e}", "type": type(e).__name__,
                                      "message": str(e)})
            except OSError:
                pass
        if core is not None:
            core.shutdown()
        sys.stderr.flush()
        os._exit(1 if not isinstance(e, SystemExit) else int(e.code or 0))
    core.shutdown()
    sock.close()


# ---- the frontend's side: starting and stopping the process -------------------------------------------
class CoreProcess:
    """Starts the core process, waits until its model is loaded, and stops (and reaps) it."""

    def __init__(self, config: Any) -> None:
        ours, theirs = socket.socketpair()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(carpool.__file__)))
        env = dict(os.environ, CARPOOL_CORE_PIPE_FD=str(theirs.fileno()), CARPOOL_CORE_PARENT_PID=str(os.getpid()),
                   PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "carpool.engine.core_proc"], env=env,
                                     pass_fds=[theirs.fileno()])
        theirs.close()
        self.sock = ours
        # Stops the process if the owner is garbage-collected or the interpreter exits without stop().
        self._finalizer = weakref.finalize(self, _stop_process, self.proc, self.sock)
        try:
            _send_blocking(self.sock, tp_codec.engine_config_to_dict(config))
            ready = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.num_kv_blocks: int = ready["ready"]["num_kv_blocks"]
        self.initial_stats = proto.stats_from_list(ready["stats"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self) -> dict[str, Any]:
        buffer = bytearray()
        while True:
            r, _, _ = select.select([self.sock], [], [], STARTUP_POLL_S)
            if r:
                data = self.sock.recv(RECV_BYTES)
                if not data:
                    self.proc.wait()
                    raise CoreDiedError(f"the engine core process exited with status {self.proc.returncode} "
                                        "while starting")
                buffer += data
                for msg in proto.split_frames(buffer):
                    if "error" in msg:
                        self.proc.wait()
                        if msg.get("type") == "ValueError":  # a bad checkpoint or setting: as in one process
                            raise ValueError(msg["message"])
                        raise CoreDiedError(f"the engine core failed to start: {msg['error']}")
                    return msg
            elif self.proc.poll() is not None:
                raise CoreDiedError(f"the engine core process exited with status {self.proc.returncode} "
                                    "while starting")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        self._finalizer()


def _stop_process(proc: subprocess.Popen, sock: socket.socket) -> None:
    """SIGTERM, then SIGKILL if it lingers; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    sock.close()


if __name__ == "__main__":
    main()
