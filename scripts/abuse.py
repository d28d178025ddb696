"""A hostile client against a live `carpool serve`, bounded in count and time; prints one JSON object.

Phases, each against 127.0.0.1 only:
1. corpus: one request per case of a hostile corpus (bad auth on every route, wrong media types,
   malformed and deeply nested JSON, wrong types and out-of-range values of every field, unsupported
   fields, hostile prompts and messages, oversized bodies and names, malformed HTTP on raw sockets);
2. disconnect storm: concurrent streams, half of them dropped after their first token;
3. slow-header flood: sockets that never finish their headers (and some that never finish a body),
   trickling a byte now and then, while /health is probed;
4. large-request flood: worker processes send requests at the server's size limits (prompts of
   --max-prompt-chars characters to every route that tokenizes, bodies at and past the body limit,
   unauthenticated and authenticated) while /health is probed and a stream that was already running
   is timed token by token;
5. connection cap: more idle connections than the server admits.
Afterwards: requests still running or waiting and KV blocks still held (all must be 0), and, for a
server this script started, the lines it logged and the tracebacks among them.

Pass criteria (`"ok"`): no 5xx anywhere; during the large-request flood, /health and the running
stream's gaps under 100 ms at p99; every slow connection closed by the server; nothing leaked. The
slow flood's /health figures are reported too: a probe that connects during the burst of a thousand
connections waits in the kernel's accept queue behind them (the server sets each up in well under a
millisecond, in turns of 64 so that running streams are not held up).

Run: `python scripts/abuse.py [--quick]` starts `carpool serve` (demo model, CPU, an API key, 2-second
header and body timeouts) itself; `--url URL --api-key KEY` targets a running server instead (its
limits are then derived from max_model_len unless given). The large-request flood is also importable
(`large_request_flood`) for the test that guards it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

KEY = "abuse-key"
HEALTH_PROBE_S = 0.02


# ---- a server to abuse -----------------------------------------------------------------------------------
@dataclass
class Target:
    url: str
    key: str
    max_model_len: int
    max_prompt_chars: int
    max_body_bytes: int
    header_timeout_s: float
    max_connections: int
    proc: subprocess.Popen | None = None
    log_file: Any = None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=self.auth, timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out.setdefault(name.split("{", 1)[0], float(value))
        return out

    def log(self) -> str:
        if self.log_file is None:
            return ""
        self.log_file.seek(0)
        return self.log_file.read()


def start_server(header_timeout_s: float, max_connections: int) -> Target:
    from carpool.entrypoints.openai.serving import default_max_body_bytes, default_max_prompt_chars

    log = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, "-m", "carpool.entrypoints.cli", "serve", "--device", "cpu", "--port", "0",
           "--request-header-timeout", str(header_timeout_s), "--request-body-timeout", str(header_timeout_s),
           "--max-connections", str(max_connections)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "CARPOOL_API_KEY": KEY})
    line = proc.stdout.readline()  # type: ignore[union-attr]
    match = re.search(r"on (http://\S+) \(max_model_len=(\d+)\)", line)
    if match is None:
        proc.kill()
        log.seek(0)
        raise RuntimeError(f"the server did not start: {line!r}\n{log.read()}")
    url, max_model_len = match.group(1), int(match.group(2))
    deadline = time.monotonic() + 240
    while httpx.get(f"{url}/health", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not become healthy")
        time.sleep(0.05)
    chars = default_max_prompt_chars(max_model_len)
    return Target(url, KEY, max_model_len, chars, default_max_body_bytes(chars), header_timeout_s, max_connections,
                  proc, log)


def stop_server(target: Target) -> int | None:
    if target.proc is None:
        return None
    target.proc.send_signal(signal.SIGTERM)
    try:
        return target.proc.wait(60)
    except subprocess.TimeoutExpired:
        target.proc.kill()
        return -9


# ---- measuring ---------------------------------------------------------------------------------------------
class HealthProbe:
    """GET /health every HEALTH_PROBE_S from a process of its own (so that this process's work, such as
    juggling a thousand sockets, does not delay the probe), a new connection each time as a load
    balancer's probe; latencies and statuses are read back when the context exits."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "HealthProbe":
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--probe-worker", "--url", self.url],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "probing":
            raise RuntimeError("the health probe did not start")
        return self

    def __exit__(self, *_: object) -> None:
        assert self._proc is not None
        out, _ = self._proc.communicate(timeout=60)  # closing its stdin stops it
        result = json.loads(out)
        self.latencies, self.statuses = result["latencies"], Counter(result["statuses"])

    def summary(self) -> dict[str, Any]:
        return {"probes": len(self.latencies), "statuses": dict(self.statuses), **ms_stats(self.latencies)}


