"""The trainer on one CPU process: gradient accumulation, activation checkpointing, the loss going down,
stop/resume, interrupted checkpoints, the export, and errors before the first step."""

from __future__ import annotations

import json
import os

import pytest
import torch
from training_fixtures import build_token_files, tiny_config

from carpool.training.checkpoint import complete_checkpoints, latest_checkpoint
from carpool.training.trainer import Trainer


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    return build_token_files(str(tmp_path_factory.mktemp("train-data")))


def _grads(cfg) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = Trainer(cfg)
    loss, _ = trainer.accumulate_gradients()
    loss = float(loss)
    grads = trainer.full_gradients()
    trainer.close()
    return loss, grads


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


def test_accumulating_two_micro_batches_equals_one_batch_of_both(paths, tmp_path):
    one_loss, one = _grads(tiny_config(paths, str(tmp_path / "a"), micro_batch_size=4, grad_accum_steps=1))
    acc_loss, acc = _grads(tiny_config(paths, str(tmp_path / "b"), micro_batch_size=2, grad_accum_steps=2))
    assert acc_loss == pytest.approx(one_loss, rel=1e-6)
    _assert_same_grads(acc, one, rtol=1e-5, atol=1e-7)  # fp32: the sums are only reordered


@pytest.mark.parametrize("mode", ["on", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(paths, tmp_path, mode):
    _, plain = _grads(tiny_config(paths, str(tmp_path / "off")))
    _, recomputed = _grads(tiny_config(paths, str(tmp_path / mode), activation_checkpointing=mode))
    _assert_same_grads(recomputed, plain, rtol=0, atol=0)  # the recomputation repeats the same ops


def test_loss_falls_on_a_tiny_corpus(paths, tmp_path):
    cfg = tiny_config(paths, str(tmp_path), max_steps=30, optim={"lr": 1e-2, "warmup_steps": 3})
    summary = Trainer(cfg).run()
    losses = summary["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0, losses  # at least one nat per token lower


def test_stopped_and_resumed_run_reproduces_the_uninterrupted_losses(paths, tmp_path):
    straight = Trainer(tiny_config(paths, str(tmp_path / "straight"), max_steps=6)).run()["losses"]
    split_cfg = tiny_config(paths, str(tmp_path / "split"), max_steps=6, stop_after_steps=3)
    first = Trainer(split_cfg).run()
    assert first["steps"] == 3 and not first["finished"]
    second_trainer = Trainer(split_cfg)
    assert second_trainer.resumed_from is not None and second_trainer.step == 3
    second = second_trainer.run()
    assert first["losses"] + second["losses"] == straight  # exactly: fp32 on CPU is deterministic


def test_interrupted_checkpoint_leaves_the_previous_one_loadable(paths, tmp_path, monkeypatch):
    cfg = tiny_config(paths, str(tmp_path), max_steps=4, checkpoint={"interval": 1})
    trainer = Trainer(cfg)
    trainer.train_step()
    trainer.save()
    expected = {k: v.clone() for k, v in trainer.full_state_dict().items()}
    trainer.train_step()

    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def killed_after_the_shards(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed while writing the checkpoint")

    monkeypatch.setattr(dcp, "save", killed_after_the_shards)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert os.path.isdir(os.path.join(cfg.checkpoint_dir, "step-00000002.tmp"))
    assert latest_checkpoint(cfg.checkpoint_dir) == complete_checkpoints(cfg.checkpoint_dir)[0]
    resumed = Trainer(cfg)
    assert resumed.step == 1
    for name, value in resumed.full_state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_export_gives_the_same_logits_and_greedy_tokens_in_carpool_and_transformers(paths, tmp_path):
    from transformers import AutoModelForCausalLM

    from carpool import LLM, SamplingParams

    cfg = tiny_config(paths, str(tmp_path), max_steps=3, export=True, export_max_shard_mb=1)
    summary = Trainer(cfg).run()
    export = summary["export_dir"]
    with open(os.path.join(export, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    prompt = [0, 17, 42, 99, 5, 250, 8]
    with torch.no_grad():
        hf_logits = hf(torch.tensor([prompt])).logits[0]
        ids = torch.tensor([prompt])
        hf_tokens = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
    llm = LLM(model=export, device="cpu")
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                                      logprobs=1), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_tokens
    # carpool's and transformers' log-probabilities of the chosen first token agree
    first = out.logprobs[0][out.token_ids[0]]
    first_lp = first.logprob if hasattr(first, "logprob") else first
    torch.testing.assert_close(torch.tensor(first_lp), hf_logits[-1].log_softmax(-1)[out.token_ids[0]],
                               rtol=1e-4, atol=1e-4)


def test_bad_input_is_reported_before_any_step(paths, tmp_path, capsys):
    from carpool.entrypoints.cli import main

    out = tmp_path / "run"
    code = main(["train", "--data.train", paths["train"], "--model.vocab-size", "64", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "model.vocab_size" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()


def test_training_from_a_hugging_face_checkpoint_starts_at_its_loss(llama_path, tmp_path):
    import numpy as np
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from carpool.training.config import TrainConfig
    from carpool.training.data import PackedLoader
    from carpool.training.pretokenize import write_token_file

    tokens = np.random.default_rng(0).integers(0, 256, 3000)
    write_token_file(tokens, str(tmp_path / "bytes"), vocab_size=258, bos_token_id=256, eos_token_id=257,
                     pad_token_id=0)
    cfg = TrainConfig.from_dict({"data": {"train": str(tmp_path / "bytes")}, "model": {"init_from": llama_path},
                                 "seq_len": 32, "micro_batch_size": 2, "precision": "fp32",
                                 "output_dir": str(tmp_path / "run")})
    loss, _ = Trainer(cfg).accumulate_gradients()
    batch = PackedLoader(tokens, 32, 2, seed=cfg.seed).next_batch()
    hf = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = F.cross_entropy(hf(batch.input_ids).logits.flatten(0, 1), batch.labels.flatten())
    torch.testing.assert_close(loss.float(), ref, rtol=1e-5, atol=1e-5)


def test_compiled_layers_give_the_same_loss_gradients_and_parameter_names(paths, tmp_path):
    plain_loss, plain = _grads(tiny_config(paths, str(tmp_path / "plain")))
    compiled_loss, compiled = _grads(tiny_config(paths, str(tmp_path / "compiled"), compile=True))
    assert compiled_loss == pytest.approx(plain_loss, rel=1e-6)
    _assert_same_grads(compiled, plain, rtol=1e-5, atol=1e-6)  # inductor may fuse and reorder fp32 sums


def test_bf16_computes_in_bf16_over_fp32_master_weights_and_optimizer_states(paths, tmp_path):
    trainer = Trainer(tiny_config(paths, str(tmp_path), precision="bf16"))
    seen: list[torch.dtype] = []
    trainer.module.model.layers[0].mlp.register_forward_hook(lambda m, i, out: seen.append(out.value.dtype))
    trainer.train_step()
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainer.module.parameters())
    states = [t for s in trainer.optimizer.state.values() for t in (s["exp_avg"], s["exp_avg_sq"])]
    assert states and all(t.dtype == torch.float32 for t in states)
    trainer.close()


def test_gradient_clipping_scales_the_global_norm_down_to_the_limit(paths, tmp_path):
    def global_norm(grads: dict[str, torch.Tensor]) -> float:
        return float(torch.stack([g.norm() for g in grads.values()]).norm())

    trainer = Trainer(tiny_config(paths, str(tmp_path), optim={"grad_clip": 1e-3}))
    trainer.accumulate_gradients()
    before = global_norm(trainer.full_gradients())
    norm, _ = trainer.clip_and_step()
    assert before > 1e-2 and float(norm) == pytest.approx(before, rel=1e-5)  # reported before clipping
    assert global_norm(trainer.full_gradients()) == pytest.approx(1e-3, rel=1e-4)


def test_resuming_restores_the_random_number_generators(paths, tmp_path):
    import random

    import numpy as np

    cfg = tiny_config(paths, str(tmp_path), max_steps=3)
    trainer = Trainer(cfg)
    trainer.train_step()
    torch.rand(5), np.random.rand(5), random.random()  # a run that drew random numbers before saving
    trainer.save()
    expected = (torch.rand(4), np.random.rand(4), random.random())
    resumed = Trainer(cfg)
    assert resumed.step == 1
    got = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_run_shows_progress_and_writes_metric_lines(paths, tmp_path, capsys):
    cfg = tiny_config(paths, str(tmp_path), max_steps=2, progress_bar=True, eval_interval=1)
    Trainer(cfg).run()
    err = capsys.readouterr().err
    assert "2/2" in err and "loss=" in err and "tok/s=" in err
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert records[0]["event"] == "start" and records[0]["memory_estimate"]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["tokens_per_s"] > 0 for r in steps)
    assert [r["step"] for r in records if "heldout_ppl" in r] == [1, 2]  # at the interval and at the end
