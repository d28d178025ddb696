"""The wire between the server's frontend and the engine-core process: framing and message encoding.

A frame is a 4-byte little-endian length followed by that many bytes of JSON (tp_codec.dumps: no pickle
crosses the boundary). Frontend -> core, a frame is a list of commands (everything one event-loop turn
produced, in order):
    {"op": "add", "k": K, "id": REQ, "prompt": [ids], "arrival": T, "params": [one dict per sequence]}
    {"op": "finish", "ids": [sequence ids], "stop": STOP | null}   (abort, or a stop string was found)
    {"op": "call", "k": K, "method": "reset_prefix_cache"}
    {"op": "shutdown"}
Core -> frontend, a frame is one object whose keys are all optional:
    "ready": {"num_kv_blocks": N}                  once, after the model loaded
    "acks": [[K, error type | null, message | null]]  one per add, in order
    "replies": [[K, result]]
    "out": [[sequence id, [token ids], finish_reason, stop_reason, num_cached_tokens]]
    "lp": [[index into "out", [[token ids], [logprobs], [ranks]] | null per token]]
    "plp": [[index into "out", [[token ids], [logprobs], [ranks]] per prompt token after the first]]
    "sched": [[sequence id, monotonic time first scheduled]]
    "stats": [EngineStats fields in declaration order]
    "error": "what killed the core"              sent just before it exits non-zero
Outputs are columns of plain lists rather than objects: one step of 256 requests is one short JSON array.
"""

from __future__ import annotations

import struct
from dataclasses import astuple
from typing import Any

from carpool.core.sched_output import EngineCoreOutput, TokenLogprobs
from carpool.engine.core import CoreStepResult, EngineStats
from carpool.engine.input_processor import ProcessedRequest, child_request_id
from carpool.request import Request
from carpool.worker.tp_codec import (
    dumps,
    loads,
    sampling_params_from_dict,
    sampling_params_to_dict,
    token_logprobs_from_list,
    token_logprobs_to_list,
)

HEADER = struct.Struct("<I")

__all__ = ["HEADER", "frame", "split_frames", "dumps", "loads", "add_command", "requests_from_add",
           "encode_outputs", "decode_outputs", "stats_to_list", "stats_from_list"]


def frame(obj: Any) -> bytes:
    payload = dumps(obj)
    return HEADER.pack(len(payload)) + payload


def split_frames(buffer: bytearray) -> list[Any]:
    """Decode and remove every complete frame at the front of `buffer`; a partial one stays."""
    messages = []
    pos = 0
    size = HEADER.size
    while len(buffer) - pos >= size:
        (n,) = HEADER.unpack_from(buffer, pos)
        if len(buffer) - pos - size < n:
            break
        messages.append(loads(memoryview(buffer)[pos + size:pos + size + n]))
        pos += size + n
    del buffer[:pos]
    return messages


# ---- requests ----------------------------------------------------------------------------------------
def add_command(k: int, req: ProcessedRequest) -> dict[str, Any]:
    return {"op": "add", "k": k, "id": req.request_id, "prompt": req.prompt_token_ids, "arrival": req.arrival_time,
            "params": [sampling_params_to_dict(s.sampling_params) for s in req.sequences]}


def requests_from_add(cmd: dict[str, Any]) -> list[Request]:
    """The frontend validated and completed these params; they are restored as they were."""
    params = cmd["params"]
    return [Request(child_request_id(cmd["id"], i, len(params)), list(cmd["prompt"]), sampling_params_from_dict(p),
                    arrival_time=cmd["arrival"]) for i, p in enumerate(params)]


# ---- step results ------------------------------------------------------------------------------------
def encode_outputs(result: CoreStepResult, msg: dict[str, Any]) -> None:
    """Add one step's results to the frame `msg`."""
    if result.outputs:
        msg["out"] = [[o.request_id, o.new_token_ids, o.finish_reason, o.stop_reason, o.num_cached_tokens]
                      for o in result.outputs]
        lps = [[i, [None if lp is None else [lp.token_ids, lp.logprobs, lp.ranks] for lp in o.new_logprobs]]
               for i, o in enumerate(result.outputs) if any(lp is not None for lp in o.new_logprobs)]
        if lps:
            msg["lp"] = lps
        plps = [[i, [token_logprobs_to_list(lp) for lp in o.new_prompt_logprobs]]
                for i, o in enumerate(result.outputs) if o.new_prompt_logprobs is not None]
        if plps:
            msg["plp"] = plps
    if result.scheduled:
        msg["sched"] = result.scheduled


def decode_outputs(msg: dict[str, Any]) -> list[EngineCoreOutput]:
    rows = msg.get("out")
    if not rows:
        return []
    outputs = [EngineCoreOutput(request_id=r[0], new_token_ids=r[1], new_logprobs=[None] * len(r[1]),
                                finish_reason=r[2], stop_reason=r[3], num_cached_tokens=r[4]) for r in rows]
    for i, lps in msg.get("lp", ()):
        outputs[i].new_logprobs = [None if lp is None else TokenLogprobs(token_ids=lp[0], logprobs=lp[1], ranks=lp[2])
                                   for lp in lps]
    for i, lps in msg.get("plp", ()):
        outputs[i].new_prompt_logprobs = [token_logprobs_from_list(lp) for lp in lps]
    return outputs


def stats_to_list(stats: EngineStats) -> list[Any]:
    return list(astuple(stats))


def stats_from_list(values: list[Any]) -> EngineStats:
    return EngineStats(*values)
