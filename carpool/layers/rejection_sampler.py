"""Verification of proposed tokens (speculative decoding): which of a request's proposed tokens it keeps,
and the one token the target adds after them.

A request verifying d proposed tokens x_1..x_d has the target's logits at d + 1 positions (its last known
token's and each proposed token's). Position j's distribution p_j is the one plain sampling draws from
there (penalties and min_tokens bans applied per position, then `sampler.processed_probs`: temperature,
min_p, top-k, top-p). Walking j = 1..d, x_j proposed with probability q_j(x_j) is accepted with
probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection a token drawn from
norm(max(0, p_j - q_j)) is emitted instead; if all d are accepted, a bonus token is drawn from p_{d+1}.
Every emitted token is then distributed exactly as the target's own sampling would give it (Leviathan et
al. 2023; Chen et al. 2023). Greedy rows are the temperature-0 limit: x_j is accepted iff it is the
argmax, and the argmax is emitted at the first mismatch.

Deterministic proposals (n-gram, replay, a greedy draft model: q_j one-hot at x_j) need no acceptance
uniform: accepting x_j with probability p_j(x_j) and otherwise emitting a draw from p_j without x_j is
the same as drawing position j's token exactly as plain sampling would and accepting x_j iff it is that
token. So each position samples with the ordinary sampler (its seed is (seed, output index), as
without speculation) and the walk compares: a seeded request emits the very tokens it would emit without
speculation, and logprobs are the sampler's (the target's raw distribution at each emitted token). The
engine's proposers are all deterministic: a verification step samples every position on the device and
the walk (`emitted_lengths`) runs on the host once the candidates arrive, with the proposed tokens the
host already holds, so the step adds no kernel to plain sampling's. Proposals with a distribution
(`draft_probs`, RejectionSampler) take the explicit rule, drawing per position the exponential-race noise
and then the acceptance uniform from the row's generator, and share the walk.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from carpool.core.sched_output import TokenLogprobs
from carpool.layers.sampler import (
    Sampler,
    SamplingMetadata,
    _flat_pairs,
    apply_penalties,
    gather_logprobs,
    processed_probs,
)
from carpool.platform import to_device


def emitted_lengths(accepted: np.ndarray, num_drafts: np.ndarray) -> np.ndarray:
    """How many tokens each request emits: 1 + the number of its leading accepted proposed tokens.
    accepted [L] bool, request s owning num_drafts[s] + 1 consecutive rows (its proposed tokens' rows
    then its bonus row, whose entry is ignored); returns [S] int64 in [1, num_drafts[s] + 1]. A request
    emits the tokens of its first m rows: an accepted row's token is the proposed one, the first
    rejected row's (or the bonus row's) is the target's own."""
    counts = num_drafts.astype(np.int64) + 1
    starts = np.cumsum(counts) - counts
    rejected = ~accepted.astype(bool, copy=True)
    rejected[starts + counts - 1] = True  # the walk always stops at the bonus row
    index = np.where(rejected, np.arange(len(rejected)), len(rejected))
    return np.minimum.reduceat(index, starts) - starts + 1


