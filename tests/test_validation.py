"""Validation of SamplingParams, EarlyExitConfig, prompts and chat messages, without a model.

Hypothesis throws arbitrary values at every field: a constructor may only raise ValueError, and
whatever it accepts must lie in the allowed ranges written out here by hand (issue 17, items 3
and 5, "Fuzzing in the suite").
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eeserve.config import EarlyExitConfig
from eeserve.engine.llm_engine import LLMEngine
from eeserve.entrypoints.chat_utils import parse_chat_messages
from eeserve.errors import InvalidRequestError
from eeserve.inputs import parse_prompts
from eeserve.sampling_params import EarlyExitOverride, SamplingParams

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Thresholds each confidence measure allows, from the measures' definitions (a probability, a
# difference of two probabilities, an entropy in nats, a cosine).
RANGES = {"softmax": (0, 1), "margin": (0, 1), "classifier": (0, 1), "entropy": (0, math.inf), "saturation": (-1, 1)}

ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.lists(st.one_of(st.integers(-3, 10**13), st.floats(), st.text(max_size=2)), max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers(-3, 99)), st.one_of(st.floats(), st.integers()),
                    max_size=2),
    st.tuples(st.integers(-2, 40), st.integers(-2, 40)),
)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _near(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Values that are often valid, with anything mixed in."""
    return st.one_of(valid, ANY)


# ---- SamplingParams --------------------------------------------------------------------------

SP_FIELDS = {
    "n": _near(st.integers(-1, 70)),
    "temperature": _near(st.floats(-0.5, 2.5)),
    "top_p": _near(st.floats(-0.1, 1.1)),
    "min_p": _near(st.floats(-0.1, 1.1)),
    "seed": _near(st.integers(-1, 2**64)),
    "presence_penalty": _near(st.floats(-3, 3)),
    "frequency_penalty": _near(st.floats(-3, 3)),
    "repetition_penalty": _near(st.floats(-1, 11)),
    "max_tokens": _near(st.integers(-1, 100)),
    "min_tokens": _near(st.integers(-1, 100)),
    "stop": _near(st.lists(st.text(max_size=3), max_size=2)),
    "stop_token_ids": _near(st.lists(st.integers(-2, 10**13), max_size=2)),
    "include_stop_str_in_output": ANY,
    "ignore_eos": ANY,
    "skip_special_tokens": ANY,
    "logprobs": _near(st.integers(-1, 25)),
    "prompt_logprobs": _near(st.integers(-1, 25)),
    "logit_bias": _near(st.dictionaries(st.one_of(st.integers(-1, 99), st.from_regex(r"\A-?[0-9]{1,3}\Z")),
                                        st.one_of(st.floats(-150, 150), st.just(float("nan"))), max_size=3)),
    "early_exit": _near(st.fixed_dictionaries({}, optional={"enabled": ANY, "threshold": ANY, "other": ANY})),
}


def _check_accepted_sampling(p: SamplingParams) -> None:
    assert _int(p.n) and 1 <= p.n <= 64
    assert _num(p.temperature) and 0 <= p.temperature <= 2
    assert _num(p.top_p) and 0 < p.top_p <= 1
    assert _num(p.min_p) and 0 <= p.min_p <= 1
    assert p.seed is None or (_int(p.seed) and 0 <= p.seed < 2**63)
    assert _num(p.presence_penalty) and -2 <= p.presence_penalty <= 2
    assert _num(p.frequency_penalty) and -2 <= p.frequency_penalty <= 2
    assert _num(p.repetition_penalty) and 0 < p.repetition_penalty <= 10
    assert p.max_tokens is None or (_int(p.max_tokens) and p.max_tokens >= 1)
    assert _int(p.min_tokens) and 0 <= p.min_tokens <= (p.max_tokens or p.min_tokens)
    assert isinstance(p.stop, list) and all(isinstance(s, str) and s for s in p.stop)
    assert isinstance(p.stop_token_ids, list) and all(_int(t) and t >= 0 for t in p.stop_token_ids)
    for b in (p.include_stop_str_in_output, p.ignore_eos, p.skip_special_tokens):
        assert isinstance(b, bool)
    for lp in (p.logprobs, p.prompt_logprobs):
        assert lp is None or (_int(lp) and 0 <= lp <= 20)
    assert p.logit_bias is None or all(_int(k) and k >= 0 and _num(v) and -100 <= v <= 100
                                       for k, v in p.logit_bias.items())
    ee = p.early_exit
    assert ee is None or (isinstance(ee, EarlyExitOverride) and isinstance(ee.enabled, bool)
                          and (ee.threshold is None or _num(ee.threshold)))


@FUZZ
@given(st.fixed_dictionaries({}, optional=SP_FIELDS))
def test_sampling_params_fuzz_only_value_error(kwargs):
    try:
        p = SamplingParams(**kwargs)
    except ValueError as e:
        name = str(e).split(" ", 1)[0].removeprefix("SamplingParams.").split(".")[0]
        assert name in kwargs or name in ("min_tokens", "early_exit"), e  # names a field it was given
        return
    _check_accepted_sampling(p)


