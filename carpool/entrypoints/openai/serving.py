"""What the completion and chat handlers share: reading a bounded JSON body, checking the model name,
submitting prompts to the engine client (engine errors -> 400/503), merging the streams of a batch,
aborting on disconnect, SSE framing and logprob formatting."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from carpool.engine.core import QueueFullError
from carpool.engine.input_processor import PromptType
from carpool.engine.request_stream import EngineClient, EngineDeadError, RequestStream
from carpool.entrypoints.openai.errors import (
    APIError,
    bad_request_from_validation_error,
    bad_request_from_value_error,
    error_body,
)
from carpool.entrypoints.openai.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from carpool.outputs import Logprob, RequestOutput
from carpool.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

DEFAULT_MAX_BODY_BYTES = 16 << 20


@dataclass
class ServerContext:
    """What every handler needs to know about the served model."""

    engine: EngineClient
    model_name: str
    model_path: str
    max_model_len: int
    vocab_size: int
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    quantization: str | None = None  # the method's name (quantization/config.py); None: unquantized
    kv_cache_dtype: str | None = None  # what the KV cache stores, e.g. "bfloat16" or "float8_e4m3fn"


class OpenAIServing:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.engine = ctx.engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def parse_body(self, request: Request, model: type[M]) -> M:
        """Read at most max_body_bytes (413 beyond) and validate them as `model` (400 if invalid)."""
        limit = self.ctx.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body exceeds {limit} bytes")
        try:
            parsed = model.model_validate_json(bytes(body))
        except ValidationError as e:
            raise bad_request_from_validation_error(e) from None
        self.check_model(getattr(parsed, "model", None))
        return parsed

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.ctx.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model")

    def sampling_params(self, make: Callable[[], SamplingParams]) -> SamplingParams:
        try:
            return make()
        except ValueError as e:
            raise bad_request_from_value_error(e) from None

    async def respond(self, raw: Request, streams: Sequence[RequestStream], stream: bool,
                      make_stream: Callable[[], AsyncIterator[str]],
                      make_collect: Callable[[], Awaitable[BaseModel]]) -> Response:
        """Stream SSE chunks, or collect the whole answer; either way the requests are aborted (their
        blocks freed) as soon as the client goes away, and a dead engine is a 503."""
        if stream:
            return SSEResponse(make_stream(), on_close=lambda: abort_all(streams))
        try:
            response = await until_disconnected(raw, make_collect())
        except EngineDeadError as e:
            raise APIError(503, str(e)) from None
        finally:
            abort_all(streams)
        if response is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse(response.model_dump())

    async def submit(self, request_id: str, prompts: Sequence[PromptType], params: SamplingParams
                     ) -> list[RequestStream]:
        """Add every prompt of a request; all or none (earlier ones are aborted if a later one fails)."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(await self.engine.add_request(rid, prompt, params))
        except BaseException as e:
            for stream in streams:
                stream.abort()
            if isinstance(e, ValueError):
                raise bad_request_from_value_error(e) from None
            if isinstance(e, QueueFullError):
                raise APIError(503, "the server is overloaded: the request queue is full; retry later") from None
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e)) from None
            raise
        return streams


def abort_all(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        stream.abort()


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) pairs of several streams, as they arrive."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((i, output))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work` unless the client goes away first (then cancel it and return None): a client that
    disconnects from a non-streaming request must not keep its request running."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled (server shutdown)
        watcher.cancel()
        work_task.cancel()
        raise
    watcher.cancel()
    if not work_task.done():
        work_task.cancel()
        await asyncio.gather(work_task, return_exceptions=True)
        return None
    return work_task.result()


class SSEResponse(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends (finished, client gone,
    task cancelled), so the engine never keeps generating for nobody."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else _json(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(e: BaseException) -> str:
    """A stream that breaks after its headers went out ends with an error event; details stay in the log."""
    if isinstance(e, EngineDeadError):
        return sse(error_body(503, str(e)))
    logger.error("stream failed", exc_info=e)
    return sse(error_body(500, "internal server error"))


def _json(obj: dict[str, Any]) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


# ---- logprobs ----------------------------------------------------------------------------------------
def _token_text(lp: Logprob | None, token_id: int) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return f"token_id:{token_id}"


def _by_rank(entries: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entries.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30))


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], text_offset: int
                        ) -> CompletionLogprobs:
    """Legacy completions format; top_logprobs holds the top-N and the sampled token, as vLLM's does."""
    out = CompletionLogprobs()
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries.get(token_id)
        text = _token_text(sampled, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(sampled.logprob if sampled is not None else None)
        out.top_logprobs.append({_token_text(lp, t): lp.logprob for t, lp in _by_rank(entries)})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int
                  ) -> list[ChatTokenLogprob]:
    out = []
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries.get(token_id)
        text = _token_text(sampled, token_id)
        top = [TopLogprob(token=_token_text(lp, t), logprob=lp.logprob,
                          bytes=list(_token_text(lp, t).encode("utf-8")))
               for t, lp in _by_rank(entries)[:num_top]]
        out.append(ChatTokenLogprob(token=text, logprob=sampled.logprob if sampled is not None else float("-inf"),
                                    bytes=list(text.encode("utf-8")), top_logprobs=top))
    return out
