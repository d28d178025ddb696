"""What the completion and chat handlers share: reading a bounded JSON body, checking the model name,
turning prompts into token ids off the event loop, submitting them to the engine client (engine errors
-> 400/503), merging the streams of a batch, aborting on disconnect, SSE framing and logprob formatting.

The event loop serves every connection, so nothing whose cost grows with a client's input runs on it
unbounded: a body is refused (413) past `max_body_bytes` before it is parsed, a text prompt past
`max_prompt_chars` (400) before it is tokenized, and tokenizing, chat templating and detokenizing a
large input run on a small thread pool (the Rust tokenizer releases the GIL while it works).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
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
from carpool.entrypoints.openai.protocol import (
    ChatMessage,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprobsJSON,
    TopLogprob,
    UnsupportedFieldError,
    rename_field,
    short,
)
from carpool.outputs import Logprob, PromptLogprobs, RequestOutput
from carpool.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# A text prompt may hold this many characters per token of max_model_len (--max-prompt-chars): far more
# than fits, since common tokenizers average 3-5 characters per token, yet a bound on tokenizing work.
PROMPT_CHARS_PER_TOKEN = 16
# A body may hold this many bytes per prompt character (JSON escapes, batches), and at least 1 MiB.
BODY_BYTES_PER_PROMPT_CHAR = 8
MIN_MAX_BODY_BYTES = 1 << 20
# A list of token ids takes at most this many bytes of JSON per id (digits, comma, indentation).
BODY_BYTES_PER_TOKEN_ID = 16
# Inputs at least this long (characters, or token ids) are tokenized/decoded on the pool, off the loop;
# shorter ones take well under a millisecond, less than the hop to a thread and back.
OFFLOAD_MIN_SIZE = 2048
TOKENIZER_THREADS = 2


def default_max_prompt_chars(max_model_len: int) -> int:
    return PROMPT_CHARS_PER_TOKEN * max_model_len


def default_max_body_bytes(max_prompt_chars: int) -> int:
    return max(MIN_MAX_BODY_BYTES, BODY_BYTES_PER_PROMPT_CHAR * max_prompt_chars)


JSON_MEDIA_TYPE = "application/json"


class ClientGone(Exception):
    """The client disconnected before its request body arrived (or took longer than the body timeout):
    nobody is left to answer, and it is no error of the server's, so it is not logged as one."""


