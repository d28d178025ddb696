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
from training_fixtures import build_token_files, join_gloo_group, tiny_config

from carpool.training.trainer import Trainer

# (strategy, reshard_after_forward, activation checkpointing)
STRATEGIES = [("ddp", True, "off"), ("fsdp", True, "on"), ("fsdp", False, "off")]
TOL = dict(rtol=1e-5, atol=1e-6)


# the run whose sharded checkpoint a single process resumes
SAVED = ("fsdp", True, "on")


def _one_step(cfg, save: bool = False) -> dict:
    trainer = Trainer(cfg)
    loss, _ = trainer.accumulate_gradients()
    loss = float(loss)
    grads = trainer.full_gradients()
    trainer.clip_and_step()
    params = trainer.full_state_dict()
    if save:
        trainer.save()
    trainer.close()
    return {"loss": loss, "grads": grads, "params": params}


def _worker(rank: int, world: int, paths: dict, out_dir: str) -> None:
    join_gloo_group(rank, world, out_dir)
    try:
        for strategy, reshard, ac in STRATEGIES:
            name = f"{strategy}-{reshard}-{ac}"
            cfg = tiny_config(paths, os.path.join(out_dir, name), micro_batch_size=2, activation_checkpointing=ac,
                              parallel={"strategy": strategy, "reshard_after_forward": reshard})
            result = _one_step(cfg, save=(strategy, reshard, ac) == SAVED)
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
    second = Trainer(tiny_config(paths, os.path.join(out, "one-rank-two-steps"), micro_batch_size=4))
    reference["next_loss"] = [second.train_step().loss for _ in range(2)][1]
    reference["next_params"] = second.full_state_dict()
    return {"reference": reference, "out": out, "paths": paths, **two}


@pytest.mark.parametrize("strategy, reshard, ac", STRATEGIES)
def test_two_rank_step_equals_the_one_rank_step(results, strategy, reshard, ac):
    ref, two = results["reference"], results[f"{strategy}-{reshard}-{ac}"]
    assert two["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert two["grads"].keys() == ref["grads"].keys() and two["params"].keys() == ref["params"].keys()
    for name in ref["grads"]:
        torch.testing.assert_close(two["grads"][name], ref["grads"][name], msg=name, **TOL)
    for name in ref["params"]:
        torch.testing.assert_close(two["params"][name], ref["params"][name], msg=name, **TOL)


def test_a_sharded_two_rank_checkpoint_resumes_on_one_process(results):
    """FSDP's DCP shards, the AdamW states, the schedule and the data position saved by two ranks load into
    one process, which continues as the one-rank run: its second step's loss (data position, weights) and
    the weights after it (AdamW states, schedule) agree to the tolerance of the two-rank step."""
    name = "-".join(map(str, SAVED))
    cfg = tiny_config(results["paths"], os.path.join(results["out"], "resumed"), micro_batch_size=4,
                      checkpoint={"dir": os.path.join(results["out"], name, "checkpoints")})
    resumed = Trainer(cfg)
    assert resumed.step == 1 and resumed.loader.global_position == 4
    for key, value in resumed.full_state_dict().items():
        torch.testing.assert_close(value, results[name]["params"][key], rtol=0, atol=0, msg=key)
    assert resumed.train_step().loss == pytest.approx(results["reference"]["next_loss"], rel=1e-5)
    for key, value in resumed.full_state_dict().items():
        torch.testing.assert_close(value, results["reference"]["next_params"][key], msg=key, **TOL)
