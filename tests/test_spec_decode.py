"""Speculative decoding through the engine (CPU, tiny checkpoints): greedy output with each proposer is
token for token the output without speculation, in batches mixing speculating and plain requests, under
chunked prefill, preemption and prefix hits, with stops and max_tokens ending inside an accepted run;
blocks are all free at the end."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from checkpoints import prompts_of_lengths
from safetensors.torch import load_file, save_file

from carpool import LLM, Engine, EngineArgs, SamplingParams

K = 3
MAX_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
# Engine settings that exercise chunking (budget 24 tokens), preemption (the batch needs more than 20
# blocks of 8 tokens at once) and prefix hits (prompts sharing a prefix, one prompt twice).
PRESSURE = dict(max_num_batched_tokens=24, block_size=8, num_kv_blocks=20)


def workload() -> list[list[int]]:
    """Input-grounded prompts (a segment repeated, so n-gram lookup finds something), plain random ones,
    a shared prefix and a prompt given twice."""
    seg = prompts_of_lengths([12, 9], seed=4)
    rnd = prompts_of_lengths([5, 30, 17], seed=5)
    return [seg[0] * 3, seg[1] + rnd[0] + seg[1], rnd[1], rnd[1][:16] + rnd[2], rnd[2], rnd[2]]


def smaller_draft(target: str, dst: str) -> str:
    """The target without its last layer: a cheaper model with the same vocabulary that agrees with the
    target often, not always."""
    if not os.path.exists(os.path.join(dst, "config.json")):
        shutil.copytree(target, dst, dirs_exist_ok=True)
        with open(os.path.join(target, "config.json")) as f:
            cfg = json.load(f)
        last = cfg["num_hidden_layers"] - 1
        cfg["num_hidden_layers"] = last
        weights = load_file(os.path.join(target, "model.safetensors"))
        save_file({n: w for n, w in weights.items() if f".layers.{last}." not in n},
                  os.path.join(dst, "model.safetensors"))
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    return dst


def record(path: str, dst: str, prompts: list[list[int]], outputs: list[list[int]]) -> str:
    with open(dst, "w") as f:
        json.dump({"prompt_token_ids": prompts, "output_token_ids": outputs}, f)
    return dst


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def token_ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


_reference: dict[str, list] = {}


def reference(path: str, prompts: list[list[int]], params) -> list:
    key = f"{path}:{id(params)}"
    if key not in _reference:
        _reference[key] = token_ids(generate(LLM(path, device="cpu", **PRESSURE), prompts, params))
    return _reference[key]


def spec_config(method: str, path: str, tmp_path, prompts: list[list[int]], **extra) -> dict:
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                **extra}
    if method == "draft_model":
        return {"method": "draft_model", "model": smaller_draft(path, str(tmp_path / "draft")),
                "num_speculative_tokens": K, **extra}
    # replay: the first half of the prompts are recorded (they speculate), the rest are not (plain)
    outputs = [t[0] for t in reference(path, prompts, GREEDY)]
    half = len(prompts) // 2
    rec = record(path, str(tmp_path / "rec.json"), prompts[:half], outputs[:half])
    return {"method": "replay", "num_speculative_tokens": K, "acceptance_rate": 0.7, "replay_path": rec, **extra}


@pytest.mark.parametrize("method", ["ngram", "draft_model", "replay"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_with_speculation_equals_greedy_without(checkpoint_factory, tmp_path, arch, method):
    path = checkpoint_factory(arch)
    prompts = workload()
    # one request is penalized: it never verifies, so every batch mixes speculating and plain requests
    params = [GREEDY] * len(prompts)
    params[2] = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.3)
    llm = LLM(path, device="cpu", speculative_config=spec_config(method, path, tmp_path, prompts), **PRESSURE)
    assert token_ids(generate(llm, prompts, params)) == reference(path, prompts, params)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens
    llm.engine.core.kv_cache_manager.check_integrity(live_request_ids=[])
    assert llm.engine.core.kv_cache_manager.pool.num_free_blocks == PRESSURE["num_kv_blocks"]


@pytest.fixture(scope="module")
def replay_llm(llama_path, tmp_path_factory) -> LLM:
    """Every proposed token accepted: each verification emits k + 1 tokens, so stops land inside runs."""
    prompts = workload()
    outputs = [t[0] for t in token_ids(generate(LLM(llama_path, device="cpu"), prompts))]
    rec = record(llama_path, str(tmp_path_factory.mktemp("replay") / "rec.json"), prompts, outputs)
    return LLM(llama_path, device="cpu", speculative_config={
        "method": "replay", "num_speculative_tokens": 4, "acceptance_rate": 1.0, "replay_path": rec})


def test_max_tokens_and_stop_tokens_end_inside_an_accepted_run(replay_llm):
    prompt = workload()[0]
    full = token_ids(generate(replay_llm, [prompt]))[0][0]
    # prefill emits token 0; the first verification tokens 1..5: max_tokens 4 and a stop at token 3 end there
    short = generate(replay_llm, [prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert short.outputs[0].token_ids == full[:4] and short.outputs[0].finish_reason == "length"
    stop = full[3]
    first = full.index(stop)
    stopped = generate(replay_llm, [prompt], SamplingParams(temperature=0.0, max_tokens=MAX_NEW,
                                                            stop_token_ids=[stop], ignore_eos=True))[0]
    assert stopped.outputs[0].token_ids == full[:first + 1] and stopped.outputs[0].finish_reason == "stop"
    assert replay_llm.engine.stats().spec_decode_num_accepted_tokens > 0
    assert replay_llm.engine.core.kv_cache_manager.pool.num_free_blocks == replay_llm.engine.stats().num_kv_blocks


def test_stop_string_inside_an_accepted_run_ends_text_and_tokens_there(replay_llm):
    prompt = workload()[0]
    full = generate(replay_llm, [prompt])[0].outputs[0]
    text = full.text
    start = next(i for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    stop = text[start:start + 2]
    out = generate(replay_llm, [prompt], SamplingParams(temperature=0.0, max_tokens=MAX_NEW, stop=[stop],
                                                        ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]
    assert full.token_ids[:len(out.token_ids)] == out.token_ids and len(out.token_ids) < MAX_NEW


@pytest.mark.parametrize("min_tokens", [3, 6], ids=["stop-allowed-from-token-3", "stop-banned-at-token-3"])
def test_min_tokens_bans_stop_tokens_at_each_verified_position_by_its_own_index(replay_llm, llama_path,
                                                                                 min_tokens):
    """After prefill the replay proposes tokens 1..4 of the unconstrained continuation, token 3 being the
    stop token. Each verified position bans it while its own output index is below min_tokens: with 3 the
    run stops at token 3 (a ban by the step's first index would reject it), with 6 the target rejects it
    there (no ban would accept it and stop), as plain decoding does."""
    prompt = workload()[0]
    full = token_ids(generate(replay_llm, [prompt]))[0][0]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=min_tokens, stop_token_ids=[full[3]],
                            ignore_eos=True)
    plain = generate(LLM(llama_path, device="cpu"), [prompt], params)[0].outputs[0]
    assert full[3] not in full[:3] and (plain.token_ids == full[:4]) == (min_tokens == 3)
    spec = generate(replay_llm, [prompt], params)[0].outputs[0]
    assert (spec.token_ids, spec.finish_reason) == (plain.token_ids, plain.finish_reason)


def test_n_sequences_and_logprobs_are_the_targets(replay_llm, llama_path):
    prompt = workload()[1]
    params = SamplingParams(n=2, temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2)
    plain = generate(LLM(llama_path, device="cpu"), [prompt], params)[0]
    spec = generate(replay_llm, [prompt], params)[0]
    for a, b in zip(plain.outputs, spec.outputs):
        assert a.token_ids == b.token_ids
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            assert lp_a.keys() == lp_b.keys()
            assert all(abs(lp_a[t].logprob - lp_b[t].logprob) < 1e-4 for t in lp_a)


def test_seeded_sampling_draws_the_same_tokens_with_and_without_speculation(llama_path):
    """Deterministic proposals: each position samples as plain decoding would (seed per output index) and
    a proposed token is accepted iff it is that sample, so seeded outputs match token for token."""
    llm = LLM(llama_path, device="cpu", speculative_config={"method": "ngram", "num_speculative_tokens": K,
                                                            "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    params = SamplingParams(temperature=0.3, top_p=0.95, seed=11, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    prompts = workload()
    plain = generate(LLM(llama_path, device="cpu"), prompts, params)
    spec = generate(llm, prompts, params)
    assert token_ids(spec) == token_ids(plain)
    for a, b in zip(plain, spec):
        for lp_a, lp_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert lp_a.keys() == lp_b.keys()
            assert all(abs(lp_a[t].logprob - lp_b[t].logprob) < 1e-4 for t in lp_a)
    assert llm.engine.stats().spec_decode_num_accepted_tokens > 0


def run_engine(engine: Engine, prompts: dict[str, list[int]], abort_after: dict[str, int] | None = None
               ) -> dict[str, list[int]]:
    """Run requests to the end (each aborted once it has `abort_after[id]` tokens); their tokens by id."""
    abort_after = abort_after or {}
    for rid, prompt in prompts.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, GREEDY)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] = out.outputs[0].token_ids
            if len(got[out.request_id]) >= abort_after.get(out.request_id, MAX_NEW + 1) and not out.finished:
                engine.abort(out.request_id)
    return got


def test_a_draft_row_freed_by_an_abort_proposes_for_its_next_request_as_a_fresh_engine_would(llama_path,
                                                                                           tmp_path):
    """One row (max_num_seqs=1): the aborted request's draft state must not leak into the next request's
    proposals, so the next request's tokens and acceptance counts are those of a fresh engine."""
    prompts = workload()

    def engine() -> Engine:
        return Engine.from_engine_args(EngineArgs(model=llama_path, device="cpu", max_num_seqs=1,
                                                  speculative_config=spec_config("draft_model", llama_path,
                                                                                 tmp_path, prompts)))

    def counts(e: Engine) -> tuple[int, int, int]:
        s = e.stats()
        return s.spec_decode_num_drafts, s.spec_decode_num_draft_tokens, s.spec_decode_num_accepted_tokens

    fresh = engine()
    expected = run_engine(fresh, {"b": prompts[3]})
    reused = engine()
    aborted = run_engine(reused, {"a": prompts[1]}, abort_after={"a": 6})
    assert 6 <= len(aborted["a"]) < MAX_NEW and counts(reused)[0] > 0
    before = counts(reused)
    assert run_engine(reused, {"b": prompts[3]}) == expected
    assert tuple(x - y for x, y in zip(counts(reused), before)) == counts(fresh)
    reused.core.kv_cache_manager.check_integrity(live_request_ids=[])


def test_async_engine_overlaps_steps_only_while_speculation_is_off(llama_path):
    """disable_by_batch_size=3 with 6 requests: steps overlap while 3 or more run, then speculation takes
    over as requests finish; the tokens are those of the plain synchronous engine."""
    prompts = workload()
    lengths = [MAX_NEW, 14, 4, 6, 8, 10]  # the repetitive prompts (n-gram matches) run longest
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    expected = token_ids(generate(LLM(llama_path, device="cpu"), prompts, params))
    engine = Engine.from_engine_args(EngineArgs(
        model=llama_path, device="cpu", async_scheduling=True, speculative_config={
            "method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "disable_by_batch_size": 3}))
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), {"prompt_token_ids": p}, sp)
    got: dict[str, list[int]] = {}
    overlapped = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        overlapped += engine.core._in_flight is not None
        engine.core.scheduler.check_integrity()
    assert [got[str(i)] for i in range(len(prompts))] == [t[0] for t in expected]
    assert overlapped > 0 and engine.stats().spec_decode_num_drafts > 0


KV_BUDGET = 1 << 20


@pytest.fixture(scope="module")
def draft_llm(llama_path, tmp_path_factory) -> LLM:
    draft = smaller_draft(llama_path, str(tmp_path_factory.mktemp("draft") / "draft"))
    return LLM(llama_path, device="cpu", block_size=16, kv_cache_memory_bytes=KV_BUDGET, speculative_config={
        "method": "draft_model", "model": draft, "num_speculative_tokens": K})


def test_a_draft_models_kv_cache_shares_the_block_budget(draft_llm, llama_path):
    """One block of the pool holds the target's K/V and the draft's (one layer fewer), for the same ids."""
    with open(os.path.join(llama_path, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    itemsize = torch.tensor([], dtype=draft_llm.engine.config.model.dtype).element_size()
    per_layer = 2 * 16 * cfg["num_key_value_heads"] * head_dim * itemsize  # K and V of 16 tokens
    num_blocks = draft_llm.engine.stats().num_kv_blocks
    assert num_blocks == KV_BUDGET // (per_layer * (2 * cfg["num_hidden_layers"] - 1))
    draft_kv = draft_llm.engine.core.executor.runner.proposer.kv_cache
    assert draft_kv.shape[:3] == (2, cfg["num_hidden_layers"] - 1, num_blocks)


def test_describe_names_the_speculative_method_and_the_draft(draft_llm, replay_llm):
    spec = draft_llm.engine.config.speculative_config
    assert draft_llm.engine.core.executor.describe()["speculative"] == {
        "method": "draft_model", "num_speculative_tokens": K, "disable_by_batch_size": spec.disable_by_batch_size,
        "draft_model": spec.model, "draft_on_every_rank": False, "draft_cuda_graphs": False}
    assert replay_llm.engine.core.executor.describe()["speculative"]["method"] == "replay"


def test_metrics_expose_vllm_spec_decode_counters(replay_llm):
    from prometheus_client.parser import text_string_to_metric_families

    from carpool.metrics import ServerMetrics

    generate(replay_llm, workload()[:2])
    stats = replay_llm.engine.stats()
    text = ServerMetrics(replay_llm.engine.stats, "m").render().decode()
    samples = {(s.name, s.labels.get("position")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("carpool:spec_decode_num_drafts_total", None)] == stats.spec_decode_num_drafts > 0
    assert samples[("carpool:spec_decode_num_draft_tokens_total", None)] == stats.spec_decode_num_draft_tokens
    assert samples[("carpool:spec_decode_num_accepted_tokens_total", None)] == stats.spec_decode_num_accepted_tokens
    per_pos = [samples[("carpool:spec_decode_num_accepted_tokens_per_pos_total", str(i))] for i in range(4)]
    assert per_pos == stats.spec_decode_num_accepted_tokens_per_pos and per_pos[0] > 0


def test_tensor_parallel_verification_agrees_with_one_process(llama_path):
    """TP=2: greedy rows verify on every rank, random ones on rank 0 (broadcast); the tokens equal TP=1's."""
    spec = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    prompts = workload()[:3]
    seeded = SamplingParams(temperature=0.8, top_k=40, seed=5, max_tokens=MAX_NEW, ignore_eos=True)
    one = LLM(llama_path, device="cpu", speculative_config=spec, kv_cache_memory_bytes=1 << 22)
    two = LLM(llama_path, device="cpu", tensor_parallel_size=2, speculative_config=spec,
              kv_cache_memory_bytes=1 << 22)
    try:
        for params in (GREEDY, seeded):
            assert token_ids(generate(two, prompts, params)) == token_ids(generate(one, prompts, params))
        assert 0 < two.engine.stats().spec_decode_num_accepted_tokens
    finally:
        two.engine.shutdown()


@pytest.mark.parametrize("draft_tp", [None, 1], ids=["draft-split-over-ranks", "draft-whole-on-rank-0"])
def test_tensor_parallel_draft_model_greedy_equals_greedy_without_speculation(llama_path, tmp_path, draft_tp):
    """TP=2 (gloo): the draft split over both ranks (vLLM's default) or whole on rank 0, in a chunked batch
    where one penalized request never speculates; the tokens are those of greedy without speculation."""
    prompts = workload()[:4]
    params = [GREEDY] * len(prompts)
    params[2] = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.3)
    spec = spec_config("draft_model", llama_path, tmp_path, prompts, draft_tensor_parallel_size=draft_tp)
    llm = LLM(llama_path, device="cpu", tensor_parallel_size=2, speculative_config=spec,
              max_num_batched_tokens=24, kv_cache_memory_bytes=1 << 22)
    try:
        assert llm.engine.config.speculative_config.draft_tensor_parallel_size == (draft_tp or 2)
        assert llm.engine.core.executor.describe()["speculative"]["draft_on_every_rank"] == (draft_tp is None)
        assert token_ids(generate(llm, prompts, params)) == reference(llama_path, prompts, params)
        stats = llm.engine.stats()
        assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens
    finally:
        llm.engine.shutdown()
