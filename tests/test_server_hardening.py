"""`carpool serve` against hostile or careless clients (issue 24): work bounded before it starts and kept
off the event loop, quiet disconnects, JSON-only bodies, slow connections closed, unsupported fields
refused, user text never turned into special tokens, errors in the client's terms.

Real server processes on 127.0.0.1 (the demo model), driven by raw HTTP and sockets where a client
library would not send the case."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time

import httpx
import openai
import pytest
from server_utils import ServerProcess

from carpool.entrypoints.cli import build_parser
from carpool.entrypoints.openai.serving import default_max_body_bytes, default_max_prompt_chars

KEY = "h4rd"
MAX_MODEL_LEN = 4096  # the demo model's
MAX_PROMPT_CHARS = default_max_prompt_chars(MAX_MODEL_LEN)
NUM_KV_BLOCKS = 200  # x 16 tokens: less than max_model_len, so KV capacity is what limits a request
TIMEOUT_S = 1.0


def load_abuse_script():
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "abuse.py")
    spec = importlib.util.spec_from_file_location("carpool_scripts_abuse", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hardened():
    """An API key, /metrics open, special-token text split in completions, 1-second header and body
    timeouts, at most 64 connections, a KV cache smaller than max_model_len. One torch thread: on a
    small machine the engine core then leaves a core to the server, as the flood test needs."""
    s = ServerProcess("--request-header-timeout", str(TIMEOUT_S), "--request-body-timeout", str(TIMEOUT_S),
                      "--max-connections", "64", "--allow-unauthenticated-metrics", "--split-special-tokens",
                      "--num-kv-blocks", str(NUM_KV_BLOCKS), api_key=KEY, env={"OMP_NUM_THREADS": "1"})
    yield s
    assert s.terminate() == 0, s.log()


def post(server: ServerProcess, path: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={**server.headers, **headers}, timeout=30)


# ---- 1. large requests --------------------------------------------------------------------------------
def test_flood_of_maximal_requests_leaves_health_and_a_running_stream_answering(hardened):
    """Requests at every size limit (prompts of --max-prompt-chars characters to each route that
    tokenizes, bodies at and past the body limit, with and without the key) from two processes, while
    /health is probed and an earlier stream is timed. Target: p99 under 100 ms for both. The budget is
    100 ms over what the same probes measure idle just before, so that a machine busy with other work
    does not fail the test: a server that tokenized on its event loop, or tokenized before checking
    sizes, stalls for hundreds of milliseconds per request at these sizes."""
    abuse = load_abuse_script()
    target = abuse.Target(hardened.url, KEY, MAX_MODEL_LEN, MAX_PROMPT_CHARS, default_max_body_bytes(MAX_PROMPT_CHARS),
                          TIMEOUT_S, 64)
    with abuse.RunningStream(target) as stream, abuse.HealthProbe(target.url) as probe:
        start = time.perf_counter()
        time.sleep(1.5)
        idle_end = time.perf_counter()
    idle_health = abuse.ms_stats(probe.latencies)["p99_ms"]
    idle_stream = abuse.ms_stats(stream.gaps(start, idle_end))["p99_ms"]

    flood = abuse.large_request_flood(target, duration_s=3.0, workers=2)
    assert flood["5xx"] == 0 and flood["requests"] >= 8, flood
    statuses = flood["statuses"]
    assert set(statuses["completion, prompt at the char limit"]) == {"400"}  # too many tokens, said after
    assert set(statuses["completion, body past the byte limit"]) == {"413"}
    assert set(statuses["unauthenticated tokenize, body at the byte limit"]) == {"401"}
    assert flood["health"]["statuses"] == {"200": flood["health"]["probes"]}
    assert flood["health"]["p99_ms"] < 100 + idle_health, (flood, idle_health)
    assert flood["stream"]["error"] is None and flood["stream"]["events"] >= 10, flood
    assert flood["stream"]["p99_ms"] < 100 + idle_stream, (flood, idle_stream)


def test_a_prompt_past_the_character_limit_is_refused_before_tokenizing(hardened):
    over = "x" * (MAX_PROMPT_CHARS + 1)
    for path, body, param in [("/v1/completions", {"prompt": over}, "prompt"),
                              ("/v1/completions", {"prompt": ["ok", over]}, "prompt"),
                              ("/tokenize", {"prompt": over}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": over}]}, "messages"),
                              ("/tokenize", {"messages": [{"role": "user", "content": over[:-9]},
                                                          {"role": "user", "content": "x" * 10}]}, "messages")]:
        r = post(hardened, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)
        assert str(MAX_PROMPT_CHARS) in r.json()["error"]["message"]
    # at the limit it is tokenized (and is then too many tokens for the model)
    r = post(hardened, "/v1/completions", {"prompt": "x" * MAX_PROMPT_CHARS})
    assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]


def test_help_states_the_size_limits_and_how_they_derive_from_max_model_len():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = " ".join(serve.format_help().split())
    assert "--max-prompt-chars" in text and "16 x max_model_len" in text
    assert "--max-request-body-bytes" in text and "8 x --max-prompt-chars" in text
    assert "$CARPOOL_API_KEY" in text and "ps" in text


# ---- 2. /metrics open by flag only ------------------------------------------------------------------------
def test_allow_unauthenticated_metrics_opens_metrics_and_nothing_else(hardened):
    assert httpx.get(f"{hardened.url}/metrics").status_code == 200
    for path in ("/version", "/v1/models", "/openapi.json", "/tokenizer_info"):
        assert httpx.get(hardened.url + path).status_code == 401, path


# ---- 3. disconnects while sending the body ---------------------------------------------------------------
def test_clients_that_disconnect_mid_body_leave_at_most_a_line_each_in_the_log(hardened):
    host, port = "127.0.0.1", int(hardened.url.rsplit(":", 1)[1])
    before = len(hardened.log().splitlines())
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        for _ in range(3):
            with socket.create_connection((host, port)) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                             "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"prompt".encode())
                time.sleep(0.05)
    time.sleep(0.3)
    new = hardened.log().splitlines()[before:]
    assert len(new) <= 12 and "Traceback" not in "\n".join(new), new
    assert httpx.get(f"{hardened.url}/health").status_code == 200


# ---- 4. JSON bodies only -------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp", None])
def test_a_body_that_is_not_declared_json_is_a_415(demo_server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        r = httpx.post(demo_server.url + path, content=b'{"prompt": "x", "max_tokens": 1}', headers=headers)
        if content_type is None:  # httpx sends no Content-Type for raw bytes; make sure of it
            assert "content-type" not in r.request.headers
        assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type", (path, r.text)
    ok = httpx.post(f"{demo_server.url}/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}',
                    headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200


# ---- 6. slow connections --------------------------------------------------------------------------------
def _port(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_connections_that_never_finish_headers_or_body_are_closed_after_the_timeout(hardened):
    socks = []
    for i in range(30):
        sock = socket.create_connection(("127.0.0.1", _port(hardened)), timeout=10)
        if i % 3 == 0:  # headers done, body never finished
            sock.sendall(f"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: "
                         "application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
        elif i % 3 == 1:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)  # (the rest send nothing at all)
    start = time.monotonic()
    for _ in range(4):  # a byte now and then does not extend the deadline
        time.sleep(TIMEOUT_S / 4)
        assert httpx.get(f"{hardened.url}/health").status_code == 200
        for sock in socks:
            try:
                sock.send(b"X")
            except OSError:
                pass
    answers = []
    for sock in socks:
        data = b""
        try:
            while chunk := sock.recv(1024):  # until the server closes it
                data += chunk
        except ConnectionResetError:
            pass
        answers.append(data)
        sock.close()
    elapsed = time.monotonic() - start
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 3, elapsed
    assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) == 20  # those still sending headers


def test_connections_past_the_cap_get_a_503_and_are_closed(hardened):
    socks = [socket.create_connection(("127.0.0.1", _port(hardened)), timeout=10) for _ in range(70)]
    try:
        time.sleep(0.3)
        refused = 0
        for sock in socks:
            sock.setblocking(False)
            try:
                data = sock.recv(200)
            except BlockingIOError:
                continue
            assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in data
            refused += 1
        assert 6 <= refused <= 10  # 64 admitted (an idle keep-alive connection of this process may hold one)
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{hardened.url}/health").status_code == 200


# ---- 7. unsupported fields ---------------------------------------------------------------------------------
MESSAGES = [{"role": "user", "content": "Hi"}]
UNSUPPORTED = [
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
    ("/v1/chat/completions", "logit_bias", {"65": 10}),
    ("/v1/chat/completions", "guided_json", {"type": "object"}),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/completions", "response_format", {"type": "json_object"}),
    ("/v1/completions", "suffix", "the end"),
    ("/v1/completions", "best_of", 3),
    ("/v1/completions", "guided_regex", "[a-z]+"),
]


@pytest.mark.parametrize("path,field,value", UNSUPPORTED,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{f}" for p, f, _ in UNSUPPORTED])
def test_an_unsupported_field_is_a_400_naming_it(demo_server, path, field, value):
    body = {"messages": MESSAGES} if "chat" in path else {"prompt": "Hi"}
    r = post(demo_server, path, {**body, field: value, "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: not supported")


def test_unsupported_fields_with_no_op_values_are_accepted(demo_server):
    client = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2, tools=[], tool_choice="none",
                                       response_format={"type": "text"}, logit_bias={})
    # accepted and served (a sampled end-of-text token may end it before max_tokens)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 2
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])
    bad = post(demo_server, "/v1/chat/completions", {"messages": [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function"}]}], "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    assert bad.json()["error"]["message"].startswith("messages.0: tool_calls: not supported")


# ---- 8. user text never becomes special tokens ---------------------------------------------------------------
def specials_of(tokenizer) -> tuple[str, str, int, int]:
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    assert {bos, eos} <= set(tokenizer.all_special_tokens)
    return bos, eos, tokenizer.bos_token_id, tokenizer.eos_token_id


@pytest.mark.parametrize("arch", ["demo", "llama", "qwen2", "qwen3", "mistral"])
def test_chat_content_never_produces_special_tokens(arch, checkpoint_factory, demo_llm):
    from transformers import AutoTokenizer

    from carpool.entrypoints.openai.protocol import ChatMessage
    from carpool.entrypoints.openai.serving_chat import render_chat_prompt

    tok = demo_llm.get_tokenizer() if arch == "demo" else AutoTokenizer.from_pretrained(checkpoint_factory(arch))
    bos, eos, bos_id, eos_id = specials_of(tok)
    hostile = f"a{eos}b{bos}  "
    messages = [ChatMessage(role="system", content=f"{bos}sys"), ChatMessage(role="user", content=hostile)]
    ids = render_chat_prompt(tok, messages, add_generation_prompt=True)
    text = tok.apply_chat_template([m.model_dump(exclude_none=True) for m in messages], tokenize=False,
                                   add_generation_prompt=True)
    # the template's own BOS is the only special token; every character of the content is plain text
    assert ids.count(bos_id) == 1 and ids[0] == bos_id and eos_id not in ids
    assert tok.decode(ids) == text
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert plain.count(eos_id) == 1 and plain.count(bos_id) == 3  # what tokenizing the text whole gives


@pytest.mark.parametrize("arch", ["demo", "llama", "qwen2", "qwen3", "mistral"])
def test_completion_prompts_keep_vllms_default_and_split_special_tokens_on_request(arch, checkpoint_factory,
                                                                                  demo_llm):
    from transformers import AutoTokenizer

    from carpool.entrypoints.openai.serving import splitting_copy, tokenize_text

    tok = demo_llm.get_tokenizer() if arch == "demo" else AutoTokenizer.from_pretrained(checkpoint_factory(arch))
    bos, eos, bos_id, eos_id = specials_of(tok)
    hostile = f"a{eos}b{bos}"
    split = splitting_copy(tok)
    assert eos_id in tokenize_text(tok, hostile, True)  # vLLM's default: the text is the prompt
    ids = tokenize_text(split, hostile, True)
    assert eos_id not in ids and ids.count(bos_id) == 1 and tok.decode(ids[1:]) == hostile
    assert eos_id in tokenize_text(tok, hostile, True)  # the shared tokenizer was never switched


def test_a_template_that_trims_content_still_splits_special_tokens(demo_llm):
    from carpool.demo import build_byte_tokenizer
    from carpool.entrypoints.openai.protocol import ChatMessage
    from carpool.entrypoints.openai.serving_chat import render_chat_prompt

    tok = build_byte_tokenizer(chat_template="{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                                             "{{ m['content'] | trim }}{{ eos_token }}{% endfor %}")
    _, eos, bos_id, eos_id = specials_of(tok)
    ids = render_chat_prompt(tok, [ChatMessage(role="user", content=f"  x{eos}y  ")], add_generation_prompt=False)
    assert ids.count(eos_id) == 1 and ids[-1] == eos_id and ids.count(bos_id) == 1  # the template's only
    assert tok.decode(ids) == f"<s>[user] x{eos}y{eos}"


def test_special_token_text_in_prompts_through_the_server(demo_server, hardened, demo_llm):
    tok = demo_llm.get_tokenizer()
    bos, eos, bos_id, eos_id = specials_of(tok)
    hostile = f"a{eos}b{bos}"
    chat = post(demo_server, "/tokenize", {"messages": [{"role": "user", "content": hostile}]}).json()["tokens"]
    assert chat.count(bos_id) == 1 and eos_id not in chat
    usage = post(demo_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": hostile}],
                                                       "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == len(chat)
    # /v1/completions keeps vLLM's default (the text is the prompt, special tokens included) ...
    default = post(demo_server, "/tokenize", {"prompt": hostile}).json()["tokens"]
    assert default == tok(hostile)["input_ids"] and eos_id in default
    # ... and --split-special-tokens keeps it text (BOS added by the tokenizer only)
    split = post(hardened, "/tokenize", {"prompt": hostile}).json()["tokens"]
    assert split == [bos_id] + list(hostile.encode())
    r = post(hardened, "/v1/completions", {"prompt": hostile, "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == len(split)


# ---- 9. precise errors -----------------------------------------------------------------------------------
PRECISE = [
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     ["top_logprobs: must be in [0, 20], got 21"]),
    ("/v1/completions", {"prompt": [1.5]}, "prompt", ["item 0", "1.5"]),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt", ["item 1", "'a'", "integers"]),
    ("/v1/completions", {"prompt": [[1, 2], [3, 4.5]]}, "prompt", ["prompt 1", "item 1", "4.5"]),
    ("/v1/completions", {"prompt": [[1, 2], "x"]}, "prompt", ["item 1", "'x'"]),
    ("/v1/completions", {"prompt": {"text": "x"}}, "prompt", ["an object"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages",
     ["messages.0.content", "'image_url'", "images are not supported"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages",
     ["messages.0.content", "part 0", "text"]),
    ("/v1/completions", {"prompt": "x", "seed": 10**80}, "seed", ["seed: must be in", "bits"]),
]


@pytest.mark.parametrize("path,body,param,says", PRECISE, ids=[str(i) for i in range(len(PRECISE))])
def test_errors_name_the_field_the_client_got_wrong(demo_server, path, body, param, says):
    r = post(demo_server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error
    assert "valid string" not in error["message"]
    for fragment in says:
        assert fragment in error["message"], (fragment, error["message"])


def test_a_huge_value_is_echoed_as_a_short_prefix_only(demo_server):
    r = post(demo_server, "/v1/completions", {"prompt": "x", "model": "m" * 500_000})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert len(r.text) < 400 and "500000 characters" in r.text
    r = post(demo_server, "/v1/completions", {"prompt": [1, "z" * 100_000]})
    assert r.status_code == 400 and len(r.text) < 400


def test_requests_the_kv_cache_cannot_hold_blame_the_field_with_block_counts(hardened):
    capacity = NUM_KV_BLOCKS * 16
    r = post(hardened, "/v1/completions", {"prompt": [65] * 3000, "max_tokens": 300})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "max_tokens", error
    assert f"{NUM_KV_BLOCKS} blocks of 16 tokens ({capacity} tokens)" in error["message"]
    assert f"at most {capacity - 3000} fit" in error["message"]
    r = post(hardened, "/v1/completions", {"prompt": [65] * capacity, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert f"{NUM_KV_BLOCKS} blocks" in r.json()["error"]["message"]
    r = post(hardened, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 3000}],
                                               "max_completion_tokens": 500})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "max_completion_tokens", error
    assert "max_tokens" not in error["message"] and f"{NUM_KV_BLOCKS} blocks" in error["message"]
    # omitted, max_tokens is what the KV cache leaves, not what max_model_len would
    with httpx.stream("POST", f"{hardened.url}/v1/completions", headers=hardened.headers, timeout=30,
                      json={"prompt": [65] * 3000, "max_tokens": None, "stream": True}) as ok:
        assert ok.status_code == 200
        assert next(line for line in ok.iter_lines() if line.startswith("data: "))


# ---- 11. small gaps ----------------------------------------------------------------------------------------
def test_503_carries_retry_after(demo_server):
    # a dead or shutting-down engine, a full queue (tests/test_server.py) and the connection cap answer
    # 503; all go through the same response. The cap's raw answer is checked above; here, the JSON one.
    from carpool.entrypoints.openai.errors import error_response

    assert error_response(503, "x").headers["retry-after"] == "1"
    assert "retry-after" not in error_response(400, "x").headers


def test_metrics_report_the_kv_cache_size(hardened):
    assert hardened.metrics()["carpool:kv_cache_blocks"] == NUM_KV_BLOCKS


def test_the_hostile_corpus_gets_no_5xx_and_the_server_keeps_answering(hardened):
    abuse = load_abuse_script()
    target = abuse.Target(hardened.url, KEY, MAX_MODEL_LEN, MAX_PROMPT_CHARS, default_max_body_bytes(MAX_PROMPT_CHARS),
                          TIMEOUT_S, 64)
    result = abuse.run_corpus(target)
    assert result["cases"] >= 150 and result["5xx"] == 0 and result["healthy_after"], json.dumps(result)
    assert "Traceback" not in hardened.log()
    m = hardened.metrics()
    assert m["carpool:num_requests_running"] == m["carpool:num_requests_waiting"] == 0


# ---- 10. prompt logprobs through the server ----------------------------------------------------------------
def demo_log_softmax(demo_llm, prompt_ids: list[int]):
    """transformers' float32 log-softmax over the prompt, row i scoring token i + 1."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_llm.engine.config.model.path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, :-1].float(), dim=-1)


