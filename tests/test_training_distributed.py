"""Two gloo ranks on CPU: one optimizer step with DDP and with FSDP2 (ZeRO-3 with activation
checkpointing, and ZeRO-2-like) equals the one-rank step on the same global batch (fp32; the only
difference is the order of the gradient sums, so gradients and updated weights agree to rtol 1e-5 /
atol 1e-6)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from training_fixtures import build_token_files, tiny_config

from carpool.training.trainer import Trainer

# (strategy, reshard_after_forward, activation checkpointing)
STRATEGIES = [("ddp", True, "off"), ("fsdp", True, "on"), ("fsdp", False, "off")]
TOL = dict(rtol=1e-5, atol=1e-6)


def _one_step(cfg) -> dict:
    trainer = Trainer(cfg)
    loss, _ = trainer.accumulate_gradients()
    loss = float(loss)
    grads = trainer.full_gradients()
    trainer.clip_and_step()
    params = trainer.full_state_dict()
    trainer.close()
    return {"loss": loss, "grads": grads, "params": params}


def _worker(rank: int, world: int, paths: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # A file rendezvous: no port to pick, so nothing else on the machine can take it between pick and bind.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        for strategy, reshard, ac in STRATEGIES:
            name = f"{strategy}-{reshard}-{ac}"
            cfg = tiny_config(paths, os.path.join(out_dir, name), micro_batch_size=2, activation_checkpointing=ac,
                              parallel={"strategy": strategy, "reshard_after_forward": reshard})
            result = _one_step(cfg)
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    paths = build_token_files(str(tmp_path_factory.mktemp("dist-data")))
    out = str(tmp_path_factory.mktemp("dist-out"))
    reference = _one_step(tiny_config(paths, os.path.join(out, "one-rank"), micro_batch_size=4))
    mp.spawn(_worker, args=(2, paths, out), nprocs=2, join=True)
    two = {f"{s}-{r}-{a}": torch.load(os.path.join(out, f"{s}-{r}-{a}.pt"), weights_only=False)
           for s, r, a in STRATEGIES}
    return {"reference": reference, **two}


@pytest.mark.parametrize("strategy, reshard, ac", STRATEGIES)
def test_two_rank_step_equals_the_one_rank_step(results, strategy, reshard, ac):
    ref, two = results["reference"], results[f"{strategy}-{reshard}-{ac}"]
    assert two["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert two["grads"].keys() == ref["grads"].keys() and two["params"].keys() == ref["params"].keys()
    for name in ref["grads"]:
        torch.testing.assert_close(two["grads"][name], ref["grads"][name], msg=name, **TOL)
    for name in ref["params"]:
        torch.testing.assert_close(two["params"][name], ref["params"][name], msg=name, **TOL)
