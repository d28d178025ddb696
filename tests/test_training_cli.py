"""The training commands end to end at toy size: corpus -> tokenizer -> token files -> `carpool train`
on two processes (FSDP2 over gloo, launched by --nproc-per-node) -> `carpool eval` of the export."""

from __future__ import annotations

import json
import subprocess
import sys

from carpool.entrypoints.cli import build_parser, main

TINY = ["--model.hidden-size", "32", "--model.intermediate-size", "64", "--model.num-hidden-layers", "2",
        "--model.num-attention-heads", "4", "--model.num-key-value-heads", "2", "--seq-len", "32",
        "--micro-batch-size", "2", "--precision", "fp32", "--optim.warmup-steps", "1"]


def test_train_help_names_every_group_of_flags():
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    text = train.format_help()
    for flag in ("--config", "--nproc-per-node", "--parallel.strategy", "--optim.lr", "--optim.betas",
                 "--model.init-from", "--data.heldout", "--checkpoint.dir", "--activation-checkpointing",
                 "--compile", "--profile-steps", "--grad-accum-steps", "--loss-chunk-size"):
        assert flag in text, flag


def test_train_help_says_how_to_launch_on_several_processes_and_nodes():
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    text = train.format_help()
    for words in ("--nproc-per-node N", "torchrun --nproc-per-node", "--nnodes", "--rdzv-endpoint", "YAML"):
        assert words in text, words


def test_commands_train_on_two_processes_and_evaluate_the_export(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    manifest = str(data / "manifest.json")
    assert main(["corpus", manifest, "--no-stdlib", "--packages", "tqdm", "--heldout-fraction", "0.3"]) == 0
    assert main(["train-tokenizer", "--manifest", manifest, "--vocab-size", "300", "--out", str(data / "tok")]) == 0
    assert main(["pretokenize", "--manifest", manifest, "--tokenizer", str(data / "tok"), "--out", str(data)]) == 0
    capsys.readouterr()
    proc = subprocess.run(
        [sys.executable, "-m", "carpool.entrypoints.cli", "train", *TINY, "--nproc-per-node", "2",
         "--parallel.strategy", "fsdp", "--max-steps", "2", "--data.train", str(data / "train"),
         "--data.heldout", str(data / "heldout"), "--data.tokenizer", str(data / "tok"), "--eval-sequences", "4",
         "--output-dir", str(run), "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "summary.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["heldout_loss"] > 0
    export = str(run / "export")
    assert main(["eval", export, "--data", str(data / "heldout"), "--seq-len", "32", "--max-sequences", "4",
                 "--device", "cpu", "--code-manifest", manifest, "--code-prompts", "3",
                 "--code-max-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the export scores the held-out sequences as the trainer did (same model, same tokens)
    assert abs(result["heldout"]["loss"] - summary["heldout_loss"]) < 1e-2
    assert result["code"]["prompts"] == 3 and 0.0 <= result["code"]["parse_fraction"] <= 1.0
