"""Counting what a forward launches on CPU: Triton kernels run by the interpreter, and the torch ops that
would be device kernels on a GPU (views, allocations and metadata ops launch nothing and are left out).

Used by tests that pin a path's launch count (a CUDA graph still pays a few microseconds per kernel, and a
torch kernel between two Triton kernels breaks their programmatic dependent launch chain)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch no device kernel (views, allocation, metadata)
NO_KERNEL = {"view", "_unsafe_view", "as_strided", "detach", "t", "alias", "empty", "empty_strided", "new_empty",
             "new_empty_strided", "expand", "permute", "reshape", "slice", "select", "unsqueeze", "squeeze",
             "transpose", "split", "split_with_sizes", "chunk", "unbind", "lift_fresh", "_to_copy_noop",
             "empty_like", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "size", "stride", "dim",
             "contiguous", "narrow", "flatten", "numel", "_local_scalar_dense", "result_type"}


@dataclass
class Launches:
    """The kernels a region launched, in order: ("triton", name) or ("torch", aten op)."""
    kernels: list[tuple[str, str]] = field(default_factory=list)

    def triton(self) -> list[str]:
        return [name for kind, name in self.kernels if kind == "triton"]

    def torch(self) -> list[str]:
        return [name for kind, name in self.kernels if kind == "torch"]


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, launches: Launches) -> None:
        super().__init__()
        self.launches = launches
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if not self.paused and name not in NO_KERNEL:
            self.launches.kernels.append(("torch", name))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches() -> Iterator[Launches]:
    """Record the launches of the region (Triton kernels must run in the interpreter: TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = Launches()
    recorder = _AtenRecorder(launches)
    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        launches.kernels.append(("triton", self.__name__))
        recorder.paused += 1  # (the interpreter's own tensor traffic is not the kernel's launches)
        try:
            return real_run(self, *args, **kwargs)
        finally:
            recorder.paused -= 1

    InterpretedFunction.run = run  # type: ignore[method-assign]
    try:
        with recorder:
            yield launches
    finally:
        InterpretedFunction.run = real_run  # type: ignore[method-assign]