class RejectionSampler(nn.Module):
    def __init__(self, sampler: Sampler) -> None:
        super().__init__()
        self.sampler = sampler  # the plain sampler: each position's own draw for deterministic proposals

    def forward(self, logits: torch.Tensor, md: SamplingMetadata, draft_token_ids: torch.Tensor,
                num_drafts: np.ndarray, draft_probs: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[TokenLogprobs | None]]:
        """Verification with the rule above, all of it here (tests; the engine's deterministic proposals
        sample the candidates in the step and walk at resolve, model_runner.PendingStep).

        logits [L, V] with L = sum(num_drafts + 1): request s owns num_drafts[s] + 1 consecutive rows,
        its proposed tokens' positions then its bonus position; md describes each of the L rows (with
        per-position seeds); draft_token_ids [L]: the proposed token each row judges (ignored at each
        request's last row); draft_probs [L, V]: the proposer's distributions (None: deterministic).

        Returns (tokens [S, max(num_drafts) + 1] int64, of which the first num_emitted[s] are request s's
        emitted tokens, the rest -1; num_emitted [S] int64 in [1, num_drafts[s] + 1]; the logprobs of
        each row's candidate token, per row: the caller keeps those of the emitted ones)."""
        device = logits.device
        counts = num_drafts.astype(np.int64) + 1
        ends = np.cumsum(counts)
        is_bonus_np = np.zeros(len(logits), dtype=bool)
        is_bonus_np[ends - 1] = True
        draft = draft_token_ids.clamp(min=0)
        if draft_probs is None:
            candidate, logprobs = self.sampler(logits, md)
            row_token = candidate.to(torch.int64)
            accepted = row_token.cpu().numpy() == draft_token_ids.cpu().numpy()
        else:
            candidate, accepted_dev, logprobs = self._with_draft_probs(logits, md, draft, draft_probs,
                                                                       torch.from_numpy(is_bonus_np).to(device))
            # Each row's token if the walk reaches it: the proposed token if accepted, else the target's own.
            row_token = torch.where(accepted_dev, draft, candidate)
            accepted = accepted_dev.cpu().numpy()
        num_emitted = emitted_lengths(accepted, num_drafts)
        width = int(counts.max())
        col = np.arange(width)
        emitted = col[None, :] < num_emitted[:, None]
        index = np.where(emitted, (ends - counts)[:, None] + col[None, :], 0)
        tokens = torch.where(to_device(emitted, device), row_token[to_device(index, device)],
                             torch.full(index.shape, -1, dtype=torch.int64, device=device))
        return tokens, to_device(num_emitted, device), logprobs

    @staticmethod
    def _with_draft_probs(logits: torch.Tensor, md: SamplingMetadata, draft: torch.Tensor,
                          draft_probs: torch.Tensor, is_bonus: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, list[TokenLogprobs | None]]:
        """(candidate token, accepted, logprobs) per row for proposals drawn from draft_probs: accept with
        min(1, p/q), else draw from norm(max(0, p - q)); a bonus row draws from p."""
        logits = logits.to(torch.float32, copy=True)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(n is not None for n in md.num_logprobs) else None
        if md.banned_token_ids:
            rows, ids = _flat_pairs(list(md.banned_token_ids.values()), logits.device, list(md.banned_token_ids))
            logits[rows, ids] = float("-inf")
        if md.repetition_penalty is not None:
            logits = apply_penalties(logits, md)
        argmax = logits.argmax(dim=-1)
        x = draft.unsqueeze(1)
        greedy_accepted = (argmax == draft) & ~is_bonus
        if md.all_greedy:
            candidate, accepted = argmax, greedy_accepted
        else:
            probs = processed_probs(logits, md)
            p_x = probs.gather(1, x).squeeze(1)
            q_x = draft_probs.gather(1, x).squeeze(1)
            residual = (probs - draft_probs).clamp_(min=0.0)
            noise = torch.empty_like(probs).exponential_()
            uniform = torch.rand(len(probs), device=probs.device)
            for row, gen in md.generators.items():
                noise[row].exponential_(generator=gen)
                uniform[row] = torch.rand(1, generator=gen, device=probs.device)[0]
            # An all-zero residual means p == q at that row, where rejection has probability zero; p keeps
            # the draw defined.
            target = torch.where(is_bonus.unsqueeze(1) | (residual.sum(dim=-1, keepdim=True) <= 0), probs, residual)
            drawn = target.div_(noise).argmax(dim=-1)
            greedy = md.temperature < 1e-5
            candidate = torch.where(greedy, argmax, drawn)
            accepted = torch.where(greedy, greedy_accepted, (uniform * q_x < p_x) & ~is_bonus)
        row_token = torch.where(accepted, draft, candidate)
        logprobs = (gather_logprobs(raw_logprobs, row_token, md.num_logprobs) if raw_logprobs is not None
                    else [None] * len(logits))
        return candidate, accepted, logprobs
