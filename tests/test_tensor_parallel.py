"""Tensor parallelism on CPU (gloo, float32): TP=2 gives the same greedy tokens as TP=1 and as Hugging
Face; heads that do not split are refused before any process starts; a dead worker takes the engine
down with a clear error, and no worker process outlives the engine.

Each TP engine costs a process spawn (~2 s), so engines are shared per module.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from checkpoints import copy_without_weight, hf_greedy, prompts_of_lengths

from carpool import LLM, SamplingParams
from carpool.worker.multiproc_executor import TPWorkerError, check_tensor_parallel
from carpool.worker.tp_worker import samples_on_every_rank

LENGTHS = [1, 2, 5, 16, 17, 33, 64, 100, 150, 200]
MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
PROMPTS = prompts_of_lengths(LENGTHS, seed=6)

# Per-rank KV block of the tiny llama at TP=2: K+V x 2 layers x 16 tokens x 1 KV head x 16 dims x 4 bytes.
LLAMA_BLOCK_BYTES_TP2 = 2 * 2 * 16 * 1 * 16 * 4
# Checkpoints that exercise the sharding paths (the base configs are in checkpoints.py):
CASES = {
    "llama": ("llama", {}),  # 2 KV heads split over 2 ranks, untied LM head, llama3 rope scaling
    "qwen3": ("qwen3", {}),  # q/k norms, head_dim 24 != hidden / heads
    # 1 KV head replicated on both ranks; tied embeddings; a vocab (259) that leaves the last
    # vocab-parallel shard padded; q/k/v biases
    "qwen2-kv1-vocab259": ("qwen2", {"num_key_value_heads": 1, "vocab_size": 259}),
}


def greedy_tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")  # a zombie has finished
    except FileNotFoundError:
        return True


def tp2_llm(name: str, path: str, **kwargs) -> LLM:
    engine_kwargs: dict = {"kv_cache_memory_bytes": 1 << 22}
    if name == "llama":  # the hardest schedule: chunks, preemption and prefix hits
        engine_kwargs = {"kv_cache_memory_bytes": 18 * LLAMA_BLOCK_BYTES_TP2, "max_num_batched_tokens": 24}
    return LLM(path, device="cpu", tensor_parallel_size=2, **engine_kwargs, **kwargs)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, checkpoint_factory):
    """(name, path, TP=2 LLM) — the LLM lives for the whole module."""
    arch, overrides = CASES[request.param]
    path = checkpoint_factory(arch, **overrides)
    llm = tp2_llm(request.param, path)
    yield request.param, path, llm
    llm.engine.shutdown()


def test_tp2_greedy_equals_tp1_and_hf(case):
    name, path, llm = case
    got = greedy_tokens(llm, PROMPTS)
    assert got == hf_greedy(path, PROMPTS, MAX_NEW)
    tp1 = LLM(path, device="cpu", num_kv_blocks=64)
    assert got == greedy_tokens(tp1, PROMPTS)
    if name == "llama":
        assert llm.engine.stats().num_preemptions > 0  # the schedule really was the hard one


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_with_async_scheduling_equals_tp1(checkpoint_factory, name):
    """Steps overlap: each rank launches step N+1 (fed N's tokens on the device) before it replies N."""
    arch, overrides = CASES[name]
    path = checkpoint_factory(arch, **overrides)
    llm = tp2_llm(name, path, async_scheduling=True)
    try:
        got = greedy_tokens(llm, PROMPTS)
        assert llm.engine.config.async_scheduling
        assert llm.engine.core.executor.describe()["custom_all_reduce"] is False  # gloo: no fast path on CPU
        if name == "llama":
            assert llm.engine.stats().num_preemptions > 0
            seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=6, ignore_eos=True, logprobs=2)
            prompts = [{"prompt_token_ids": p} for p in PROMPTS[:4]]
            tp1 = LLM(path, device="cpu", async_scheduling=False).generate(prompts, seeded, use_tqdm=False)
            tp2 = llm.generate(prompts, seeded, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in tp2] == [o.outputs[0].token_ids for o in tp1]
            assert ([[lp.keys() for lp in o.outputs[0].logprobs] for o in tp2]
                    == [[lp.keys() for lp in o.outputs[0].logprobs] for o in tp1])
    finally:
        llm.engine.shutdown()
    assert got == greedy_tokens(LLM(path, device="cpu", num_kv_blocks=64), PROMPTS)


