"""The OpenAI-compatible server end to end: a real `carpool serve` process (demo model) on 127.0.0.1,
driven by the official openai client, and by raw HTTP for what a client library would refuse to send."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from server_utils import ServerProcess

import carpool
from carpool import LLM, SamplingParams

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
LONG = 2000  # tokens: seconds of work for the demo model, so a request is surely still running


@pytest.fixture
def server(demo_server) -> ServerProcess:
    return demo_server


@pytest.fixture
def offline(demo_llm) -> LLM:
    return demo_llm


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def greedy(llm: LLM, prompts: list, max_tokens: int) -> list[carpool.RequestOutput]:
    return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)


def chat_prompt_ids(llm: LLM, messages: list[dict]) -> list[int]:
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_completion_streamed_equals_non_streamed_equals_offline(client, offline):
    kwargs = dict(model="demo", prompt=PROMPT, max_tokens=24, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    (expected,) = greedy(offline, [PROMPT], 24)

    assert full.object == "text_completion" and full.id.startswith("cmpl-") and full.model == "demo"
    assert full.choices[0].text == expected.outputs[0].text
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert full.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert full.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_chat_streamed_equals_non_streamed_equals_offline(client, offline):
    kwargs = dict(model="demo", messages=MESSAGES, max_completion_tokens=24, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    (expected,) = greedy(offline, [chat_prompt_ids(offline, MESSAGES)], 24)

    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == expected.outputs[0].text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert full.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_32_concurrent_streaming_clients_all_get_their_own_output(server, offline):
    prompts = [f"Request {i}: tell me about {i * 7}" for i in range(32)]
    expected = [o.outputs[0].text for o in greedy(offline, prompts, 16)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model="demo", prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(all_of_them()) == expected


def test_batch_prompts_n_seed_and_logprobs(client, offline):
    r = client.completions.create(model="demo", prompt=[PROMPT, "Another one"], max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [o.outputs[0].text for o in greedy(offline, [PROMPT, "Another one"], 8)]

    kwargs = dict(model="demo", prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=7, logprobs=2)
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    for c in a.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 8
        assert all(len(top) >= 2 for top in c.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)

    chat = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob for t in content)


def test_echo_and_chat_choices_stream_like_they_answer(client, offline):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=0)
    plain = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text
    # the prompt's tokens (the first without a logprob), then the generated ones, offsets after the echo
    num_prompt = len(offline.get_tokenizer()(PROMPT)["input_ids"])
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == num_prompt + 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None for x in lp.token_logprobs[1:])
    assert lp.text_offset[num_prompt] == len(PROMPT) and "".join(lp.tokens[num_prompt:]) == plain.choices[0].text

    kwargs = dict(model="demo", messages=MESSAGES, max_tokens=10, n=2, temperature=1.0, seed=3)
    full = client.chat.completions.create(**kwargs)
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == {c.index: c.message.content for c in full.choices}


def test_stop_string_cuts_the_text(client):
    text = client.completions.create(model="demo", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = text[6:8]
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_client_disconnect_mid_stream_frees_the_request_within_a_second(server):
    idle = server.metrics()["carpool:kv_cache_usage_perc"]
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        running = server.metrics()
        assert running["carpool:num_requests_running"] == 1
        assert running["carpool:kv_cache_usage_perc"] > idle
    # leaving the block closed the connection mid-stream
    assert wait_until(lambda: (m := server.metrics())["carpool:num_requests_running"] == 0
                      and m["carpool:kv_cache_usage_perc"] == idle, timeout=1.0)


def test_client_disconnect_without_streaming_aborts_the_request(server):
    before = server.metrics()["carpool:generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True},
                   timeout=httpx.Timeout(10, read=0.3))
    assert wait_until(lambda: server.metrics()["carpool:num_requests_running"] == 0, timeout=1.0)
    assert server.metrics()["carpool:generation_tokens_total"] - before < LONG


BAD_COMPLETIONS = [
    ("malformed JSON", b'{"prompt": "x", ', None),
    ("not an object", b"[1, 2]", None),
    ("prompt of the wrong type", {"prompt": 5}, "prompt"),
    ("max_tokens as a string", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("max_tokens as a float", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("negative max_tokens", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("zero max_tokens", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("oversized max_tokens", {"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("max_tokens beyond the context", {"prompt": "x", "max_tokens": 4096}, "max_tokens"),
    ("temperature < 0", {"prompt": "x", "temperature": -0.5}, "temperature"),
    ("top_p = 0", {"prompt": "x", "top_p": 0}, "top_p"),
    ("n too large", {"prompt": "x", "n": 1000}, "n"),
    ("n as a boolean", {"prompt": "x", "n": True}, "n"),
    ("stream as a string", {"prompt": "x", "stream": "yes"}, "stream"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("empty token list", {"prompt": []}, "prompt"),
    ("token id out of range", {"prompt": [1, 2, 999999]}, "prompt_token_ids"),
    ("negative token id", {"prompt": [-1]}, "prompt_token_ids"),
    ("prompt longer than the model", {"prompt": [65] * 5000}, "prompt"),
    ("prompt filling the model, max_tokens omitted", {"prompt": [65] * 4096, "max_tokens": None}, "prompt"),
    ("prompt filling the model with max_tokens", {"prompt": [65] * 4088, "max_tokens": 16}, "max_tokens"),
    ("too many logprobs", {"prompt": "x", "logprobs": 1000}, "logprobs"),
    ("too many stop strings", {"prompt": "x", "stop": ["a"] * 100}, "stop"),
    ("seed out of range", {"prompt": "x", "seed": 2**70}, "seed"),
]
BAD_CHATS = [
    ("no messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("content of the wrong type", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ("top_logprobs without logprobs", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("negative max_completion_tokens", {"messages": MESSAGES, "max_completion_tokens": -3},
     "max_completion_tokens"),
    ("temperature too high", {"messages": MESSAGES, "temperature": 1e6}, "temperature"),
]
BAD = [("/v1/completions", *case) for case in BAD_COMPLETIONS] + [("/v1/chat/completions", *c) for c in BAD_CHATS]


def post(url: str, body: bytes | dict) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(url, json=body, timeout=30)


@pytest.mark.parametrize("path,case,body,param", BAD, ids=[f"{p.rsplit('/', 1)[-1]}: {c}" for p, c, _, _ in BAD])
def test_bad_request_is_a_400_naming_the_field(server, path, case, body, param):
    r = post(server.url + path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["message"].startswith(param)


def test_unknown_model_is_a_404_and_the_server_still_answers(server, client, offline):
    for path, _, body, _ in BAD:
        assert post(server.url + path, body).status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=MESSAGES, max_tokens=2)
    ok = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={
        "no_such_field": 1})  # unknown fields are ignored, as OpenAI does
    assert ok.choices[0].text == greedy(offline, [PROMPT], 12)[0].outputs[0].text
    assert server.metrics()["carpool:num_requests_waiting"] == 0


def test_null_fields_mean_their_defaults(server):
    body = {"prompt": PROMPT, "max_tokens": 3, "n": None, "stream": None, "echo": None, "temperature": None}
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_models_tokenize_detokenize_version_health(server, offline):
    url = server.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/version").json() == {"version": carpool.__version__}
    (card,) = httpx.get(f"{url}/v1/models").json()["data"]
    assert card["id"] == card["root"] == "demo" and card["max_model_len"] == 4096  # no local path
    assert {**httpx.get(f"{url}/v1/models/demo").json(), "created": 0} == {**card, "created": 0}
    missing = httpx.get(f"{url}/v1/models/gpt-17")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    tok = offline.get_tokenizer()
    r = httpx.post(f"{url}/tokenize", json={"prompt": "hi"}).json()
    assert r == {"count": 3, "max_model_len": 4096, "tokens": tok("hi")["input_ids"]}
    r = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES}).json()
    assert r["tokens"] == chat_prompt_ids(offline, MESSAGES)
    assert httpx.post(f"{url}/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [999999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_metrics_expose_vllm_names(server, client):
    client.completions.create(model="demo", prompt=PROMPT, max_tokens=4)
    m = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "num_preemptions_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total"):
        assert f"carpool:{name}" in m, name
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert m[f"carpool:{name}_count"] > 0, name
    assert m["carpool:generation_tokens_total"] >= 4


ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def guarded_server():
    """API key required ($CARPOOL_API_KEY); one running request at a time; one waiting request at most;
    small bodies; CORS for one origin."""
    s = ServerProcess("--max-num-seqs", "1", "--max-num-queued-reqs", "1", "--max-request-body-bytes", "10000",
                      "--allowed-origins", ORIGIN, api_key="s3cret")
    yield s
    assert s.terminate() == 0, s.log()


GUARDED_ROUTES = [("GET", "/v1/models"), ("GET", "/v1/models/demo"), ("POST", "/v1/completions"),
                  ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                  ("GET", "/tokenizer_info"), ("GET", "/version"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                  ("GET", "/docs"), ("GET", "/no/such/route")]


def test_wrong_or_missing_api_key_is_a_401_on_every_route_but_health(guarded_server):
    url = guarded_server.url
    for method, path in GUARDED_ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.request(method, url + path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["type"] == "AuthenticationError"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{url}/health").status_code == 200  # load balancers probe it without a key
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
    assert good.completions.create(model="demo", prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
    key = guarded_server.headers
    assert httpx.get(f"{url}/metrics", headers=key).status_code == 200
    assert httpx.get(f"{url}/version", headers=key).json() == {"version": carpool.__version__}


def test_two_authorization_headers_are_a_401_even_if_one_is_right(guarded_server):
    for pair in ([("Authorization", "Bearer wrong"), ("Authorization", "Bearer s3cret")],
                 [("Authorization", "Bearer s3cret"), ("Authorization", "Bearer wrong")],
                 [("Authorization", "Bearer s3cret"), ("Authorization", "Bearer s3cret")]):
        r = httpx.get(f"{guarded_server.url}/v1/models", headers=httpx.Headers(pair))
        assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization", pair


def test_cors_answers_only_the_allowed_origin(guarded_server, server):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    ok = httpx.options(f"{guarded_server.url}/v1/completions", headers={"Origin": ORIGIN, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    evil = httpx.options(f"{guarded_server.url}/v1/completions", headers={"Origin": "https://evil.example",
                                                                         **preflight})
    assert "access-control-allow-origin" not in evil.headers
    r = httpx.get(f"{guarded_server.url}/v1/models", headers={"Origin": ORIGIN, **guarded_server.headers})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    # without --allowed-origins: no CORS at all
    for origin in (ORIGIN, "https://evil.example"):
        r = httpx.options(f"{server.url}/v1/completions", headers={"Origin": origin, **preflight})
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in httpx.get(f"{server.url}/v1/models",
                                                              headers={"Origin": origin}).headers


def test_full_queue_is_a_503_and_clears(guarded_server):
    headers = {"Authorization": "Bearer s3cret"}
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=guarded_server.url, headers=headers, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as running:
            tokens = running.iter_lines()  # keep it: a dropped line iterator closes the connection
            next(tokens)  # a token came: this one is running (max_num_seqs=1)
            with c.stream("POST", "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200  # accepted: it waits behind the running one
                r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
                assert r.status_code == 503, r.text
                assert r.json()["error"]["type"] == "ServiceUnavailableError" and r.json()["error"]["code"] == 503
                assert int(r.headers["retry-after"]) >= 1
        assert wait_until(lambda: guarded_server.metrics()["carpool:num_requests_running"] == 0, timeout=1.0)
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_sigterm_ends_in_flight_work_and_exits_zero():
    s = ServerProcess("--shutdown-timeout", "0.5")
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        next(lines)
        start = time.monotonic()
        assert s.terminate(timeout=30) == 0, s.log()
        assert time.monotonic() - start < 15
        events = [line for line in lines if line.startswith("data: ")]
    # cut at the shutdown timeout, long before its 2000 tokens: a clean error event, then [DONE]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["code"] == 503 and "shutting down" in error["message"]
    assert len(events) < LONG
    assert "Traceback" not in s.log()


def test_oversized_body_is_refused(guarded_server):
    headers = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    r = httpx.post(f"{guarded_server.url}/v1/completions", json={"prompt": "x" * 20_000}, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    chunks = (b'{"prompt": "' + b"x" * 1000 + (b'"}' if i == 19 else b"") for i in range(20))
    r = httpx.post(f"{guarded_server.url}/v1/completions", content=chunks, headers=headers)  # no length
    assert r.status_code == 413


def test_a_taken_port_is_a_clear_error(server, capsys):
    from carpool.entrypoints.cli import main

    port = server.url.rsplit(":", 1)[1]
    assert main(["serve", "--device", "cpu", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "port" in err and port in err and "Traceback" not in err
