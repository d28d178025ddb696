#!/usr/bin/env bash
# Wheels the GPU image lacks, downloaded here into .whl/ (git-ignored) so that a device call can carry them
# (`carry: [".whl"]`); scripts/gpu_suite.sh installs whatever is in .whl/ into /tmp/site without touching
# the image's own packages. The set is the dependency closure of the named packages in this machine's
# venv, less what the image has (IMAGE below: torch, transformers and their requirements), at the venv's
# versions.
#   bash scripts/gpu_wheels.sh            # compressed-tensors (the quantization GPU tests)
#   bash scripts/gpu_wheels.sh serve      # ... and fastapi, uvicorn, openai (the serving benchmark)
#   bash scripts/gpu_wheels.sh train      # ... and torchtitan 0.2.2 (the training benchmark's peer, ~1 MB)
# torchtitan is not in the venv (it would pull datasets, tensorboard, wandb), so its set is pinned here
# instead: the packages torchtitan 0.2.2's Trainer and Llama model import at load that the image lacks.
# datasets and tensorboard, imported at load for features the benchmark leaves off, are stubbed in the
# benchmark's process instead (benchmarks/bench_train.py); 0.2.2 is the newest release that runs on the
# image's torch 2.11 (0.3.0 imports torch.distributed.fsdp.DataParallelMeshDims, which 2.11 lacks).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
roots="compressed-tensors"
[ "${1:-}" = serve ] && roots="$roots fastapi uvicorn openai httpx"
pins=$("$python" - $roots <<'PY'
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement


# What the image has (torch, triton, transformers and their requirements): not followed, not downloaded.
IMAGE = {"torch", "triton", "transformers", "huggingface-hub", "tokenizers", "safetensors", "numpy", "tqdm",
         "pyyaml", "regex", "packaging", "filelock", "fsspec", "jinja2", "markupsafe", "sympy", "mpmath",
         "networkx", "setuptools", "requests", "urllib3", "idna", "charset-normalizer", "certifi"}


def closure(names):
    seen, todo = {}, list(names)
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen or key in IMAGE or key.startswith("nvidia-"):
            continue
        try:
            dist = distribution(key)
        except PackageNotFoundError:
            sys.exit(f"{key} is not installed in the venv: pip install it first")
        seen[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)  # this machine is x86-64 Linux too, so its markers hold there
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


print(" ".join(f"{name}=={version}" for name, version in sorted(closure(sys.argv[1:]).items())))
PY
)
[ "${1:-}" = train ] && pins="$pins torchtitan==0.2.2 torchdata==0.11.0 tyro==1.0.17 docstring-parser==0.18.0 \
typeguard==4.6.1"
mkdir -p .whl
# The device machines run CPython 3.12 on x86-64 Linux.
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl $pins 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
echo "$pins"
du -sh .whl
