"""The rejection sampler keeps the target distribution exactly, and greedy verification accepts the
longest agreeing prefix plus the target's own token.

Statistical checks (a small vocabulary, N draws each, a fixed seed): the emitted tokens' frequencies
are compared with the target distribution p by a chi-square test at alpha = 1e-4. Its power against
wrong acceptance rules, for the distributions below and N = 20000: resampling from p instead of
norm(max(0, p - q)) after a rejection, accepting with probability p(x) regardless of q (for proposals
sampled from q; with one-hot q that is the right rule), or accepting every proposed token move the
expected statistic to at least ~1500 (without top-k/top-p), ~1550 (with them) and ~1600 (with min_p),
against critical values of at most 25.7: each would be caught with probability > 0.9999. A rule that
skips the filters (min_p, top-k, top-p) on either distribution emits tokens outside the target's
support, which fails at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carpool.layers.rejection_sampler import RejectionSampler
from carpool.layers.sampler import Sampler, SamplingMetadata, apply_top_k_top_p

# chi-square critical values at alpha = 1e-4 by degrees of freedom
CHI2_CRITICAL = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745}
N = 20000

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0],  # position 1 (judges the first proposed token)
                       [-1.0, 0.3, 1.5, 0.2, 0.9, 0.0],  # position 2
                       [0.0, 0.0, 1.0, -2.0, 0.5, 1.2]])  # position 3 (bonus after two accepted)
DRAFT_PROBS = torch.tensor([[0.05, 0.10, 0.40, 0.30, 0.10, 0.05],
                            [0.30, 0.05, 0.05, 0.20, 0.20, 0.20],
                            [1 / 6] * 6])


def target(position: int, temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    logits = LOGITS[position:position + 1] / temperature
    probs = torch.softmax(logits, dim=-1)
    logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))  # min_p: relative to the top token
    logits = apply_top_k_top_p(logits, torch.tensor([top_k]) if top_k else None,
                               torch.tensor([top_p]) if top_p < 1 else None)
    return torch.softmax(logits, dim=-1)[0]


def metadata(rows: int, temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> SamplingMetadata:
    md = SamplingMetadata(temperature=torch.full((rows,), temperature), all_greedy=False,
                          num_logprobs=[None] * rows)
    if min_p:
        md.min_p = torch.full((rows,), min_p)
    if top_k:
        md.top_k = torch.full((rows,), top_k, dtype=torch.long)
    if top_p < 1:
        md.top_p = torch.full((rows,), top_p)
    return md


def assert_distributed_as(tokens: torch.Tensor, p: torch.Tensor) -> None:
    counts = torch.bincount(tokens, minlength=len(p)).double()
    support = p > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    expected = p[support].double() * len(tokens)
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    assert statistic < CHI2_CRITICAL[int(support.sum()) - 1], (statistic, counts / len(tokens), p)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [(1.0, 0, 1.0, 0.0), (0.8, 4, 0.9, 0.0),
                                                             (0.9, 0, 1.0, 0.15)],
                         ids=["plain", "top_k_top_p", "min_p"])
@pytest.mark.parametrize("proposals", ["sampled_from_q", "one_hot"])
def test_emitted_tokens_follow_the_target_distribution(temperature, top_k, top_p, min_p, proposals):
    torch.manual_seed(0)
    # N requests, each proposing 2 tokens: rows (position 1, position 2, bonus) per request
    logits = LOGITS.repeat(N, 1)
    if proposals == "sampled_from_q":
        draft_probs = DRAFT_PROBS.repeat(N, 1)
        drafts = torch.multinomial(draft_probs, 1).squeeze(1)
    else:  # a deterministic proposer: the same guesses for every request, q one-hot
        draft_probs = None
        drafts = torch.tensor([2, 4, 0]).repeat(N)
    drafts.view(N, 3)[:, 2] = -1
    md = metadata(3 * N, temperature, top_k, top_p, min_p)
    tokens, num_emitted, _ = RejectionSampler(Sampler())(logits, md, drafts, np.full(N, 2), draft_probs)
    assert_distributed_as(tokens[:, 0], target(0, temperature, top_k, top_p, min_p))
    # after an accepted first token the second is position 2's; after two, the bonus is position 3's
    assert_distributed_as(tokens[num_emitted >= 2, 1], target(1, temperature, top_k, top_p, min_p))
    assert_distributed_as(tokens[num_emitted == 3, 2], target(2, temperature, top_k, top_p, min_p))
    first_accepted = tokens[:, 0] == drafts.view(N, 3)[:, 0]
    assert torch.equal(num_emitted >= 2, first_accepted)  # a second token only after an accepted first


def test_greedy_accepts_the_longest_agreeing_prefix_and_adds_the_targets_token():
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0], [5.0, 0.0, 0.0, 0.0],  # request 0
                           [0.0, 0.0, 0.0, 5.0], [0.0, 5.0, 0.0, 0.0],  # request 1
                           [0.0, 0.0, 5.0, 0.0]])  # request 2: nothing proposed
    drafts = torch.tensor([1, 3, -1, 3, -1, -1])  # request 0: right, wrong; request 1: right
    md = SamplingMetadata(temperature=torch.zeros(6), all_greedy=True, num_logprobs=[None] * 6)
    tokens, num_emitted, _ = RejectionSampler(Sampler())(logits, md, drafts, np.array([2, 1, 0]))
    assert num_emitted.tolist() == [2, 2, 1]
    assert tokens.tolist() == [[1, 2, -1], [3, 1, -1], [2, -1, -1]]


def test_seeded_rows_draw_the_same_tokens_again():
    def run() -> list[list[int]]:
        gens = {i: torch.Generator().manual_seed(100 + i) for i in range(6)}
        md = metadata(6, 1.0, 0, 1.0)
        md.generators = gens
        tokens, _, _ = RejectionSampler(Sampler())(LOGITS.repeat(2, 1), md, torch.tensor([2, 4, -1, 3, 3, -1]),
                                          np.array([2, 2]))
        return tokens.tolist()

    torch.manual_seed(1)
    first = run()
    torch.manual_seed(2)  # the global stream differs; seeded rows do not read it
    assert run() == first


@pytest.mark.parametrize("accepted, num_drafts, expected", [
    ([True, True, False], [2], [3]),  # both proposed tokens kept, then the bonus row's token
    ([True, False, True], [2], [2]),  # the walk stops at the first rejection
    ([False, True, True], [2], [1]),
    ([True], [0], [1]),  # nothing proposed: the bonus row alone (its entry ignored)
    ([True, True, True, False, True, True, True, False, False], [3, 1, 0, 1], [4, 2, 1, 1]),
])
def test_emitted_lengths_count_the_leading_accepted_tokens_plus_one(accepted, num_drafts, expected):
    """The host walk of a verification: each request's rows are its proposed tokens' then its bonus row."""
    from carpool.layers.rejection_sampler import emitted_lengths

    got = emitted_lengths(np.array(accepted), np.array(num_drafts))
    assert got.tolist() == expected
