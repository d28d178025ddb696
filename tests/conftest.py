from __future__ import annotations

import os
import sys

import pytest
import torch

# Triton kernels run on CPU through the interpreter when there is no GPU. Triton reads this when a
# kernel is decorated, so it must be set before any test module imports carpool.ops.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

from checkpoints import build_checkpoint  # noqa: E402

from carpool.demo import demo_model_path  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests build the demo model into a private cache, never the user's."""
    os.environ.setdefault("CARPOOL_CACHE_DIR", str(tmp_path_factory.mktemp("carpool-cache")))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    made: dict[tuple, str] = {}

    def make(arch: str, **overrides) -> str:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = build_checkpoint(str(tmp_path_factory.mktemp(f"ckpt-{arch}")), arch, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def llama_path(checkpoint_factory) -> str:
    return checkpoint_factory("llama")


@pytest.fixture(scope="session")
def demo_server():
    """A `carpool serve` process with the demo model, shared by the server tests; it must exit 0 on SIGTERM."""
    from server_utils import ServerProcess

    server = ServerProcess()
    yield server
    assert server.terminate() == 0, server.log()


@pytest.fixture(scope="session")
def demo_llm():
    """The demo model offline, the reference that server outputs are compared with."""
    from carpool import LLM

    return LLM(model=demo_model_path(), device="cpu")
