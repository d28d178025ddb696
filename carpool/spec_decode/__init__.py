"""Speculative decoding: proposers that guess a request's next tokens, which the target model verifies
in one step (the scheduler's rule in core/scheduler.py, acceptance in layers/rejection_sampler.py).

A proposer only ever affects speed: whatever it proposes, the tokens a request emits are the target
model's (greedy: exactly; random sampling: exactly distributed as the target's).
"""

from carpool.spec_decode.proposer import Proposer, make_proposer

__all__ = ["Proposer", "make_proposer"]
