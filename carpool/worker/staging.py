"""Host-to-device copies of a step's inputs through pinned memory.

Why: a copy from pageable (NumPy) memory goes through a driver staging buffer, and a decode step made
ten of them; the device profiles of runs 39-40 (EXPERIMENTS.md) counted some 0.3-0.5 ms of idle device time per step
next to those copies. Here a CUDA-graph replay fills a pinned mirror of its static input buffer and
uploads everything in one copy (`StaticInputs`); the step's other small arrays are copied from pinned
memory as well (`platform.to_device`). On CPU both are plain host tensors and the same code runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from carpool.utils import cdiv

ALIGN = 16  # bytes: every field starts 16-byte aligned (Triton specializes kernels on pointer alignment)


@dataclass(frozen=True)
class Field:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    initial: int | np.ndarray  # value (or values) the field holds before the first upload


class StaticInputs:
    """Named device tensors that are views of one buffer, refilled by one copy from a pinned host
    mirror (or by a kernel that reads the mirror itself, then `uploaded()`). There are two mirrors, used
    in turn: the host fills one while the copy from the other may still be queued behind the running
    step, and `host()` waits (rarely) only for a copy two uploads old. So a mirror holds what was
    written two uploads ago until it is overwritten: write every value a step reads. Put the field
    whose rows a step uses only in part last; `upload(nbytes)` copies a prefix of the buffer
    (`end_of`)."""

    def __init__(self, fields: list[Field], device: torch.device) -> None:
        self.device = device
        self.layout: dict[str, tuple[int, Field]] = {}
        self._row_bytes: dict[str, int] = {}  # (end_of runs every replay: no per-call dtype lookup)
        offset = 0
        for f in fields:
            self.layout[f.name] = (offset, f)
            self._row_bytes[f.name] = self._nbytes(f) // f.shape[0]
            offset += cdiv(self._nbytes(f), ALIGN) * ALIGN
        self.total = offset
        pin = device.type == "cuda"
        self._host = [torch.zeros(offset, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._host_views = [{name: self._view(buf, name).numpy() for name in self.layout} for buf in self._host]
        for views in self._host_views:
            for name, (_, f) in self.layout.items():
                views[name][...] = f.initial
        self._device_buf = self._host[0].to(device, copy=True)
        self.tensors = {name: self._view(self._device_buf, name) for name in self.layout}
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    @staticmethod
    def _nbytes(f: Field) -> int:
        return int(np.prod(f.shape)) * torch.tensor([], dtype=f.dtype).element_size()

    def _view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        offset, f = self.layout[name]
        return buf[offset:offset + self._nbytes(f)].view(f.dtype).view(f.shape)

    def host(self) -> dict[str, np.ndarray]:
        """NumPy views of the mirror the next upload copies from."""
        event = self._copied[self._turn]
        if event is not None:
            event.synchronize()
        return self._host_views[self._turn]

    def end_of(self, name: str, rows: int) -> int:
        """Bytes from the buffer's start to the end of the first `rows` rows of field `name`."""
        return self.layout[name][0] + rows * self._row_bytes[name]

    def upload(self, nbytes: int | None = None) -> None:
        """Queue the copy of the mirror's first nbytes (default: all) to the device buffer."""
        n = self.total if nbytes is None else nbytes
        src = self._host[self._turn][:n]
        self._device_buf[:n].copy_(src, non_blocking=self.device.type == "cuda")
        self.uploaded()

    def host_tensor(self, name: str) -> torch.Tensor:
        """Field `name` of the mirror the next upload reads, as a (pinned) tensor: for a kernel that reads
        it from the device itself (ops/triton/host_io.stage_inputs) instead of `upload`."""
        return self._view(self._host[self._turn], name)

    def host_words(self) -> torch.Tensor:
        """The mirror the next upload reads, as int32 words."""
        return self._host[self._turn].view(torch.int32)

    def device_words(self) -> torch.Tensor:
        """The device buffer, as int32 words (every field starts on a word: ALIGN)."""
        return self._device_buf.view(torch.int32)

    def word_offset(self, name: str) -> int:
        """Where field `name` starts, in 4-byte words."""
        return self.layout[name][0] // 4

    def uploaded(self) -> None:
        """The mirror's data is queued to the device (by `upload` or a kernel that reads it): the next
        upload fills the other mirror, and this one is rewritten only once that work has run."""
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
        self._turn ^= 1
