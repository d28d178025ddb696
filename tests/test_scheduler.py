"""Scheduler without a model: the token budget, chunking, admission order, preemption, limits."""

from __future__ import annotations

import pytest

from carpool.config import SchedulerConfig
from carpool.core.kv_cache_manager import KVCacheManager
from carpool.core.sched_output import ModelRunnerOutput, SchedulerOutput
from carpool.core.scheduler import Scheduler
from carpool.request import Request, RequestStatus
from carpool.sampling_params import SamplingParams


def make(num_blocks: int = 64, block_size: int = 4, budget: int = 32, max_seqs: int = 8,
         max_len: int = 256, caching: bool = False) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_caching=caching, hash_seed=b"s")
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_len), kv)


def req(rid: str, n_prompt: int, max_tokens: int = 4, **kw) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def fake_step(s: Scheduler, token: int = 7) -> tuple[SchedulerOutput, list]:
    """Run one schedule/update cycle; every request whose tokens are all computed samples `token`."""
    so = s.schedule()
    ids = [rid for rid in so.num_scheduled_tokens if s.requests[rid].num_output_placeholders]
    out = s.update_from_output(so, ModelRunnerOutput(ids, [token] * len(ids), [None] * len(ids)))
    s.check_integrity()
    return so, out


def test_decodes_cost_one_token_and_prefills_take_the_rest_of_the_budget():
    s = make(budget=16)
    s.add_request(req("a", 4))
    fake_step(s)
    s.add_request(req("b", 30))
    so, _ = fake_step(s)
    assert so.num_scheduled_tokens == {"a": 1, "b": 15}


def test_long_prompt_is_chunked_and_samples_only_on_its_last_chunk():
    s = make(budget=10)
    s.add_request(req("a", 25))
    chunks = []
    outs = []
    for _ in range(3):
        so, out = fake_step(s)
        chunks.append(so.num_scheduled_tokens["a"])
        outs.append(out)
    assert chunks == [10, 10, 5]
    assert outs[0] == [] and outs[1] == [] and outs[2][0].new_token_ids == [7]


def test_waiting_requests_are_admitted_in_arrival_order_up_to_max_num_seqs():
    s = make(max_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, 2))
    so, _ = fake_step(s)
    assert list(so.num_scheduled_tokens) == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_newest_running_request_is_preempted_and_requeued_first_keeping_its_tokens():
    # 6 blocks of 4 tokens; two requests of 8 prompt tokens each take 2 blocks + 1 more as they decode.
    s = make(num_blocks=5, block_size=4, budget=64)
    s.add_request(req("old", 8, max_tokens=8))
    s.add_request(req("new", 8, max_tokens=8))
    preempted = False
    for _ in range(20):
        fake_step(s)
        if s.requests.get("new") is not None and s.requests["new"].num_preemptions:
            preempted = True
            assert s.requests["old"].status == RequestStatus.RUNNING
            break
    assert preempted
    new = s.requests["new"]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert s.waiting[0] is new and len(new.output_token_ids) > 0
    kept = list(new.output_token_ids)
    while s.has_unfinished_requests():
        fake_step(s)
    assert s.num_preemptions >= 1
    assert kept  # tokens generated before preemption were kept (the request resumed from them)
    assert s.kv.pool.num_free_blocks == 5


def test_preempted_request_is_resent_to_the_runner_in_full():
    s = make(num_blocks=5, block_size=4, budget=64)
    s.add_request(req("old", 8, max_tokens=8))
    s.add_request(req("new", 8, max_tokens=8))
    seen_forget = False
    resent = None
    for _ in range(40):
        so, _ = fake_step(s)
        seen_forget |= "new" in so.finished_req_ids
        for n in so.new_reqs:
            if n.req_id == "new" and n.output_token_ids:
                resent = n
        if not s.has_unfinished_requests():
            break
    assert seen_forget and resent is not None
    assert resent.num_computed_tokens == 0 and resent.block_ids