@pytest.mark.parametrize("kwargs,field", [
    ({"early_exit": "off"}, "early_exit"),
    ({"stop": 5}, "stop"),
    ({"n": True}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"early_exit": {"threshold": float("nan")}}, "early_exit.threshold"),
    ({"early_exit": {"enabled": "yes"}}, "early_exit.enabled"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias"),
    ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
])
def test_sampling_params_refusals_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as ei:
        SamplingParams(**kwargs)
    assert ei.value.param == field
    assert f"SamplingParams.{field} must be" in str(ei.value), ei.value


def test_logit_bias_keys_from_json_become_ids():
    assert SamplingParams(logit_bias={"17": -100, 3: 2.5}).logit_bias == {17: -100.0, 3: 2.5}


# ---- engine-side checks (need the model's sizes, not its weights) ---------------------------


def _fake_engine(confidence: str, vocab: int = 100, max_model_len: int = 64):
    return SimpleNamespace(args=SimpleNamespace(vocab_size=vocab), max_model_len=max_model_len,
                           config=SimpleNamespace(early_exit=EarlyExitConfig(confidence=confidence,
                                                                             threshold=0.5)))


@FUZZ
@given(st.sampled_from(sorted(RANGES)), st.floats(-3, 10, allow_nan=False))
def test_request_threshold_checked_against_the_measure(measure, threshold):
    params = SamplingParams(early_exit={"threshold": threshold}, max_tokens=4)
    low, high = RANGES[measure]
    try:
        LLMEngine.check_params(_fake_engine(measure), params, 3)
    except InvalidRequestError as e:
        assert e.param == "early_exit.threshold" and "early_exit.threshold" in str(e)
        assert not low <= threshold <= high
        return
    assert low <= threshold <= high


@pytest.mark.parametrize("kwargs,n_prompt,field", [
    ({"max_tokens": 10**9}, 3, "max_tokens"),
    ({"max_tokens": 62}, 3, "max_tokens"),
    ({"stop_token_ids": [10**12]}, 3, "stop_token_ids"),
    ({"logit_bias": {100: 1.0}}, 3, "logit_bias"),
    ({}, 64, "prompt"),
])
def test_engine_checks_name_the_field(kwargs, n_prompt, field):
    with pytest.raises(InvalidRequestError) as ei:
        LLMEngine.check_params(_fake_engine("softmax"), SamplingParams(**kwargs), n_prompt)
    assert ei.value.param == field and field in str(ei.value)
    LLMEngine.check_params(_fake_engine("softmax"), SamplingParams(max_tokens=61, stop_token_ids=[99]), 3)


# ---- EarlyExitConfig -------------------------------------------------------------------------

EE_FIELDS = {
    "exit_policy": _near(st.sampled_from(["none", "batch", "token", "tokens"])),
    "exit_layers": _near(st.lists(st.integers(-1, 40), max_size=4).map(tuple)),
    "exit_head": _near(st.sampled_from(["shared", "adapter", "mlp", "untied", "x"])),
    "confidence": _near(st.sampled_from([*RANGES, "max"])),
    "threshold": _near(st.one_of(st.floats(-2, 3), st.just(float("nan")), st.lists(st.floats(-2, 3), max_size=4))),
    "kv_fill": _near(st.sampled_from(["propagate", "recompute", "fill"])),
    "exit_heads": ANY,
    "min_exit_layer": _near(st.integers(-1, 40)),
    "vocab_prune_k": _near(st.integers(-1, 100)),
    "max_exit_batch": _near(st.integers(-1, 8)),
    "verify_exits": ANY,
    "max_draft_tokens": _near(st.integers(-1, 4)),
}


def _check_accepted_early_exit(c: EarlyExitConfig) -> None:
    assert c.exit_policy in ("none", "batch", "token")
    assert c.exit_head in ("shared", "adapter", "mlp", "untied")
    assert c.kv_fill in ("propagate", "recompute")
    assert c.confidence in RANGES
    layers = c.exit_layers
    assert isinstance(layers, tuple) and all(_int(e) and e >= 1 for e in layers)
    assert all(a < b for a, b in zip(layers, layers[1:]))
    low, high = RANGES[c.confidence]
    ts = c.threshold if isinstance(c.threshold, tuple) else (c.threshold,)
    assert all(isinstance(t, float) and math.isfinite(t) and low <= t <= high for t in ts)
    if isinstance(c.threshold, tuple):
        assert len(c.threshold) == len(layers) > 1
    assert _int(c.min_exit_layer) and c.min_exit_layer >= 1
    if c.exit_policy != "none":
        assert layers and c.min_exit_layer <= layers[-1]
    assert _int(c.vocab_prune_k) and c.vocab_prune_k >= 0
    assert c.max_exit_batch is None or (_int(c.max_exit_batch) and c.max_exit_batch >= 0)
    assert isinstance(c.verify_exits, bool) and (not c.verify_exits or c.kv_fill == "recompute")
    assert _int(c.max_draft_tokens) and c.max_draft_tokens >= 0
    assert c.exit_heads is None or isinstance(c.exit_heads, str)


