"""The worker's use of the Triton backend: CUDA-graph replays' static inputs and host IO kernels, and whole
engines on the Triton kernels giving the torch backend's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from triton_cases import DEVICE, interpreter_only, poison_outputs

from carpool.ops import triton as tri  # noqa: E402
from carpool.ops.triton.attention import MIN_TOKENS_PER_SPLIT, balanced_decode_plan  # noqa: E402

# Idle decode splits compute log2(0) = -inf on purpose; numpy warns about it in the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_outputs(monkeypatch)


@pytest.mark.parametrize("kernel_io", [False, True])
def test_graph_runner_uploads_each_replay_with_plan_longest_first_and_padding_last(monkeypatch,
                                                                                  kernel_io: bool) -> None:
    """What a captured graph reads from its static buffers, refilled before each replay from one of two
    host mirrors in turn (by one copy, or with kernel_io by one kernel that reads the mirror itself): the
    step's rows, padding rows that attend one key and store nothing, the decode plan (longest request
    first, padding last), and the tokens the previous step sampled, which only the device holds (the
    fix-up). Replays are faked: the buffers are checked at each replay, through steps of different
    sizes so each mirror is reused with other row counts (and, with kernel_io, by the kernel for small
    steps and the copy for large ones in turn)."""
    from types import SimpleNamespace

    from carpool.attention.triton_paged import TritonAttentionBackend
    from carpool.ops.triton import host_io
    from carpool.worker.cuda_graph import (
        HOST_IO_MAX_ROWS,
        HOST_IO_MAX_TABLE_WORDS,
        CUDAGraphRunner,
        GraphShape,
    )
    from carpool.worker.input_batch import PendingFixup, StepInputs

    model = SimpleNamespace(attention_layers=lambda: [SimpleNamespace(num_kv_heads=8)])
    backend = TritonAttentionBackend()
    runner = CUDAGraphRunner(model, backend, 64, 65536, 16, torch.device(DEVICE), kernel_io=kernel_io)  # type: ignore[arg-type]
    splits = backend._decode_splits
    assert splits[1] == 32 and splits[48] == 2 and splits[64] == 2
    seen: list[dict] = []
    for bs in runner.batch_sizes:
        runner.graphs[GraphShape(bs)] = SimpleNamespace(replay=lambda: seen.append(
            {**{name: t.to("cpu", copy=True) for name, t in runner.staged.tensors.items()},
             "block_tables": runner.block_tables.to("cpu", copy=True)}))
        runner.logits[GraphShape(bs)] = torch.zeros(bs, 5)

    def step(lens: list[int], width: int, salt: int) -> StepInputs:
        n = len(lens)
        return StepInputs(rows=np.arange(n), input_ids=np.arange(n, dtype=np.int64) + salt,
                          positions=np.array(lens, dtype=np.int64) - 1,
                          slot_mapping=np.arange(n, dtype=np.int64) * 7 + salt,
                          query_start_loc=np.arange(n + 1, dtype=np.int32), seq_lens=np.array(lens, dtype=np.int32),
                          block_tables=np.arange(n * width, dtype=np.int32).reshape(n, width) + salt,
                          sample_rows=np.arange(n), logits_indices=np.arange(n, dtype=np.int64), max_query_len=1,
                          max_seq_len=max(lens), pending_token_index=np.zeros(0, dtype=np.int64),
                          pending_rows=np.zeros(0, dtype=np.int64))

    # (the third step reuses the first one's mirror: its padding row 3 held a real row there). Fix-ups:
    # input rows -> the previous step's sampled tokens (device values), in and out of order, or none.
    cases = [([300, 1000] + [100] * 45, 63, 100, [3, 0, 46]), ([5, 9], 1, 200, [0, 1]), ([8] * 3, 1, 300, []),
             ([40] * 16 + [700] * 31, 44, 400, [5]), ([7, 300, 20], 19, 500, [2, 0]),
             ([64] * 5, 4, 600, [4, 1, 3]), ([33] * 9, 3, 700, [8]), ([10] * 2, 3000, 800, [1])]
    if kernel_io:
        runner._compile_host_io()  # (start-up: both kernel variants once, before any step)
    staged_by_kernel = []
    real_stage = host_io.stage_inputs
    monkeypatch.setattr(host_io, "stage_inputs", lambda *a: staged_by_kernel.append(1) or real_stage(*a))
    for lens, width, salt, fix_rows in cases:
        inputs = step(lens, width, salt)
        values = torch.arange(len(fix_rows), dtype=torch.int64, device=DEVICE) * 11 + 5000 + salt
        runner.run(inputs, PendingFixup(np.array(fix_rows, dtype=np.int64), values) if fix_rows else None)
        got, b = seen[-1], len(lens)
        bs = next(s for s in runner.batch_sizes if s >= b)
        expected_ids = inputs.input_ids.copy()
        expected_ids[fix_rows] = values.cpu().numpy()
        assert got["input_ids"][:b].tolist() == expected_ids.tolist()
        for name in ("positions", "slot_mapping", "seq_lens"):
            assert got[name][:b].tolist() == getattr(inputs, name).tolist(), name
        assert torch.equal(got["block_tables"][:b, :width], torch.from_numpy(inputs.block_tables))
        assert (got["slot_mapping"][b:bs] == -1).all() and (got["seq_lens"][b:bs] == 1).all()
        assert (got["block_tables"][b:bs, 0] == 0).all()
        plan = balanced_decode_plan(inputs.seq_lens, 8, splits[bs])
        assert got["decode_order"][:bs].tolist() == plan.order.tolist() + list(range(b, bs))
        assert got["decode_split_len"].item() == plan.split_len
    # (small: few rows and block tables of at most HOST_IO_MAX_TABLE_WORDS; the last case has long ones)
    small = sum(1 for lens, width, *_ in cases if (bs := next(s for s in runner.batch_sizes if s >= len(lens)))
                <= HOST_IO_MAX_ROWS and bs * width <= HOST_IO_MAX_TABLE_WORDS)
    assert len(staged_by_kernel) == (small if kernel_io else 0) and 0 < small < len(cases)
    assert seen[0]["decode_order"][:2].tolist() == [1, 0]  # longest first
    assert seen[0]["decode_split_len"].item() >= MIN_TOKENS_PER_SPLIT
    assert seen[1]["decode_split_len"].item() == 1  # many splits: batch order, one-tile splits


def test_static_inputs_upload_a_prefix_from_alternating_mirrors() -> None:
    from carpool.worker.staging import Field, StaticInputs

    staged = StaticInputs([Field("a", torch.long, (3,), -1), Field("rows", torch.int32, (4, 5), 0)],
                          torch.device("cpu"))
    assert staged.tensors["a"].tolist() == [-1, -1, -1] and staged.end_of("rows", 2) == 32 + 2 * 20
    host = staged.host()
    host["a"][:] = [1, 2, 3]
    host["rows"][:] = 9
    staged.upload(staged.end_of("rows", 2))  # the first two rows only
    assert staged.tensors["a"].tolist() == [1, 2, 3]
    assert staged.tensors["rows"][:, 0].tolist() == [9, 9, 0, 0]
    host2 = staged.host()  # the other mirror: still the initial values
    assert host2["a"].tolist() == [-1, -1, -1] and staged.host() is host2
    staged.upload()
    assert staged.tensors["a"].tolist() == [-1, -1, -1] and staged.host() is host


def test_copy_to_host_and_stage_inputs_read_and_write_where_told() -> None:
    """The host_io kernels (their host side in pinned memory on a GPU): a plain copy, and the staging of
    a replay's inputs: ids with the fix-up applied, a word range copied and nothing outside it, packed
    block tables spread into their wider home and nothing else of it touched."""
    from carpool.ops.triton.host_io import copy_to_host, stage_inputs

    def host(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if DEVICE == "cuda" else t

    src = torch.arange(7, dtype=torch.int64, device=DEVICE) * 3
    dst = host(torch.full((7,), -1, dtype=torch.int64))
    copy_to_host(src, dst)
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # (the host reads what a kernel wrote)
    assert dst.tolist() == src.tolist()
    with pytest.raises(ValueError, match="copy_to_host"):
        copy_to_host(src, host(torch.empty(6, dtype=torch.int64)))

    host_ids = host(torch.tensor([10, 11, 12, 13], dtype=torch.int64))
    ids = torch.full((6,), -1, dtype=torch.int64, device=DEVICE)
    source = host(torch.tensor([-1, 1, -1, 0], dtype=torch.int32))
    values = torch.tensor([900, 901], dtype=torch.int64, device=DEVICE)
    host_words = host(torch.arange(20, dtype=torch.int32) + 100)
    words = torch.zeros(20, dtype=torch.int32, device=DEVICE)
    host_tables = host(torch.arange(6, dtype=torch.int32).view(2, 3) + 50)
    tables = torch.full((4, 5), -7, dtype=torch.int32, device=DEVICE)
    stage_inputs(host_ids, ids, source, values, host_words, words, 4, 9, host_tables, tables)
    assert ids.tolist() == [10, 901, 12, 900, -1, -1]
    assert words.tolist() == [0] * 4 + list(range(104, 109)) + [0] * 11
    assert tables[:2, :3].tolist() == host_tables.tolist()
    assert (tables[2:] == -7).all() and (tables[:, 3:] == -7).all()
    stage_inputs(host_ids, ids, None, None, host_words, words, 0, 0, host(host_tables[:1, :2].contiguous()), tables)
    assert ids[:4].tolist() == host_ids.tolist()  # (no fix-up)
    with pytest.raises(ValueError, match="stage_inputs"):
        stage_inputs(host_ids, ids, None, None, host_words, words, 0, 0, host(torch.zeros(5, 3, dtype=torch.int32)),
                     tables)
    with pytest.raises(ValueError, match="together"):
        stage_inputs(host_ids, ids, source, None, host_words, words, 0, 0, host_tables, tables)
    with pytest.raises(ValueError, match="word range"):
        stage_inputs(host_ids, ids, None, None, host_words, words, 4, 21, host_tables, tables)


# ---- in the model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # head_dim 16; head_dim 24 with q/k norms on views
def test_engine_with_triton_kernels_gives_the_same_greedy_tokens(checkpoint_factory, arch: str) -> None:
    from checkpoints import prompts_of_lengths

    from carpool import LLM, SamplingParams

    path = checkpoint_factory(arch)
    prompts = prompts_of_lengths([1, 17, 50])  # (interpreter time: few, short prompts, yet chunked)
    prompts.append(prompts[2][:36] + [1, 2, 3])  # a prefix-cache hit on prompt 2's first blocks
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        # 32-token steps: chunked prefill, and steps mixing decodes with prefill chunks.
        llm = LLM(path, device=DEVICE, kernel_backend=backend, max_num_batched_tokens=32)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
    assert tokens["triton"] == tokens["torch"]


def test_engine_batch_one_steps_take_the_gemv_and_match_torch(checkpoint_factory, monkeypatch) -> None:
    from checkpoints import prompts_of_lengths

    from carpool import LLM, SamplingParams
    calls = []
    real = tri.gemv
    monkeypatch.setattr(tri, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = []
    real_fused = tri.gemv_silu_and_mul
    monkeypatch.setattr(tri, "gemv_silu_and_mul", lambda *a, **k: fused.append(1) or real_fused(*a, **k))
    rope = []
    real_rope = tri.gemv_rope_and_store_kv
    monkeypatch.setattr(tri, "gemv_rope_and_store_kv", lambda *a, **k: rope.append(1) or real_rope(*a, **k))
    path = checkpoint_factory("qwen2")  # q/k/v biases go through the GEMV's bias
    prompt = {"prompt_token_ids": prompts_of_lengths([23])[0]}
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens = {backend: LLM(path, device=DEVICE, kernel_backend=backend).generate(
        [prompt], params, use_tqdm=False)[0].outputs[0].token_ids for backend in ("torch", "triton")}
    assert calls, "a batch-1 decode step should use the Triton GEMV"
    assert fused, "a batch-1 decode step's gate/up projection should use the GEMV with SiLU-and-mul"
    assert rope, "a batch-1 decode step's q/k/v projection should use the GEMV with RoPE and the KV store"
    assert tokens["triton"] == tokens["torch"]


@interpreter_only
def test_engine_seeded_sampling_with_the_one_pass_kernel_is_batch_independent(checkpoint_factory) -> None:
    from checkpoints import prompts_of_lengths

    from carpool import LLM, SamplingParams

    llm = LLM(checkpoint_factory("llama"), device="cpu", kernel_backend="triton")
    assert llm.engine.core.executor.runner.sampler.fast_sample is not None
    prompts = prompts_of_lengths([5, 12, 20])  # (interpreter time: short prompts, 3 tokens)
    seeded = SamplingParams(temperature=0.9, seed=5, max_tokens=3, ignore_eos=True)
    other = SamplingParams(temperature=0.9, max_tokens=3, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": prompts[1]}], seeded, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate([{"prompt_token_ids": p} for p in prompts], [other, seeded, other], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


@interpreter_only
def test_engine_decodes_a_shared_prefix_with_cascade_attention(checkpoint_factory) -> None:
    """16 requests behind one 320-token prefix: after the first computes it, the others hit its cached
    blocks, and their decode steps read it once through the cascade kernels; tokens equal torch_ref's."""
    from checkpoints import prompts_of_lengths

    from carpool import LLM, SamplingParams
    from carpool.worker.model_runner import ModelRunner

    path = checkpoint_factory("llama")
    prefix = prompts_of_lengths([320], seed=21)[0]
    prompts = [prefix + tail for tail in prompts_of_lengths([5] * 16, seed=22)]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)  # (one decode step: interpreter time)
    seen: list[int] = []
    forward = ModelRunner._forward

    def spy(self, inputs, fixup, **kwargs):
        seen.append(inputs.cascade_prefix_len)
        return forward(self, inputs, fixup, **kwargs)

    ModelRunner._forward = spy  # type: ignore[method-assign]
    try:
        fast = LLM(path, device="cpu", kernel_backend="triton").generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        ModelRunner._forward = forward  # type: ignore[method-assign]
    ref = LLM(path, device="cpu").generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert 320 in seen  # the decode steps took the cascade path
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in ref]
