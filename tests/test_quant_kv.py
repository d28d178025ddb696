"""The FP8 KV cache: the Triton store, RoPE + store and attention kernels against their torch twins
(ops/torch_ref/quant.py), and a model's logits with an FP8 cache against the model-dtype cache.

Kernels run under the Triton interpreter on CPU (tests/conftest.py) with float32 queries, and with bfloat16
ones for the float16 tiles the GPU runs (paged_kv.fp8_tile_query); K/V are e4m3 with per-layer scales that
are not 1, so a scale applied twice or not at all fails.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("triton")

from quant_checkpoints import run_prompt_logits  # noqa: E402

from carpool.forward_batch import AttentionMetadata, TritonAttentionMetadata  # noqa: E402
from carpool.ops import triton as tri  # noqa: E402
from carpool.ops.torch_ref import quant as ref  # noqa: E402
from carpool.ops.triton import utils  # noqa: E402
from carpool.ops.triton.paged_kv import store_kvcache  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
FP8 = torch.float8_e4m3fn
K_SCALE, V_SCALE = 0.75, 1.5  # not 1: a scale dropped or applied twice shows
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(utils, "empty_output", poisoned)


def fp8_batch(reqs: list[tuple[int, int]], num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
              seed: int = 0):
    """Random float32 q/k/v and an e4m3 cache already holding random K/V, for requests (seq_len, q_len);
    each request's q_len new tokens go to its last slots, and one padding row (slot -1) ends the batch."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // block_size) for s, _ in reqs]
    num_blocks = sum(blocks_per_req) + 2
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(reqs), max(blocks_per_req), dtype=torch.int32)
    slots: list[int] = []
    qsl = [0]
    for i, ((seq_len, q_len), nb) in enumerate(zip(reqs, blocks_per_req)):
        table = [ids.pop() for _ in range(nb)]
        block_tables[i, :nb] = torch.tensor(table, dtype=torch.int32)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
        qsl.append(qsl[-1] + q_len)
    slots.append(-1)
    n = len(slots)
    q = torch.randn(n, num_q_heads, head_dim, generator=gen)
    k, v = (torch.randn(n, num_kv_heads, head_dim, generator=gen) for _ in range(2))
    caches = [(torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen) / s).to(FP8)
              for s in (K_SCALE, V_SCALE)]
    seq_lens = [s for s, _ in reqs]
    meta = TritonAttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        max_query_len=max(q for _, q in reqs), max_seq_len=max(seq_lens), query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens)
    to = functools.partial(torch.Tensor.to, device=DEVICE)
    return to(q), to(k), to(v), to(caches[0]), to(caches[1]), meta


def check_fp8_attention(reqs: list[tuple[int, int]], num_q_heads: int, num_kv_heads: int, head_dim: int,
                        block_size: int = 16, num_splits: int | None = None) -> None:
    q, k, v, kc, vc, meta = fp8_batch(reqs, num_q_heads, num_kv_heads, head_dim, block_size)
    meta.num_splits = num_splits
    scale = head_dim ** -0.5
    kc_ref, vc_ref = kc.clone().cpu(), vc.clone().cpu()
    cpu_meta = AttentionMetadata(meta.query_start_loc.cpu(), meta.seq_lens.cpu(), meta.block_tables.cpu(),
                                 meta.slot_mapping.cpu(), meta.max_query_len, meta.max_seq_len,
                                 meta.query_start_loc_cpu, meta.seq_lens_cpu)
    expected = ref.paged_attention_fp8(q.cpu(), k.cpu(), v.cpu(), kc_ref, vc_ref, cpu_meta, scale, K_SCALE, V_SCALE)
    out = tri.paged_attention(q, k, v, kc, vc, meta, scale, K_SCALE, V_SCALE)
    n = meta.query_start_loc_cpu[-1]
    assert not out[:n].isnan().any(), "some output elements were never written"
    torch.testing.assert_close(out[:n].cpu(), expected[:n], atol=2e-5, rtol=1e-4)
    # The store wrote the same e4m3 bytes as the reference, and nothing for the padding row.
    assert torch.equal(kc.cpu().view(torch.uint8), kc_ref.view(torch.uint8))
    assert torch.equal(vc.cpu().view(torch.uint8), vc_ref.view(torch.uint8))


