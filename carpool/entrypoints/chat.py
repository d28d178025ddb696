"""`carpool chat [MODEL]`: an interactive terminal chat that streams each reply as it is generated.

By default the model runs in this process (the Engine stepped directly, DELTA outputs printed as they
come). With --url it talks to a running `carpool serve` (or any OpenAI-compatible server) instead.
Commands: /reset forgets the conversation, /exit (or end of input) quits; Ctrl-C stops a reply.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from carpool.engine.arg_utils import EngineArgs
from carpool.entrypoints.cli import add_sampling_args, sampling_params_from_args, subcommand
from carpool.sampling_params import RequestOutputKind, SamplingParams

Message = dict[str, str]


class ChatBackend(Protocol):
    def reply(self, messages: list[Message]) -> Iterator[str]: ...


class LocalBackend:
    """The model in this process."""

    def __init__(self, ns: argparse.Namespace) -> None:
        from carpool.engine.llm_engine import Engine

        self.engine = Engine.from_engine_args(EngineArgs.from_cli_args(ns))
        self.params = sampling_params_from_args(ns, output_kind=RequestOutputKind.DELTA, n=1, logprobs=None)
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("model: this model's tokenizer has no chat template")

    def reply(self, messages: list[Message]) -> Iterator[str]:
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore
        prompt_ids = list(tok(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        params: SamplingParams = self.params.clone()
        params.max_tokens = min(params.max_tokens or 1 << 30,
                                self.engine.config.scheduler.max_model_len - len(prompt_ids))
        if params.max_tokens < 1:
            raise ValueError("the conversation fills the model's context; /reset to start over")
        request_id = self.engine.add_request(None, prompt_ids, params)
        # Ctrl-C must not land inside a step (it would leave the engine half updated): it only sets a
        # flag, checked between steps, that ends this reply.
        stop = threading.Event()
        previous = (signal.signal(signal.SIGINT, lambda *_: stop.set())
                    if threading.current_thread() is threading.main_thread() else None)
        try:
            while self.engine.has_unfinished_requests() and not stop.is_set():
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out.outputs[0].text if out.outputs else ""
                        if out.finished:
                            return
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self.engine.abort(request_id)  # no-op once finished


class RemoteBackend:
    """A server's /v1/chat/completions, streamed."""

    def __init__(self, ns: argparse.Namespace) -> None:
        import httpx

        self.base = ns.url.rstrip("/")
        headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(None, connect=10.0))
        self.body: dict[str, Any] = {"max_tokens": ns.max_tokens, "temperature": ns.temperature,
                                     "top_p": ns.top_p, "stream": True}
        if ns.stop:
            self.body["stop"] = ns.stop
        models = self.client.get(f"{self.base}/v1/models")
        models.raise_for_status()
        self.body["model"] = models.json()["data"][0]["id"]

    def reply(self, messages: list[Message]) -> Iterator[str]:
        body = {**self.body, "messages": messages}
        with self.client.stream("POST", f"{self.base}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                raise ValueError(resp.json().get("error", {}).get("message", f"HTTP {resp.status_code}"))
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise ValueError(chunk["error"]["message"])
                for choice in chunk.get("choices", []):
                    yield choice.get("delta", {}).get("content") or ""


def chat_loop(backend: ChatBackend, system: str | None, out: Any = None) -> int:
    out = out or sys.stdout
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    start = len(history)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=out)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            del history[start:]
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        parts: list[str] = []
        try:
            for piece in backend.reply(history):
                parts.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        except ValueError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(parts)})


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or Hugging Face repo id to run here (default: the demo model)")
    p.add_argument("--url", default=None,
                   help="chat with a running server at this base URL (e.g. http://127.0.0.1:8000) "
                        "instead of loading the model in this process")
    p.add_argument("--api-key", default=os.environ.get("CARPOOL_API_KEY"),
                   help="API key for --url (default: $CARPOOL_API_KEY)")
    p.add_argument("--system", default=None, help="system prompt that starts the conversation")
    EngineArgs.add_cli_args(p, model_flag=False)
    add_sampling_args(p)
    p.set_defaults(max_tokens=256)


@subcommand("chat", "interactive terminal chat that streams replies (in-process, or --url SERVER)", _chat_args)
def run_chat(ns: argparse.Namespace) -> int:
    backend: ChatBackend = RemoteBackend(ns) if ns.url else LocalBackend(ns)
    return chat_loop(backend, ns.system)
