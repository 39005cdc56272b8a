"""eeserve: an inference and serving engine for early-exit LLMs."""

from eeserve.config import CacheConfig, EarlyExitConfig, EngineConfig, ModelConfig, SchedulerConfig
from eeserve.outputs import CompletionOutput, RequestOutput
from eeserve.sampling_params import EarlyExitOverride, SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch models and tokenizers; import it lazily.
    if name == "LLM":
        from eeserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = [
    "LLM",
    "CacheConfig",
    "CompletionOutput",
    "EarlyExitConfig",
    "EarlyExitOverride",
    "EngineConfig",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
