"""The batch-1 push exchange of tensor parallelism: row-parallel GEMVs (and the one-token embedding, and
the LM head) send their outputs to every rank while they compute them, and the next RMSNorm (or the
logits gather) only receives.

Why: at batch 1 a TP step is a chain of small kernels where each all-reduce costs more than the data it
moves. Pushing the GEMV's words into every peer's symmetric slots as they are produced hides the
exchange inside the GEMV; the receiving norm polls its slots for the call's epoch.

Invariant (checked in `add_rms_norm`): pushes and receives alternate strictly, in the model's order,
and a norm receives exactly the partial sums pushed last; anything else raises a RuntimeError naming it,
because a receive of the wrong epoch would wait forever or read stale words.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from carpool.distributed.symmetric import peer_addresses

# Widest row (hidden size) the push slots hold.
PUSH_MAX_WIDTH = 16384


@dataclass
class PushExchange:
    """Device state of the batch-1 push exchange (ops/triton/gemv.py gemv_push, then
    ops/triton/all_reduce_norm.py pushed_add_rms_norm): symmetric int64 slots, every rank's slot
    address, this rank's call epoch. `pending` is the GEMV output whose sums are in flight: the next
    norm must be the one that receives them (the model's order: row-parallel projection, then norm).
    The LM head's logits have slots of their own (create_logits, gather_logits)."""

    slots: torch.Tensor  # symmetric, int64 [2 * world_size * slot_stride], zero at start
    slot_ptrs: torch.Tensor  # int64 [world_size]
    epoch: torch.Tensor  # int32 [1]
    slot_stride: int
    rank: int
    world_size: int
    pending: torch.Tensor | None = None
    # The first norm's residual after an embedding push, [1, >= D] of the model dtype; set (turning the
    # embedding push on) once that push passed its own self-tests.
    zeros: torch.Tensor | None = None
    # The LM head's gather (pushed_gather): its own symmetric slots and every rank's address, for rows
    # of `logit_shard` logits (the vocab slice); set by create_logits, kept once its self-tests passed.
    logit_slots: torch.Tensor | None = None
    logit_ptrs: torch.Tensor | None = None
    logit_shard: int = 0
    # Whether the last exchange op of this forward was a norm receiving a push (so the epoch moved since
    # the last gather, whose words would otherwise look current: pushed_gather). Reset as each forward
    # starts (begin_forward): a CUDA graph replay may have gathered since a push received eagerly.
    received: bool = False

    @staticmethod
    def _symmetric_slots(device: torch.device, group_name: str, world: int, stride: int
                         ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Zeroed symmetric int64 slots [2 halves * world * stride], every rank's address of them and
        this rank's index; collective."""
        import torch.distributed._symmetric_memory as symm_mem

        slots = symm_mem.empty(2 * world * stride, dtype=torch.int64, device=device)
        slots.zero_()
        torch.cuda.synchronize(device)
        return (slots, *peer_addresses(slots, group_name, world))

    @classmethod
    def create(cls, device: torch.device, group_name: str, world: int) -> "PushExchange":
        from carpool.ops.triton.push_words import check_push_world

        check_push_world("push exchange", world)
        stride = PUSH_MAX_WIDTH // 2
        slots, ptrs, rank = cls._symmetric_slots(device, group_name, world, stride)
        return cls(slots, ptrs, torch.zeros(1, dtype=torch.int32, device=device), stride, rank, world)

    def create_logits(self, group_name: str, shard: int) -> None:
        """The LM head's slots, for one-row logits of `shard` (even) values per rank; collective."""
        if shard % 2:
            raise ValueError(f"the pushed logits gather needs an even vocab slice, not {shard}")
        self.logit_slots, self.logit_ptrs, _ = self._symmetric_slots(self.slots.device, group_name, self.world_size,
                                                                     shard // 2)
        self.logit_shard = shard

    def begin_forward(self) -> None:
        """Called before every forward, eager or replayed (ModelRunner): nothing received yet."""
        self.received = False

    def _fits(self, width: int, weight: torch.Tensor, slot_stride: int | None = None) -> bool:
        """A 16-bit weight, contiguous in its last dim, whose output rows of `width` fit slots of
        `slot_stride` pairs (default: the norm's) (equal on every rank)."""
        stride = self.slot_stride if slot_stride is None else slot_stride
        return (weight.dtype in (torch.bfloat16, torch.float16) and width % 2 == 0 and width // 2 <= stride
                and weight.stride(-1) == 1)

    def eligible(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """One row of a 16-bit model whose output fits the slots."""
        return (self.pending is None and x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype
                and self._fits(weight.shape[0], weight))

    def gemv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from carpool.ops.triton.gemv import gemv_push

        self.pending = gemv_push(x, weight, self.slot_ptrs, self.epoch, self.slot_stride, self.rank,
                                 self.world_size)
        self.received = False
        return self.pending

    def embedding(self, token_id: torch.Tensor, weight: torch.Tensor, vocab_start: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One token's vocab-parallel embedding, pushed (ops/triton/all_reduce_norm.py embedding_push):
        (this rank's share, zeros as the residual for the norm that receives the sum); None when not
        eligible, and then the embedding all-reduces as usual."""
        zeros = self.zeros
        if not (zeros is not None and self.pending is None and token_id.numel() == 1
                and weight.dtype == zeros.dtype and weight.shape[1] <= zeros.shape[1]
                and self._fits(weight.shape[1], weight)):
            return None
        from carpool.ops.triton.all_reduce_norm import embedding_push

        self.pending = embedding_push(token_id, weight, vocab_start, self.slot_ptrs, self.epoch, self.slot_stride,
                                      self.rank, self.world_size)
        self.received = False
        return self.pending, zeros[:, :weight.shape[1]]

    def gather_logits(self, hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor | None:
        """A one-row step's vocab-parallel LM head, pushed (gemv_push into the logit slots, then
        ops/triton/all_reduce_norm.py pushed_gather): [1, vocab], every rank's logits side by side, cut to
        the vocab. None when not eligible (then it all-gathers as usual): the gather needs the last exchange
        op to have been a
        norm receiving a push (the model's order: the final norm, then the head)."""
        if not (self.logit_slots is not None and self.received and self.pending is None and hidden.dim() == 2
                and hidden.shape[0] == 1 and hidden.dtype == weight.dtype and weight.shape[0] == self.logit_shard
                and self._fits(self.logit_shard, weight, self.logit_shard // 2)):
            return None
        from carpool.ops.triton.all_reduce_norm import pushed_gather
        from carpool.ops.triton.gemv import gemv_push

        stride = self.logit_shard // 2
        gemv_push(hidden, weight, self.logit_ptrs, self.epoch, stride, self.rank, self.world_size)
        self.received = False
        logits = pushed_gather(self.logit_slots, self.epoch, stride, self.world_size, self.logit_shard, weight.dtype)
        return logits[..., :vocab]

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        from carpool.ops.triton.all_reduce_norm import pushed_add_rms_norm

        pushed, self.pending = self.pending, None
        if x is not pushed or residual.shape != x.shape:
            raise RuntimeError("push exchange: a norm may receive only the partial sums pushed last, with a "
                               "residual of their shape; it got other partial sums"
                               f"{'' if x is not pushed else f' (or a residual of shape {tuple(residual.shape)})'}")
        outs = pushed_add_rms_norm(residual, weight, eps, self.slots, self.epoch, self.slot_stride, self.world_size)
        self.received = True
        return outs