@dataclass
class ServerContext:
    """What every handler needs to know about the served model and the server's limits."""

    engine: EngineClient
    model_name: str
    max_model_len: int
    vocab_size: int
    max_prompt_chars: int
    max_body_bytes: int
    # Text prompts of /v1/completions and /tokenize: special-token text ("</s>") stays text, as
    # vLLM's tokenizer option of the same name does; chat message content is always split.
    split_special_tokens: bool = False
    quantization: str | None = None  # the method's name (quantization/config.py); None: unquantized
    kv_cache_dtype: str | None = None  # what the KV cache stores, e.g. "bfloat16" or "float8_e4m3fn"
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        TOKENIZER_THREADS, thread_name_prefix="carpool-tokenizer"))
    # The engine's tokenizer, and a copy that always splits special-token text (see splitting_copy).
    tokenizer: Any = field(init=False)
    splitting_tokenizer: Any = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer = self.engine.tokenizer
        self.splitting_tokenizer = splitting_copy(self.tokenizer)

    @property
    def prompt_tokenizer(self) -> Any:
        """The tokenizer of /v1/completions and /tokenize text prompts (--split-special-tokens)."""
        return self.splitting_tokenizer if self.split_special_tokens else self.tokenizer

    async def off_loop(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), on the pool when the input is large (`size` characters or tokens)."""
        if size < OFFLOAD_MIN_SIZE:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))


class OpenAIServing:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.engine = ctx.engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def parse_body(self, request: Request, model: type[M], max_bytes: int | None = None) -> M:
        """Check the media type (415: a browser form can post text/plain across sites, never JSON),
        read at most max_body_bytes, or `max_bytes` if smaller (413 beyond), and validate them as
        `model` (400 if invalid)."""
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != JSON_MEDIA_TYPE:
            raise APIError(415, f"Content-Type: request bodies must be {JSON_MEDIA_TYPE}, got "
                                f"{short(media_type) if media_type else 'none'}", "Content-Type")
        limit = self.ctx.max_body_bytes if max_bytes is None else min(max_bytes, self.ctx.max_body_bytes)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise APIError(413, f"the request body exceeds {limit} bytes")
        except ClientDisconnect:
            raise ClientGone from None
        try:
            parsed = model.model_validate_json(bytes(body))
        except ValidationError as e:
            raise bad_request_from_validation_error(e) from None
        except UnsupportedFieldError as e:
            raise APIError(400, str(e), e.field) from None
        self.check_model(getattr(parsed, "model", None))
        return parsed

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.ctx.model_name:
            raise APIError(404, f"model: the model {short(name)} does not exist; this server serves "
                                f"{self.ctx.model_name!r}", "model")

    # ---- prompts -------------------------------------------------------------------------------------
    def check_prompt_chars(self, num_chars: int, param: str, what: str) -> None:
        limit = self.ctx.max_prompt_chars
        if num_chars > limit:
            raise APIError(400, f"{param}: {what} has {num_chars} characters, more than this server takes "
                                f"({limit}, --max-prompt-chars; max_model_len={self.ctx.max_model_len} tokens)",
                           param)

    async def render_messages(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> list[int]:
        """Chat messages -> token ids under the model's template (off the event loop when large), after
        their size was checked."""
        from carpool.entrypoints.openai.serving_chat import render_chat_prompt

        num_chars = sum(len(m.text()) + len(m.name or "") for m in messages)
        self.check_prompt_chars(num_chars, "messages", "the messages' content")
        ids = await self.ctx.off_loop(num_chars, render_chat_prompt, self.tokenizer, messages,
                                      add_generation_prompt, self.ctx.splitting_tokenizer)
        if len(ids) > self.ctx.max_model_len:  # before the engine validates every id, on the loop
            raise APIError(400, f"messages: the conversation is {len(ids)} tokens long, more than "
                                f"max_model_len={self.ctx.max_model_len}", "messages")
        return ids

    async def engine_prompt(self, prompt: str | list[int], add_special_tokens: bool = True, decode: bool = False,
                            what: str = "the prompt") -> dict[str, Any]:
        """A prompt as the engine takes it, {"prompt": text, "prompt_token_ids": ids}, tokenized here
        (off the event loop when large) after its size was checked. Token-id prompts are decoded to text
        only when `decode` (echo)."""
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, f"prompt: {what} is empty", "prompt")
            self.check_prompt_chars(len(prompt), "prompt", what)
            if self.tokenizer is None:
                raise APIError(400, "prompt: this model has no tokenizer; send token ids", "prompt")
            ids = await self.ctx.off_loop(len(prompt), tokenize_text, self.ctx.prompt_tokenizer, prompt,
                                          add_special_tokens)
            if len(ids) > self.ctx.max_model_len:  # before the engine validates every id, on the loop
                raise APIError(400, f"prompt: {what} is {len(ids)} tokens long, more than "
                                    f"max_model_len={self.ctx.max_model_len}", "prompt")
            return {"prompt": prompt, "prompt_token_ids": ids}
        if len(prompt) > self.ctx.max_model_len:  # before any per-token work on a long list
            raise APIError(400, f"prompt: {len(prompt)} tokens exceed max_model_len={self.ctx.max_model_len}",
                           "prompt")
        text = None
        if decode and self.tokenizer is not None:
            self.check_token_ids(prompt, "prompt_token_ids")
            text = await self.ctx.off_loop(len(prompt), decode_text, self.tokenizer, prompt, False)
        return {"prompt": text, "prompt_token_ids": prompt}

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.ctx.vocab_size
        if ids and not (min(ids) >= 0 and max(ids) < vocab):  # builtins: C speed over a long list
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise APIError(400, f"{param}: token id {short(bad)} is outside the vocabulary [0, {vocab})", param)

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
        # pydantic's serializer: one pass in Rust, even for the tens of thousands of entries of a long
        # prompt's logprobs
        return Response(response.model_dump_json(), media_type="application/json")

    async def submit(self, request_id: str, prompts: Sequence[PromptType], params: SamplingParams,
                     field_names: dict[str, str] | None = None) -> list[RequestStream]:
        """Add every prompt of a request; all or none (earlier ones are aborted if a later one fails).
        An engine error names its field as the engine does unless `field_names` renames it to what this
        endpoint's client sent (chat: "max_completion_tokens", "messages")."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(await self.engine.add_request(rid, prompt, params))
        except BaseException as e:
            for stream in streams:
                stream.abort()
            if isinstance(e, ValueError):
                message = str(e)
                if len(prompts) > 1:
                    field, _, rest = message.partition(":")
                    message = f"{field}: prompt {i} of the batch:{rest}" if rest else message
                raise bad_request_from_value_error(ValueError(rename_field(message, field_names or {}))) from None
            if isinstance(e, QueueFullError):
                raise APIError(503, "the server is overloaded: the request queue is full; retry later") from None
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e)) from None
            raise
        return streams


