"""The OpenAI-compatible HTTP server (`carpool serve`): FastAPI routes over one engine client, run by uvicorn.

The engine core (scheduler + model) runs in a process of its own and this process does HTTP, tokens and
text (MPAsyncEngine); `--disable-frontend-multiprocessing` puts the whole engine on a thread here instead.

Lifecycle: the model loads before the socket opens; SIGTERM/SIGINT stop accepting connections, let
in-flight requests finish for up to --shutdown-timeout seconds, cancel (= abort) the rest and exit 0.
If the engine loop (or the core process) dies, /health turns 503, the server shuts down and the process
exits 1.

Facing untrusted clients: with an API key every route but /health needs it (/metrics too, unless
--allow-unauthenticated-metrics); request bodies must be JSON (415 otherwise: a cross-site form cannot
send that); CORS is off unless --allowed-origins names origins; connections are bounded in number and
in how long their headers and body may take (http_protocol.py); and work that grows with a client's
input is bounded before it starts and kept off the event loop (serving.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hmac
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from carpool import __version__
from carpool.engine.arg_utils import EngineArgs
from carpool.engine.request_stream import EngineClient
from carpool.entrypoints.cli import subcommand
from carpool.entrypoints.openai.errors import APIError, error_response
from carpool.entrypoints.openai.http_protocol import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    limited_h11_protocol,
)
from carpool.entrypoints.openai.protocol import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest
from carpool.entrypoints.openai.serving import (
    BODY_BYTES_PER_PROMPT_CHAR,
    BODY_BYTES_PER_TOKEN_ID,
    MIN_MAX_BODY_BYTES,
    PROMPT_CHARS_PER_TOKEN,
    ClientGone,
    OpenAIServing,
    ServerContext,
    decode_text,
    default_max_body_bytes,
    default_max_prompt_chars,
)
from carpool.entrypoints.openai.serving_chat import OpenAIServingChat
from carpool.entrypoints.openai.serving_completion import OpenAIServingCompletion
from carpool.metrics import CONTENT_TYPE, ServerMetrics
from carpool.quantization.config import describe_quantization

logger = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0


class APIKeyMiddleware:
    """Guards every route but the open ones with `Authorization: Bearer <key>`, compared in constant
    time, before a byte of the body is read. A request with several Authorization headers is refused:
    which one a proxy or framework would honour is ambiguous."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str] = frozenset({"/health"})) -> None:
        self.app = app
        self.expected = b"Bearer " + api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "") not in self.open_paths:
            given = [value for name, value in scope["headers"] if name == b"authorization"]
            if len(given) > 1:
                await error_response(401, "Authorization: send exactly one Authorization header",
                                     "Authorization")(scope, receive, send)
                return
            if not given or not hmac.compare_digest(given[0], self.expected):
                await error_response(401, "invalid or missing API key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(ctx: ServerContext, metrics: ServerMetrics, api_key: str | None = None,
              on_engine_dead: Callable[[], None] | None = None, allowed_origins: list[str] | None = None,
              allow_unauthenticated_metrics: bool = False) -> FastAPI:
    engine = ctx.engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        watchdog = asyncio.create_task(_watch_engine(engine, on_engine_dead))
        try:
            yield
        finally:
            watchdog.cancel()
            await engine.shutdown()
            ctx.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="carpool", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    if api_key:
        open_paths = {"/health", "/metrics"} if allow_unauthenticated_metrics else {"/health"}
        app.add_middleware(APIKeyMiddleware, api_key=api_key, open_paths=frozenset(open_paths))
    if allowed_origins:  # added last = outermost: preflights are answered before the key is checked
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _add_error_handlers(app)
    completions = OpenAIServingCompletion(ctx)
    chat = OpenAIServingChat(ctx)
    common = OpenAIServing(ctx)

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await completions.create_completion(request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await chat.create_chat_completion(request)

    def model_card() -> ModelCard:
        # root: the served name, never the checkpoint's path on this machine
        return ModelCard(id=ctx.model_name, root=ctx.model_name, max_model_len=ctx.max_model_len,
                         quantization=ctx.quantization, kv_cache_dtype=ctx.kv_cache_dtype)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse(ModelList(data=[model_card()]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        common.check_model(model_id)
        return JSONResponse(model_card().model_dump())

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = await common.parse_body(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            ids = await common.render_messages(req.messages, req.add_generation_prompt)
        else:
            assert req.prompt is not None
            ids = (await common.engine_prompt(req.prompt, req.add_special_tokens))["prompt_token_ids"]
        return JSONResponse({"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        # No sequence is longer than max_model_len: neither is what may be detokenized (bounded first
        # by the body's size, so that parsing a list of ids stays cheap).
        req = await common.parse_body(request, DetokenizeRequest,
                                      max_bytes=BODY_BYTES_PER_TOKEN_ID * ctx.max_model_len + 1024)
        if len(req.tokens) > ctx.max_model_len:
            raise APIError(400, f"tokens: {len(req.tokens)} ids, more than max_model_len={ctx.max_model_len}",
                           "tokens")
        common.check_token_ids(req.tokens, "tokens")
        if engine.tokenizer is None:
            raise APIError(400, "tokens: this model has no tokenizer", "tokens")
        text = await ctx.off_loop(len(req.tokens), decode_text, engine.tokenizer, req.tokens, False)
        return JSONResponse({"prompt": text})

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        """vLLM's tokenizer description, which vLLM-compatible clients (lm-evaluation-harness's remote
        tokenizer) read to tokenize through /tokenize instead of downloading the tokenizer."""
        tok = engine.tokenizer
        if tok is None:
            raise APIError(404, "this model has no tokenizer")
        info: dict[str, object] = {"tokenizer_class": type(tok).__name__, "model_max_length": ctx.max_model_len,
                                   "chat_template": getattr(tok, "chat_template", None)}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            info[name] = getattr(tok, name, None)
        return JSONResponse(info)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return error_response(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, str(exc.detail))

    async def validation_error(_: Request, exc: Exception) -> Response:
        return error_response(400, "invalid request")

    async def client_gone(request: Request, exc: Exception) -> Response:
        # Not an error of ours, and cheap to cause: at most a debug line, never a traceback.
        logger.debug("client %s left before sending its whole request body", request.client)
        return Response(status_code=499)  # nobody reads this

    async def internal_error(_: Request, exc: Exception) -> Response:
        # Starlette re-raises after sending this, so the server logs the traceback; the client gets none.
        return error_response(500, "internal server error")

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(Exception, internal_error)


async def _watch_engine(engine: EngineClient, on_dead: Callable[[], None] | None) -> None:
    assert engine.dead is not None
    await engine.dead.wait()
    logger.error("the engine loop died; shutting the server down")
    if on_dead is not None:
        on_dead()


# ---- running -------------------------------------------------------------------------------------------
def _uvicorn_server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn with carpool's shutdown: in-flight requests get `drain_after` seconds to finish, then
        `drain()` ends them cleanly (an error event, then [DONE]) so every connection closes by itself;
        uvicorn's own cancel-everything timeout is only a backstop. SIGTERM exits 0: uvicorn would
        re-raise the captured signal after shutting down."""

        def __init__(self, config: uvicorn.Config, drain: Callable[[], None], drain_after: float) -> None:
            super().__init__(config)
            self.drain = drain
            self.drain_after = drain_after

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            """asyncio takes one number both for the kernel's listen queue and for how many connections
            it accepts and sets up in one turn of the event loop (config.backlog = ACCEPTS_PER_TURN).
            A burst of connections (a thousand slow-header sockets) would then cost one turn of a few
            hundred ms, stalling every running stream; so the turn stays short and the queue, restored
            here, stays deep: a burst waits in the kernel rather than being refused."""
            await super().startup(sockets)
            for sock in sockets or ():
                sock.listen(LISTEN_BACKLOG)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            async def drain_later() -> None:
                await asyncio.sleep(self.drain_after)
                if self.server_state.tasks:
                    logger.warning("shutdown: aborting the requests still running after %.1f s", self.drain_after)
                self.drain()

            drainer = asyncio.create_task(drain_later())
            try:
                await super().shutdown(sockets)
            finally:
                drainer.cancel()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


LISTEN_BACKLOG = 2048  # connections the kernel queues before the server accepts them
ACCEPTS_PER_TURN = 64  # connections accepted per turn of the event loop (see Server.startup)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)


def make_engine_client(engine_args: EngineArgs, in_process: bool) -> EngineClient:
    """The engine core in its own process (default), or the whole Engine on a thread of this one."""
    if in_process:
        from carpool.engine.async_engine import AsyncEngine
        from carpool.engine.llm_engine import Engine

        return AsyncEngine(Engine.from_engine_args(engine_args))
    from carpool.engine.core_client import MPAsyncEngine

    return MPAsyncEngine.from_engine_args(engine_args)


class CarpoolServer:
    """Binds the socket (so the address is known, and a taken port fails fast) and loads the engine;
    then `run()` serves until SIGTERM/SIGINT (returns 0) or the engine dies (returns 1)."""

    def __init__(self, ns: argparse.Namespace) -> None:
        try:  # first, so a taken port fails before minutes of model loading
            self.sock = bind_socket(ns.host, ns.port)
        except OSError as e:
            raise ValueError(f"port: cannot listen on {ns.host}:{ns.port}: {e.strerror or e}") from None
        _check_server_args(ns)
        engine_args = EngineArgs.from_cli_args(ns)
        self.engine: EngineClient = make_engine_client(engine_args, ns.disable_frontend_multiprocessing)
        config = self.engine.config
        self.model_name: str = ns.served_model_name or engine_args.model or "demo"
        self.metrics = ServerMetrics(self.engine.stats, self.model_name)
        self.engine.observer = self.metrics
        max_model_len = config.scheduler.max_model_len
        max_prompt_chars = ns.max_prompt_chars or default_max_prompt_chars(max_model_len)
        self.ctx = ServerContext(engine=self.engine, model_name=self.model_name, max_model_len=max_model_len,
                                 vocab_size=config.model.vocab_size, max_prompt_chars=max_prompt_chars,
                                 max_body_bytes=ns.max_request_body_bytes or default_max_body_bytes(max_prompt_chars),
                                 split_special_tokens=ns.split_special_tokens,
                                 **describe_quantization(config.model.hf_config, config.quantization,
                                                         config.kv_cache_dtype, config.model.dtype))
        self.app = build_app(self.ctx, self.metrics, api_key=ns.api_key, on_engine_dead=self._request_exit,
                             allowed_origins=ns.allowed_origins,
                             allow_unauthenticated_metrics=ns.allow_unauthenticated_metrics)
        self.shutdown_timeout: float = ns.shutdown_timeout
        self.log_level: str = ns.uvicorn_log_level
        self.http_protocol = limited_h11_protocol(ns.request_header_timeout, ns.request_body_timeout,
                                                  ns.max_connections)
        _raise_open_file_limit(ns.max_connections)
        self._uvicorn: object | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _request_exit(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True  # type: ignore[attr-defined]

    def run(self) -> int:
        import uvicorn

        timeout = max(self.shutdown_timeout, 0.0)
        config = uvicorn.Config(self.app, log_level=self.log_level, timeout_graceful_shutdown=timeout + 5.0,
                                access_log=self.log_level in ("debug", "trace"), http=self.http_protocol,
                                backlog=ACCEPTS_PER_TURN)
        self._uvicorn = _uvicorn_server_class()(
            config, drain=lambda: self.engine.abort_all("the server is shutting down"), drain_after=timeout)
        asyncio.run(self._uvicorn.serve(sockets=[self.sock]))  # type: ignore[attr-defined]
        return 1 if self.engine.is_dead else 0


def _check_server_args(ns: argparse.Namespace) -> None:
    for name in ("max_prompt_chars", "max_request_body_bytes", "max_connections"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value}")
    for name in ("request_header_timeout", "request_body_timeout"):
        if not getattr(ns, name) > 0:
            raise ValueError(f"{name}: must be a positive number of seconds, got {getattr(ns, name)}")


def _raise_open_file_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: make sure the soft limit leaves room for all of them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 256  # model files, the core's socket, logs...
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            logger.warning("the open-file limit (%d) is below --max-connections + 256; raise `ulimit -n`", target)


def freeze_startup_heap() -> None:
    """Exempt every object alive after startup (torch, transformers, the tokenizer: some 300,000) from
    garbage collection. Otherwise a burst of allocations (a thousand connections opening) triggers a
    full collection that walks them all, stalling the event loop for hundreds of milliseconds."""
    gc.collect()
    gc.freeze()


def run_server(ns: argparse.Namespace) -> int:
    server = CarpoolServer(ns)
    print(f"carpool: serving {server.model_name!r} on {server.url} (max_model_len={server.ctx.max_model_len})",
          flush=True)
    freeze_startup_heap()  # (here, not in run(): a process that embeds the server keeps its own GC policy)
    code = server.run()
    if code:
        print("carpool: the engine loop died; exiting with status 1", flush=True)
    return code


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or Hugging Face repo id (default: the built-in demo model)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    g.add_argument("--api-key", default=os.environ.get("CARPOOL_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health (default: "
                        "$CARPOOL_API_KEY, which keeps the key out of `ps`; none = open)")
    g.add_argument("--allow-unauthenticated-metrics", action="store_true",
                   help="serve /metrics without the API key (for Prometheus scrapers that send none)")
    g.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="allow cross-origin (CORS) requests from these origins, e.g. https://app.example "
                        "(default: none; CORS off)")
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients send and see (default: MODEL as given, or 'demo')")
    g.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest text prompt (for chat: all messages' content) in characters; longer ones "
                        "get 400 before any tokenizing (default: "
                        f"{PROMPT_CHARS_PER_TOKEN} x max_model_len, more than any prompt that fits)")
    g.add_argument("--max-request-body-bytes", type=int, default=None,
                   help="larger request bodies get 413 before they are parsed (default: "
                        f"{BODY_BYTES_PER_PROMPT_CHAR} x --max-prompt-chars, at least {MIN_MAX_BODY_BYTES})")
    g.add_argument("--split-special-tokens", action="store_true",
                   help="tokenize special-token text in /v1/completions and /tokenize prompts (e.g. '</s>') "
                        "as plain text, never as the special token (chat message content always is)")
    g.add_argument("--request-header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                   help="close a connection whose request headers are not complete this many seconds "
                        f"after it opened or after its previous response (default: {DEFAULT_HEADER_TIMEOUT_S:g})")
    g.add_argument("--request-body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="close a connection whose request body is not complete this many seconds after "
                        f"its headers (default: {DEFAULT_BODY_TIMEOUT_S:g})")
    g.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help="most open connections; more get 503 and are closed at once "
                        f"(default: {DEFAULT_MAX_CONNECTIONS})")
    g.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help="on SIGTERM, seconds to let in-flight requests finish before aborting them "
                        f"(default: {DEFAULT_SHUTDOWN_TIMEOUT_S:g})")
    g.add_argument("--disable-frontend-multiprocessing", action="store_true",
                   help="run the engine on a thread of the server's process instead of in a process of its "
                        "own (slower under load: HTTP and the engine then share one GIL)")
    g.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level; debug and trace also log every request (default: warning)")
    EngineArgs.add_cli_args(p, model_flag=False)


@subcommand("serve", "serve a model over an OpenAI-compatible HTTP API", _serve_args)
def run_serve(ns: argparse.Namespace) -> int:
    return run_server(ns)
