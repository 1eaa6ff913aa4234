"""vlserve's engine. The public offline API, named as in vLLM:

    from engine import LLM, SamplingParams
    outputs = LLM("Qwen/Qwen2.5-VL-3B-Instruct").generate("Hello", SamplingParams(max_tokens=16))
"""

from engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from engine.config import EngineConfig
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams
from engine.structured_output import GuidedDecodingParams, StructuredOutputsParams


def __getattr__(name: str):
    # LLM pulls in the core, the runner and torch models; import it only when asked for.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "RequestOutput",
           "CompletionOutput", "Logprob", "EngineConfig", "StructuredOutputsParams", "GuidedDecodingParams"]
