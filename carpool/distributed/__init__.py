"""Tensor parallelism's communication, split by concern:

- group.py: the process group (rank, size) and plain collectives;
- communicator.py: what the model asks for (partial sums reduced with the next norm, the LM head's
  gather), choosing among the paths below;
- symmetric.py: the one-shot symmetric-memory all-reduce and the fused all-reduce + RMSNorm's state;
- push_exchange.py: the batch-1 push exchange;
- startup.py: establishing those fast paths with self-tests every rank agrees on.

Single-GPU code imports none of this beyond `SINGLE_RANK` (a communicator whose calls are local).
"""

from carpool.distributed.communicator import SINGLE_RANK, Communicator, PartialSums
from carpool.distributed.group import SINGLE, TPGroup

__all__ = ["Communicator", "PartialSums", "SINGLE", "SINGLE_RANK", "TPGroup"]
