"""JSON encoding of everything that crosses a process boundary under tensor parallelism.

No pickle: the engine config, each step's SchedulerOutput and each step's ModelRunnerOutput become
plain JSON (UTF-8 bytes), written field by field. Explicit to_dict/from_dict functions (rather than
`dataclasses.asdict`) keep the wire format visible and make a new field a deliberate change: a field
added to a message without a line here fails the round-trip test in tests/test_tp_codec.py.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from carpool.config import (
    CacheConfig,
    EngineConfig,
    KernelConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    parse_dtype,
)
from carpool.core.sched_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    PromptLogprobs,
    SchedulerOutput,
    TokenLogprobs,
)
from carpool.sampling_params import RequestOutputKind, SamplingParams


def dumps(obj: Any) -> bytes:
    # allow_nan: logprobs may be -inf; Python's json writes and reads it back as -Infinity.
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


def loads(data: bytes | bytearray | memoryview) -> Any:
    return json.loads(bytes(data))


# ---- sampling params --------------------------------------------------------------------------------
def sampling_params_to_dict(p: SamplingParams) -> dict[str, Any]:
    return {
        "n": p.n, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p,
        "seed": p.seed, "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
        "repetition_penalty": p.repetition_penalty, "max_tokens": p.max_tokens, "min_tokens": p.min_tokens,
        "stop": list(p.stop or []), "stop_token_ids": list(p.stop_token_ids or []),
        "include_stop_str_in_output": p.include_stop_str_in_output, "ignore_eos": p.ignore_eos,
        "logprobs": p.logprobs, "prompt_logprobs": p.prompt_logprobs, "skip_special_tokens": p.skip_special_tokens,
        "detokenize": p.detokenize,
        "output_kind": p.output_kind.name, "eos_token_ids": list(p.eos_token_ids),
    }


def sampling_params_from_dict(d: dict[str, Any]) -> SamplingParams:
    """The engine validated these params on admission (and then filled in fields such as max_tokens
    itself), so they are restored as they were rather than validated a second time: the runner must
    see exactly what the scheduler saw."""
    p = SamplingParams.__new__(SamplingParams)
    for f in fields(SamplingParams):
        value = d[f.name]
        if f.name == "output_kind":
            value = RequestOutputKind[value]
        elif f.name == "eos_token_ids":
            value = tuple(value)
        setattr(p, f.name, value)
    return p


# ---- scheduler output -----------------------------------------------------------------------------
def scheduler_output_to_dict(so: SchedulerOutput) -> dict[str, Any]:
    return {
        "new_reqs": [{"req_id": r.req_id, "prompt_token_ids": r.prompt_token_ids,
                      "output_token_ids": r.output_token_ids,
                      "sampling_params": sampling_params_to_dict(r.sampling_params),
                      "block_ids": r.block_ids, "num_computed_tokens": r.num_computed_tokens}
                     for r in so.new_reqs],
        "cached_reqs": [{"req_id": r.req_id, "new_block_ids": r.new_block_ids,
                         "num_computed_tokens": r.num_computed_tokens, "num_blocks_kept": r.num_blocks_kept}
                        for r in so.cached_reqs],
        # A list of pairs: JSON objects keep insertion order too, but the batch order is the point here.
        "num_scheduled_tokens": list(so.num_scheduled_tokens.items()),
        "total_num_scheduled_tokens": so.total_num_scheduled_tokens,
        "finished_req_ids": sorted(so.finished_req_ids),
        "scheduled_spec_decode_tokens": so.scheduled_spec_decode_tokens,
    }


def scheduler_output_from_dict(d: dict[str, Any]) -> SchedulerOutput:
    return SchedulerOutput(
        new_reqs=[NewRequestData(req_id=r["req_id"], prompt_token_ids=list(r["prompt_token_ids"]),
                                 output_token_ids=list(r["output_token_ids"]),
                                 sampling_params=sampling_params_from_dict(r["sampling_params"]),
                                 block_ids=list(r["block_ids"]), num_computed_tokens=r["num_computed_tokens"])
                  for r in d["new_reqs"]],
        cached_reqs=[CachedRequestData(req_id=r["req_id"], new_block_ids=list(r["new_block_ids"]),
                                       num_computed_tokens=r["num_computed_tokens"],
                                       num_blocks_kept=r["num_blocks_kept"]) for r in d["cached_reqs"]],
        num_scheduled_tokens={req_id: n for req_id, n in d["num_scheduled_tokens"]},
        total_num_scheduled_tokens=d["total_num_scheduled_tokens"],
        finished_req_ids=set(d["finished_req_ids"]),
        scheduled_spec_decode_tokens={req_id: list(t) for req_id, t in d["scheduled_spec_decode_tokens"].items()},
    )


# ---- model runner output --------------------------------------------------------------------------
def token_logprobs_to_list(lp: TokenLogprobs) -> list[list[Any]]:
    return [lp.token_ids, lp.logprobs, lp.ranks]


def token_logprobs_from_list(values: list[list[Any]]) -> TokenLogprobs:
    return TokenLogprobs(token_ids=values[0], logprobs=values[1], ranks=values[2])


def runner_output_to_dict(out: ModelRunnerOutput) -> dict[str, Any]:
    return {
        "req_ids": out.req_ids, "sampled_token_ids": out.sampled_token_ids,
        "logprobs": [None if lp is None else {"token_ids": lp.token_ids, "logprobs": lp.logprobs,
                                              "ranks": lp.ranks} for lp in out.logprobs],
        "spec_token_ids": out.spec_token_ids,
        "prompt_logprobs": {req_id: [p.start, [token_logprobs_to_list(lp) for lp in p.logprobs]]
                            for req_id, p in out.prompt_logprobs.items()},
    }


def runner_output_from_dict(d: dict[str, Any]) -> ModelRunnerOutput:
    return ModelRunnerOutput(
        req_ids=list(d["req_ids"]), sampled_token_ids=list(d["sampled_token_ids"]),
        logprobs=[None if lp is None else TokenLogprobs(token_ids=lp["token_ids"], logprobs=lp["logprobs"],
                                                        ranks=lp["ranks"]) for lp in d["logprobs"]],
        spec_token_ids={req_id: list(t) for req_id, t in d["spec_token_ids"].items()},
        prompt_logprobs={req_id: PromptLogprobs(start=start, logprobs=[token_logprobs_from_list(lp) for lp in lps])
                         for req_id, (start, lps) in d["prompt_logprobs"].items()})


# ---- engine config (sent once, when a worker starts) ----------------------------------------------
_NESTED = ("model", "cache", "scheduler", "parallel", "kernels", "speculative_config")


def engine_config_to_dict(c: EngineConfig) -> dict[str, Any]:
    m = c.model
    model = {f.name: getattr(m, f.name) for f in fields(ModelConfig)}
    model["dtype"] = str(m.dtype).replace("torch.", "")
    model["eos_token_ids"] = list(m.eos_token_ids)
    model["moe"] = None if m.moe is None else {f.name: getattr(m.moe, f.name) for f in fields(MoEConfig)}
    return {
        "model": model,
        "cache": {f.name: getattr(c.cache, f.name) for f in fields(CacheConfig)},
        "scheduler": {f.name: getattr(c.scheduler, f.name) for f in fields(SchedulerConfig)},
        "parallel": {f.name: getattr(c.parallel, f.name) for f in fields(ParallelConfig)},
        "kernels": {f.name: getattr(c.kernels, f.name) for f in fields(KernelConfig)},
        "speculative_config": c.speculative_config.to_dict() if c.speculative_config is not None else None,
        # every plain top-level field (device, kernels, seed, load format, ...), whatever is added later
        **{f.name: getattr(c, f.name) for f in fields(EngineConfig) if f.name not in _NESTED},
    }


def engine_config_from_dict(d: dict[str, Any]) -> EngineConfig:
    model = dict(d["model"])
    model["dtype"] = parse_dtype(model["dtype"])
    model["eos_token_ids"] = tuple(model["eos_token_ids"])
    if model.get("moe") is not None:
        model["moe"] = MoEConfig(**{**model["moe"], "mlp_only_layers": tuple(model["moe"]["mlp_only_layers"])})
    return EngineConfig(model=ModelConfig(**model), cache=CacheConfig(**d["cache"]),
                        scheduler=SchedulerConfig(**d["scheduler"]), parallel=ParallelConfig(**d["parallel"]),
                        kernels=KernelConfig(**d["kernels"]),
                        speculative_config=(SpeculativeConfig(**d["speculative_config"])
                                            if d["speculative_config"] is not None else None),
                        **{f.name: d[f.name] for f in fields(EngineConfig) if f.name not in _NESTED})
