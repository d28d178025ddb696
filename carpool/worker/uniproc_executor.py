"""The whole model in this process, on one device."""

from __future__ import annotations

import gc
from typing import Any

import torch

from carpool.config import EngineConfig
from carpool.core.sched_output import ModelRunnerOutput, SchedulerOutput
from carpool.worker.executor import Executor, StepHandle
from carpool.worker.model_runner import ModelRunner


class UniProcExecutor(Executor):
    """The whole model in this process, on one device.

    Shutting down drops the runner, so its weights, KV cache and CUDA graph pools go back to the device
    even while the caller still holds the engine: a second engine built in the same process (benchmarks
    compare several) must not find the first one's KV cache counted in its own memory profile."""

    def __init__(self, config: EngineConfig) -> None:
        self._runner: ModelRunner | None = ModelRunner(config)

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise RuntimeError("the engine was shut down; build a new one")
        return self._runner

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def launch(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return self.runner.launch(scheduler_output)

    def describe(self) -> dict[str, Any]:
        return self.runner.describe()

    def shutdown(self) -> None:
        if self._runner is None:
            return
        device = self._runner.device
        self._runner = None
        gc.collect()  # the runner and its proposer refer to each other
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