def probe_worker(url: str) -> dict[str, Any]:
    """Probe /health until stdin closes (HealthProbe's worker process)."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    stop = threading.Event()

    def run() -> None:
        # One client (building one costs tens of ms of CPU here), but no connection kept between probes.
        with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    status = str(client.get(f"{url}/health").status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                latencies.append(time.perf_counter() - start)
                statuses[status] += 1
                stop.wait(HEALTH_PROBE_S)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    print("probing", flush=True)
    sys.stdin.read()
    stop.set()
    thread.join()
    return {"latencies": latencies, "statuses": dict(statuses)}


def ms_stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return round(1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": round(1e3 * ordered[-1], 1)}


class RunningStream:
    """A long streaming completion, started before a flood; records when each SSE event arrives."""

    def __init__(self, target: Target, max_tokens: int = 3000) -> None:
        self.target = target
        self.max_tokens = max_tokens
        self.arrivals: list[float] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RunningStream":
        self._thread.start()
        if not self._started.wait(60):
            raise RuntimeError("the stream never started")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True, "temperature": 0}
        try:
            with httpx.stream("POST", f"{self.target.url}/v1/completions", json=body, headers=self.target.auth,
                              timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.arrivals.append(time.perf_counter())
                        self._started.set()
                    if self._stop.is_set():
                        return  # leaving the block drops the connection: the server aborts the request
        except httpx.HTTPError as e:
            self.error = type(e).__name__
        finally:
            self._started.set()

    def gaps(self, start: float, end: float) -> list[float]:
        times = [t for t in self.arrivals if start <= t <= end]
        return [b - a for a, b in zip(times, times[1:])]


# ---- 1. the hostile corpus ----------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    method: str = "POST"
    path: str = "/v1/completions"
    body: Any = None  # dict/list -> JSON; bytes as they are
    headers: dict[str, str] = field(default_factory=dict)
    auth: bool = True
    raw: bytes | None = None  # a whole HTTP request written to a socket as it is


def corpus(target: Target) -> list[Case]:
    ok_completion = {"prompt": "hi", "max_tokens": 2}
    ok_chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases: list[Case] = []
    routes = [("GET", "/v1/models", None), ("GET", "/v1/models/demo", None), ("POST", "/v1/completions", ok_completion),
              ("POST", "/v1/chat/completions", ok_chat), ("POST", "/tokenize", {"prompt": "hi"}),
              ("POST", "/detokenize", {"tokens": [104, 105]}), ("GET", "/tokenizer_info", None),
              ("GET", "/version", None), ("GET", "/metrics", None), ("GET", "/openapi.json", None),
              ("GET", "/docs", None), ("GET", "/nope", None)]
    bad_auth = {"no key": {}, "wrong key": {"Authorization": "Bearer wrong"}, "no scheme": {"Authorization": KEY},
                "basic": {"Authorization": "Basic " + KEY}, "empty bearer": {"Authorization": "Bearer"},
                "key with suffix": {"Authorization": f"Bearer {target.key}x"}}
    for method, path, body in routes:
        for what, headers in bad_auth.items():
            cases.append(Case(f"{what}: {method} {path}", method, path, body, headers, auth=False))
        host, port = target.address
        two = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer wrong\r\n"
               f"Authorization: Bearer {target.key}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        cases.append(Case(f"two Authorization headers: {method} {path}", raw=two.encode()))
    for path, body in (("/v1/completions", ok_completion), ("/v1/chat/completions", ok_chat),
                       ("/tokenize", {"prompt": "hi"})):
        raw = json.dumps(body).encode()
        for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      "application/jsonx", "", "application/xml"):
            cases.append(Case(f"Content-Type {media or 'none'!r}: {path}", path=path, body=raw,
                              headers={"Content-Type": media} if media else {}))
    json_garbage = {
        "truncated": b'{"prompt": "x", ', "array": b"[1, 2]", "string": b'"x"', "number": b"5", "null": b"null",
        "empty": b"", "nesting 100000": b"[" * 100_000 + b"]" * 100_000,
        "object nesting 5000": b'{"prompt": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,
        "NaN": b'{"prompt": "x", "temperature": NaN}', "Infinity": b'{"prompt": "x", "top_p": Infinity}',
        "duplicate keys": b'{"prompt": "x", "prompt": 5}', "invalid UTF-8": b'{"prompt": "\xff\xfe"}',
        "BOM": b'\xef\xbb\xbf{"prompt": "x"}', "1e400": b'{"prompt": "x", "temperature": 1e400}',
        "lone surrogate": b'{"prompt": "\\ud800"}', "NUL in string": b'{"prompt": "a\\u0000b", "max_tokens": 2}',
        "trailing garbage": b'{"prompt": "x"} xyz', "huge integer": b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
    }
    for what, raw in json_garbage.items():
        cases.append(Case(f"JSON {what}", body=raw, headers={"Content-Type": "application/json"}))
    wrong_types: dict[str, list[Any]] = {
        "max_tokens": ["ten", 1.5, True, [1], {}], "temperature": ["hot", [1.0], True], "top_p": ["x", {}],
        "n": [True, 2.0, "2"], "stop": [5, [1, 2], {"a": "b"}], "seed": [1.5, "1"], "logprobs": [True, "3", 2.5],
        "stream": ["yes", 1], "echo": ["yes", 0], "stream_options": ["x", [1], {"include_usage": "yes"}],
        "stop_token_ids": ["x", [1.5], [-1]], "top_k": ["x", 1.5], "min_tokens": ["x", -1],
        "presence_penalty": ["x"], "frequency_penalty": [[]], "repetition_penalty": ["x"],
        "ignore_eos": ["x"], "skip_special_tokens": [1], "prompt_logprobs": ["x", -1, 21, 1.5], "model": [5, []],
    }
    for name, values in wrong_types.items():
        for value in values:
            cases.append(Case(f"{name}={json.dumps(value)[:20]}", body={"prompt": "x", name: value}))
    out_of_range = {"max_tokens": [0, -1, 10**9, 2**70], "temperature": [-1, 1e9], "top_p": [0, 1.5, -0.1],
                    "n": [0, 1000], "top_k": [-5], "min_p": [2.0], "seed": [2**70, -(2**70)],
                    "logprobs": [21, -1], "presence_penalty": [5.0], "repetition_penalty": [0.0, -1.0],
                    "stop": [["a"] * 100, ["x" * 1000], [""]], "min_tokens": [10**9]}
    for name, values in out_of_range.items():
        for value in values:
            cases.append(Case(f"{name} out of range {json.dumps(value)[:20]}", body={"prompt": "x", name: value}))
    for name, value in {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
                        "functions": [{"name": "f"}], "function_call": "auto",
                        "response_format": {"type": "json_object"}, "logit_bias": {"1": 5}, "best_of": 3,
                        "guided_json": {"type": "object"}, "guided_regex": "a+", "structured_outputs": {"json": {}},
                        "chat_template": "{{ 1 }}", "modalities": ["audio"]}.items():
        cases.append(Case(f"unsupported {name}", path="/v1/chat/completions", body={**ok_chat, name: value}))
    cases.append(Case("unsupported suffix", body={"prompt": "x", "suffix": "y"}))
    big = target.max_prompt_chars
    prompts: dict[str, Any] = {
        "[1.5]": [1.5], "[1, 'a']": [1, "a"], "[[]]": [[]], "[[1, 'x']]": [[1, "x"]], "object": {"a": 1},
        "empty": "", "[]": [], "65 prompts": ["x"] * 65, "over the character limit": "x" * (big + 1),
        "token out of range": [1, 2, 10**6], "token of 300 bits": [2**300], "negative token": [-5],
        "too many tokens": [65] * 100_000, "special-token text": "a</s>b<s>", "null": None,
        "mixed batch": ["x", [1, 2]], "true": True,
    }
    for what, prompt in prompts.items():
        cases.append(Case(f"prompt {what}", body={"prompt": prompt, "max_tokens": 2}))
    messages: dict[str, Any] = {
        "image_url": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        "bad role": [{"role": "wizard", "content": "x"}], "content number": [{"role": "user", "content": 5}],
        "tool_calls": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}],
        "name with special token": [{"role": "user", "content": "x", "name": "</s>"}],
        "1025 messages": [{"role": "user", "content": "x"}] * 1025,
        "257 parts": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 257}],
        "over the character limit": [{"role": "user", "content": "x" * (big + 1)}],
        "empty list": [], "not a list": "hello", "part without text": [{"role": "user", "content": [{"type": "text"}]}],
        "special-token text": [{"role": "user", "content": "<s>a</s>"}],
    }
    for what, value in messages.items():
        cases.append(Case(f"messages {what}", path="/v1/chat/completions", body={"messages": value, "max_tokens": 2}))
    cases.append(Case("model name of 500 kB", body={"prompt": "x", "model": "m" * 500_000}))
    cases.append(Case("unknown model", body={"prompt": "x", "model": "gpt-17"}))
    cases.append(Case("body over the limit", body=b'{"prompt": "' + b"x" * target.max_body_bytes + b'"}',
                      headers={"Content-Type": "application/json"}))
    cases.append(Case("detokenize out of range", path="/detokenize", body={"tokens": [10**6]}))
    cases.append(Case("detokenize of 200k tokens", path="/detokenize", body={"tokens": [65] * 200_000}))
    cases.append(Case("tokenize both prompt and messages", path="/tokenize",
                      body={"prompt": "x", "messages": [{"role": "user", "content": "x"}]}))
    for method in ("PUT", "DELETE", "PATCH"):
        cases.append(Case(f"method {method}", method, "/v1/completions", {"prompt": "x"}))
    host, port = target.address
    auth = f"Authorization: Bearer {target.key}\r\n"
    raws = {
        "garbage request line": b"HELLO\r\n\r\n",
        "no Host in HTTP/1.1": f"GET /v1/models HTTP/1.1\r\n{auth}\r\n".encode(),
        "header of 20 kB": f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nX-A: {'a' * 20_000}\r\n\r\n".encode(),
        "500 headers": (f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n{auth}" + "X-A: b\r\n" * 500 + "\r\n").encode(),
        "bad chunked body": (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json"
                             "\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nxx\r\n0\r\n\r\n").encode(),
        "content-length and chunked": (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 5"
                                       "\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode(),
        "negative content-length": f"POST /tokenize HTTP/1.1\r\nHost: {host}\r\nContent-Length: -1\r\n\r\n".encode(),
        "HTTP/1.0": "GET /health HTTP/1.0\r\n\r\n".encode(),
        "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "CONNECT": f"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        "absolute URI": f"GET http://{host}:{port}/health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        "path traversal": f"GET /../../etc/passwd HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode(),
        "NUL in path": f"GET /v1/models%00 HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode(),
        "URL of 30 kB": f"GET /{'a' * 30_000} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        "pipelined x3": (f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n" * 3).encode(),
        "websocket upgrade": (f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\nSec-WebSocket-Key: x\r\n"
                              "Sec-WebSocket-Version: 13\r\n\r\n").encode(),
        "Expect: 100-continue": (f"POST /tokenize HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
                                 "Content-Length: 15\r\nExpect: 100-continue\r\n\r\n{\"prompt\": \"x\"}").encode(),
        "content-length lies short": (f"POST /tokenize HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json"
                                      "\r\nContent-Length: 5\r\n\r\n{\"prompt\": \"x\"}").encode(),
    }
    for what, raw in raws.items():
        cases.append(Case(f"raw HTTP: {what}", raw=raw))
    return cases


def send_raw(target: Target, raw: bytes, timeout: float = 5.0) -> str:
    """Write `raw` to a fresh connection and return the status of the first response ("closed" if the
    server closed without one, "timeout" if it said nothing)."""
    with socket.create_connection(target.address, timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            data = sock.recv(4096)
        except socket.timeout:
            return "timeout"
        except ConnectionError:
            return "closed"
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return match.group(1).decode() if match else "closed"


def run_corpus(target: Target) -> dict[str, Any]:
    cases = corpus(target)
    statuses: Counter[str] = Counter()
    server_errors: list[str] = []
    with httpx.Client(base_url=target.url, timeout=30) as client:
        for case in cases:
            if case.raw is not None:
                status = send_raw(target, case.raw)
            else:
                headers = {**(target.auth if case.auth else {}), **case.headers}
                kwargs: dict[str, Any] = {"content": case.body} if isinstance(case.body, bytes) else \
                    ({"json": case.body} if case.body is not None else {})
                try:
                    status = str(client.request(case.method, case.path, headers=headers, **kwargs).status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
            statuses[status] += 1
            if status.startswith("5"):
                server_errors.append(f"{case.name}: {status}")
    healthy = httpx.get(f"{target.url}/health", timeout=10).status_code == 200
    return {"cases": len(cases), "status_counts": dict(sorted(statuses.items())), "5xx": len(server_errors),
            "5xx_cases": server_errors[:20], "healthy_after": healthy}


# ---- 2. the disconnect storm ------------------------------------------------------------------------------
async def _storm(target: Target, n: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
    statuses: Counter[str] = Counter()

    async def one(client: httpx.AsyncClient, i: int) -> None:
        drop = i % 2 == 0
        body = {"prompt": f"storm {i}", "stream": True, "max_tokens": 2000 if drop else 16, "ignore_eos": True}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                statuses[str(response.status_code)] += 1
                async for line in response.aiter_lines():
                    if drop and line.startswith("data: "):
                        return  # leaving drops the connection mid-stream
        except httpx.HTTPError as e:
            statuses[type(e).__name__] += 1

    async with httpx.AsyncClient(base_url=target.url, headers=target.auth, timeout=120, limits=limits) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    return {"streams": n, "dropped": n // 2 + n % 2, "statuses": dict(statuses),
            "5xx": sum(v for k, v in statuses.items() if k.startswith("5"))}


def disconnect_storm(target: Target, n: int) -> dict[str, Any]:
    result = asyncio.run(_storm(target, n))
    time.sleep(0.5)
    result.update(leaks(target))
    return result


def leaks(target: Target) -> dict[str, int]:
    m = target.metrics()
    return {"running_after": int(m["carpool:num_requests_running"]),
            "waiting_after": int(m["carpool:num_requests_waiting"]),
            "kv_blocks_after": round(m["carpool:kv_cache_usage_perc"] * m["carpool:kv_cache_blocks"])}


# ---- 3. the slow-header flood -------------------------------------------------------------------------------
def slow_flood(target: Target, n: int, wait_s: float) -> dict[str, Any]:
    """n connections: two thirds stop mid-headers, a third mid-body (with the key); all trickle a byte
    every 0.5 s. Returns how many the server closed, and when."""
    host, _ = target.address
    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    closed_after: list[float] = []
    got_408 = 0
    with HealthProbe(target.url) as probe:
        for i in range(n):
            sock = socket.create_connection(target.address, timeout=5)
            if i % 3 == 2:
                sock.sendall((f"POST /tokenize HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {target.key}\r\n"
                              "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{").encode())
            else:
                sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n".encode())
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
            opened[sock] = time.monotonic()
        deadline = time.monotonic() + wait_s
        next_trickle = time.monotonic() + 0.5
        while opened and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                except (BlockingIOError, ConnectionError):
                    data = b""
                if data.startswith(b"HTTP/1.1 408"):
                    got_408 += 1
                sel.unregister(sock)
                closed_after.append(time.monotonic() - opened.pop(sock))  # type: ignore[arg-type]
                sock.close()  # type: ignore[union-attr]
            if time.monotonic() >= next_trickle:
                next_trickle += 0.5
                for sock in list(opened):
                    try:
                        sock.send(b"x")
                    except OSError:
                        pass
        still_open = len(opened)
        for sock in opened:
            sock.close()
    return {"connections": n, "closed_by_server": len(closed_after), "still_open_after_s": round(wait_s, 1),
            "still_open": still_open, "answered_408": got_408,
            "closed_after_s_max": round(max(closed_after, default=0.0), 2), "health": probe.summary()}


# ---- 4. the large-request flood -----------------------------------------------------------------------------
def flood_requests(target: Target) -> list[tuple[str, str, dict[str, str], bytes]]:
    """(name, path, headers, body) of requests at the server's size limits."""
    chars = target.max_prompt_chars
    at_limit = "x" * chars
    json_headers = {"Content-Type": "application/json"}
    auth = {**json_headers, **target.auth}
    body_at_limit = b'{"prompt": "' + b"y" * (target.max_body_bytes - 32) + b'"}'
    return [
        ("completion, prompt at the char limit", "/v1/completions", auth,
         json.dumps({"prompt": at_limit, "max_tokens": 1}).encode()),
        ("tokenize, prompt at the char limit", "/tokenize", auth, json.dumps({"prompt": at_limit}).encode()),
        ("chat, content at the char limit", "/v1/chat/completions", auth,
         json.dumps({"messages": [{"role": "user", "content": at_limit}], "max_tokens": 1}).encode()),
        ("completion, body at the byte limit", "/v1/completions", auth, body_at_limit),
        ("unauthenticated tokenize, body at the byte limit", "/tokenize", json_headers, body_at_limit),
        ("completion, body past the byte limit", "/v1/completions", auth, body_at_limit + b" " * 64),
        ("detokenize, max_model_len ids", "/detokenize", auth,
         json.dumps({"tokens": [65] * target.max_model_len}).encode()),
        ("detokenize, ids at the byte limit", "/detokenize", auth,
         json.dumps({"tokens": [65] * ((target.max_body_bytes - 32) // 4)}).encode()),
    ]


def flood_worker(target: Target, duration_s: float, seed: int) -> dict[str, Any]:
    """Send the flood's requests round robin until `duration_s` passed; statuses by request kind."""
    requests = flood_requests(target)
    statuses: dict[str, Counter[str]] = {name: Counter() for name, *_ in requests}
    deadline = time.monotonic() + duration_s
    i = seed
    with httpx.Client(base_url=target.url, timeout=60) as client:
        while time.monotonic() < deadline:
            name, path, headers, body = requests[i % len(requests)]
            i += 1
            try:
                status = str(client.post(path, content=body, headers=headers).status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            statuses[name][status] += 1
    return {name: dict(c) for name, c in statuses.items()}


def large_request_flood(target: Target, duration_s: float = 3.0, workers: int = 4) -> dict[str, Any]:
    """`workers` processes send requests at the size limits for `duration_s` while /health is probed and
    an already running stream is timed. Latencies are measured in this process, which sends nothing else."""
    args = [sys.executable, os.path.abspath(__file__), "--flood-worker", "--url", target.url, "--api-key", target.key,
            "--max-model-len", str(target.max_model_len), "--max-prompt-chars", str(target.max_prompt_chars),
            "--max-body-bytes", str(target.max_body_bytes), "--duration", str(duration_s)]
    with RunningStream(target) as stream, HealthProbe(target.url) as probe:
        start = time.perf_counter()
        procs = [subprocess.Popen([*args, "--seed", str(i)], stdout=subprocess.PIPE, text=True)
                 for i in range(workers)]
        outputs = [p.communicate(timeout=duration_s + 120)[0] for p in procs]
        end = time.perf_counter()
    statuses: dict[str, Counter[str]] = {}
    for out in outputs:
        for name, counts in json.loads(out).items():
            statuses.setdefault(name, Counter()).update(counts)
    total = sum(sum(c.values()) for c in statuses.values())
    server_errors = sum(v for c in statuses.values() for k, v in c.items() if k.startswith("5"))
    gaps = stream.gaps(start, end)
    return {"workers": workers, "duration_s": round(end - start, 2), "requests": total, "5xx": server_errors,
            "statuses": {name: dict(c) for name, c in statuses.items()}, "health": probe.summary(),
            "stream": {"events": len(gaps) + 1 if gaps else 0, "error": stream.error, **ms_stats(gaps)}}


# ---- 5. the connection cap ------------------------------------------------------------------------------------
def connection_cap(target: Target, extra: int) -> dict[str, Any]:
    """Open max_connections + extra idle connections; count those refused at once with a 503."""
    socks = []
    refused = 0
    try:
        for _ in range(target.max_connections + extra):
            socks.append(socket.create_connection(target.address, timeout=5))
        time.sleep(0.3)
        for sock in socks:
            sock.setblocking(False)
            try:
                if sock.recv(64).startswith(b"HTTP/1.1 503"):
                    refused += 1
            except BlockingIOError:
                pass
    finally:
        for sock in socks:
            sock.close()
    return {"opened": len(socks), "max_connections": target.max_connections, "refused_503": refused}


# ---- the run -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one on 127.0.0.1)")
    p.add_argument("--api-key", default=KEY)
    p.add_argument("--max-model-len", type=int, default=None, help="(default: as /v1/models says)")
    p.add_argument("--max-prompt-chars", type=int, default=None)
    p.add_argument("--max-body-bytes", type=int, default=None)
    p.add_argument("--header-timeout", type=float, default=2.0, help="the started server's header/body timeout")
    p.add_argument("--max-connections", type=int, default=1200, help="the started server's connection cap")
    p.add_argument("--quick", action="store_true", help="smaller counts and shorter floods")
    p.add_argument("--flood-workers", type=int, default=4,
                   help="processes sending maximal requests back to back in the large-request flood (default: 4)")
    p.add_argument("--flood-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=3.0, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.url is not None and urlsplit(ns.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url: only a server on this machine (127.0.0.1) may be targeted")
    if ns.probe_worker:
        print(json.dumps(probe_worker(ns.url)))
        return 0
    if ns.flood_worker:
        target = Target(ns.url, ns.api_key, ns.max_model_len, ns.max_prompt_chars, ns.max_body_bytes, 0.0, 0)
        print(json.dumps(flood_worker(target, ns.duration, ns.seed)))
        return 0

    started = time.monotonic()
    machine = {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if ns.url is None:
        target = start_server(ns.header_timeout, ns.max_connections)
    else:
        from carpool.entrypoints.openai.serving import default_max_body_bytes, default_max_prompt_chars

        (card,) = httpx.get(f"{ns.url}/v1/models", headers={"Authorization": f"Bearer {ns.api_key}"}).json()["data"]
        max_model_len = ns.max_model_len or card["max_model_len"]
        chars = ns.max_prompt_chars or default_max_prompt_chars(max_model_len)
        target = Target(ns.url, ns.api_key, max_model_len, chars, ns.max_body_bytes or default_max_body_bytes(chars),
                        ns.header_timeout, ns.max_connections)
    quick = ns.quick
    try:
        result: dict[str, Any] = {"machine": machine, "server": {"url": target.url,
                                                                 "max_model_len": target.max_model_len,
                                             "max_prompt_chars": target.max_prompt_chars,
                                             "max_body_bytes": target.max_body_bytes,
                                             "header_and_body_timeout_s": target.header_timeout_s,
                                             "max_connections": target.max_connections}}
        result["corpus"] = run_corpus(target)
        result["disconnect_storm"] = disconnect_storm(target, 60 if quick else 200)
        result["slow_flood"] = slow_flood(target, 150 if quick else 1000, target.header_timeout_s + 3.0)
        result["large_request_flood"] = large_request_flood(target, 3.0 if quick else 10.0, ns.flood_workers)
        if target.proc is not None:  # only where this run knows the cap and may fill it
            result["connection_cap"] = connection_cap(target, 20 if quick else 50)
            time.sleep(target.header_timeout_s + 1.0)  # the idle ones time out
        result["leaked"] = leaks(target)
        result["healthy_after"] = httpx.get(f"{target.url}/health", timeout=10).status_code == 200
    finally:
        code = stop_server(target)
    floods = [result["slow_flood"]["health"], result["large_request_flood"]["health"]]
    result["cases"] = result["corpus"]["cases"]
    result["status_counts"] = result["corpus"]["status_counts"]
    result["5xx"] = (result["corpus"]["5xx"] + result["disconnect_storm"]["5xx"]
                     + result["large_request_flood"]["5xx"]
                     + sum(v for h in floods for k, v in h["statuses"].items() if k.startswith("5")))
    result["health_max_ms_during_floods"] = max(h["max_ms"] for h in floods)
    result["health_p99_ms_during_large_request_flood"] = result["large_request_flood"]["health"]["p99_ms"]
    result["stream_gap_p99_ms_during_large_request_flood"] = result["large_request_flood"]["stream"]["p99_ms"]
    if target.proc is not None:
        log = target.log()
        result["server_log"] = {"lines": len(log.splitlines()), "tracebacks": log.count("Traceback"),
                                "exit_status": code}
    leaked = result["leaked"]
    result["ok"] = (result["5xx"] == 0 and result["healthy_after"]
                    and result["health_p99_ms_during_large_request_flood"] < 100
                    and result["stream_gap_p99_ms_during_large_request_flood"] < 100
                    and result["slow_flood"]["still_open"] == 0
                    and leaked["running_after"] == leaked["waiting_after"] == leaked["kv_blocks_after"] == 0
                    and result["disconnect_storm"]["running_after"] == 0
                    and result["disconnect_storm"]["kv_blocks_after"] == 0)
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
