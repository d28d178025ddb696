"""FSDP2's prefetch schedule on two gloo ranks, read from a CPU profiler trace (bench_train_scaling's
fsdp_schedule): with explicit prefetch, layer i's all-gather is issued before layer i-1's forward compute
and waited on after it, so on a GPU the gather is in flight during that compute; without it the forward
gathers each layer on demand, after the previous layer's compute. The backward is the same either way:
FSDP2 prefetches the next layer's gather in backward by the recorded forward order on its own."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from training_fixtures import build_token_files, join_gloo_group, tiny_config

from carpool.training.trainer import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from bench_train_scaling import fsdp_schedule  # noqa: E402

LAYERS = 4


def _worker(rank: int, world: int, paths: dict, out_dir: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    join_gloo_group(rank, world, out_dir)
    try:
        for prefetch in (True, False):
            cfg = tiny_config(paths, os.path.join(out_dir, f"prefetch-{prefetch}"), micro_batch_size=2,
                              model={"num_hidden_layers": LAYERS},
                              parallel={"strategy": "fsdp", "explicit_prefetch": prefetch})
            trainer = Trainer(cfg)
            trainer.train_step()  # the first step also builds FSDP's lazy state
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer.train_step()
            if rank == 0:
                prof.export_chrome_trace(os.path.join(out_dir, f"trace-{prefetch}.json"))
            trainer.close()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def schedules(tmp_path_factory) -> dict[bool, dict]:
    paths = build_token_files(str(tmp_path_factory.mktemp("schedule-data")))
    out = str(tmp_path_factory.mktemp("schedule-out"))
    mp.spawn(_worker, args=(2, paths, out), nprocs=2, join=True)
    result = {}
    for prefetch in (True, False):
        with open(os.path.join(out, f"trace-{prefetch}.json")) as f:
            result[prefetch] = fsdp_schedule(json.load(f)["traceEvents"])
    return result


def test_explicit_prefetch_issues_each_layers_gather_before_the_previous_layer_computes(schedules):
    forward = schedules[True]["forward"]
    assert [w["layer"] for w in forward["windows"]] == list(range(1, LAYERS))
    for w in forward["windows"]:
        assert w["issued_before_prev_compute_start"] and w["waited_after_prev_compute_end"], w
        assert w["compute_between_us"] == pytest.approx(w["prev_compute_us"]) and w["prev_compute_us"] > 0
    assert forward["fraction_in_flight"] == 1.0


def test_without_explicit_prefetch_each_forward_gather_is_issued_after_the_previous_layer_computes(schedules):
    forward = schedules[False]["forward"]
    assert [w["layer"] for w in forward["windows"]] == list(range(1, LAYERS))
    for w in forward["windows"]:
        assert not w["issued_before_prev_compute_end"] and w["compute_between_us"] == 0, w
    assert forward["fraction_in_flight"] == 0.0


@pytest.mark.parametrize("prefetch", [True, False])
def test_backward_gathers_each_layer_during_the_next_layers_backward_either_way(schedules, prefetch):
    backward = schedules[prefetch]["backward"]
    assert sorted(w["layer"] for w in backward["windows"]) == list(range(LAYERS - 1))
    for w in backward["windows"]:
        assert w["issued_before_prev_compute_start"] and w["waited_after_prev_compute_end"], w


def test_each_reduce_scatter_is_waited_on_after_the_next_layers_backward(schedules):
    reduce = schedules[True]["reduce_scatter"]
    assert sorted(w["layer"] for w in reduce["windows"]) == list(range(1, LAYERS))
    for w in reduce["windows"]:
        assert w["issued_before_prev_compute_start"] and w["waited_after_prev_compute_end"], w
