"""AsyncEngine: the synchronous Engine driven by one background thread, for the server.

Why a thread: `Engine.step()` is blocking compute. On its own thread it leaves the event loop free to
accept connections and stream tokens while the next step runs, and a new request wakes the idle thread
at once (low time to first token). The Engine is not thread-safe, so this thread is the only one that
ever touches it: `add_request` and `abort` are commands queued to it and applied between steps, in the
order they were made; each step's outputs go back to per-request asyncio queues with a single
`loop.call_soon_threadsafe` call.

Invariants: a request that was added is aborted when its stream is closed before it finished (client
gone, handler cancelled); if the step loop raises, the engine is marked dead, every stream and pending
command fails with EngineDeadError, and `dead` is set so the server can stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import time
from dataclasses import dataclass, field

from carpool.config import EngineConfig
from carpool.engine.llm_engine import Engine, EngineStats, PromptType, QueueFullError
from carpool.engine.request_stream import AsyncEngineBase, EngineDeadError, OutputObserver, RequestStream
from carpool.outputs import RequestOutput
from carpool.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["AsyncEngine", "EngineDeadError", "OutputObserver", "RequestStream"]

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    arrival_time: float
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Abort:
    request_ids: list[str]


ENGINE_GIL_SWITCH_INTERVAL_S = 0.0005


class AsyncEngine(AsyncEngineBase):
    def __init__(self, engine: Engine, observer: OutputObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._dead_error: BaseException | None = None  # set once, under _cond
        self._streams: dict[str, RequestStream] = {}  # touched only on the event loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stats: EngineStats = engine.stats()  # replaced (never mutated) by the engine thread
        self._live: set[str] = set()  # request ids in the engine; touched only by the engine thread
        self.dead: asyncio.Event | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.dead = asyncio.Event()
        # The engine thread and the event loop share the GIL. With Python's default 5 ms switch interval
        # a busy event loop (hundreds of streams) can hold the engine thread off for a whole GPU step,
        # leaving the GPU idle; a short interval hands the GIL back within a fraction of a step.
        sys.setswitchinterval(ENGINE_GIL_SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name="carpool-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Abort every request, stop the engine thread and wait for it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._fail_all(EngineDeadError("the server is shutting down"))
        self.engine.shutdown()

    @property
    def is_dead(self) -> bool:
        return self._dead_error is not None

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step (a snapshot; safe from any thread)."""
        return self._stats

    @property
    def tokenizer(self) -> object:
        return self.engine.tokenizer

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    # ---- requests ----------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          arrival_time: float | None = None) -> RequestStream:
        """Queue a request and return its stream once the engine accepted it. Raises what
        Engine.add_request raises (ValueError naming the field, QueueFullError), or EngineDeadError."""
        if self._loop is None:
            raise RuntimeError("AsyncEngine.start() was not called")
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        stream = RequestStream(request_id, self.abort, delta=params.output_kind == RequestOutputKind.DELTA)
        command = _Add(request_id, prompt, params, time.monotonic() if arrival_time is None else arrival_time)
        self._streams[request_id] = stream
        try:
            self._submit(command)
            await asyncio.wrap_future(command.done)
        except BaseException as e:
            self._streams.pop(request_id, None)
            stream.finished = True
            if not isinstance(e, (ValueError, QueueFullError, EngineDeadError)) and not self.is_dead:
                # Cancelled: the engine may have added it already; commands apply in order, so this
                # abort follows the add.
                self._submit(_Abort([request_id]))
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (event loop side); its KV blocks are freed before the next step."""
        self._streams.pop(request_id, None)
        if not self.is_dead:
            try:
                self._submit(_Abort([request_id]))
            except EngineDeadError:
                pass

    def _submit(self, command: _Add | _Abort) -> None:
        with self._cond:
            if self._dead_error is not None or self._stopping:
                raise EngineDeadError("the engine is not running")
            self._commands.append(command)
            self._cond.notify()

    # ---- engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                        self._cond.wait()
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                for command in commands:
                    self._apply(command)
                if stopping:
                    self.engine.abort(list(self._live))
                    self._stats = self.engine.stats()
                    return
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                self._live.difference_update(o.request_id for o in outputs if o.finished)
                self._stats = self.engine.stats()  # before delivery: whoever sees an output sees these
                if outputs:
                    self._call_in_loop(self._deliver, outputs, time.monotonic())
        except BaseException as e:  # the loop must never die silently: fail everyone, then report
            logger.exception("the engine loop died")
            with self._cond:
                self._dead_error = e
                pending, self._commands = self._commands, []
            for command in pending:
                if isinstance(command, _Add) and command.done.set_running_or_notify_cancel():
                    command.done.set_exception(EngineDeadError("the engine loop died"))
            self._call_in_loop(self._on_dead)

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_ids)
            self._live.difference_update(command.request_ids)
            return
        if not command.done.set_running_or_notify_cancel():
            return  # the caller gave up before the engine saw it
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time)
        except Exception as e:  # ValueError / QueueFullError go back to the caller as they are
            command.done.set_exception(e)
        else:
            self._live.add(command.request_id)
            command.done.set_result(None)

    def _call_in_loop(self, fn: object, *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # ---- event loop side ---------------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput], now: float) -> None:
        self._hand_out(outputs, now, self.observer)  # requests aborted while the step ran are dropped

    def _on_dead(self) -> None:
        self._fail_all(EngineDeadError("the engine loop died"))
        assert self.dead is not None
        self.dead.set()
