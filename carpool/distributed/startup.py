"""Start-up of the tensor-parallel fast paths: each is established only if every rank agrees it works.

Every rank must take the same path for every collective, or the ranks wait at different collectives
forever. So each fast path (the one-shot symmetric-memory all-reduce, its fused add + RMSNorm, the
batch-1 push exchange, the pushed logits gather) comes up in stages — allocation, an eager self-test
against NCCL, a CUDA-graph capture and replay — and the ranks agree (MIN over a CPU group) after each
stage. The first stage that fails on any rank turns that path off on every rank, with a warning naming
the stage. Self-test state is local to its function: nothing is left on the exchanges afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from carpool.config import KernelConfig
from carpool.distributed.push_exchange import PushExchange
from carpool.distributed.symmetric import DEFAULT_MAX_BYTES, CustomAllReduce, local_reasons

logger = logging.getLogger(__name__)


# ---- agreement ---------------------------------------------------------------------------------------
def agree(ok: bool, cpu_group: Any) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=cpu_group)
    return bool(flag.item())


def agreed_stages(stages: list[tuple[str, Callable[[], str | None]]], cpu_group: Any, rank: int, what: str,
                  fallback: str) -> bool:
    """Run the stages in turn on every rank, agreeing after each one, so that a failure on one rank never
    leaves a peer alone inside a collective kernel. A stage fails by raising or returning an error text.
    False (with a warning naming the stage) at the first stage that failed on any rank."""
    for name, stage in stages:
        error = ""
        try:
            error = stage() or ""
        except Exception as e:  # noqa: BLE001 - any failure means the fallback, agreed below
            error = f"{type(e).__name__}: {e}"
        if not agree(not error, cpu_group):
            logger.warning("%s off after its %s (rank %d: %s); %s", what, name, rank, error or "a peer failed",
                           fallback)
            return False
    return True


def epochs_agree(epoch: torch.Tensor, cpu_group: Any) -> str:
    """'' when every rank's push epoch is the same (they advance together, one per received push)."""
    value = torch.tensor([int(epoch.item())], dtype=torch.long)
    low, high = value.clone(), value.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=cpu_group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=cpu_group)
    return "" if low.item() == high.item() else f"push epochs differ across ranks ({low.item()}..{high.item()})"


