"""Verification of proposed tokens (speculative decoding): which of a request's proposed tokens it keeps,
and the one token the target adds after them.

A request verifying d proposed tokens x_1..x_d has the target's logits at d + 1 positions (its last known
token's and each proposed token's). Position j's distribution p_j is the one plain sampling would draw
from there (`sampler.processed_probs`: temperature, min_p, top-k, top-p; penalties and min_tokens bans as
the sampler applies them, per position). Walking j = 1..d:
- greedy rows: x_j is accepted iff it is the argmax of p_j; at the first mismatch the argmax is emitted.
- random rows: x_j, proposed with probability q_j(x_j), is accepted with probability
  min(1, p_j(x_j) / q_j(x_j)); at the first rejection a token drawn from norm(max(0, p_j - q_j)) is
  emitted instead. Deterministic proposers (n-gram, replay, a greedy draft model) have q_j one-hot at x_j.
If all d are accepted, a bonus token is drawn from p_{d+1}. Every emitted token is then distributed
exactly as the target's own sampling would give it (Leviathan et al. 2023; Chen et al. 2023), and greedy
output equals plain greedy decoding token for token.

Randomness: a seeded request's draws at output index i come from a generator the runner seeds with
(seed, i): first the acceptance uniform, then the exponential-race noise. Its tokens are reproducible
for the same proposals; they differ from the same seed's tokens without speculation (the draws are used
differently), as in vLLM. Logprobs are the target's raw distribution's at each emitted token.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from carpool.core.sched_output import TokenLogprobs
from carpool.layers.sampler import SamplingMetadata, _flat_pairs, apply_penalties, gather_logprobs, processed_probs
from carpool.platform import to_device


class RejectionSampler(nn.Module):
    def forward(self, logits: torch.Tensor, md: SamplingMetadata, draft_token_ids: torch.Tensor,
                num_drafts: np.ndarray, draft_probs: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[TokenLogprobs | None]]:
        """logits [L, V] with L = sum(num_drafts + 1): request s owns num_drafts[s] + 1 consecutive rows,
        its proposed tokens' positions then its bonus position; md describes each of the L rows;
        draft_token_ids [L]: the proposed token each row judges (ignored at each request's last row);
        draft_probs [L, V]: the proposer's distributions (None: one-hot, deterministic proposals).

        Returns (tokens [S, max(num_drafts) + 1] int64, of which the first num_emitted[s] are request s's
        emitted tokens, the rest -1; num_emitted [S] int64 in [1, num_drafts[s] + 1]; the logprobs of
        each row's candidate token, per row: the caller keeps those of the emitted ones)."""
        device = logits.device
        logits = logits.to(torch.float32, copy=True)
        want_logprobs = any(n is not None for n in md.num_logprobs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if md.banned_token_ids:
            rows, ids = _flat_pairs(list(md.banned_token_ids.values()), device, list(md.banned_token_ids))
            logits[rows, ids] = float("-inf")
        if md.repetition_penalty is not None:
            logits = apply_penalties(logits, md)
        counts = num_drafts.astype(np.int64) + 1
        ends = np.cumsum(counts)
        is_bonus_np = np.zeros(len(logits), dtype=bool)
        is_bonus_np[ends - 1] = True
        is_bonus = to_device(is_bonus_np, device)
        draft = draft_token_ids.clamp(min=0).unsqueeze(1)
        argmax = logits.argmax(dim=-1)
        accepted = (argmax == draft.squeeze(1)) & ~is_bonus
        candidate = argmax
        if not md.all_greedy:
            probs = processed_probs(logits, md)
            p_x = probs.gather(1, draft).squeeze(1)
            if draft_probs is None:
                q_x = torch.ones_like(p_x)
                residual = probs.scatter(1, draft, 0.0)
            else:
                q_x = draft_probs.gather(1, draft).squeeze(1)
                residual = (probs - draft_probs).clamp_(min=0.0)
            uniform = torch.rand(len(probs), device=device)
            noise = torch.empty_like(probs).exponential_()
            for row, gen in md.generators.items():
                uniform[row] = torch.rand(1, generator=gen, device=device)[0]
                noise[row].exponential_(generator=gen)
            # A bonus row draws from p itself. A residual that is all zero means p == q at that row, where
            # rejection has probability zero; p keeps the division defined.
            target = torch.where(is_bonus.unsqueeze(1) | (residual.sum(dim=-1, keepdim=True) <= 0), probs, residual)
            drawn = target.div_(noise).argmax(dim=-1)
            greedy = md.temperature < 1e-5
            candidate = torch.where(greedy, argmax, drawn)
            accepted = torch.where(greedy, accepted, (uniform * q_x < p_x) & ~is_bonus)
        # Each row's token if the walk reaches it: the proposed token if accepted, else the target's own.
        row_token = torch.where(accepted, draft.squeeze(1), candidate)
        width = int(counts.max())
        col = np.arange(width)
        starts = ends - counts
        valid_np = col[None, :] < counts[:, None]
        index_np = np.where(valid_np, starts[:, None] + col[None, :], 0)
        index, valid = to_device(index_np, device), to_device(valid_np, device)
        acc = accepted[index] & valid
        num_emitted = acc.to(torch.int64).cumprod(dim=1).sum(dim=1) + 1
        emitted = torch.arange(width, device=device)[None, :] < num_emitted[:, None]
        tokens = torch.where(emitted, row_token[index], torch.full_like(index, -1))
        logprobs = (gather_logprobs(raw_logprobs, row_token, md.num_logprobs) if raw_logprobs is not None
                    else [None] * len(logits))
        return tokens, num_emitted, logprobs
