"""The runner's per-request arrays: packed step inputs and the shared-prefix detection for cascade
attention, without a model."""

from __future__ import annotations

import numpy as np

from carpool.core.sched_output import NewRequestData
from carpool.sampling_params import SamplingParams
from carpool.worker.input_batch import CASCADE_MIN_PREFIX, InputBatch, shared_prefix_len


def test_shared_prefix_is_the_common_leading_blocks_rounded_to_whole_tiles():
    bt = np.array([[7, 8, 9, 10, 11, 1, 0], [7, 8, 9, 10, 11, 2, 3], [7, 8, 9, 10, 11, 4, 5]])
    num_blocks = np.array([6, 7, 7])
    seq_lens = np.array([330, 400, 420])
    # 5 shared blocks of 64 tokens = 320, below every request's last token
    assert shared_prefix_len(bt, num_blocks, seq_lens, block_size=64) == 320
    # a request whose context ends inside the shared blocks caps it before its own new token
    assert shared_prefix_len(bt, num_blocks, np.array([330, 300, 420]), block_size=64) == 256
    # different first blocks: nothing shared
    bt2 = bt.copy()
    bt2[1, 0] = 99
    assert shared_prefix_len(bt2, num_blocks, seq_lens, block_size=64) == 0
    # too short to be worth it
    assert shared_prefix_len(bt, num_blocks, seq_lens, block_size=16) == 0 < CASCADE_MIN_PREFIX


def test_prepare_packs_positions_slots_and_marks_sampling_rows():
    batch = InputBatch(max_num_reqs=4, max_model_len=64, block_size=4)
    params = SamplingParams()
    batch.add(NewRequestData("a", [1, 2, 3, 4, 5], [], params, [3, 1], 0), None)
    batch.add(NewRequestData("b", [6, 7], [8], params, [2], 1), None)
    inputs = batch.prepare(["a", "b"], [4, 2])
    assert inputs.input_ids.tolist() == [1, 2, 3, 4, 7, 8]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 1, 2]
    assert inputs.slot_mapping.tolist() == [12, 13, 14, 15, 9, 10]
    assert inputs.seq_lens.tolist() == [4, 3] and inputs.query_start_loc.tolist() == [0, 4, 6]
    assert [batch.req_ids[r] for r in inputs.sample_rows] == ["b"]  # "a" has a token left to compute
    assert inputs.block_tables.shape[1] == 16  # padded to 16 columns (fewer kernel variants)
