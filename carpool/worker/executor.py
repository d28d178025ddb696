"""The executor interface: what the engine asks of whatever runs the model (uniproc_executor.py: in this
process; multiproc_executor.py: one process per tensor-parallel rank).

The engine talks only to this interface, so adding ranks changes nothing above it. This module imports
neither implementation (the engine picks one: engine/core.py).
"""

from __future__ import annotations

from typing import Any, Protocol

from carpool.core.sched_output import ModelRunnerOutput, SchedulerOutput


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

    def describe(self) -> dict[str, Any]:
        """Which kernel and communication paths run (for logs, benchmarks and tests)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        pass
