"""MPAsyncEngine: the server's frontend to an engine core running in its own process (core_proc.py).

Same interface as the thread-driven AsyncEngine, so the HTTP layer cannot tell them apart. The split:
- here, on the event loop: validation (a bad request is a ValueError naming the field, never a round
  trip), tokenization, detokenization, stop strings, n > 1 fan-in, the RequestStreams;
- in the core process: scheduling and the model, stepping flat out with no GIL shared with HTTP.

Coalescing. The socket is read only when the event loop gets to it, and then drained: every step that
finished meanwhile is merged per request (tokens joined) and detokenized once. A frontend that falls
behind the core thus does its per-request work once per turn of the event loop, not once per step,
and each stream gets all of its pending tokens in one chunk; a frontend that keeps up sees every step.
Commands go the other way batched per turn of the loop (one frame), without ever blocking.

Invariants: a request is registered with the output processor only when the core acknowledged it, so
outputs of an earlier request that used the same id (already in flight when it was aborted) are
dropped; a stop string found here finishes the sequence in the core; if the core process dies, every
stream and pending call fails with EngineDeadError and `dead` is set.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from typing import Any

from carpool.config import EngineConfig
from carpool.core.sched_output import EngineCoreOutput
from carpool.engine import core_protocol as proto
from carpool.engine.arg_utils import EngineArgs
from carpool.engine.core import EngineStats, QueueFullError
from carpool.engine.core_proc import RECV_BYTES, SHUTDOWN_TIMEOUT_S, CoreProcess
from carpool.engine.input_processor import InputProcessor, ProcessedRequest, PromptType
from carpool.engine.llm_engine import load_tokenizer
from carpool.engine.output_processor import OutputProcessor
from carpool.engine.request_stream import AsyncEngineBase, EngineDeadError, OutputObserver, RequestStream
from carpool.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class MPAsyncEngine(AsyncEngineBase):
    def __init__(self, config: EngineConfig, tokenizer: Any | None = None,
                 observer: OutputObserver | None = None) -> None:
        """Start the core process and wait until its model is loaded (raises ValueError for a bad
        checkpoint or setting, as the in-process engine would)."""
        self.config = config
        self.observer = observer
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(
            config.tokenizer or config.model.path)
        self.core = CoreProcess(config)
        self.input_processor = InputProcessor(config, self.tokenizer, self.core.num_kv_blocks)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._sock: socket.socket = self.core.sock
        self._stats: EngineStats = self.core.initial_stats
        self._streams: dict[str, RequestStream] = {}
        self._pending_adds: dict[int, tuple[ProcessedRequest, asyncio.Future[None]]] = {}
        self._pending_calls: dict[int, asyncio.Future[Any]] = {}
        self._keys = itertools.count()
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._commands: list[dict[str, Any]] = []
        self._writer_registered = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead = False
        self._stopping = False
        self.dead: asyncio.Event | None = None

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "MPAsyncEngine":
        return cls(args.create_engine_config())

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Attach the core's socket to the running event loop, which will consume the outputs."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.dead = asyncio.Event()
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    async def shutdown(self) -> None:
        """Abort every request, stop the core process (it frees its workers) and reap it."""
        if self._stopping:
            return
        self._stopping = True
        if self._loop is not None and not self._dead:
            self._commands.append({"op": "shutdown"})
            self._flush_commands()
            code = await asyncio.to_thread(self.core.wait, SHUTDOWN_TIMEOUT_S)
            if code not in (0, None):
                logger.warning("the engine core exited with status %s while shutting down", code)
        self._detach()
        await asyncio.to_thread(self.core.stop)
        error = EngineDeadError("the server is shutting down")
        self._fail_pending(error)
        self._fail_all(error)

    @property
    def is_dead(self) -> bool:
        return self._dead

    def stats(self) -> EngineStats:
        """The core's counters as of the last frame it sent (it sends them after every change)."""
        return self._stats

    # ---- requests --------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          arrival_time: float | None = None) -> RequestStream:
        """Validate here, queue in the core, and return the stream once the core accepted it. Raises
        ValueError naming the field, QueueFullError, or EngineDeadError."""
        if self._loop is None:
            raise RuntimeError("MPAsyncEngine.start() was not called")
        if self._dead or self._stopping:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams or self.output_processor.has_request(request_id):
            raise ValueError(f"request_id: {request_id!r} is already in use")
        req = self.input_processor.process(request_id, prompt, params, arrival_time)
        k = next(self._keys)
        accepted: asyncio.Future[None] = self._loop.create_future()
        self._pending_adds[k] = (req, accepted)
        stream = RequestStream(request_id, self.abort, delta=params.output_kind == RequestOutputKind.DELTA)
        self._streams[request_id] = stream
        self._send(proto.add_command(k, req))
        try:
            await accepted
        except BaseException as e:
            self._pending_adds.pop(k, None)
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            stream.finished = True
            if not isinstance(e, (ValueError, QueueFullError, EngineDeadError)):
                # Cancelled: the core may have taken it already; the finish follows the add on the wire.
                self.output_processor.remove(request_id)
                self._send_finish([s.request_id for s in req.sequences])
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (event loop side); the core frees its KV blocks before its next step."""
        self._streams.pop(request_id, None)
        seq_ids = self.output_processor.sequence_ids(request_id)
        self.output_processor.remove(request_id)
        self._send_finish(seq_ids)

    async def reset_prefix_cache(self) -> bool:
        return bool(await self._call("reset_prefix_cache"))

    async def _call(self, method: str) -> Any:
        if self._loop is None or self._dead or self._stopping:
            raise EngineDeadError("the engine is not running")
        k = next(self._keys)
        reply: asyncio.Future[Any] = self._loop.create_future()
        self._pending_calls[k] = reply
        self._send({"op": "call", "k": k, "method": method})
        try:
            return await reply
        finally:
            self._pending_calls.pop(k, None)

    # ---- to the core -----------------------------------------------------------------------------
    def _send_finish(self, seq_ids: list[str], stop: str | None = None) -> None:
        if seq_ids:
            self._send({"op": "finish", "ids": seq_ids, "stop": stop})

    def _send(self, command: dict[str, Any]) -> None:
        """Queue a command; everything queued in one turn of the event loop goes out as one frame."""
        if self._dead or self._loop is None:
            return
        if not self._commands:
            self._loop.call_soon(self._flush_commands)
        self._commands.append(command)

    def _flush_commands(self) -> None:
        if not self._commands:
            return
        commands, self._commands = self._commands, []
        if self._dead:
            return
        self._outbox += proto.frame(commands)
        self._write()

    def _write(self) -> None:
        """Write what the socket takes without blocking; the rest waits for it to become writable."""
        try:
            while self._outbox:
                sent = self._sock.send(self._outbox)
                del self._outbox[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._outbox.clear()  # the core is gone; the reader will notice the closed socket
        assert self._loop is not None
        if self._outbox and not self._writer_registered:
            self._loop.add_writer(self._sock.fileno(), self._write)
            self._writer_registered = True
        elif not self._outbox and self._writer_registered:
            self._loop.remove_writer(self._sock.fileno())
            self._writer_registered = False

    # ---- from the core ---------------------------------------------------------------------------
    def _on_readable(self) -> None:
        gone = False
        while True:
            try:
                data = self._sock.recv(RECV_BYTES)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                gone = True
                break
            self._inbox += data
            if len(data) < RECV_BYTES:
                break
        try:
            messages = proto.split_frames(self._inbox)
            if messages:
                self._handle(messages)
        except Exception:  # a bug here must not leave a server that silently never answers
            logger.exception("the engine client failed while reading the engine core's output")
            self.core.proc.kill()
            gone = True
        if gone:
            self._on_core_gone()

    def _handle(self, messages: list[dict[str, Any]]) -> None:
        """Apply frames in order, merging each request's outputs across them (see the module docstring)."""
        merged: dict[str, EngineCoreOutput] = {}
        for msg in messages:
            for k, error_type, message in msg.get("acks", ()):
                self._on_ack(k, error_type, message, merged)
            for k, result in msg.get("replies", ()):
                reply = self._pending_calls.get(k)
                if reply is not None and not reply.done():
                    reply.set_result(result)
            for seq_id, when in msg.get("sched", ()):
                self.output_processor.mark_scheduled(seq_id, when)
            for out in proto.decode_outputs(msg):
                earlier = merged.get(out.request_id)
                if earlier is None:
                    merged[out.request_id] = out
                else:
                    earlier.new_token_ids.extend(out.new_token_ids)
                    earlier.new_logprobs.extend(out.new_logprobs)
                    if earlier.new_prompt_logprobs is None:
                        earlier.new_prompt_logprobs = out.new_prompt_logprobs
                    earlier.finish_reason, earlier.stop_reason = out.finish_reason, out.stop_reason
                    earlier.num_cached_tokens = max(earlier.num_cached_tokens, out.num_cached_tokens)
            if "stats" in msg:  # before delivery: whoever sees an output sees these
                self._stats = proto.stats_from_list(msg["stats"])
            if "error" in msg:
                logger.error("the engine core failed: %s", msg["error"])
        if merged:
            self._deliver(list(merged.values()))

    def _on_ack(self, k: int, error_type: str | None, message: str | None,
                merged: dict[str, EngineCoreOutput]) -> None:
        entry = self._pending_adds.pop(k, None)
        if entry is None:
            return  # the caller gave up; its finish command follows the add
        req, accepted = entry
        if accepted.done():
            return
        if error_type is not None:
            accepted.set_exception(QueueFullError(message) if error_type == "QueueFullError"
                                   else ValueError(message))
            return
        for seq in req.sequences:
            merged.pop(seq.request_id, None)  # outputs of an earlier request with the same id
        self.output_processor.add_request(req.request_id, req.prompt, req.prompt_token_ids, req.params,
                                          req.arrival_time)
        accepted.set_result(None)

    def _deliver(self, core_outputs: list[EngineCoreOutput]) -> None:
        outputs, stopped = self.output_processor.process_outputs(core_outputs)
        for seq_id, stop in stopped:
            self._send_finish([seq_id], stop)
        self._hand_out(outputs, time.monotonic(), self.observer)

    def _on_core_gone(self) -> None:
        self._detach()
        if self._stopping:
            return
        self._dead = True
        logger.error("the engine core process died (exit status %s)", self.core.proc.poll())
        error = EngineDeadError("the engine loop died")
        self._fail_pending(error)
        self._fail_all(error)
        assert self.dead is not None
        self.dead.set()

    def _detach(self) -> None:
        if self._loop is not None and self._sock.fileno() != -1:
            self._loop.remove_reader(self._sock.fileno())
            if self._writer_registered:
                self._loop.remove_writer(self._sock.fileno())
                self._writer_registered = False

    def _fail_pending(self, error: EngineDeadError) -> None:
        for _, accepted in self._pending_adds.values():
            if not accepted.done():
                accepted.set_exception(error)
        self._pending_adds.clear()
        for reply in self._pending_calls.values():
            if not reply.done():
                reply.set_exception(error)
