"""Applies bench_latency's ablations in a tensor-parallel rank at interpreter start (see
benchmarks/ablations.py). Only on PYTHONPATH when a benchmark asked for ablations."""

import json
import os
import sys

if os.environ.get("CARPOOL_BENCH_ABLATIONS"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ablations import apply_ablations

    apply_ablations(*json.loads(os.environ["CARPOOL_BENCH_ABLATIONS"]))