def test_tp2_prefix_cache_hits_give_the_same_tokens(case):
    name, path, llm = case
    first = greedy_tokens(llm, PROMPTS[-3:])
    hits_before = llm.engine.stats().prefix_cache_hits
    assert greedy_tokens(llm, PROMPTS[-3:]) == first
    assert llm.engine.stats().prefix_cache_hits > hits_before


def test_a_step_message_larger_than_the_first_broadcast_buffer_arrives_whole(case):
    from carpool.worker import tp_codec
    from carpool.worker.tp_worker import ControlChannel

    name, path, llm = case
    if name == "llama":
        pytest.skip("this case's KV cache is deliberately too small for long prompts")
    prompts = prompts_of_lengths([450] * 12, seed=8)  # ~20 KB of prompt ids in the first step
    assert len(tp_codec.dumps(prompts)) > ControlChannel.FIRST
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    assert greedy_tokens(llm, prompts, params) == greedy_tokens(LLM(path, device="cpu"), prompts, params)


def test_kv_blocks_are_sized_per_rank(checkpoint_factory):
    """Each rank holds half the KV heads, so the same per-rank budget holds twice the blocks."""
    path = checkpoint_factory("llama")
    budget = 18 * LLAMA_BLOCK_BYTES_TP2
    assert LLM(path, device="cpu", kv_cache_memory_bytes=budget).engine.stats().num_kv_blocks == 9
    llm = LLM(path, device="cpu", tensor_parallel_size=2, kv_cache_memory_bytes=budget)
    try:
        assert llm.engine.stats().num_kv_blocks == 18
    finally:
        llm.engine.shutdown()


def test_seeded_sampling_and_logprobs_agree_with_tp1(checkpoint_factory):
    """Seeded, greedy and penalized greedy rows in one batch, finishing at different steps: steps go from
    rank 0 sampling and broadcasting to every rank sampling alone (all greedy, unpenalized) and back."""
    path = checkpoint_factory("llama")
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=8, ignore_eos=True, logprobs=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    penalized = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, repetition_penalty=1.3)
    params = [seeded, greedy, seeded, penalized, greedy, seeded]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:6]]
    tp1 = LLM(path, device="cpu").generate(prompts, params, use_tqdm=False)
    llm = LLM(path, device="cpu", tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22)
    try:
        tp2 = llm.generate(prompts, params, use_tqdm=False)
        # the same greedy requests again, alone: every step then samples on every rank
        alone = llm.generate(prompts[:2], greedy, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    tp1_alone = LLM(path, device="cpu").generate(prompts[:2], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids for o in tp1_alone]
    for a, b in zip(tp1, tp2):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert (a.outputs[0].logprobs is None) == (b.outputs[0].logprobs is None)
        for la, lb in zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or []):
            assert la.keys() == lb.keys()
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)


def test_only_greedy_unpenalized_steps_sample_on_every_rank():
    greedy = SamplingParams(temperature=0.0, logprobs=3)
    assert samples_on_every_rank([greedy, SamplingParams(temperature=1e-6, min_tokens=2)])
    assert not samples_on_every_rank([greedy, SamplingParams(temperature=0.7, seed=1)])
    assert not samples_on_every_rank([greedy, SamplingParams(temperature=0.0, presence_penalty=0.5)])
    assert not samples_on_every_rank([SamplingParams(temperature=0.0, repetition_penalty=1.1)])
    assert not samples_on_every_rank([greedy, None])