def test_request_that_can_never_fit_is_refused_up_front():
    s = make(num_blocks=4, block_size=4, max_len=64)
    with pytest.raises(ValueError, match="prompt"):
        s.add_request(req("long", 65))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add_request(req("too-much", 60, max_tokens=10))
    with pytest.raises(ValueError, match="KV blocks"):
        s.add_request(req("blocks", 17, max_tokens=4))
    assert not s.has_unfinished_requests()


def test_stop_token_and_length_finish_reasons():
    s = make()
    s.add_request(req("stop", 3, max_tokens=10, stop_token_ids=[7]))
    s.add_request(req("len", 3, max_tokens=2))
    _, out = fake_step(s, token=7)
    by_id = {o.request_id: o for o in out}
    assert by_id["stop"].finish_reason == "stop" and by_id["stop"].stop_reason == 7
    assert by_id["len"].finish_reason is None
    _, out = fake_step(s, token=5)
    assert out[0].finish_reason == "length"
    assert not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks


def test_min_tokens_defers_eos():
    s = make()
    r = req("a", 3, max_tokens=10, min_tokens=2)
    r.sampling_params.eos_token_ids = (7,)
    s.add_request(r)
    _, out = fake_step(s, token=7)
    assert out[0].finish_reason is None
    _, out = fake_step(s, token=7)
    assert out[0].finish_reason == "stop"


def test_abort_frees_blocks_of_running_and_waiting_requests():
    s = make(max_seqs=1)
    s.add_request(req("run", 10))
    s.add_request(req("wait", 10))
    fake_step(s)
    s.finish_requests(["run", "wait"], RequestStatus.FINISHED_ABORTED)
    s.check_integrity()
    assert not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks
    so = s.schedule()
    assert "run" in so.finished_req_ids  # the runner is told to drop its state


def test_prefix_hit_starts_num_computed_tokens_at_the_cached_length():
    s = make(caching=True, block_size=4)
    s.add_request(req("a", 10))
    while s.has_unfinished_requests():
        fake_step(s)
    s.add_request(req("b", 10))
    so, _ = fake_step(s)
    assert so.num_scheduled_tokens["b"] == 2  # 8 tokens (2 blocks) came from the cache
    assert so.new_reqs[0].num_computed_tokens == 8


def test_async_step_is_scheduled_before_the_previous_tokens_arrive():
    """With a step in flight, a request that will sample there is scheduled again for its placeholder
    token; the in-flight output then fills the placeholder, and a finished request's extra output is
    dropped."""
    s = make(budget=64)
    s.add_request(req("a", 5, max_tokens=2))
    so1 = s.schedule()
    assert s.requests["a"].num_output_placeholders == 1
    so2 = s.schedule()  # step 1 still in flight
    assert so2.num_scheduled_tokens == {"a": 1}
    assert s.requests["a"].num_output_placeholders == 2
    so3 = s.schedule()  # both outputs pending: max_tokens=2 reached, nothing more to schedule
    assert so3.is_empty
    out1 = s.update_from_output(so1, ModelRunnerOutput(["a"], [11], [None]))
    assert out1[0].new_token_ids == [11] and out1[0].finish_reason is None
    out2 = s.update_from_output(so2, ModelRunnerOutput(["a"], [12], [None]))
    assert out2[0].finish_reason == "length"
    assert not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks


def test_output_of_a_request_preempted_while_in_flight_is_dropped():
    s = make(num_blocks=5, block_size=4, budget=64)
    s.add_request(req("old", 8, max_tokens=8))
    s.add_request(req("new", 8, max_tokens=8))
    prev = None
    for _ in range(30):
        so = s.schedule()
        if prev is not None:
            ids = [r for r in prev.num_scheduled_tokens if r in s.requests]
            s.update_from_output(prev, ModelRunnerOutput(ids, [9] * len(ids), [None] * len(ids)))
            s.check_integrity()
        prev = so
        if s.num_preemptions:
            break
    victim = s.waiting[0]
    assert victim.num_output_placeholders == 0 and victim.num_computed_tokens == 0
    kept = list(victim.output_token_ids)
    s.update_from_output(prev, ModelRunnerOutput([victim.request_id], [99], [None]))
    assert victim.output_token_ids == kept  # the in-flight token of the preempted request was dropped
