"""AsyncEngine: the Engine stepped on its own thread, one stream per request; abort when a stream is
left; and what happens (to streams, to /health, to the process) when the step loop dies."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from carpool import LLM, Engine, EngineArgs, RequestOutputKind, SamplingParams
from carpool.engine.async_engine import AsyncEngine, EngineDeadError
from carpool.entrypoints.cli import build_parser
from carpool.entrypoints.openai.api_server import CarpoolServer, build_app


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA)


def engine_for(path: str) -> Engine:
    return Engine.from_engine_args(EngineArgs(model=path, device="cpu"))


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def boom() -> list:
    raise RuntimeError("secret internal detail")


def test_concurrent_streams_get_the_offline_tokens(llama_path):
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    expected = [o.outputs[0].token_ids for o in LLM(model=llama_path, device="cpu").generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)]

    async def run() -> list[list[int]]:
        engine = AsyncEngine(engine_for(llama_path))
        engine.start()

        async def one(i: int) -> list[int]:
            outs = [out async for out in engine.generate(prompts[i], greedy(12), f"r{i}")]
            return [t for out in outs for t in out.outputs[0].token_ids]

        try:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            await engine.shutdown()

    assert asyncio.run(run()) == expected


def test_a_slow_consumer_gets_the_missed_deltas_merged(llama_path):
    prompt = [5, 6, 7]
    (expected,) = LLM(model=llama_path, device="cpu").generate(
        [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=1), use_tqdm=False)

    async def run() -> list:
        engine = AsyncEngine(engine_for(llama_path))
        engine.start()
        params = greedy(30)
        params.logprobs = 1
        outs = []
        async for out in engine.generate(prompt, params, "slow"):
            outs.append(out)
            if len(outs) == 1:
                await until(lambda: engine.stats().num_running == 0)  # everything else arrives meanwhile
        await engine.shutdown()
        return outs

    outs = asyncio.run(run())
    assert len(outs) == 2 and outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert sum((o.outputs[0].token_ids for o in outs), []) == expected.outputs[0].token_ids
    assert "".join(o.outputs[0].text for o in outs) == expected.outputs[0].text
    assert len(sum((o.outputs[0].logprobs for o in outs), [])) == 30


def test_leaving_a_stream_early_aborts_the_request_and_frees_its_blocks(llama_path):
    async def run() -> None:
        engine = AsyncEngine(engine_for(llama_path))
        engine.start()
        stream = engine.generate(list(range(1, 40)), greedy(400), "long")
        async for _ in stream:
            break
        assert engine.stats().kv_cache_usage > 0
        await stream.aclose()
        await until(lambda: engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0)
        await engine.shutdown()
        engine.engine.core.kv_cache_manager.check_integrity(live_request_ids=[])

    asyncio.run(run())


def test_a_cancelled_add_leaves_nothing_running(llama_path):
    async def run() -> None:
        engine = AsyncEngine(engine_for(llama_path))
        engine.start()
        for i in range(5):
            task = asyncio.ensure_future(engine.add_request(f"c{i}", [1, 2, 3], greedy(300)))
            await asyncio.sleep(0.001 * i)  # cancel before, during or after the engine takes it
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await until(lambda: engine.stats().num_running == 0 and engine.stats().num_waiting == 0)
        await engine.shutdown()

    asyncio.run(run())


def test_bad_requests_raise_value_error_naming_the_field(llama_path):
    async def run() -> None:
        engine = AsyncEngine(engine_for(llama_path))
        engine.start()
        with pytest.raises(ValueError, match="^prompt"):
            await engine.add_request("x", [1] * 10_000, greedy(2))
        with pytest.raises(ValueError, match="^request_id"):
            await engine.add_request("y", [1], greedy(50))
            await engine.add_request("y", [1], greedy(50))
        await engine.shutdown()

    asyncio.run(run())


def test_a_dead_loop_fails_every_stream_and_every_new_request(llama_path):
    async def run() -> None:
        inner = engine_for(llama_path)
        inner.step = boom  # type: ignore[method-assign]
        engine = AsyncEngine(inner)
        engine.start()
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate([1, 2, 3], greedy(5), "a"):
                pass
        assert engine.dead is not None and engine.dead.is_set() and engine.is_dead
        with pytest.raises(EngineDeadError):
            await engine.add_request("b", [1, 2, 3], greedy(5))
        await engine.shutdown()

    asyncio.run(run())


def _server(path: str) -> CarpoolServer:
    """A server whose engine runs on a thread here (so a test can break its step)."""
    return CarpoolServer(build_parser().parse_args(["serve", path, "--device", "cpu", "--port", "0",
                                                    "--disable-frontend-multiprocessing"]))


def test_health_is_503_once_the_engine_loop_died(llama_path):
    async def run() -> None:
        server = _server(llama_path)
        server.sock.close()
        server.engine.engine.step = boom  # type: ignore[method-assign]
        dead = asyncio.Event()
        app = build_app(server.ctx, server.metrics, on_engine_dead=dead.set)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                assert (await client.get("/health")).status_code == 200
                r = await client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5})
                assert r.status_code == 503 and "secret" not in r.text
                await asyncio.wait_for(dead.wait(), 5)
                assert (await client.get("/health")).status_code == 503

    asyncio.run(run())


def test_server_with_a_dead_engine_ends_streams_and_exits_1(llama_path):
    server = _server(llama_path)
    real_step, calls = server.engine.engine.step, []

    def step() -> list:
        calls.append(1)
        return real_step() if len(calls) < 3 else boom()

    server.engine.engine.step = step  # type: ignore[method-assign]
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(server.run()), daemon=True)
    thread.start()
    body = {"prompt": [1, 2, 3], "max_tokens": 50, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == 503 and "secret" not in "".join(events)
    thread.join(30)
    assert code == [1]