def check_fp8_attention_16bit_query(reqs: list[tuple[int, int]], num_splits: int | None = None,
                                    huge_dim0: bool = False, cascade_prefix_len: int = 0) -> None:
    """bfloat16 q/k/v through the float16 tiles against the reference on the same values in float32; the
    tolerance is the bfloat16 output's rounding. huge_dim0: q's first dim is 1e5 (beyond float16) and every
    key's is 0, so the scores stay ordinary and a query left unscaled, or scores not scaled back, show.
    cascade_prefix_len: every request shares its first blocks with request 0, read as a cascade."""
    q, k, v, kc, vc, meta = fp8_batch(reqs, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    if huge_dim0:
        q[..., 0], k[..., 0], kc[..., 0] = 1e5, 0.0, 0.0
    if cascade_prefix_len:
        shared = cascade_prefix_len // 16
        meta.block_tables[1:, :shared] = meta.block_tables[0, :shared]
        meta.cascade_prefix_len = torch.tensor([cascade_prefix_len], dtype=torch.int32, device=DEVICE)
    meta.num_splits = num_splits
    scale = 16 ** -0.5
    kc_ref, vc_ref = kc.clone().cpu(), vc.clone().cpu()
    cpu_meta = AttentionMetadata(meta.query_start_loc.cpu(), meta.seq_lens.cpu(), meta.block_tables.cpu(),
                                 meta.slot_mapping.cpu(), meta.max_query_len, meta.max_seq_len,
                                 meta.query_start_loc_cpu, meta.seq_lens_cpu)
    expected = ref.paged_attention_fp8(q.float().cpu(), k.float().cpu(), v.float().cpu(), kc_ref, vc_ref, cpu_meta,
                                       scale, K_SCALE, V_SCALE)
    out = tri.paged_attention(q, k, v, kc, vc, meta, scale, K_SCALE, V_SCALE)
    n = meta.query_start_loc_cpu[-1]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[:n].float().cpu(), expected[:n], atol=1e-2, rtol=1e-2)


def test_fp8_decode_with_bf16_queries_matches_reference_across_key_tiles() -> None:
    # contexts shorter than, spanning and several times the FP8 decode tile (128 keys), over 3 splits
    check_fp8_attention_16bit_query([(s, 1) for s in (1, 70, 200, 300)], num_splits=3)


def test_fp8_prefill_and_decode_with_bf16_queries_match_reference() -> None:
    check_fp8_attention_16bit_query([(21, 21), (40, 7), (150, 1)])


def test_fp8_attention_with_queries_beyond_float16_range_matches_reference() -> None:
    check_fp8_attention_16bit_query([(40, 7), (150, 1)], huge_dim0=True)


def test_fp8_cascade_decode_with_bf16_queries_matches_reference() -> None:
    from carpool.forward_batch import CASCADE_ALIGN

    # the prefix is one CASCADE_ALIGN (half an FP8 decode tile): the split kernel's tiles shrink to it
    check_fp8_attention_16bit_query([(CASCADE_ALIGN + 5, 1), (CASCADE_ALIGN + 150, 1)],
                                    cascade_prefix_len=CASCADE_ALIGN)


@pytest.mark.parametrize("bf16", [False, True])
def test_fp8_decode_reads_tiles_as_e4m3_pairs_with_the_outputs_of_the_per_tile_cast(monkeypatch, bf16: bool) -> None:
    """DecodeConfig.e4m3_pairs (int16 pairs, each converted on its own) against Triton's cast of each tile:
    the same output bit for bit (e4m3 values are exact in the tiles' dtype), over a head_dim whose pairs
    fill no power-of-two tile (24: 12 pairs in a 16-pair tile) and keys past each request's end."""
    from carpool.ops.triton import decode_attention as da

    q, k, v, kc, vc, meta = fp8_batch([(s, 1) for s in (1, 70, 200)], 4, 2, 24, 16)
    if bf16:
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    outs = []
    for pairs in (True, False):
        cfg = da.default_decode_config(24, q.dtype if bf16 else torch.float32, kv_fp8=True)
        monkeypatch.setattr(da, "default_decode_config",
                            lambda *a, _c=cfg, _p=pairs, **kw: da.replace(_c, e4m3_pairs=_p))
        outs.append(tri.paged_attention(q, None, None, kc, vc, meta, 24 ** -0.5, K_SCALE, V_SCALE)[:3].clone())
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])


