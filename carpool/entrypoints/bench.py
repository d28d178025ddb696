"""`carpool bench BENCHMARK`: thin wrappers over the scripts in the checkout's benchmarks/ directory.

A benchmark script is a module with `add_args(parser)` and `main(namespace) -> int` that prints one JSON
object; it runs the same as `python benchmarks/<file>` and as `carpool bench <name>`. To add one, write
the script and list it in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from types import ModuleType

from carpool.entrypoints.cli import subcommand

# name -> (file in benchmarks/, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "serve": ("bench_serve.py", "load a running server (Poisson arrivals or fixed concurrency); latency and "
                                "throughput as JSON"),
}


def benchmarks_dir() -> str:
    """benchmarks/ next to the carpool package: present in a source checkout (and editable installs)."""
    import carpool

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(carpool.__file__))), "benchmarks")


def load_benchmark(file: str) -> ModuleType | None:
    path = os.path.join(benchmarks_dir(), file)
    if not os.path.exists(path):
        return None
    name = f"carpool_benchmarks.{file.removesuffix('.py')}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def _missing(file: str) -> int:
    print(f"carpool bench: {file} not found in {benchmarks_dir()}; the benchmarks ship with the source "
          "checkout, not the wheel", file=sys.stderr)
    return 2


def _bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (file, help_text) in BENCHMARKS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module = load_benchmark(file)
        if module is None:
            sp.set_defaults(bench_main=lambda ns, file=file: _missing(file))
            continue
        module.add_args(sp)
        sp.set_defaults(bench_main=module.main)


@subcommand("bench", "run a benchmark (each prints one JSON object)", _bench_args)
def run_bench(ns: argparse.Namespace) -> int:
    return int(ns.bench_main(ns))
