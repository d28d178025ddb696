"""`carpool chat` (in-process and against a server) and `carpool bench serve`, on the demo model."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest

from carpool import SamplingParams
from carpool.demo import demo_model_path
from carpool.entrypoints.bench import load_benchmark
from carpool.entrypoints.cli import build_parser, main

GREETING = "Hello there!"


def expected_reply(llm, max_tokens: int) -> str:
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": GREETING}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return llm.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0].outputs[0].text


@pytest.mark.parametrize("where", ["in-process", "server"])
def test_chat_streams_replies_and_reset_forgets_the_conversation(where, demo_llm, demo_server, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{GREETING}\n/reset\n{GREETING}\n/exit\n"))
    args = ["chat", "--temperature", "0", "--max-tokens", "12"]
    args += [demo_model_path(), "--device", "cpu"] if where == "in-process" else ["--url", demo_server.url]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count(expected_reply(demo_llm, 12) + "\n") == 2  # the same reply again after /reset


def _maybe_warns():
    """The plot needs matplotlib, which carpool does not depend on: without it, a warning instead."""
    if importlib.util.find_spec("matplotlib") is None:
        return pytest.warns(UserWarning, match="matplotlib")
    return contextlib.nullcontext()


def test_bench_serve_reports_latencies_and_throughput(demo_server, capsys, tmp_path):
    args = ["bench", "serve", "--base-url", demo_server.url, "--num-prompts", "4", "--input-len-min", "4",
            "--input-len-max", "8", "--output-len-min", "3", "--output-len-max", "6", "--request-rate", "50",
            "inf", "--plot", str(tmp_path / "plot.png"), "--warmup", "0"]
    with _maybe_warns():
        assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    dataset = load_benchmark("bench_serve.py").make_dataset(build_parser().parse_args(args))
    assert [r["request_rate"] for r in result["runs"]] == [50, "inf"]
    for run in result["runs"]:
        assert run["completed"] == 4 and run["failed"] == 0
        assert run["total_output_tokens"] == sum(d.max_tokens for d in dataset)  # ignore_eos: exact lengths
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(run[key]) == {"mean", "p50", "p90", "p99"} and run[key]["p99"] >= run[key]["p50"] > 0
        assert run["request_throughput"] > 0 and run["output_throughput"] > 0
    assert result["plot"] is None or (tmp_path / "plot.png").exists()


def test_bench_has_a_serve_subcommand_with_its_flags():
    parser = build_parser()
    bench = parser._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    serve = bench._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    for flag in ("--base-url", "--request-rate", "--max-concurrency", "--dataset", "--num-prompts"):
        assert flag in text, flag
