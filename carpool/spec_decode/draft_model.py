"""Draft-model proposer: a smaller checkpoint with the target's vocabulary runs k greedy steps per target
step, in the target's process and on its device. Under tensor parallelism it is either split over the
target's ranks (`draft_tensor_parallel_size` = the target's, vLLM's default: every rank runs its shard of
every draft step) or whole on rank 0 (`draft_tensor_parallel_size` 1: the other ranks hold no draft).

KV memory: the draft keeps its own K/V tensors with the target's block count and reads them through the
target's block tables (the same block ids), so one block of the shared pool costs the target's bytes
plus the draft's (`kv_bytes_per_block`, counted when the pool is sized). The scheduler holds
`num_speculative_tokens` lookahead slots past a sampling step's tokens, where the draft writes the K/V of
the tokens it proposes; a row proposes fewer tokens where its table ends sooner.

Per row, `num_computed[row]` counts leading positions whose draft K/V was computed from verified tokens.
A proposal first catches up on the verified tokens from there (a whole prompt the first time; after a
verification, the accepted tokens and the target's own), whose last logits give the first guess, then
feeds back each guess for k - 1 single-token steps; positions holding guesses are recomputed next time,
so a rejected guess never lingers. Draft K/V of a prefix-cache hit block is recomputed too (its
computing request may not have drafted): a new row starts at 0.

On a GPU (CUDA graphs on for the target) a steady cycle replays two graphs: the catch-up one of the
draft's own CUDAGraphRunner (the target's runner class), its verification-shaped graphs of W = 2 .. k + 1
query tokens per row (W = 1: its decode graphs), then the k - 1 single-token steps all in one graph of
DraftChainGraphs (draft_chain.py): their metadata is known before the first of them (step j of a row is
at its verified token count + j, over the same block table), so one host pass and one upload prepare
them all, and each step's argmax is written, inside the graph, where the next step reads its input ids.
Without graphs (CPU, enforce_eager) the single-token steps run one by one, eagerly; with them every
proposing batch fits the chain (proposals stop at disable_by_batch_size, where its ladder ends).

A cycle's catch-up has 1 .. k + 1 tokens per row (the tokens a verification emitted), so it is made
uniform: every row recomputes its last W verified tokens, W the widest row's count, which rewrites K/V
that some rows already hold from the same verified tokens (a guess only; verification decides what is
emitted). Rows with more to catch up (a new request's prompt, a row that skipped proposing) run eagerly
in a forward of their own. The host waits once per proposal, for the guesses of all steps (the chain
returns them as one [k, rows] tensor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from carpool.config import EngineConfig, ModelConfig
from carpool.distributed import SINGLE, Communicator, TPGroup
from carpool.forward_batch import ForwardBatch
from carpool.models.loader import load_model
from carpool.models.registry import get_model_class
from carpool.models.runtime import ModelRuntime
from carpool.platform import to_device
from carpool.quantization.config import parse_kv_cache_dtype, parse_quantization_config
from carpool.quantization.factory import check_device_support
from carpool.spec_decode.draft_chain import DraftChainGraphs
from carpool.spec_decode.proposer import Proposer
from carpool.utils import cdiv
from carpool.worker.cuda_graph import CUDAGraphRunner, verification_graph_shapes
from carpool.worker.input_batch import PendingFixup, StepInputs, packed_ranges
from carpool.worker.kv_cache import allocate_kv_cache, bytes_per_block

if TYPE_CHECKING:
    from carpool.worker.input_batch import InputBatch
    from carpool.worker.model_runner import ModelRunner


class DraftModelProposer(Proposer):
    def __init__(self, config: EngineConfig, runner: "ModelRunner") -> None:
        spec = config.speculative_config
        assert spec is not None and spec.model is not None
        self.device = runner.device
        self.block_size = config.cache.block_size
        self.draft_config = ModelConfig.from_pretrained(spec.model, config.model.dtype,  # type: ignore[arg-type]
                                                        config.model.max_model_len)
        # A draft checkpoint quantized in its own format loads with its own scheme (`--quantization` is
        # the target's); its K/V stays in the draft's dtype (kv_bytes_per_block counts those bytes).
        quantization = parse_quantization_config(self.draft_config.hf_config)
        kv_cache = parse_kv_cache_dtype("auto", self.draft_config.hf_config)
        check_device_support(quantization, kv_cache, config.kernel_backend, self.device)
        # Split over the target's ranks, the draft's collectives take the plain group (NCCL, gloo on CPU):
        # the target's symmetric-memory paths were sized and self-tested for the target's shapes. Its
        # greedy guesses agree on every rank because its logits are a gather, the same bits everywhere.
        group = TPGroup(runner.tp.rank, runner.tp.size) if spec.draft_on_every_rank else SINGLE
        self.runtime = ModelRuntime.for_inference(
            config.kernel_backend, Communicator(group, config.kernels), config.kernels, quantization,
            get_model_class(self.draft_config.architecture).packed_modules_mapping, kv_cache)
        self.model = load_model(self.draft_config, self.runtime, self.device, config.load_format)
        self.num_computed = np.zeros(config.scheduler.max_num_seqs, dtype=np.int64)
        self.kv_cache: torch.Tensor | None = None
        # Proposals are made for batches below disable_by_batch_size only: graphs up to that size.
        self.graph_max_num_seqs = verification_graph_shapes(config)[1]
        self.use_cuda_graphs = (runner.use_cuda_graphs and self.runtime.attention.supports_cuda_graphs
                                and self.graph_max_num_seqs > 0)
        self.graph_runner: CUDAGraphRunner | None = None
        self.chain: DraftChainGraphs | None = None
        self.num_speculative_tokens = spec.num_speculative_tokens
        self.max_model_len = config.model.max_model_len
        # Catch-up widths with a graph: a verification emits 1 .. k + 1 tokens, the draft recomputes them.
        self.catch_up_widths = tuple(range(2, spec.num_speculative_tokens + 2))

    def kv_bytes_per_block(self) -> int:
        layer = self.model.attention_layers()[0]
        return bytes_per_block(self.draft_config, self.block_size, layer.num_kv_heads)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = allocate_kv_cache(self.model.attention_layers(), num_blocks, self.block_size,
                                          self.draft_config.dtype, self.device)
        if self.use_cuda_graphs:
            self.graph_runner = CUDAGraphRunner(self.model, self.runtime.attention, self.graph_max_num_seqs,
                                                self.max_model_len, self.block_size, self.device, cascade=False,
                                                verify_widths=self.catch_up_widths,
                                                verify_max_num_seqs=self.graph_max_num_seqs)
            self.graph_runner.capture()
            if self.num_speculative_tokens > 1:
                self.chain = DraftChainGraphs(self.model, self.runtime.attention, self.graph_max_num_seqs,
                                              self.num_speculative_tokens - 1, self.max_model_len, self.block_size,
                                              self.device, self.runtime.comm.begin_forward)
                self.chain.capture()

    def describe(self) -> dict[str, Any]:
        return {"draft_model": self.draft_config.path, "draft_on_every_rank": self.runtime.comm.size > 1,
                "draft_cuda_graphs": self.graph_runner is not None}

    def remove(self, row: int) -> None:
        self.num_computed[row] = 0

    @torch.inference_mode()
    def propose(self, batch: "InputBatch", rows: np.ndarray, max_lens: np.ndarray) -> list[list[int]]:
        num_tokens = batch.num_tokens[rows]
        # a guess at position p is proposed after writing the K/V of positions up to p - 1: the table ends it
        capacity = batch.num_blocks[rows] * self.block_size
        k = np.minimum(max_lens, capacity - num_tokens + 1)
        active = np.flatnonzero(k > 0)
        out: list[list[int]] = [[] for _ in rows]
        if not len(active):
            return out
        rows, k, num_tokens = rows[active], k[active], num_tokens[active]
        start = np.minimum(self.num_computed[rows], num_tokens - 1)
        # Step 0: the verified tokens not yet in the draft's cache; the last one's logits guess first.
        guesses = [self._catch_up(batch, rows, start, num_tokens)]
        self.num_computed[rows] = num_tokens
        if self.chain is not None and int(k.max()) > 1 and self.chain.fits(len(rows)):
            self.runtime.comm.begin_forward()
            # [k, rows] (the chain's k): one wait, for every guess of every row
            host = self.chain.run(batch.block_table[rows], num_tokens, k - 1, guesses[0]).tolist()
            for i in range(len(rows)):
                out[int(active[i])] = [host[j][i] for j in range(int(k[i]))]
            return out
        # Steps 1 .. k - 1: each row feeds back its last guess while it wants more.
        alive = np.arange(len(rows))
        for j in range(1, int(k.max())):
            keep = np.flatnonzero(k[alive] > j)
            if not len(keep):
                break
            prev = guesses[-1] if len(keep) == len(alive) else guesses[-1].index_select(
                0, to_device(keep, self.device))
            alive = alive[keep]
            guesses.append(self._step(batch, rows[alive], prev, num_tokens[alive] + j - 1,
                                      np.ones(len(alive), dtype=np.int64)))
        host = [g.tolist() for g in guesses]  # one wait, after every step is queued
        # guesses[j] lists the rows alive at step j, in order: row i is alive at j iff k[i] > j
        cursor = [0] * len(host)
        for i in range(len(rows)):
            proposal = []
            for j in range(int(k[i])):
                proposal.append(host[j][cursor[j]])
                cursor[j] += 1
            out[int(active[i])] = proposal
        return out

    def _catch_up(self, batch: "InputBatch", rows: np.ndarray, start: np.ndarray, num_tokens: np.ndarray
                  ) -> torch.Tensor:
        """Draft K/V of each row's verified tokens from start[i] to num_tokens[i] - 1, and the first guess
        (after the last of them), [len(rows)] on the device. Rows whose count fits a catch-up graph are
        widened to one count W (they start at num_tokens - W) so that one graph replay computes them all;
        the others (or all, without graphs) run in one eager forward."""
        counts = num_tokens - start
        width = self._uniform_width(counts, num_tokens)
        if width == 0:
            return self._step(batch, rows, self._verified_ids(batch, rows, start, counts), start, counts)
        uniform = (counts <= width) & (num_tokens >= width)
        if uniform.all():
            wide = np.full(len(rows), width, dtype=np.int64)
            return self._step(batch, rows, self._verified_ids(batch, rows, num_tokens - width, wide),
                              num_tokens - width, wide)
        # two forwards (graphed, eager), their guesses put back in row order
        out = torch.empty(len(rows), dtype=torch.long, device=self.device)
        graphed, eager = np.flatnonzero(uniform), np.flatnonzero(~uniform)
        wide = np.full(len(graphed), width, dtype=np.int64)
        for part, first, c in ((graphed, num_tokens[graphed] - width, wide), (eager, start[eager], counts[eager])):
            guesses = self._step(batch, rows[part], self._verified_ids(batch, rows[part], first, c), first, c)
            out.index_copy_(0, to_device(part, self.device), guesses)
        return out

    def _uniform_width(self, counts: np.ndarray, num_tokens: np.ndarray) -> int:
        """The catch-up width W (0: none) whose graph takes the rows that have at most W tokens to catch up
        and W verified tokens to recompute: the widest such count, when a graph of that width exists for
        that many rows (1 is a decode graph)."""
        if self.graph_runner is None:
            return 0
        widest = max(self.catch_up_widths, default=1)
        fits = counts[counts <= widest]
        if not len(fits):
            return 0
        width = int(fits.max())
        n = int(np.count_nonzero((counts <= width) & (num_tokens >= width)))
        sizes = self.graph_runner.index.sizes.get(width, [])
        return width if n and sizes and sizes[-1] >= n else 0

    @staticmethod
    def _verified_ids(batch: "InputBatch", rows: np.ndarray, start: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The token ids at positions start[i] .. start[i] + counts[i] - 1 of each row, packed (host)."""
        return batch.token_ids[np.repeat(rows, counts), packed_ranges(start, counts)]

    def _step(self, batch: "InputBatch", rows: np.ndarray, input_ids: torch.Tensor | np.ndarray,
              start: np.ndarray, counts: np.ndarray) -> torch.Tensor:
        """One draft forward: each row computes counts[i] tokens at positions start[i] .. start[i] +
        counts[i] - 1 and guesses the token after its last one (greedy). `input_ids` (packed): on the host
        (verified tokens) or on the device (the last guesses, written into a graph's inputs as a fix-up).
        Returns the guesses [len(rows)] on the device; nothing here waits for the device."""
        bs = self.block_size
        qsl = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=qsl[1:])
        positions = packed_ranges(start, counts)
        slots = batch.block_table[np.repeat(rows, counts), positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = start + counts
        max_blocks = min(cdiv(int(batch.num_blocks[rows].max()), 16) * 16, batch.max_blocks_per_req)
        on_host = isinstance(input_ids, np.ndarray)
        inputs = StepInputs(rows=rows, input_ids=(input_ids.astype(np.int64, copy=False) if on_host  # type: ignore[union-attr]
                                                  else np.zeros(len(positions), dtype=np.int64)),
                            positions=positions, slot_mapping=slots, query_start_loc=qsl.astype(np.int32),
                            seq_lens=seq_lens.astype(np.int32), block_tables=batch.block_table[rows, :max_blocks],
                            sample_rows=rows, logits_indices=qsl[1:] - 1, max_query_len=int(counts.max()),
                            max_seq_len=int(seq_lens.max()), pending_token_index=np.zeros(0, dtype=np.int64),
                            pending_rows=np.zeros(0, dtype=np.int64))
        self.runtime.comm.begin_forward()
        shape = self.graph_runner.choose(inputs) if self.graph_runner is not None else None
        if shape is not None:  # device input ids (every one of them) go in as the fix-up
            fixup = None if on_host else PendingFixup(np.arange(len(positions), dtype=np.int64),
                                                      input_ids)  # type: ignore[arg-type]
            return self.graph_runner.run(inputs, fixup, shape).argmax(dim=-1)  # type: ignore[union-attr]
        ids = to_device(inputs.input_ids, self.device) if on_host else input_ids
        fwd = ForwardBatch(input_ids=ids, positions=to_device(inputs.positions, self.device),  # type: ignore[arg-type]
                           attn=self.runtime.attention.build_metadata(inputs, self.device))
        hidden = self.model(fwd.input_ids, fwd.positions, fwd)
        logits = self.model.compute_logits(hidden.index_select(0, to_device(inputs.logits_indices, self.device)))
        return logits.argmax(dim=-1)
