"""The `carpool` command and the built-in demo model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from carpool.demo import default_model_path, demo_model_path, write_demo_checkpoint
from carpool.entrypoints.cli import build_parser, main


def test_demo_checkpoint_is_deterministic(tmp_path):
    digests = []
    for name in ("a", "b"):
        write_demo_checkpoint(str(tmp_path / name))
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_generate_prints_completions_of_the_demo_model(capsys):
    assert main(["generate", "--model", demo_model_path(), "--device", "cpu", "--max-tokens", "6",
                 "--temperature", "0", "--ignore-eos", "--json", "Hello", "world"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == ["Hello", "world"]
    for x in lines:
        (c,) = x["completions"]
        assert len(c["token_ids"]) == 6 and c["finish_reason"] == "length"
        # the demo's byte tokenizer: token id == byte value
        assert c["text"] == bytes(c["token_ids"]).decode("utf-8", errors="replace")


def test_the_default_model_is_the_shipped_trained_demo_model_else_the_random_one(tmp_path, monkeypatch):
    import carpool.training.demo_model as shipped

    monkeypatch.setattr(shipped, "DEMO_MODELS_DIR", str(tmp_path))
    assert default_model_path() == demo_model_path()
    main_dir = tmp_path / "main"
    main_dir.mkdir()
    (main_dir / "config.json").write_text("{}")
    assert default_model_path() == demo_model_path()  # no weights: not a model
    (main_dir / "model.safetensors").write_bytes(b"")
    assert default_model_path() == str(main_dir)


def test_generate_reports_bad_input_without_a_traceback(capsys):
    assert main(["generate", "--device", "cpu", "--temperature", "-1", "x"]) == 2
    err = capsys.readouterr().err
    assert "temperature" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [[], ["generate"]])
def test_help_lists_the_flags(command):
    parser = build_parser()
    text = (parser if not command else
            parser._subparsers._group_actions[0].choices[command[0]]).format_help()  # type: ignore[union-attr]
    if not command:
        assert "generate" in text
    else:
        for flag in ("--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
                     "--kv-cache-memory-bytes", "--num-kv-blocks", "--no-enable-prefix-caching",
                     "--tensor-parallel-size", "--dtype", "--device", "--temperature", "--top-p", "--stop"):
            assert flag in text, flag


def test_console_script_runs(tmp_path):
    env = {**os.environ, "CARPOOL_CACHE_DIR": os.environ["CARPOOL_CACHE_DIR"]}
    proc = subprocess.run([sys.executable, "-m", "carpool.entrypoints.cli", "generate", "--device", "cpu",
                           "--max-tokens", "3", "--temperature", "0", "Hi"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Completion:" in proc.stdout


def test_the_other_commands_run_where_the_server_packages_are_missing(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_fastapi(name, *args):
        if name == "carpool.entrypoints.openai.api_server":
            raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_fastapi)
    parser = build_parser()
    assert parser.parse_args(["eval", "some/dir"]).command == "eval"
