"""What the HTTP layer sees of an async engine: EngineClient, and RequestStream (one request's outputs,
handed from the engine's delivery code to its consumer).

Shared by both async engines (the thread one in async_engine.py, the process one in core_client.py);
everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from carpool.outputs import RequestMetrics, RequestOutput
from carpool.sampling_params import SamplingParams

if TYPE_CHECKING:
    from carpool.config import EngineConfig
    from carpool.engine.core import EngineStats
    from carpool.engine.input_processor import PromptType


class EngineDeadError(RuntimeError):
    """The engine is not serving: its loop crashed, or the server is shutting down. The message is
    written here (never an internal exception's text), so servers may show it to clients."""


class OutputObserver(Protocol):
    """Receives per-request timing as outputs are handed out (the server's Prometheus metrics)."""

    def observe_inter_token_latency(self, seconds: float) -> None: ...

    def observe_finished(self, metrics: RequestMetrics, num_output_tokens: int, finish_reason: str | None
                         ) -> None: ...


class EngineClient(Protocol):
    """AsyncEngine (engine on a thread) and MPAsyncEngine (engine core in its own process) both are one."""

    config: "EngineConfig"
    tokenizer: Any
    observer: OutputObserver | None
    dead: asyncio.Event | None

    def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    @property
    def is_dead(self) -> bool: ...

    def stats(self) -> "EngineStats": ...

    async def add_request(self, request_id: str, prompt: "PromptType", params: SamplingParams,
                          arrival_time: float | None = None) -> "RequestStream": ...

    def generate(self, prompt: "PromptType", params: SamplingParams, request_id: str
                 ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def abort_all(self, reason: str) -> None: ...


class AsyncEngineBase:
    """What both async engines share: `generate` in terms of `add_request`, and ending every open stream
    at once. Each engine keeps its open streams in `_streams` (request id -> stream), on the event loop."""

    _streams: dict[str, "RequestStream"]

    async def add_request(self, request_id: str, prompt: "PromptType", params: SamplingParams,
                          arrival_time: float | None = None) -> "RequestStream":
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def generate(self, prompt: "PromptType", params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request (use RequestOutputKind.DELTA to stream); leaving the loop early or
        being cancelled aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort_all(self, reason: str) -> None:
        """End every open stream now with EngineDeadError(reason) and abort its request (the server's
        shutdown deadline passed). New requests are still accepted until shutdown()."""
        for request_id in self._fail_all(EngineDeadError(reason)):
            self.abort(request_id)

    def _hand_out(self, outputs: list[RequestOutput], now: float, observer: OutputObserver | None) -> None:
        """Give each output to its open stream (outputs of aborted requests are dropped); a finished
        request's stream leaves `_streams`."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream._put(output, now, observer)

    def _fail_all(self, error: EngineDeadError) -> list[str]:
        """End every open stream with `error`; returns their request ids."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(error)
        return list(streams)


class RequestStream:
    """The outputs of one request in order; `async for` ends after the finished one. Closing the stream
    early (`abort()`, also called by the engine's `generate` on exit) aborts the request in the engine.

    Outputs the consumer has not picked up yet are merged into one (DELTA: texts and tokens joined;
    otherwise the newest replaces the older), so a slow client costs one pending output, not a backlog,
    and the event loop's work per request follows the client's pace rather than the step rate."""

    def __init__(self, request_id: str, abort: Callable[[str], None], delta: bool = True) -> None:
        self.request_id = request_id
        self._abort = abort
        self._delta = delta
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self.finished = False
        self._last_output_time: float | None = None
        self._num_output_tokens: dict[int, int] = {}

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while self._pending is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if self._pending is not None:  # outputs that arrived before an error are still handed out
            output, self._pending = self._pending, None
            self.finished = output.finished
            return output
        self.finished = True
        assert self._error is not None
        raise self._error

    def abort(self) -> None:
        """Abort the request unless it already finished; idempotent, call from the event loop."""
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    def _put(self, output: RequestOutput, now: float, observer: OutputObserver | None) -> None:
        for c in output.outputs:
            seen = self._num_output_tokens.get(c.index, 0) if self._delta else 0
            self._num_output_tokens[c.index] = seen + len(c.token_ids)
        if observer is not None:
            if self._last_output_time is not None and any(c.token_ids for c in output.outputs):
                observer.observe_inter_token_latency(now - self._last_output_time)
            if output.finished and output.metrics is not None:
                reason = next((c.finish_reason for c in output.outputs if c.finish_reason), None)
                observer.observe_finished(output.metrics, max(self._num_output_tokens.values(), default=0),
                                          reason)
        self._last_output_time = now
        if self._pending is not None and self._delta:
            _merge_delta(self._pending, output)
        else:
            self._pending = output
        self._ready.set()


def _merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    """Append DELTA output `new` to the not yet consumed `into` (in place: both are fresh objects that
    only this stream holds)."""
    by_index = {c.index: c for c in into.outputs}
    for c in new.outputs:
        old = by_index.get(c.index)
        if old is None:
            into.outputs.append(c)
            continue
        old.text += c.text
        old.token_ids = old.token_ids + c.token_ids
        if c.logprobs is not None:
            old.logprobs = (old.logprobs or []) + c.logprobs
        old.cumulative_logprob = c.cumulative_logprob
        old.finish_reason, old.stop_reason = c.finish_reason, c.stop_reason
    into.finished = new.finished
    into.metrics = new.metrics
    into.num_cached_tokens = new.num_cached_tokens
    if into.prompt_logprobs is None:  # (DELTA: only one output carries them)
        into.prompt_logprobs = new.prompt_logprobs