def splitting_copy(tokenizer: Any) -> Any:
    """A copy of `tokenizer` that tokenizes a special token's text ("</s>") as ordinary text, never as
    the special token. A copy, not a per-call `split_special_tokens=True`: transformers implements that
    by setting a flag on the Rust tokenizer the call uses, which two threads tokenizing at once would
    race on (chat content could come out with real special tokens). Each object here keeps one setting."""
    if tokenizer is None:
        return None
    split = copy.deepcopy(tokenizer)
    split.split_special_tokens = True
    backend = getattr(split, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_special_tokens"):
        backend.encode_special_tokens = True
    return split


def tokenize_text(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of `text`; whether special-token text is split is the tokenizer's own setting
    (splitting_copy), never switched per call."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def decode_text(tokenizer: Any, ids: list[int], skip_special_tokens: bool) -> str:
    """tokenizer.decode(ids) through the Rust decoder's batch call where it gives the same text, as it
    releases the GIL while it works (see detokenizer.fast_decoder)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


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
LOGPROB_FLOOR = -9999.0  # -inf is not JSON: OpenAI and vLLM send this instead


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _token_text(lp: Logprob | None, token_id: int) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return f"token_id:{token_id}"


def _by_rank(entries: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entries.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30))


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob] | None], text_offset: int,
                        token_text: Callable[[int], str] | None = None) -> CompletionLogprobs:
    """Legacy completions format; top_logprobs holds the top-N and the token itself, as vLLM's does. An
    entry of None (a prompt's first token: nothing before it to score it by) gives null logprobs; its
    text comes from `token_text`. Offsets count the tokens' texts from `text_offset`."""
    out = CompletionLogprobs()
    for token_id, entries in zip(token_ids, logprobs):
        if entries is None:
            text = token_text(token_id) if token_text is not None else f"token_id:{token_id}"
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            chosen = entries.get(token_id)
            text = _token_text(chosen, token_id)
            out.token_logprobs.append(_finite(chosen.logprob) if chosen is not None else None)
            out.top_logprobs.append({_token_text(lp, t): _finite(lp.logprob) for t, lp in _by_rank(entries)})
        out.tokens.append(text)
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def vllm_prompt_logprobs(prompt_logprobs: PromptLogprobs) -> PromptLogprobsJSON:
    """RequestOutput.prompt_logprobs as vLLM's servers return them: null, then {token id: {"logprob",
    "rank", "decoded_token"}} per prompt token."""
    return [None if entries is None else
            {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in entries.items()}
            for entries in prompt_logprobs]


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