@pytest.mark.parametrize("field,overrides,tp", [
    ("num_attention_heads=4", {}, 3),
    ("num_key_value_heads=3", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3}, 2),
    ("intermediate_size=129", {"intermediate_size": 129}, 2),
])
def test_heads_that_do_not_split_are_refused_before_spawning(checkpoint_factory, field, overrides, tp):
    path = checkpoint_factory("llama", **overrides)
    children = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match=f"^tensor_parallel_size: .*{field}.*tensor_parallel_size={tp}"):
        LLM(path, device="cpu", tensor_parallel_size=tp)
    assert set(multiprocessing.active_children()) == children


def test_a_checkpoint_error_in_a_worker_is_the_same_value_error_as_with_one_process(tmp_path, llama_path):
    path = copy_without_weight(llama_path, str(tmp_path / "partial"), "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ValueError, match="^checkpoint at .* lacks weights for: model.layers.1.mlp.down_proj"):
        LLM(path, device="cpu", tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22)


def test_check_tensor_parallel_accepts_kv_replication(checkpoint_factory):
    from carpool.config import ModelConfig

    model = ModelConfig.from_pretrained(checkpoint_factory("llama"))  # 4 heads, 2 KV heads
    check_tensor_parallel(model, 4)  # each KV head on 2 ranks
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        check_tensor_parallel(model, 8)


@pytest.mark.parametrize("victim,async_scheduling", [(0, False), (1, False), (1, True)])
def test_killed_worker_fails_the_next_step_fast_and_leaves_no_process(llama_path, victim, async_scheduling):
    llm = LLM(llama_path, device="cpu", tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22,
              async_scheduling=async_scheduling)
    engine = llm.engine
    pids = engine.core.executor.worker_pids
    engine.add_request("r", PROMPTS[3], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert (engine.core._in_flight is not None) == async_scheduling  # the victim dies with a step in flight
    os.kill(pids[victim], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(TPWorkerError, match=f"rank {victim} .*SIGKILL.*cannot continue"):
        for _ in range(50):
            engine.step()
    assert time.monotonic() - start < 5.0
    with pytest.raises(TPWorkerError, match="engine is down"):
        engine.core.executor.determine_num_blocks()
    engine.shutdown()
    assert all(process_gone(pid) for pid in pids)


def test_shutdown_and_a_killed_engine_leave_no_worker_process(llama_path):
    llm = LLM(llama_path, device="cpu", tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22)
    pids = llm.engine.core.executor.worker_pids
    llm.engine.shutdown()
    llm.engine.shutdown()  # idempotent
    assert all(process_gone(pid) for pid in pids)

    # An engine process that is killed outright cannot clean up: its workers notice and exit.
    script = textwrap.dedent(f"""
        import os, signal
        from carpool import LLM
        llm = LLM({llama_path!r}, device="cpu", tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22)
        print(*llm.engine.core.executor.worker_pids, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    orphans = [int(p) for p in proc.stdout.split()]
    assert len(orphans) == 2, proc.stderr
    deadline = time.monotonic() + 10
    while not all(process_gone(pid) for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(process_gone(pid) for pid in orphans)


def test_two_node_layout_through_env_rendezvous(llama_path, monkeypatch):
    """Two "nodes" on one host, exactly as the README tells users to start them: node 1 runs
    `python -m carpool.worker.multiproc_executor`, node 0 the engine; each holds one rank."""
    from carpool.worker.tp_processes import free_port

    env = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    node1 = subprocess.Popen([sys.executable, "-m", "carpool.worker.multiproc_executor", "--model", llama_path,
                              "-tp", "2", "--device", "cpu", "--kv-cache-memory-bytes", str(1 << 22)],
                             env={**os.environ, **env, "NODE_RANK": "1"})
    try:
        for key, value in {**env, "NODE_RANK": "0"}.items():
            monkeypatch.setenv(key, value)
        llm = LLM(llama_path, device="cpu", tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22)
        assert len(llm.engine.core.executor.worker_pids) == 1  # rank 0 here, rank 1 on "node 1"
        prompts = PROMPTS[:3]
        assert greedy_tokens(llm, prompts) == hf_greedy(llama_path, prompts, MAX_NEW)
        llm.engine.shutdown()
        assert node1.wait(10) == 0  # node 1's rank left on rank 0's shutdown command
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