def test_lm_eval_harness_loglikelihood_requests_score_the_continuations(hardened, demo_llm):
    """What lm-evaluation-harness's `local-completions` model does for multiple-choice tasks, request for
    request: find the remote tokenizer (/tokenizer_info, /tokenize), encode context and continuation
    apart, send them as one token-id prompt with echo, logprobs 1 and max_tokens 1, and sum
    token_logprobs[ctxlen:-1] (the last entry is the generated token); is_greedy compares each with the
    max of its top_logprobs. The scores must be the model's, not zeros."""
    session = httpx.Client(base_url=hardened.url, headers={"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {KEY}"}, timeout=60)
    info = session.get("/tokenizer_info").json()
    assert isinstance(info, dict) and "eos_token" in info
    assert isinstance(session.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()["tokens"],
                      list)

    def encode(text: str) -> list[int]:
        return session.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

    context = "Question: which animal barks?\nAnswer:"
    choices = [" a dog", " a cat", " the quick brown fox"]
    requests = [(encode(context), encode(c)) for c in choices]
    scores = []
    for batch in (requests[:2], requests[2:]):  # batch_size=2: two prompts in one request
        payload = {"model": "demo", "prompt": [ctx + cont for ctx, cont in batch], "temperature": 0, "max_tokens": 1,
                   "logprobs": 1, "seed": 1234, "echo": True}
        out = session.post("/v1/completions", json=payload).json()
        for choice, (ctx, _) in zip(sorted(out["choices"], key=lambda c: c["index"]), batch):
            ctxlen = len(ctx)
            token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
            top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
            is_greedy = all(tok == max(top.values()) for tok, top in zip(token_logprobs, top_logprobs))
            scores.append((sum(token_logprobs), is_greedy))
    for (ctx, cont), (score, is_greedy) in zip(requests, scores):
        ref = demo_log_softmax(demo_llm, ctx + cont)
        rows = ref[len(ctx) - 1:len(ctx) + len(cont) - 1]
        expected = rows.gather(1, torch_tensor(cont).unsqueeze(1)).sum().item()
        assert score == pytest.approx(expected, abs=1e-3) and score < 0
        assert is_greedy == bool((rows.argmax(dim=1) == torch_tensor(cont)).all())
    assert len({round(s, 3) for s, _ in scores}) == 3  # the choices are told apart


