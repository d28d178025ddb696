"""The one-shot symmetric-memory all-reduce (carpool/distributed/): off wherever it cannot run,
with NCCL (or gloo) carrying every all-reduce then; on two GPUs, equal to NCCL bit for bit in eager
mode and inside CUDA graphs (the GPU test runs benchmarks/bench_all_reduce.py --check on 2 ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from carpool.distributed import startup
from carpool.distributed.symmetric import MULTICAST_OFF, local_reasons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_ranks_do_not_use_the_fast_path():
    assert local_reasons(torch.device("cpu"), torch.float32, 0, 2, 2) == ["not a CUDA device"]


def test_start_up_stages_stop_at_the_first_failure_on_any_rank(monkeypatch, caplog):
    """The stages of establishing a fast path run in turn and are agreed after each (here one rank, whose
    own outcome is the agreement): an error text or an exception stops them, naming the stage."""
    monkeypatch.setattr(startup, "agree", lambda ok, group: ok)
    ran = []
    ok = startup.agreed_stages([("one", lambda: ran.append(1)), ("two", lambda: ""), ("three", lambda: 1 / 0),
                             ("four", lambda: ran.append(4))], None, 0, "fast path", "using the slow one")
    assert not ok and ran == [1]
    assert "fast path off after its three (rank 0: ZeroDivisionError" in caplog.text
    assert "using the slow one" in caplog.text
    assert not startup.agreed_stages([("one", lambda: "mismatch")], None, 0, "x", "y")
    assert startup.agreed_stages([("one", lambda: None), ("two", lambda: "")], None, 0, "x", "y")


def test_multicast_stays_off_in_tp_workers():
    assert MULTICAST_OFF == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                             "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs")
def test_fast_path_equals_nccl_eager_and_in_cuda_graphs(tmp_path):
    out = tmp_path / "all_reduce.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_all_reduce.py"), "--check",
                           "-n", "2", "--out", str(out), "--timeout", "240"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **MULTICAST_OFF})
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0
    result = json.loads(out.read_text())
    checks = result["checks"]
    assert checks["passed"], checks["failures"]
    if not result["custom_available"]["torch.bfloat16"]:
        pytest.skip("symmetric-memory all-reduce unavailable here (the NCCL fallback passed); see the log")
    assert checks["fast_path_calls_in_graph_check"]["torch.bfloat16"] == 3


def test_norm_exchange_takes_one_row_width_and_what_fits():
    """Which calls the fused all-reduce + RMSNorm takes: 2-D, contiguous, the exchange's dtype, rows that
    fit its slots, and one row width once used (slots are rows of that width)."""
    from carpool.distributed.symmetric import NormExchange

    ptrs = torch.zeros(2, dtype=torch.int64)
    ex = NormExchange(data=torch.empty(2 * 4096, dtype=torch.bfloat16), pads=torch.zeros(256, dtype=torch.int32),
                      buffer_ptrs=ptrs, pad_ptrs=ptrs, epochs=torch.zeros(128, dtype=torch.int32),
                      uses=torch.zeros(64, dtype=torch.int32), half_stride=4096, rank=0, world_size=2, max_programs=128)

    def x(rows: int, width: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.zeros(rows, width, dtype=dtype)

    assert ex.eligible(x(4, 1024), x(4, 1024)) and ex.eligible(x(2, 64), x(2, 64))
    assert not ex.eligible(x(5, 1024), x(5, 1024))  # more elements than a half holds
    assert not ex.eligible(x(65, 32), x(65, 32))  # more rows than use bits
    assert not ex.eligible(x(4, 1024, torch.float32), x(4, 1024, torch.float32))
    assert not ex.eligible(x(4, 1024)[:, :512], x(4, 512))  # not contiguous
    assert not ex.eligible(x(0, 1024), x(0, 1024))
    ex.width = 1024  # as after a call
    assert ex.eligible(x(1, 1024), x(1, 1024)) and not ex.eligible(x(1, 512), x(1, 512))


def _one_rank_push(monkeypatch):
    """A push exchange of one simulated rank (slots of 1024 pairs), for the self-tests' logic in the
    interpreter: no device to synchronize."""
    from carpool.distributed.push_exchange import PushExchange

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    slots = torch.zeros(2 * 1024, dtype=torch.int64)
    return PushExchange(slots, torch.tensor([slots.data_ptr()]), torch.zeros(1, dtype=torch.int32), 1024,
                        rank=0, world_size=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (Triton interpreter) check of the self-test's logic")
def test_embedding_push_self_test_passes_on_agreement_and_names_a_mismatch(monkeypatch):
    """The start-up self-test of the embedding push, with one simulated rank in the interpreter and NCCL
    replaced by the identity (one rank's sum): '' when the pushed rows and norms match the reference;
    an error text when the reference differs; an exception when the push refuses (push off)."""
    monkeypatch.setattr(startup, "nccl_all_reduce", lambda x, group: x.clone())
    push = _one_rank_push(monkeypatch)
    # 512 and a model width of 1100 (550 pairs: two programs of the embedding kernel, one partly masked)
    push.zeros = torch.zeros(1, 1100, dtype=torch.float16)
    assert startup.embedding_push_self_test(push, torch.float16, 0, 1, None, 1100, graph=False) == ""
    assert push.epoch.item() == 6 and push.pending is None  # 3 tokens x 2 widths
    monkeypatch.setattr(startup, "nccl_all_reduce", lambda x, group: 2 * x)
    assert "disagrees with NCCL" in startup.embedding_push_self_test(push, torch.float16, 0, 1, None, 1100, graph=False)
    push.zeros = None
    with pytest.raises(RuntimeError, match="refused"):
        startup.embedding_push_self_test(push, torch.float16, 0, 1, None, 1100, graph=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (Triton interpreter) check of the self-test's logic")
def test_push_self_test_takes_the_model_shape_with_the_lm_head_rows(monkeypatch):
    """The GEMV push's start-up self-test with the model shape the TP worker passes (hidden, intermediate,
    LM head rows per rank), one simulated rank and NCCL as the identity: it runs the model's o_proj and
    down_proj shapes and agrees ('' ), and names a mismatch against the reference."""
    monkeypatch.setattr(startup, "nccl_all_reduce", lambda x, group: x.clone())
    push = _one_rank_push(monkeypatch)
    assert startup.push_self_test(push, torch.float16, 0, 1, None, (64, 96, 80), graph=False) == ""
    assert push.epoch.item() == 4 and push.received  # two small shapes, o_proj's and down_proj's
    monkeypatch.setattr(startup, "nccl_all_reduce", lambda x, group: 2 * x)
    assert "disagrees with NCCL" in startup.push_self_test(push, torch.float16, 0, 1, None, (64, 96, 80), graph=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (Triton interpreter) check of the self-test's logic")
def test_logits_push_self_test_passes_on_agreement_and_names_a_mismatch(monkeypatch):
    """The start-up self-test of the LM head's pushed gather, with one simulated rank in the interpreter
    and NCCL replaced by the identity: '' when the gathered logits equal the reference (the self-test's
    norms advance the epoch: two gathers, two pushes received); an error text when they differ or when
    the gather is refused (no logit slots)."""
    monkeypatch.setattr(startup, "nccl_gather", lambda x, group, world: x.clone())
    push = _one_rank_push(monkeypatch)
    logit_slots = torch.zeros(2 * 40, dtype=torch.int64)  # 80 logits a rank
    push.logit_slots, push.logit_ptrs, push.logit_shard = logit_slots, torch.tensor([logit_slots.data_ptr()]), 80
    assert startup.logits_push_self_test(push, torch.float16, 0, 1, None, graph=False) == ""
    assert push.epoch.item() == 2 and not push.received
    monkeypatch.setattr(startup, "nccl_gather", lambda x, group, world: 2 * x)
    assert "disagrees with NCCL" in startup.logits_push_self_test(push, torch.float16, 0, 1, None, graph=False)
    monkeypatch.setattr(startup, "nccl_gather", lambda x, group, world: x.clone())
    push.logit_slots = None
    assert "disagrees with NCCL" in startup.logits_push_self_test(push, torch.float16, 0, 1, None, graph=False)


def test_push_epochs_must_agree_across_ranks_after_the_self_tests(monkeypatch):
    """The embedding push's last start-up stage: the ranks' epochs (one per received push) must be equal,
    else a rank would wait for words its peer already sent; simulated with MIN/MAX over given values."""
    def reduce_over(values):
        def all_reduce(t, op, group):
            t.fill_(min(values) if op == startup.dist.ReduceOp.MIN else max(values))
        return all_reduce

    epoch = torch.tensor([12], dtype=torch.int32)
    monkeypatch.setattr(startup.dist, "all_reduce", reduce_over([12, 12]))
    assert startup.epochs_agree(epoch, None) == ""
    monkeypatch.setattr(startup.dist, "all_reduce", reduce_over([12, 11]))
    assert "differ across ranks (11..12)" in startup.epochs_agree(epoch, None)