@FUZZ
@given(st.fixed_dictionaries({}, optional=EE_FIELDS), st.integers(2, 40))
def test_early_exit_config_fuzz_only_value_error(kwargs, num_layers):
    try:
        c = EarlyExitConfig(**kwargs)
    except ValueError as e:
        assert str(e).split(" ", 1)[0] in EE_FIELDS, e  # the message starts with the field
        return
    _check_accepted_early_exit(c)
    try:
        c.check_model(num_layers)
    except ValueError as e:
        assert str(e).startswith(f"exit_layers must be in 1..{num_layers - 1}")
        assert any(e >= num_layers for e in c.exit_layers)
        return
    assert all(e < num_layers for e in c.exit_layers)


@pytest.mark.parametrize("kwargs,field,allowed", [
    ({"threshold": 5}, "threshold", "[0, 1]"),
    ({"threshold": -1}, "threshold", "[0, 1]"),
    ({"threshold": float("nan")}, "threshold", "[0, 1]"),
    ({"confidence": "margin", "threshold": 1.5}, "threshold", "[0, 1]"),
    ({"confidence": "classifier", "threshold": 2}, "threshold", "[0, 1]"),
    ({"confidence": "entropy", "threshold": -0.1}, "threshold", ">= 0"),
    ({"confidence": "entropy", "threshold": float("inf")}, "threshold", ">= 0"),
    ({"confidence": "saturation", "threshold": -1.5}, "threshold", "[-1, 1]"),
    ({"exit_layers": (4, 8), "threshold": (0.9, 2.0)}, "threshold", "[0, 1]"),
    ({"exit_policy": "token", "exit_layers": (4, 8), "min_exit_layer": 99}, "min_exit_layer", "<= the last exit layer"),
    ({"exit_layers": ("4",)}, "exit_layers", "layer counts"),
    ({"verify_exits": "yes"}, "verify_exits", "True or False"),
])
def test_early_exit_refusals_name_field_and_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as ei:
        EarlyExitConfig(**kwargs)
    msg = str(ei.value)
    assert msg.startswith(f"{field} must be") and allowed in msg, msg


def test_accepted_thresholds_at_the_range_ends():
    assert EarlyExitConfig(confidence="entropy", threshold=7).threshold == 7.0
    assert EarlyExitConfig(confidence="saturation", threshold=-1).threshold == -1.0
    assert EarlyExitConfig(threshold=1).threshold == 1.0


def test_min_exit_layer_outside_the_model():
    with pytest.raises(ValueError, match=r"min_exit_layer must be <= the last exit layer \(8\)"):
        EarlyExitConfig(exit_policy="token", exit_layers=(4, 8), min_exit_layer=99)
    c = EarlyExitConfig(exit_policy="token", exit_layers=(4, 8), min_exit_layer=8)
    c.check_model(30)
    with pytest.raises(ValueError, match=r"exit_layers must be in 1\.\.5 for this 6-layer model, got \[8\]"):
        c.check_model(6)


# ---- prompts and messages ------------------------------------------------------------------


def test_prompt_forms():
    assert parse_prompts("hi") == ["hi"]
    assert parse_prompts([1, 2]) == [[1, 2]]
    assert parse_prompts({"prompt": "hi"}) == ["hi"]
    assert parse_prompts([{"prompt_token_ids": [3]}, "x", [4, 5]]) == [[3], "x", [4, 5]]
    assert parse_prompts([]) == []


@pytest.mark.parametrize("prompt,where", [
    (None, "prompt must be"), (123, "prompt must be"), ([None], "prompt[0] must be"), ([True], "prompt[0] must be"),
    ({"prompt": 5}, "prompt.prompt must be"), ({"prompt_token_ids": []}, "prompt.prompt_token_ids must be"),
    ({"text": "x"}, "prompt as a dict"), ("Hi \ud800 x", "prompt must be valid Unicode"),
])
def test_bad_prompts(prompt, where):
    with pytest.raises(InvalidRequestError, match=where.replace("[", r"\[").replace("]", r"\]")) as ei:
        parse_prompts(prompt)
    assert ei.value.param == "prompt"


def test_chat_messages():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert parse_chat_messages(parts) == [{"role": "user", "content": "a\nb"}]
    for msgs, where in [
        ([{"role": "wizard", "content": "x"}], "messages[0].role must be one of"),
        ([{"role": "user", "content": None}], "messages[0].content must be"),
        ([{"role": "user"}], "messages[0] must be"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].type must be 'text'"),
        ([{"role": "user", "content": "\udc00"}], "messages[0].content must be valid Unicode"),
        ([], "messages must be"), ("hi", "messages must be"),
    ]:
        with pytest.raises(InvalidRequestError) as ei:
            parse_chat_messages(msgs)
        assert str(ei.value).startswith(where), ei.value
