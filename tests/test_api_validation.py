"""The Python API refuses what the server refuses, with a ValueError naming the field, and accepts
vLLM's prompt forms and OpenAI's multi-part chat content (issue 17, items 3 and 5). After each
refusal a normal request on the same engine still succeeds."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import assert_greedy_matches_reference, assert_no_leak, reference_logits

from eeserve import LLM, SamplingParams
from eeserve.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPT = "The capital of France is"


def _still_works(llm) -> None:
    out = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
    assert_no_leak(llm)


@pytest.mark.parametrize("prompt,field", [(None, "prompt"), (123, "prompt"), ([None], "prompt[0]"),
                                          ({"text": "x"}, "prompt"), ("Hi \ud800 x", "prompt"),
                                          ([10**9], "prompt")])
def test_bad_prompts_are_value_errors(llm, prompt, field):
    with pytest.raises(InvalidRequestError) as ei:
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert ei.value.param == "prompt" and str(ei.value).startswith(field), ei.value
    _still_works(llm)


def test_vllm_prompt_dicts(llm, hf_model):
    ids = llm.tokenizer.encode(PROMPT)
    a, b = llm.generate([{"prompt": PROMPT}, {"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
    assert a.prompt == PROMPT and a.prompt_token_ids == ids and b.prompt_token_ids == ids
    for out in (a, b):
        assert_greedy_matches_reference(hf_model, ids, list(out.outputs[0].token_ids), "prompt dict")


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 10**9}, "max_tokens"),  # the server's 400 context_length_exceeded, not a silent cap
    ({"stop_token_ids": [10**12]}, "stop_token_ids"),
    ({"logit_bias": {10**7: 1.0}}, "logit_bias"),
    ({"early_exit": {"threshold": 5}}, "early_exit.threshold"),  # the engine's measure (softmax): [0, 1]
])
def test_engine_side_refusals(llm, kwargs, field):
    with pytest.raises(InvalidRequestError) as ei:
        llm.generate(PROMPT, SamplingParams(**kwargs), use_tqdm=False)
    assert ei.value.param == field and f"SamplingParams.{field} must" in str(ei.value), ei.value
    _still_works(llm)


def test_max_tokens_none_is_up_to_the_context(llm):
    params = SamplingParams(max_tokens=None, temperature=0, stop=["."])
    assert llm.generate(PROMPT, params, use_tqdm=False)[0].finished


def test_sampling_params_refusals_before_the_engine(llm):
    for kwargs in ({"early_exit": "off"}, {"stop": 5}, {"n": True}, {"logprobs": True}):
        with pytest.raises(ValueError, match=f"SamplingParams.{next(iter(kwargs))} must be"):
            SamplingParams(**kwargs)
    with pytest.raises(InvalidRequestError, match="sampling_params must be"):
        llm.generate(PROMPT, "greedy", use_tqdm=False)
    _still_works(llm)


def test_llm_early_exit_threshold_checked_before_loading():
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\] for confidence 'classifier'"):
        LLM("smollm2-135m", early_exit={"threshold": 5})
    with pytest.raises(ValueError, match=r"threshold must be a number >= 0 for confidence 'entropy'"):
        LLM("smollm2-135m", early_exit={"exit_heads": "none", "exit_layers": (8,), "confidence": "entropy",
                                       "threshold": float("nan")})
    with pytest.raises(ValueError, match=r"min_exit_layer must be <= the last exit layer"):
        LLM("smollm2-135m", early_exit={"exit_heads": "none", "exit_layers": (8,), "min_exit_layer": 99})


def test_chat_multi_part_content_and_roles(llm, gguf_tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"},
                                          {"type": "text", "text": "Answer briefly."}]}]
    joined = [{"role": "user", "content": "What is 2+2?\nAnswer briefly."}]
    ref = gguf_tokenizer.apply_chat_template(joined, tokenize=True, add_generation_prompt=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert llm.apply_chat_template(parts) == list(ref)
    out = llm.chat(parts, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == list(ref)
    for msgs, where in [([{"role": "wizard", "content": "x"}], "messages[0].role"),
                        ([{"role": "user", "content": None}], "messages[0].content"),
                        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].type")]:
        with pytest.raises(InvalidRequestError, match="^" + re.escape(where) + " must be"):
            llm.chat(msgs, GREEDY, use_tqdm=False)
    _still_works(llm)


def test_logit_bias_moves_greedy_choice(llm, hf_model):
    """Reference: transformers' logits of the prompt plus the bias. A bias of (gap + 1) on the
    second-best token makes it the greedy pick; -100 on the best token moves greedy off it."""
    ids = llm.tokenizer.encode(PROMPT)
    row = reference_logits(hf_model, ids)[-1]
    top2 = row.topk(2)
    best, second = int(top2.indices[0]), int(top2.indices[1])
    gap = float(top2.values[0] - top2.values[1])
    one = SamplingParams(temperature=0, max_tokens=1)
    assert llm.generate(ids, one, use_tqdm=False)[0].outputs[0].token_ids == [best]
    up = SamplingParams(temperature=0, max_tokens=1, logit_bias={second: gap + 1.0})
    assert llm.generate(ids, up, use_tqdm=False)[0].outputs[0].token_ids == [second]
    down = SamplingParams(temperature=0, max_tokens=1, logit_bias={best: -100.0})
    biased = row.clone()
    biased[best] -= 100.0
    assert llm.generate(ids, down, use_tqdm=False)[0].outputs[0].token_ids == [int(torch.argmax(biased))]
