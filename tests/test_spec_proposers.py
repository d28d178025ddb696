"""Proposers without a model: n-gram prompt lookup (numpy) and the replay proposer of the benchmarks."""

from __future__ import annotations

import json

import numpy as np

from carpool.core.sched_output import NewRequestData
from carpool.sampling_params import SamplingParams
from carpool.spec_decode.ngram import NgramProposer, ngram_propose
from carpool.spec_decode.replay import ReplayProposer
from carpool.worker.input_batch import InputBatch


def propose(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    return ngram_propose(np.asarray(tokens, dtype=np.int64), min_n, max_n, k).tolist()


def test_the_longest_matching_suffix_wins_over_a_more_recent_shorter_one():
    # the suffix [1, 2, 3] occurred at the start (then 4, 5); [3] alone occurred more recently (then 9, 9)
    tokens = [1, 2, 3, 4, 5, 6, 3, 9, 9, 7, 1, 2, 3]
    assert propose(tokens, 1, 3, 2) == [4, 5]
    assert propose(tokens, 1, 1, 2) == [9, 9]


def test_the_most_recent_occurrence_of_the_longest_suffix_is_used():
    tokens = [7, 8, 1, 7, 8, 2, 7, 8]
    assert propose(tokens, 2, 2, 1) == [2]


def test_no_proposal_below_prompt_lookup_min():
    tokens = [1, 2, 3, 4, 9, 3, 4]  # suffix [3, 4] occurs earlier; [9, 3, 4] does not
    assert propose(tokens, 3, 4, 2) == []
    assert propose(tokens, 2, 4, 2) == [9, 3]


def test_a_match_near_the_end_proposes_only_the_tokens_that_follow_it():
    tokens = [5, 6, 5, 6]
    assert propose(tokens, 2, 2, 4) == [5, 6]
    assert propose([5], 1, 3, 4) == []


def batch_with(prompt: list[int], outputs: list[int]) -> InputBatch:
    batch = InputBatch(max_num_reqs=2, max_model_len=64, block_size=4)
    batch.add(NewRequestData("a", prompt, outputs, SamplingParams(max_tokens=20), [0], 0), None)
    return batch


def test_ngram_proposer_reads_prompt_and_outputs_of_each_row():
    batch = batch_with([1, 2, 3, 4], [1, 2])
    assert NgramProposer(1, 3).propose(batch, np.array([0]), np.array([2])) == [[3, 4]]
    assert NgramProposer(1, 3).propose(batch, np.array([0]), np.array([0])) == [[]]


def test_replay_proposes_the_recording_and_replaces_tokens_at_the_set_rate(tmp_path):
    path = tmp_path / "rec.json"
    recorded = list(range(10, 30))
    path.write_text(json.dumps({"prompt_token_ids": [[1, 2, 3]], "output_token_ids": [recorded]}))
    batch = batch_with([1, 2, 3], recorded[:2])
    exact = ReplayProposer.from_file(str(path), 1.0, vocab_size=100)
    assert exact.propose(batch, np.array([0]), np.array([4])) == [recorded[2:6]]
    never = ReplayProposer.from_file(str(path), 0.0, vocab_size=100)
    assert all(t != r for t, r in zip(never.propose(batch, np.array([0]), np.array([4]))[0], recorded[2:6]))
    half = ReplayProposer.from_file(str(path), 0.5, vocab_size=100, seed=1)
    kept = [t == r for _ in range(400) for t, r in zip(half.propose(batch, np.array([0]), np.array([4]))[0],
                                                     recorded[2:6])]
    assert 0.44 < np.mean(kept) < 0.56  # 1600 draws: 5 standard deviations either side
    off = batch_with([1, 2, 3], [10, 99])  # not following the recording: no guess
    assert exact.propose(off, np.array([0]), np.array([4])) == [[]]
