"""carpool: a small LLM inference and serving engine (paged KV cache, continuous batching)."""

from carpool.engine.arg_utils import EngineArgs
from carpool.engine.llm_engine import LLM, Engine, LLMEngine
from carpool.outputs import CompletionOutput, RequestOutput
from carpool.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "Engine", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutputKind",
           "RequestOutput", "CompletionOutput", "__version__"]
