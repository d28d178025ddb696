"""The whole model in this process, on one device."""

from __future__ import annotations

from typing import Any

from carpool.config import EngineConfig
from carpool.core.sched_output import ModelRunnerOutput, SchedulerOutput
from carpool.worker.executor import Executor, StepHandle
from carpool.worker.model_runner import ModelRunner


class UniProcExecutor(Executor):
    """The whole model in this process, on one device."""

    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config)

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