def test_e4m3_pairs_are_taken_only_where_every_row_is_whole_pairs(monkeypatch) -> None:
    from carpool.ops.triton.paged_kv import E4M3_CAST, E4M3_PAIRS_CAST, E4M3_PAIRS_PTX, e4m3_pairs_mode

    cache = torch.zeros(4, 16, 2, 24, dtype=FP8)
    monkeypatch.setattr(utils, "interpreting", lambda: True)
    assert e4m3_pairs_mode(True, torch.float16, cache, cache) == E4M3_PAIRS_CAST.value  # (no inline PTX there)
    assert e4m3_pairs_mode(False, torch.float16, cache, cache) == E4M3_CAST.value
    assert e4m3_pairs_mode(True, torch.float16, cache, torch.zeros(4, 16, 2, 23, dtype=FP8)) == E4M3_CAST.value
    odd_strides = torch.zeros(4, 16, 3, 25, dtype=FP8)[..., :24]
    assert e4m3_pairs_mode(True, torch.float16, cache, odd_strides) == E4M3_CAST.value
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    for query_dtype in (torch.float16, torch.bfloat16):  # (16-bit queries: float16 tiles)
        assert e4m3_pairs_mode(True, query_dtype, cache, cache) == E4M3_PAIRS_PTX.value
    assert e4m3_pairs_mode(True, torch.float32, cache, cache) == E4M3_PAIRS_CAST.value


def test_fp8_decode_matches_reference() -> None:
    check_fp8_attention([(s, 1) for s in (1, 17, 70)], num_q_heads=4, num_kv_heads=2, head_dim=24)


def test_fp8_decode_split_over_several_programs_matches_reference() -> None:
    check_fp8_attention([(90, 1), (33, 1)], num_q_heads=2, num_kv_heads=1, head_dim=16, num_splits=3)


def test_fp8_prefill_chunks_prefix_hits_and_decodes_in_one_batch_match_reference() -> None:
    # a whole prompt, a chunk after a cached prefix, and a decode, with a page size the tiles straddle
    check_fp8_attention([(21, 21), (40, 7), (29, 1)], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=8)


def test_fp8_cascade_decode_over_a_shared_prefix_matches_reference() -> None:
    from carpool.forward_batch import CASCADE_ALIGN

    q, k, v, kc, vc, meta = fp8_batch([(CASCADE_ALIGN + 5, 1), (CASCADE_ALIGN + 9, 1)], 2, 1, 16, 16)
    # both requests read the same first blocks: copy request 0's table prefix into request 1's
    shared = CASCADE_ALIGN // 16
    meta.block_tables[1, :shared] = meta.block_tables[0, :shared]
    meta.cascade_prefix_len = torch.tensor([CASCADE_ALIGN], dtype=torch.int32, device=DEVICE)
    scale = 16 ** -0.5
    kc_ref, vc_ref = kc.clone().cpu(), vc.clone().cpu()
    cpu_meta = AttentionMetadata(meta.query_start_loc.cpu(), meta.seq_lens.cpu(), meta.block_tables.cpu(),
                                 meta.slot_mapping.cpu(), 1, meta.max_seq_len, meta.query_start_loc_cpu,
                                 meta.seq_lens_cpu)
    expected = ref.paged_attention_fp8(q.cpu(), k.cpu(), v.cpu(), kc_ref, vc_ref, cpu_meta, scale, K_SCALE, V_SCALE)
    out = tri.paged_attention(q, k, v, kc, vc, meta, scale, K_SCALE, V_SCALE)
    torch.testing.assert_close(out[:2].cpu(), expected[:2], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fp8_rope_and_store_kv_matches_reference(qk_norm: bool) -> None:
    from carpool.layers.rotary import RotaryEmbedding

    head_dim, n = 16, 5
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, h, head_dim, generator=gen) for h in (4, 2, 2))
    positions = torch.tensor([0, 3, 7, 100, 2])
    slots = torch.tensor([5, 0, 17, -1, 9])
    cos_sin = RotaryEmbedding(head_dim, 512, 10000.0, None).cos_sin_cache
    qw, kw = (torch.rand(head_dim, generator=gen) + 0.5 for _ in range(2)) if qk_norm else (None, None)
    caches = [torch.zeros(3, 8, 2, head_dim, dtype=FP8) for _ in range(4)]
    expected = ref.rope_and_store_kv_fp8(positions, q.clone(), k, v, cos_sin, caches[0], caches[1], slots, K_SCALE,
                                         V_SCALE, qw, kw, 1e-6)
    dev = [t.to(DEVICE) for t in (positions, q.clone(), k, v, cos_sin, caches[2], caches[3], slots)]
    out = tri.rope_and_store_kv(*dev, *(t.to(DEVICE) if t is not None else None for t in (qw, kw)), 1e-6,
                                k_scale=K_SCALE, v_scale=V_SCALE)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(dev[5].cpu().view(torch.uint8), caches[0].view(torch.uint8))
    assert torch.equal(dev[6].cpu().view(torch.uint8), caches[1].view(torch.uint8))


