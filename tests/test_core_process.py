"""The engine core in its own process (MPAsyncEngine, `carpool serve`'s default): same tokens as offline,
merged outputs when the frontend falls behind, stop strings that finish the request in the core, and
what happens when the core process dies or the server is stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from server_utils import ServerProcess

from carpool import LLM, EngineArgs, RequestOutputKind, SamplingParams
from carpool.demo import demo_model_path
from carpool.engine.core import QueueFullError
from carpool.engine.core_client import MPAsyncEngine
from carpool.engine.request_stream import EngineDeadError
from carpool.entrypoints.cli import build_parser
from carpool.entrypoints.openai.api_server import CarpoolServer, build_app


def delta(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA, **kwargs)


def offline(llm: LLM, prompts: list, **kwargs) -> list:
    return llm.generate(prompts, SamplingParams(temperature=0, **kwargs), use_tqdm=False)


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_streams_get_the_offline_text_and_tokens(llama_path):
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    expected = offline(LLM(model=llama_path, device="cpu"), prompts, max_tokens=12, ignore_eos=True, logprobs=1)

    async def run() -> list[tuple[list[int], int]]:
        engine = MPAsyncEngine.from_engine_args(EngineArgs(model=llama_path, device="cpu"))
        engine.start()

        async def one(i: int) -> tuple[list[int], int]:
            params = delta(12, ignore_eos=True, logprobs=1)
            outs = [out async for out in engine.generate(prompts[i], params, f"r{i}")]
            return sum((o.outputs[0].token_ids for o in outs), []), sum(len(o.outputs[0].logprobs) for o in outs)

        try:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            await engine.shutdown()

    assert asyncio.run(run()) == [(e.outputs[0].token_ids, 12) for e in expected]


def test_a_frontend_that_falls_behind_merges_steps_and_keeps_the_text(demo_llm):
    """The event loop is held up (as by hundreds of busy streams), so the core runs many steps before
    the frontend reads again: the stream gets them merged, and the text is still the offline text."""
    prompt, n = "The quick brown fox", 40
    (expected,) = offline(demo_llm, [prompt], max_tokens=n, ignore_eos=True)

    async def run() -> list:
        engine = MPAsyncEngine.from_engine_args(EngineArgs(model=demo_model_path(), device="cpu"))
        engine.start()
        outs = []
        try:
            async for out in engine.generate(prompt, delta(n, ignore_eos=True), "slow"):
                outs.append(out)
                if len(outs) == 1:
                    time.sleep(1.5)  # blocks the event loop: nothing is read while the core steps on
        finally:
            await engine.shutdown()
        return outs

    outs = asyncio.run(run())
    assert len(outs) < n and max(len(o.outputs[0].token_ids) for o in outs) > 1
    assert "".join(o.outputs[0].text for o in outs) == expected.outputs[0].text
    assert sum((o.outputs[0].token_ids for o in outs), []) == expected.outputs[0].token_ids
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"


def test_a_stop_string_in_merged_steps_ends_where_it_would_step_by_step(demo_llm):
    prompt = "The quick brown fox"
    (free,) = offline(demo_llm, [prompt], max_tokens=40, ignore_eos=True)
    stop = free.outputs[0].text[10:12]
    (expected,) = offline(demo_llm, [prompt], max_tokens=40, ignore_eos=True, stop=[stop])
    assert expected.outputs[0].finish_reason == "stop"

    async def run() -> tuple[list, object]:
        engine = MPAsyncEngine.from_engine_args(EngineArgs(model=demo_model_path(), device="cpu"))
        engine.start()
        outs = []
        try:
            async for out in engine.generate(prompt, delta(40, ignore_eos=True, stop=[stop]), "s"):
                outs.append(out)
                if len(outs) == 1:
                    time.sleep(0.5)
            await until(lambda: engine.stats().num_running == 0)  # the core was told to stop it
            return outs, engine.stats()
        finally:
            await engine.shutdown()

    outs, stats = asyncio.run(run())
    assert "".join(o.outputs[0].text for o in outs) == expected.outputs[0].text
    assert sum((o.outputs[0].token_ids for o in outs), []) == expected.outputs[0].token_ids
    assert outs[-1].outputs[0].finish_reason == "stop" and outs[-1].outputs[0].stop_reason == stop
    assert stats.kv_cache_usage == 0


def test_bad_requests_are_refused_in_the_frontend_and_a_full_queue_by_the_core(llama_path):
    async def run() -> None:
        engine = MPAsyncEngine.from_engine_args(EngineArgs(model=llama_path, device="cpu", max_num_seqs=1,
                                                           max_num_queued_reqs=1))
        engine.start()
        try:
            with pytest.raises(ValueError, match="^prompt"):
                await engine.add_request("x", [1] * 10_000, delta(2))
            running = await engine.add_request("a", [1, 2], delta(300, ignore_eos=True))
            await running.__anext__()  # "a" is running, so the next one waits
            await engine.add_request("b", [1, 2], delta(2))
            with pytest.raises(ValueError, match="^request_id"):
                await engine.add_request("b", [1], delta(2))
            with pytest.raises(QueueFullError):
                await engine.add_request("c", [1, 2], delta(2))
            running.abort()
            assert await engine.reset_prefix_cache() in (True, False)
        finally:
            await engine.shutdown()

    asyncio.run(run())


def _server(path: str) -> CarpoolServer:
    return CarpoolServer(build_parser().parse_args(["serve", path, "--device", "cpu", "--port", "0"]))


def test_a_dead_core_fails_streams_and_new_requests_and_health_is_503(llama_path):
    async def run() -> None:
        server = _server(llama_path)
        server.sock.close()
        engine = server.engine
        assert isinstance(engine, MPAsyncEngine)
        dead = asyncio.Event()
        app = build_app(server.ctx, server.metrics, on_engine_dead=dead.set)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                assert (await client.get("/health")).status_code == 200
                stream = await engine.add_request("long", [1, 2, 3], delta(400, ignore_eos=True))
                await stream.__anext__()
                os.kill(engine.core.pid, signal.SIGKILL)
                with pytest.raises(EngineDeadError):
                    async for _ in stream:
                        pass
                await asyncio.wait_for(dead.wait(), 5)
                assert (await client.get("/health")).status_code == 503
                r = await client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5})
                assert r.status_code == 503 and r.json()["error"]["code"] == 503

    asyncio.run(run())


def test_server_whose_core_is_killed_ends_streams_cleanly_and_exits_1():
    s = ServerProcess()
    (core,) = children(s.proc.pid)
    body = {"prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        next(lines)
        os.kill(core, signal.SIGKILL)
        events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == 503
    assert s.proc.wait(30) == 1
    assert "Traceback" not in s.log()


def test_sigterm_reaps_the_core_process():
    s = ServerProcess()
    (core,) = children(s.proc.pid)
    assert alive(core)
    assert s.terminate(timeout=30) == 0, s.log()
    deadline = time.monotonic() + 5
    while alive(core) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(core)


def test_a_core_whose_frontend_vanishes_exits_on_its_own(llama_path):
    """The frontend's end of the socket closing (its process killed) ends the core, workers and all."""
    engine = MPAsyncEngine.from_engine_args(EngineArgs(model=llama_path, device="cpu"))
    engine.core.sock.close()
    deadline = time.monotonic() + 10
    while engine.core.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.core.proc.returncode == 0


def test_tensor_parallel_workers_are_children_of_the_core(llama_path):
    expected = offline(LLM(model=llama_path, device="cpu"), [[1, 2, 3]], max_tokens=8, ignore_eos=True)

    async def run() -> tuple[list[int], list[int]]:
        engine = MPAsyncEngine.from_engine_args(EngineArgs(model=llama_path, device="cpu", tensor_parallel_size=2))
        engine.start()
        workers = children(engine.core.pid)
        try:
            outs = [o async for o in engine.generate([1, 2, 3], delta(8, ignore_eos=True), "tp")]
        finally:
            await engine.shutdown()
        return sum((o.outputs[0].token_ids for o in outs), []), workers

    tokens, workers = asyncio.run(run())
    assert tokens == expected[0].outputs[0].token_ids
    assert len(workers) == 2 and not any(alive(w) for w in workers)

