"""The `carpool` command: generate, serve, chat, bench.

Engine flags keep vLLM's names (see EngineArgs.add_cli_args); sampling flags keep SamplingParams' names.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from carpool.engine.arg_utils import EngineArgs
from carpool.models.registry import SUPPORTED_ARCHITECTURES
from carpool.sampling_params import SamplingParams

_SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                              Callable[[argparse.Namespace], int]]] = {}


def subcommand(name: str, help_text: str, add_args: Callable[[argparse.ArgumentParser], None]
               ) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _SUBCOMMANDS[name] = (help_text, add_args, run)
        return run
    return register


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    d = SamplingParams()
    g.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"most tokens to generate per prompt (default: {d.max_tokens})")
    g.add_argument("--min-tokens", type=int, default=0, help="generate at least this many tokens")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature; 0 = greedy (default: {d.temperature})")
    g.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass (default: 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: 0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after end-of-sequence")
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--logprobs", type=int, default=None, help="also return the top-N logprobs of each token")


def sampling_params_from_args(ns: argparse.Namespace, **overrides: object) -> SamplingParams:
    kwargs = dict(max_tokens=ns.max_tokens, min_tokens=ns.min_tokens, temperature=ns.temperature, top_p=ns.top_p,
                  top_k=ns.top_k, min_p=ns.min_p, presence_penalty=ns.presence_penalty,
                  frequency_penalty=ns.frequency_penalty, repetition_penalty=ns.repetition_penalty,
                  stop=ns.stop, ignore_eos=ns.ignore_eos, n=ns.n, logprobs=ns.logprobs)
    kwargs.update(overrides)
    return SamplingParams(**kwargs)  # type: ignore[arg-type]


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (one completion each)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    EngineArgs.add_cli_args(p)
    add_sampling_args(p)


@subcommand("generate", "complete prompts offline and print the results", _generate_args)
def run_generate(ns: argparse.Namespace) -> int:
    from carpool.engine.llm_engine import LLM

    params = sampling_params_from_args(ns)
    args = EngineArgs.from_cli_args(ns)
    llm = LLM(**{k: v for k, v in vars(args).items()})
    outputs = llm.generate(ns.prompts, params, use_tqdm=sys.stderr.isatty())
    for out in outputs:
        if ns.json:
            print(json.dumps({"prompt": out.prompt, "completions": [
                {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                for c in out.outputs]}))
            continue
        for c in out.outputs:
            print(f"Prompt: {out.prompt!r}")
            print(f"Completion: {c.text!r}  [{len(c.token_ids)} tokens, finish_reason={c.finish_reason}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    _load_optional_subcommands()
    parser = argparse.ArgumentParser(prog="carpool", description="carpool: LLM inference and serving engine. "
                                     "With no --model/MODEL, commands use the built-in demo model "
                                     "(a 23M-parameter Llama that carpool trained on Python sources; a tiny "
                                     "random one where the package ships none). Model architectures: "
                                     + ", ".join(SUPPORTED_ARCHITECTURES) + ".")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_args, run) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def _load_optional_subcommands() -> None:
    """Subcommands defined elsewhere register themselves on import."""
    import importlib

    for module in ("carpool.entrypoints.openai.api_server", "carpool.entrypoints.chat",
                   "carpool.entrypoints.bench", "carpool.entrypoints.train"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            # `serve` needs the server's packages (fastapi, uvicorn); without them the other commands still run
            if e.name != module and e.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.run(ns)
    except ValueError as e:
        print(f"carpool {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Subcommand modules register into `carpool.entrypoints.cli`; run that module, not this __main__ copy.
    from carpool.entrypoints.cli import main as _main

    sys.exit(_main())