def torch_tensor(values: list[int]):
    import torch

    return torch.tensor(values)


def test_echo_with_logprobs_returns_the_prompt_logprobs_first_streamed_or_not(hardened, demo_llm):
    tok = demo_llm.get_tokenizer()
    prompt = "The quick brown fox jumps"
    ids = tok(prompt)["input_ids"]
    ref = demo_log_softmax(demo_llm, ids)
    body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    full = post(hardened, "/v1/completions", body).json()["choices"][0]
    lp = full["logprobs"]
    assert full["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        assert len(lp["top_logprobs"][i]) in (2, 3)  # the top 2, and the prompt token if not among them
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(ref[i - 1].max().item(), abs=1e-4)
    # streamed: the same, the prompt's entries in the first chunk
    events = []
    with httpx.stream("POST", f"{hardened.url}/v1/completions", json={**body, "stream": True},
                      headers=hardened.headers, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    first = events[0]["choices"][0]
    assert first["text"].startswith(prompt) and first["logprobs"]["token_logprobs"][0] is None
    streamed = [x for e in events for c in e["choices"] for x in c["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]
    # a second time, the prompt's blocks are in the prefix cache: the same numbers
    again = post(hardened, "/v1/completions", body).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert again[0] is None and again[1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-6)


def test_max_tokens_zero_with_echo_scores_the_prompt_only(hardened, demo_llm):
    ids = demo_llm.get_tokenizer()("Score me")["input_ids"]
    r = post(hardened, "/v1/completions", {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0})
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["text"] == demo_llm.get_tokenizer().decode(ids) and choice["finish_reason"] == "length"
    with httpx.stream("POST", f"{hardened.url}/v1/completions", headers=hardened.headers, timeout=30,
                      json={"prompt": ids, "echo": True, "max_tokens": 0, "stream": True}) as response:
        streamed = [json.loads(line[6:])["choices"][0] for line in response.iter_lines()
                    if line.startswith("data: {")]
    assert "".join(c["text"] for c in streamed) == choice["text"] and streamed[-1]["finish_reason"] == "length"
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] == len(ids)
    assert len(choice["logprobs"]["tokens"]) == len(ids) and choice["logprobs"]["token_logprobs"][0] is None
    refused = post(hardened, "/v1/completions", {"prompt": ids, "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_vllm_prompt_logprobs_field_on_completions_and_chat(hardened, demo_llm):
    r = post(hardened, "/v1/completions", {"prompt": "Hello there", "max_tokens": 1, "prompt_logprobs": 1}).json()
    plp, n = r["choices"][0]["prompt_logprobs"], r["usage"]["prompt_tokens"]
    assert len(plp) == n and plp[0] is None
    ids = demo_llm.get_tokenizer()("Hello there")["input_ids"]
    for i in range(1, n):
        assert str(ids[i]) in plp[i] and {"logprob", "rank", "decoded_token"} <= set(plp[i][str(ids[i])])
    chat = post(hardened, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    plain = post(hardened, "/v1/completions", {"prompt": "Hello there", "max_tokens": 1}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None
