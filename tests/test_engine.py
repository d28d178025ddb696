"""The Engine API used directly: add_request / step / abort, with the KV block invariants checked after
every step."""

from __future__ import annotations

import pytest
from checkpoints import prompts_of_lengths

from carpool import Engine, EngineArgs, RequestOutputKind, SamplingParams


def make_engine(path: str, **kwargs) -> Engine:
    return Engine.from_engine_args(EngineArgs(model=path, device="cpu", **kwargs))


def run_checked(engine: Engine, max_steps: int = 10_000) -> list:
    outs = []
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        outs.extend(engine.step())
        engine.core.scheduler.check_integrity()
    return outs


@pytest.mark.parametrize("caching", [False, True])
def test_block_accounting_holds_after_every_step_and_all_blocks_free_at_the_end(llama_path, caching):
    engine = make_engine(llama_path, num_kv_blocks=20, max_num_batched_tokens=48,
                         enable_prefix_caching=caching)
    prompts = prompts_of_lengths([5, 40, 90, 120, 17, 64, 33, 150])
    prompts += [prompts[2][:70] + [1, 2, 3]]  # shares a prefix with prompt 2
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.8, seed=i, max_tokens=20, ignore_eos=True))
    outs = run_checked(engine)
    finished = {o.request_id for o in outs if o.finished}
    assert finished == {f"r{i}" for i in range(len(prompts))}
    assert engine.stats().num_preemptions > 0
    engine.core.kv_cache_manager.check_integrity(live_request_ids=[])
    assert engine.core.kv_cache_manager.pool.num_free_blocks == 20


def test_abort_midway_frees_every_block(llama_path):
    engine = make_engine(llama_path, num_kv_blocks=64)
    for i, p in enumerate(prompts_of_lengths([30, 60, 90])):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
        engine.core.scheduler.check_integrity()
    engine.abort(["r0", "r2"])
    engine.core.scheduler.check_integrity()
    outs = run_checked(engine)
    assert {o.request_id for o in outs if o.finished} == {"r1"}
    engine.abort("unknown-id")  # ignored
    engine.core.kv_cache_manager.check_integrity(live_request_ids=[])
    assert engine.core.kv_cache_manager.pool.num_free_blocks == 64


def test_delta_outputs_concatenate_to_the_final_output(llama_path):
    engine = make_engine(llama_path)
    prompt = "stream me"
    engine.add_request("d", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                    output_kind=RequestOutputKind.DELTA))
    engine.add_request("f", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                    output_kind=RequestOutputKind.FINAL_ONLY))
    outs = run_checked(engine)
    deltas = [o for o in outs if o.request_id == "d"]
    final = [o for o in outs if o.request_id == "f"]
    assert len(final) == 1 and len(deltas) == 12
    assert "".join(o.outputs[0].text for o in deltas) == final[0].outputs[0].text
    assert sum((o.outputs[0].token_ids for o in deltas), []) == final[0].outputs[0].token_ids
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"


def test_request_ids_must_be_unique_while_running(llama_path):
    engine = make_engine(llama_path)
    engine.add_request("same", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="^request_id"):
        engine.add_request("same", [1, 2, 3], SamplingParams(max_tokens=2))
    run_checked(engine)
    engine.add_request("same", [1, 2, 3], SamplingParams(max_tokens=2))  # free again once finished


def test_metrics_timestamps_are_ordered(llama_path):
    engine = make_engine(llama_path)
    engine.add_request("m", [1, 2, 3, 4], SamplingParams(max_tokens=3))
    out = [o for o in run_checked(engine) if o.finished][0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert out.num_cached_tokens == 0


def test_queue_limit_refuses_new_requests_when_full(llama_path):
    from carpool.engine.llm_engine import QueueFullError

    engine = make_engine(llama_path, max_num_queued_reqs=2)
    engine.add_request("a", [1], SamplingParams(max_tokens=2))
    engine.add_request("b", [1], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError):
        engine.add_request("c", [1], SamplingParams(max_tokens=2))
    run_checked(engine)
    engine.add_request("c", [1], SamplingParams(max_tokens=2))


def test_prompt_that_fills_the_context_needs_room_to_generate(llama_path):
    engine = make_engine(llama_path, max_model_len=32)
    with pytest.raises(ValueError, match="^prompt"):
        engine.add_request("full", [1] * 32, SamplingParams(max_tokens=None))
    engine.add_request("fits", [1] * 31, SamplingParams(max_tokens=None, ignore_eos=True))
    out = [o for o in run_checked(engine) if o.finished][0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("speculative", [None, "draft_model"])
def test_shutdown_frees_the_kv_cache_and_weights_while_the_engine_is_still_referenced(llama_path, speculative):
    """A benchmark that builds a second engine while holding the first must not see the first one's KV
    cache in its own memory profile: shutdown drops the runner (and a draft model's runner-proposer
    cycle) even though the caller keeps the engine object; stepping afterwards is a clear error."""
    import gc
    import weakref

    spec = {"method": "draft_model", "model": llama_path, "num_speculative_tokens": 2} if speculative else None
    engine = make_engine(llama_path, speculative_config=spec)
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
    run_checked(engine)
    runner = engine.core.executor.runner
    alive = [weakref.ref(t) for t in (runner.kv_cache, next(runner.model.parameters()))]
    if speculative:
        alive.append(weakref.ref(runner.proposer.kv_cache))
    del runner
    engine.shutdown()
    gc.collect()
    assert [ref() is None for ref in alive] == [True] * len(alive)
    engine.add_request("b", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
    with pytest.raises(RuntimeError, match="shut down"):
        engine.step()
