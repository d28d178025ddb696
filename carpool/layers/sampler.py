"""Sampler: logits of each sampling request -> next token (+ optional logprobs).

Order, as in vLLM: min_tokens masking and penalties change the logits; greedy rows take the argmax;
random rows divide by temperature, apply min_p, top_k and top_p, and sample by an exponential race
(argmax of p / Exp(1) noise, equivalent to drawing from p without a cumulative sum). A seeded request
draws its noise from its own generator, so its tokens do not depend on what else is in the batch.
Logprobs are those of the raw model distribution (before any processing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from carpool.core.sched_output import TokenLogprobs
from carpool.platform import to_device


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [N] float32; 0 for greedy rows
    all_greedy: bool
    top_k: torch.Tensor | None = None  # [N] int64, 0 = off
    top_p: torch.Tensor | None = None  # [N] float32, 1 = off
    min_p: torch.Tensor | None = None  # [N] float32, 0 = off
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded generator
    presence_penalty: torch.Tensor | None = None  # [N]; all three set together, or all None
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    prompt_token_ids: list[list[int]] = field(default_factory=list)  # for penalties only
    output_token_ids: list[list[int]] = field(default_factory=list)  # for penalties only
    banned_token_ids: dict[int, list[int]] = field(default_factory=dict)  # row -> ids (min_tokens)
    num_logprobs: list[int | None] = field(default_factory=list)  # per row; None = not asked
    # Per-row noise seeds when the whole batch can take the one-pass kernel (set by the runner only then).
    seeds: torch.Tensor | None = None


class Sampler(nn.Module):
    def __init__(self, fast_sample: Callable | None = None) -> None:
        super().__init__()
        self.fast_sample = fast_sample  # backend kernel for batches with nothing but temperature

    def forward(self, logits: torch.Tensor, md: SamplingMetadata
                ) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        if md.seeds is not None and self.fast_sample is not None:
            return self.fast_sample(logits, md.temperature, md.seeds), [None] * logits.shape[0]
        # One float32 copy that is ours to modify in place (float() alone would alias float32 input).
        logits = logits.to(torch.float32, copy=True)
        want_logprobs = any(n is not None for n in md.num_logprobs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if md.banned_token_ids:  # all rows' ids in one upload
            rows, ids = _flat_pairs(list(md.banned_token_ids.values()), logits.device, list(md.banned_token_ids))
            logits[rows, ids] = float("-inf")
        if md.repetition_penalty is not None:
            logits = apply_penalties(logits, md)
        greedy = logits.argmax(dim=-1)
        if md.all_greedy:
            sampled = greedy
        else:
            sampled = torch.where(md.temperature < 1e-5, greedy, self._sample_random(logits, md))
        logprobs = gather_logprobs(raw_logprobs, sampled, md.num_logprobs) if raw_logprobs is not None \
            else [None] * logits.shape[0]
        return sampled, logprobs

    def _sample_random(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        temperature = torch.where(md.temperature < 1e-5, torch.ones_like(md.temperature), md.temperature)
        logits = logits / temperature.unsqueeze(1)
        if md.min_p is not None:
            probs = torch.softmax(logits, dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * md.min_p.unsqueeze(1)
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if md.top_k is not None or md.top_p is not None:
            logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, gen in md.generators.items():
            noise[row].exponential_(generator=gen)
        return probs.div_(noise).argmax(dim=-1)


def _flat_pairs(lists: list[list[int]], device: torch.device, row_ids: list[int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, value) of every value of every list, on the device; list i belongs to row row_ids[i]
    (default: row i)."""
    lengths = [len(v) for v in lists]
    labels = np.arange(len(lists), dtype=np.int64) if row_ids is None else np.asarray(row_ids, dtype=np.int64)
    rows = np.repeat(labels, lengths)
    values = np.fromiter((t for v in lists for t in v), dtype=np.int64, count=sum(lengths))
    return to_device(rows, device), to_device(values, device)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (divide positive logits, multiply negative);
    presence and frequency penalties over output tokens only, as OpenAI defines them."""
    num_rows, vocab = logits.shape
    device = logits.device
    # Every row's token ids as flat (row, id) pairs: one upload each instead of two per row.
    out_rows, out_ids = _flat_pairs(md.output_token_ids, device)
    prompt_rows, prompt_ids = _flat_pairs(md.prompt_token_ids, device)
    out_counts = torch.zeros(num_rows, vocab, device=device)
    out_counts.index_put_((out_rows, out_ids), torch.ones(out_ids.numel(), device=device), accumulate=True)
    seen = out_counts > 0
    seen[prompt_rows, prompt_ids] = True
    assert md.presence_penalty is not None and md.frequency_penalty is not None
    rep = md.repetition_penalty.unsqueeze(1).expand_as(logits)  # type: ignore[union-attr]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - md.frequency_penalty.unsqueeze(1) * out_counts
    logits = logits - md.presence_penalty.unsqueeze(1) * (out_counts > 0).float()
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask everything outside each row's top-k, then outside the smallest set whose probability
    reaches top_p (the most likely token always survives)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
        kth = sorted_logits.gather(-1, (vocab - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p.unsqueeze(1))
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def gather_logprobs(raw_logprobs: torch.Tensor, sampled: torch.Tensor,
                    num_logprobs: list[int | None]) -> list[TokenLogprobs | None]:
    """For each row that asked: the sampled token's logprob and rank, then the top-N tokens."""
    max_n = max((n for n in num_logprobs if n is not None), default=0)
    sampled_lp = raw_logprobs.gather(-1, sampled.unsqueeze(1))
    ranks = (raw_logprobs > sampled_lp).sum(dim=-1) + 1
    top_lp, top_ids = raw_logprobs.topk(max_n, dim=-1) if max_n else (None, None)
    sampled_l, sampled_lp_l, ranks_l = sampled.tolist(), sampled_lp.squeeze(1).tolist(), ranks.tolist()
    top_lp_l = top_lp.tolist() if top_lp is not None else None
    top_ids_l = top_ids.tolist() if top_ids is not None else None
    out: list[TokenLogprobs | None] = []
    for row, n in enumerate(num_logprobs):
        if n is None:
            out.append(None)
            continue
        ids, lps, rks = [sampled_l[row]], [sampled_lp_l[row]], [ranks_l[row]]
        for j in range(n):
            assert top_ids_l is not None and top_lp_l is not None
            ids.append(top_ids_l[row][j])
            lps.append(top_lp_l[row][j])
            rks.append(j + 1)
        out.append(TokenLogprobs(token_ids=ids, logprobs=lps, ranks=rks))
    return out
