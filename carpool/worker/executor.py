"""Executors run the model runner: in this process, or (tensor parallel) one process per rank.

The engine talks only to this interface, so adding ranks changes nothing above it.
"""

from __future__ import annotations

from typing import Protocol

from carpool.config import EngineConfig
from carpool.core.sched_output import ModelRunnerOutput, SchedulerOutput
from carpool.worker.model_runner import ModelRunner


class StepHandle(Protocol):
    def resolve(self) -> ModelRunnerOutput: ...


class ResolvedStep:
    """A step that already finished (executors that cannot overlap steps)."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def resolve(self) -> ModelRunnerOutput:
        return self.output


class Executor:
    def determine_num_blocks(self) -> int:
        raise NotImplementedError

    def initialize_kv_cache(self, num_blocks: int) -> None:
        raise NotImplementedError

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        raise NotImplementedError

    def launch(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Start a step; the engine resolves it later (after launching the next one, if it can)."""
        return ResolvedStep(self.execute_model(scheduler_output))

    def shutdown(self) -> None:
        pass


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


def make_executor(config: EngineConfig) -> Executor:
    if config.parallel.tensor_parallel_size > 1:
        from carpool.worker.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor(config)
    return UniProcExecutor(config)
