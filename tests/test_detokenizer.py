"""IncrementalDetokenizer tests with SmolLM2's real (GGUF) tokenizer."""

import pytest

from eeserve.engine.detokenizer import IncrementalDetokenizer
from eeserve.sampling_params import SamplingParams


def _encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _stream(tok, prompt_ids, output_ids, params, eos_last=False):
    """Feed output_ids one at a time; return (detokenizer, deltas, stop string or None)."""
    detok = IncrementalDetokenizer(tok, params, prompt_ids)
    deltas = []
    stop = None
    for i, t in enumerate(output_ids):
        last = i == len(output_ids) - 1
        stop = detok.update([t], stop_terminated=eos_last and last)
        finished = stop is not None or last
        deltas.append(detok.get_next_output_text(finished=finished, delta=True))
        if stop is not None:
            break
    return detok, deltas, stop


def test_english_streaming_equals_full_decode_and_keeps_leading_space(gguf_tokenizer):
    tok = gguf_tokenizer
    prompt = _encode(tok, "The capital of France is")
    out = _encode(tok, " Paris. It is known for the Eiffel Tower, café culture & art!")
    detok, deltas, stop = _stream(tok, prompt, out, SamplingParams())
    full = tok.decode(out, skip_special_tokens=True)
    assert stop is None
    assert "".join(deltas) == full == detok.output_text
    assert full.startswith(" Paris")
    assert detok.output_text.startswith(" Paris")


def test_chat_prompt_with_special_tokens(gguf_tokenizer):
    tok = gguf_tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    out = _encode(tok, "Hello! How can I help?") + [tok.eos_token_id]
    detok, deltas, _ = _stream(tok, list(prompt), out, SamplingParams(), eos_last=True)
    assert "".join(deltas) == detok.output_text == "Hello! How can I help?"
    assert tok.decode(out, skip_special_tokens=True) == detok.output_text


@pytest.mark.parametrize("text", ["🙂👍🏽", "你好，世界", "Olá 🙂 — 你好，世界 👍🏽!"])
def test_multibyte_never_broken(gguf_tokenizer, text):
    tok = gguf_tokenizer
    out = _encode(tok, text)
    # the characters really are split over several byte-level tokens
    assert any("\ufffd" in tok.decode([t]) for t in out)
    assert len(out) > len(text.replace(" ", "")) // 2
    detok, deltas, _ = _stream(tok, _encode(tok, "Say:"), out, SamplingParams())
    for d in deltas:
        assert "\ufffd" not in d
    assert "".join(deltas) == text == tok.decode(out, skip_special_tokens=True)
    assert detok.output_text == text


def test_eos_text_not_appended(gguf_tokenizer):
    tok = gguf_tokenizer
    out = _encode(tok, "Done.") + [tok.eos_token_id]
    for skip in (True, False):
        detok, _, _ = _stream(
            tok, [], out, SamplingParams(skip_special_tokens=skip), eos_last=True
        )
        assert detok.output_text == "Done."


def _stop_spanning_two_tokens(tok):
    out = _encode(tok, "Hello world, how are you today?")
    texts = [tok.decode([t]) for t in out]
    assert texts[:2] == ["Hello", " world"]
    stop = "lo wor"
    assert all(stop not in t for t in texts)  # no single token holds it
    return out, stop


def test_stop_string_spanning_tokens_excluded(gguf_tokenizer):
    tok = gguf_tokenizer
    out, stop = _stop_spanning_two_tokens(tok)
    detok, deltas, found = _stream(tok, [], out, SamplingParams(stop=[stop]))
    assert found == stop
    assert len(deltas) == 2  # stopped at the token completing the stop string
    assert detok.output_text == "Hel"
    assert "".join(deltas) == "Hel"


def test_stop_string_spanning_tokens_included(gguf_tokenizer):
    tok = gguf_tokenizer
    out, stop = _stop_spanning_two_tokens(tok)
    detok, deltas, found = _stream(
        tok, [], out, SamplingParams(stop=[stop], include_stop_str_in_output=True)
    )
    assert found == stop
    assert detok.output_text == "Hello wor"  # "ld" after the stop string is dropped
    assert "".join(deltas) == "Hello wor"


def test_earliest_stop_string_wins_within_one_update(gguf_tokenizer):
    tok = gguf_tokenizer
    out = _encode(tok, "one two three four")
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["four", "two"]), [])
    assert detok.update(out, stop_terminated=False) == "two"
    assert detok.output_text == "one "


def test_stop_strings_wait_for_min_tokens(gguf_tokenizer):
    tok = gguf_tokenizer
    out = _encode(tok, "Hello world again")
    assert len(out) == 3
    detok, _, found = _stream(tok, [], out, SamplingParams(stop=["Hello"], min_tokens=3))
    assert found is None  # vLLM checks stop strings only after min_tokens tokens
    detok, _, found = _stream(tok, [], out, SamplingParams(stop=[" again"], min_tokens=2))
    assert found == " again" and detok.output_text == "Hello world"


def test_partial_stop_string_held_back(gguf_tokenizer):
    tok = gguf_tokenizer
    stop = "<END>"
    text = "a <EN b <END> c"
    out = _encode(tok, text)
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=[stop]), [])
    emitted = ""
    found = None
    for i, t in enumerate(out):
        found = detok.update([t], stop_terminated=False)
        finished = found is not None or i == len(out) - 1
        full_so_far = detok.get_next_output_text(finished=finished, delta=False)
        emitted += detok.get_next_output_text(finished=finished, delta=True)
        assert emitted == full_so_far
        if not finished:
            # never more than len(text) - (len(stop) - 1) chars out
            assert emitted == detok.output_text[: max(0, len(detok.output_text) - 4)]
            text_now = detok.output_text
            for k in range(1, len(stop)):
                if text_now.endswith(stop[:k]):  # a partial stop string is never emitted
                    assert len(emitted) <= len(text_now) - k
        if found:
            break
    assert found == stop
    assert emitted == detok.output_text == "a <EN b "


def test_held_back_text_released_when_finished(gguf_tokenizer):
    tok = gguf_tokenizer
    out = _encode(tok, "ends with <EN")
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["<END>"]), [])
    emitted = ""
    for t in out:
        assert detok.update([t], stop_terminated=False) is None
        emitted += detok.get_next_output_text(finished=False, delta=True)
    assert emitted == "ends with <EN"[:-4]
    emitted += detok.get_next_output_text(finished=True, delta=True)
    assert emitted == "ends with <EN"
    assert detok.get_next_output_text(finished=True, delta=True) == ""