# ---- references and graph helpers of the self-tests ---------------------------------------------------
def captured(device: torch.device, fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """fn() captured in a new CUDA graph (on a side stream, as capture requires); the graph, not yet
    replayed, and fn's outputs, which each replay refills."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        outputs = fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph, outputs


def eager_or_replayed(device: torch.device, calls: Callable[[], Any], graph: bool,
                      change_inputs: Callable[[], None]) -> Any:
    """A push self-test's calls() run eagerly, or captured in a CUDA graph that is replayed after
    change_inputs() (so the replay is not the capture's warm result); their outputs, synchronized."""
    if graph:
        g, outs = captured(device, calls)
        change_inputs()
        g.replay()
    else:
        outs = calls()
    torch.cuda.synchronize(device)
    return outs


def same(a: torch.Tensor, b: torch.Tensor, world_size: int) -> bool:
    # Two ranks: a + b is the same number in either order, so exact; more ranks may add in other orders.
    if world_size == 2:
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def norm_agrees(out: torch.Tensor, res_out: torch.Tensor, ref_out: torch.Tensor, ref_res: torch.Tensor,
                world_size: int) -> bool:
    """A fused or pushed norm's results against the reference: the residual stream as `same`, the norm
    to 2e-2."""
    return same(res_out, ref_res, world_size) and torch.allclose(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)


def nccl_all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    y = x.clone()
    dist.all_reduce(y, group=group)
    torch.cuda.synchronize(x.device)
    return y


def nccl_gather(x: torch.Tensor, group: Any, world_size: int) -> torch.Tensor:
    """The ranks' one-row x side by side, over NCCL (the reference of the pushed logits gather)."""
    y = torch.empty(1, world_size * x.shape[-1], dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(y.view(-1), x.contiguous().view(-1), group=group)
    torch.cuda.synchronize(x.device)
    return y


# ---- the symmetric-memory all-reduce and its fused norm ------------------------------------------------
def establish_custom_all_reduce(device: torch.device, dtype: torch.dtype, rank: int, local_rank: int,
                                world_size: int, local_world_size: int, cpu_group: Any, kernels: KernelConfig,
                                device_group: Any = None, max_bytes: int = DEFAULT_MAX_BYTES,
                                model_shape: tuple[int, ...] | None = None, push: bool = True
                                ) -> CustomAllReduce | None:
    """The symmetric-memory all-reduce, or None when it is not available on every rank. Collective over
    every rank of `device_group` (default: the world group); `cpu_group` is a gloo group of the same
    ranks, used to agree. model_shape: (hidden size, intermediate size[, LM head rows per rank]), so the
    push exchange's self-tests run the model's own shapes (with the third, the LM head's logits are
    gathered by the push too). push: whether the batch-1 push exchange may be established (its producers
    are Triton kernels: the model must run the Triton backend); `kernels` says which paths are wanted.
    Call after the process's PDL choice (ops/triton/utils.set_pdl): the self-tests launch as the model will."""
    reasons = local_reasons(device, dtype, local_rank, local_world_size, world_size)
    if not agree(not reasons, cpu_group):
        logger.info("custom all-reduce off (rank %d: %s); using NCCL", rank, "; ".join(reasons) or "a peer")
        return None
    group = device_group if device_group is not None else dist.group.WORLD
    made: list[CustomAllReduce] = []
    state: dict[str, Any] = {}  # the self-tests' inputs and captured graph, between stages

    def allocate() -> None:
        made.append(CustomAllReduce.allocate(device, dtype, group, max_bytes, kernels.fused_all_reduce_norm))

    stages = [("allocation", allocate),
              ("eager self-test", lambda: all_reduce_self_test(made[0], rank, world_size, group, state)),
              ("graph capture", lambda: all_reduce_capture(made[0], state)),
              ("graph replay", lambda: all_reduce_replay(made[0], world_size, group, state))]
    if not agreed_stages(stages, cpu_group, rank, "custom all-reduce", "using NCCL"):
        return None
    ar = made[0]
    logger.info("custom all-reduce on: one-shot over symmetric memory up to %d bytes", max_bytes)
    if (ar.exchange is not None and dtype in (torch.bfloat16, torch.float16) and push
            and kernels.push_all_reduce):
        establish_push(ar, rank, world_size, cpu_group, group, model_shape, kernels.push_logits)
    return ar


def _norm_residual(norm_args: tuple[torch.Tensor, torch.Tensor], rows: int) -> torch.Tensor:
    """The self-tests' residual for `rows` rows: their 4 random rows over and over."""
    return norm_args[0].repeat(rows // 4 + 1, 1)[:rows].contiguous()


def _norm_pair(ar: CustomAllReduce, norm_args: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    return ar.all_reduce_add_rms_norm(x, _norm_residual(norm_args, x.shape[0]), norm_args[1], 1e-6)


def _fused_norm_agrees(x: torch.Tensor, norm_args: tuple[torch.Tensor, torch.Tensor], device_group: Any,
                       world_size: int, out: torch.Tensor, res_out: torch.Tensor) -> bool:
    from carpool.ops.torch_ref import fused_add_rms_norm

    ref_out, ref_res = fused_add_rms_norm(nccl_all_reduce(x, device_group), _norm_residual(norm_args, x.shape[0]),
                                          norm_args[1], 1e-6)
    return norm_agrees(out, res_out, ref_out, ref_res, world_size)


def all_reduce_self_test(ar: CustomAllReduce, rank: int, world_size: int, device_group: Any,
                         state: dict[str, Any]) -> str:
    """One small and one full-size all-reduce against NCCL, and the fused all-reduce + add + RMSNorm
    against NCCL then the norm kernel; '' when they agree. Leaves its inputs in `state` for the graph
    stages."""
    dev = ar.buffer.device
    for numel in (4096, ar.buffer.numel()):
        gen = torch.Generator(device=dev).manual_seed(1234 + rank)
        x = torch.randn(numel, generator=gen, device=dev).to(ar.dtype)
        if numel == 4096:
            state["probe"] = x
        if not same(ar.all_reduce(x), nccl_all_reduce(x, device_group), world_size):
            return f"mismatch against NCCL at {numel} elements"
    gen = torch.Generator(device=dev).manual_seed(99)  # the same on every rank
    norm_args = (torch.randn(4, 1024, generator=gen, device=dev).to(ar.dtype),
                 torch.rand(1024, generator=gen, device=dev).to(ar.dtype))
    state["norm_args"] = norm_args
    gen.manual_seed(7 + rank)
    for rows in (3, 200, 1) if ar.exchange else ():  # more rows than programs; row slots reused
        x = torch.randn(rows, 1024, generator=gen, device=dev).to(ar.dtype)
        if not _fused_norm_agrees(x, norm_args, device_group, world_size, *_norm_pair(ar, norm_args, x)):
            return f"fused all-reduce + RMSNorm disagrees with NCCL at {rows} rows"
    return ""


def all_reduce_capture(ar: CustomAllReduce, state: dict[str, Any]) -> str:
    """Capture one all-reduce of the self-test's small input, and one fused all-reduce + RMSNorm, in a
    CUDA graph (not replayed yet)."""
    probe, norm_args = state["probe"], state["norm_args"]
    state["graph"], state["graph_outs"] = captured(ar.buffer.device, lambda: (
        ar.all_reduce(probe), _norm_pair(ar, norm_args, probe.view(4, 1024)) if ar.exchange else None))
    return ""


def all_reduce_replay(ar: CustomAllReduce, world_size: int, device_group: Any, state: dict[str, Any]) -> str:
    probe, norm_args = state["probe"], state["norm_args"]
    probe.mul_(2)
    state["graph"].replay()
    out, norm = state["graph_outs"]
    ok = same(out, nccl_all_reduce(probe, device_group), world_size)
    if ok and norm is not None:
        ok = _fused_norm_agrees(probe.view(4, 1024), norm_args, device_group, world_size, *norm)
    state.clear()
    if ar.exchange is not None:  # the model may use another width: the device is idle here (nccl_all_reduce)
        ar.exchange.width = 0
    return "" if ok else "a CUDA-graph replay disagrees with NCCL"


# ---- the batch-1 push exchange ------------------------------------------------------------------------
def establish_push(ar: CustomAllReduce, rank: int, world_size: int, cpu_group: Any, device_group: Any,
                   model_shape: tuple[int, ...] | None, push_logits: bool = True) -> None:
    """The push exchange (GEMV outputs and one-token embeddings) on `ar.push`, agreed like the rest; if any
    stage fails on any rank (which may leave the ranks' epochs or slots out of step), no push at all:
    batch-1 steps keep the fused exchange. Then, given the LM head's rows per rank (model_shape[2]) and
    push_logits, its pushed logits gather, agreed the same way: if it fails, only the logits all-gather
    over NCCL (unless the epochs no longer agree: then no push at all)."""
    width = model_shape[0] if model_shape is not None else 512
    made: list[PushExchange] = []

    def allocate() -> None:
        push = PushExchange.create(ar.buffer.device, ar.group_name, world_size)
        push.zeros = torch.zeros(1, max(width, 512), dtype=ar.dtype, device=ar.buffer.device)
        made.append(push)

    def epoch_check() -> str:
        return epochs_agree(made[0].epoch, cpu_group)

    stages = [("allocation", allocate),
              ("eager self-test",
               lambda: push_self_test(made[0], ar.dtype, rank, world_size, device_group, model_shape, False)),
              ("graph self-test",
               lambda: push_self_test(made[0], ar.dtype, rank, world_size, device_group, model_shape, True)),
              ("embedding eager self-test",
               lambda: embedding_push_self_test(made[0], ar.dtype, rank, world_size, device_group, width, False)),
              ("embedding graph self-test",
               lambda: embedding_push_self_test(made[0], ar.dtype, rank, world_size, device_group, width, True)),
              ("epoch check", epoch_check)]
    if not agreed_stages(stages, cpu_group, rank, "push exchange", "batch-1 steps keep the fused exchange"):
        return
    push = made[0]
    ar.push = push
    logger.info("push exchange on for batch-1 steps")
    shard = model_shape[2] if model_shape is not None and len(model_shape) > 2 else 0
    # (agreed first: ranks that ran different stage lists would meet in different collectives)
    if not agree(shard > 0 and push_logits, cpu_group):
        return
    logits = [("allocation", lambda: push.create_logits(ar.group_name, shard)),
              ("eager self-test", lambda: logits_push_self_test(push, ar.dtype, rank, world_size, device_group, False)),
              ("graph self-test", lambda: logits_push_self_test(push, ar.dtype, rank, world_size, device_group, True))]
    if agreed_stages(logits, cpu_group, rank, "pushed logits gather", "batch-1 steps all-gather their logits"):
        logger.info("pushed logits gather on for batch-1 steps")
    else:
        push.logit_slots = push.logit_ptrs = None
    if not agreed_stages([("epoch check", epoch_check)], cpu_group, rank, "push exchange",
                         "batch-1 steps keep the fused exchange"):
        ar.push = None


def embedding_push_self_test(push: PushExchange, dtype: torch.dtype, rank: int, world_size: int, device_group: Any,
                             width: int, graph: bool) -> str:
    """embedding_push then pushed_add_rms_norm (zero residual) for tokens in the first and the last rank's
    vocab slice and beyond every slice, at 512 wide and the model's hidden size, eagerly or captured and
    replayed with other tokens, against NCCL on the masked rows then the torch norm."""
    from carpool.ops.torch_ref import fused_add_rms_norm

    dev, dt, rows = push.slots.device, dtype, 64
    own = torch.Generator(device=dev).manual_seed(47 + rank)  # each rank's vocab slice
    shared = torch.Generator(device=dev).manual_seed(5)  # the norm weights, equal on every rank
    cases = []
    for d in sorted({512, width}):
        w = (0.1 * torch.randn(rows, d, generator=own, device=dev)).to(dt)
        norm_w = torch.rand(d, generator=shared, device=dev).to(dt)
        for token in (3, rows * world_size - 1, rows * world_size + 7):
            cases.append((torch.tensor([token], device=dev), w, norm_w))

    def calls() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        outs = []
        for token, w, norm_w in cases:
            pushed = push.embedding(token, w, rank * rows)
            if pushed is None:
                raise RuntimeError(f"embedding push refused a {w.shape[1]}-wide row")
            outs.append((pushed[0], *push.add_rms_norm(pushed[0], pushed[1], norm_w, 1e-6)))
        return outs

    def other_tokens() -> None:  # in the same slices (the last still beyond all)
        for token, _, _ in cases:
            token.sub_(2)

    outs = eager_or_replayed(dev, calls, graph, other_tokens)
    for (y, out, res_out), (token, w, norm_w) in zip(outs, cases):
        local = int(token.item()) - rank * rows
        expected = w[local:local + 1] if 0 <= local < rows else torch.zeros_like(y)
        ref_out, ref_res = fused_add_rms_norm(nccl_all_reduce(expected, device_group), torch.zeros_like(y),
                                              norm_w, 1e-6)
        if not (torch.equal(y, expected) and norm_agrees(out, res_out, ref_out, ref_res, world_size)):
            return f"embedding push disagrees with NCCL ({'graph' if graph else 'eager'}, {y.shape[1]} wide)"
    return ""


def logits_push_self_test(push: PushExchange, dtype: torch.dtype, rank: int, world_size: int, device_group: Any,
                          graph: bool) -> str:
    """Two one-row LM heads at the model's vocab slice, each after a pushed GEMV and its norm (the gather's
    condition), pushed and gathered, eagerly or captured and replayed with another hidden state; '' when
    every rank's gathered logits equal NCCL's all-gather of the plain GEMV's (over a vocab one short of
    the slices, as padded vocabularies are)."""
    from carpool.ops.triton.gemv import gemv

    dev, dt, k = push.slots.device, dtype, 256
    own = torch.Generator(device=dev).manual_seed(71 + rank)  # each rank's vocab slice
    shared = torch.Generator(device=dev).manual_seed(9)  # the hidden state and the norm, equal on every rank
    head = (0.05 * torch.randn(push.logit_shard, k, generator=own, device=dev)).to(dt)
    x = torch.randn(1, 64, generator=own, device=dev).to(dt)
    w = (0.1 * torch.randn(128, 64, generator=own, device=dev)).to(dt)
    hidden = torch.randn(1, k, generator=shared, device=dev).to(dt)
    residual = torch.randn(1, 128, generator=shared, device=dev).to(dt)
    norm_w = torch.rand(128, generator=shared, device=dev).to(dt)
    vocab = world_size * push.logit_shard - 1

    def calls() -> list[torch.Tensor | None]:
        outs: list[torch.Tensor | None] = []
        for _ in range(2):  # both halves of the slots
            push.add_rms_norm(push.gemv(x, w), residual, norm_w, 1e-6)
            outs.append(push.gather_logits(hidden, head, vocab))
        return outs

    outs = eager_or_replayed(dev, calls, graph, lambda: hidden.mul_(2))
    expected = nccl_gather(gemv(hidden, head), device_group, world_size)[..., :vocab]
    if any(out is None or not torch.equal(out, expected) for out in outs):
        return f"pushed logits gather disagrees with NCCL ({'graph' if graph else 'eager'}, {push.logit_shard} wide)"
    return ""


def push_self_test(push: PushExchange, dtype: torch.dtype, rank: int, world_size: int, device_group: Any,
                   model_shape: tuple[int, ...] | None, graph: bool) -> str:
    """gemv_push then pushed_add_rms_norm at two small shapes and, given model_shape, at the model's o_proj
    and down_proj shapes (both halves used), eagerly or captured and replayed, against NCCL on the GEMV
    outputs then the torch norm; '' when they agree."""
    from carpool.ops.torch_ref import fused_add_rms_norm

    dev, dt = push.slots.device, dtype
    gen = torch.Generator(device=dev).manual_seed(31 + rank)
    shapes = [(1024, 512), (256, 512)]  # (N, K) of the GEMV
    if model_shape is not None:
        hidden, inter = model_shape[:2]
        if hidden % world_size == 0 and inter % world_size == 0:
            shapes += [(hidden, hidden // world_size), (hidden, inter // world_size)]
    xs = [torch.randn(1, k, generator=gen, device=dev).to(dt) for _, k in shapes]
    ws = [(0.05 * torch.randn(n, k, generator=gen, device=dev)).to(dt) for n, k in shapes]
    gen.manual_seed(5)  # the same on every rank
    residuals = [torch.randn(1, w.shape[0], generator=gen, device=dev).to(dt) for w in ws]
    norm_ws = [torch.rand(w.shape[0], generator=gen, device=dev).to(dt) for w in ws]

    def calls() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        outs = []
        for x, w, res, nw in zip(xs, ws, residuals, norm_ws):
            y = push.gemv(x, w)
            outs.append((y, *push.add_rms_norm(y, res, nw, 1e-6)))
        return outs

    def other_inputs() -> None:
        for x in xs:
            x.mul_(2)

    outs = eager_or_replayed(dev, calls, graph, other_inputs)
    for (y, out, res_out), res, nw in zip(outs, residuals, norm_ws):
        ref_out, ref_res = fused_add_rms_norm(nccl_all_reduce(y, device_group), res, nw, 1e-6)
        if not norm_agrees(out, res_out, ref_out, ref_res, world_size):
            return f"push exchange disagrees with NCCL ({'graph' if graph else 'eager'}, {y.shape[1]} wide)"
    return ""