def test_fp8_store_saturates_instead_of_overflowing_to_nan() -> None:
    k = torch.tensor([[[1000.0, -1000.0, 3.0, 0.0]]])
    kc, vc = torch.zeros(1, 1, 1, 4, dtype=FP8), torch.zeros(1, 1, 1, 4, dtype=FP8)
    store_kvcache(k.to(DEVICE), k.to(DEVICE), kc, vc, torch.tensor([0], device=DEVICE), 1.0, 2.0)
    assert kc.float().flatten().tolist() == [448.0, -448.0, 3.0, 0.0]
    assert vc.float().flatten().tolist() == [448.0, -448.0, 1.5, 0.0]


@pytest.mark.skipif(not INTERPRET, reason="CPU engine run under the Triton interpreter")
def test_triton_backend_over_an_fp8_cache_generates_the_torch_backends_tokens(llama_path: str) -> None:
    """The engine's Triton attention backend over an FP8 cache (the model-dtype kernels switched by the
    cache dtype) through a prefill and batched decode steps: the torch reference backend's greedy tokens."""
    from checkpoints import prompts_of_lengths

    from carpool import LLM, SamplingParams

    prompts = [{"prompt_token_ids": p} for p in prompts_of_lengths([23, 9])]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(llama_path, device="cpu", dtype="float32", kernel_backend=backend, kv_cache_dtype="fp8")
        tokens[backend] = [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["triton"] == tokens["torch"]


# --- a model's logits ---------------------------------------------------------------------------------------

# Largest |logit| difference allowed between an FP8-KV run and a float32-KV run, as a fraction of the
# largest |logit| of the float32 run. e4m3 keeps 3 mantissa bits: each K/V value is off by up to 2^-4 of
# itself. Measured on the tiny random Llama below: 0.065 (0.187 on logits up to 2.87), either scale.
FP8_KV_LOGIT_RTOL = 0.1


def test_fp8_kv_cache_logits_stay_within_tolerance_of_the_model_dtype_cache(llama_path: str) -> None:
    """The torch reference path of a whole model: prefill in chunks (each chunk reads the earlier ones
    from the FP8 cache) gives logits within FP8_KV_LOGIT_RTOL (relative) of the float32 cache's, with
    per-layer scales 1 (no calibration) and 0.5 (as a checkpoint's k_scale / v_scale would set them)."""
    from carpool.config import ModelConfig
    from carpool.models.loader import load_model
    from carpool.models.runtime import ModelRuntime
    from carpool.quantization.config import KVCacheScheme

    config = ModelConfig.from_pretrained(llama_path, dtype="float32")
    prompt = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    model = load_model(config, ModelRuntime.plain(), "cpu")
    expected = run_prompt_logits(model, model.attention_layers(), prompt, 8, torch.float32)
    fp8_model = load_model(config, ModelRuntime.for_inference("torch", kv_cache=KVCacheScheme("fp8")), "cpu")
    for scale in (1.0, 0.5):
        for layer in fp8_model.attention_layers():
            layer.kv_scales = (scale, scale)
        got = run_prompt_logits(fp8_model, fp8_model.attention_layers(), prompt, 8, FP8)
        err = (got - expected).abs().max().item()
        bound = FP8_KV_LOGIT_RTOL * expected.abs().max().item()
        assert err <= bound, f"scale {scale}: max |logit error| {err:.4f} > {bound:.4f}"
        assert err > 0  # the cache really was e4m3
