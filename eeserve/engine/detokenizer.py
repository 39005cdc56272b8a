"""Incremental detokenization and stop-string handling for one request (vLLM v1's semantics).

Text is produced with ``tokenizers.decoders.DecodeStream`` on the fast tokenizer's backend: it
decodes one token at a time and never emits a partial UTF-8 character (it returns None until the
bytes of a character are complete). The stream is seeded with a few prompt tokens so that a
decoder that strips a leading space at the start of a text (SentencePiece style) keeps the
space of the first generated word.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from eeserve.sampling_params import SamplingParams

# Seed the stream with the shortest prompt suffix of at least this many tokens that decodes
# cleanly (no U+FFFD), looking back at most _MAX_SEED_TOKENS tokens.
_MIN_SEED_TOKENS = 4
_MAX_SEED_TOKENS = 24


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or itself)."""
    for name in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, name, None)
        if backend is not None:
            return backend
    return tokenizer


class IncrementalDetokenizer:
    """Turns one request's output tokens into text as they arrive and checks stop strings.

    Attributes:
        output_text: the text decoded so far (truncated at a stop string once one is found).
    """

    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int]):
        self.tokenizer = _backend(tokenizer)
        self.params = params
        self.stop = list(params.stop)
        self.include_stop_str_in_output = params.include_stop_str_in_output
        # A partial stop string may be cut later, so hold back that many chars while streaming.
        self.stop_buffer_length = (
            max(len(s) for s in self.stop) - 1
            if self.stop and not self.include_stop_str_in_output
            else 0
        )
        self.token_ids: list[int] = []  # output ids fed so far (including a skipped stop id)
        self._text = ""
        self._last_output_text_offset = 0  # chars already returned by delta streaming
        self._stopped = False
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        for token_id in self._seed_ids(prompt_token_ids):
            self._stream.step(self.tokenizer, token_id)  # text of the prompt is discarded

    def _seed_ids(self, prompt_token_ids: list[int]) -> list[int]:
        """A short prompt suffix that decodes without broken characters, or [] if none."""
        n = len(prompt_token_ids)
        if n == 0:
            return []
        skip = self.params.skip_special_tokens
        for i in range(min(_MIN_SEED_TOKENS, n), min(n, _MAX_SEED_TOKENS) + 1):
            suffix = prompt_token_ids[-i:]
            if "\ufffd" not in self.tokenizer.decode(suffix, skip_special_tokens=skip):
                return list(suffix)
        return []

    @property
    def output_text(self) -> str:
        return self._text

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Append tokens; return the stop string if the text now contains one.

        When a stop string is found the text is truncated: the stop string itself is dropped
        unless ``include_stop_str_in_output``; text after it is always dropped. Stop strings are
        only checked once more than ``min_tokens`` tokens were generated (vLLM).

        Args:
            new_token_ids: the tokens generated this step (usually one).
            stop_terminated: True when the last of them is an EOS or stop token id; its text is
                then not appended unless ``include_stop_str_in_output`` (and, for special
                tokens, ``skip_special_tokens`` is False).

        Returns:
            The stop string that matched, or None.
        """
        if not new_token_ids or self._stopped:
            return None
        self.token_ids.extend(new_token_ids)
        if stop_terminated and not self.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        offset_before = len(self._text)
        for token_id in new_token_ids:
            chunk = self._stream.step(self.tokenizer, token_id)
            if chunk:
                self._text += chunk
        if not self.stop or len(self.token_ids) <= self.params.min_tokens:
            return None
        return self._check_stop_strings(offset_before)

    def _check_stop_strings(self, new_char_offset: int) -> str | None:
        """Find the earliest stop string that ends in the new text; truncate there."""
        best: tuple[int, str] | None = None  # (start index, stop string)
        for stop in self.stop:
            # A match must end past new_char_offset, else an earlier update had found it.
            start_search = max(0, new_char_offset - len(stop) + 1)
            idx = self._text.find(stop, start_search)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        end = idx + len(stop) if self.include_stop_str_in_output else idx
        self._text = self._text[:end]
        self._stopped = True
        return stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to stream.

        While not finished, the last ``stop_buffer_length`` chars (longest stop string - 1) are
        held back so that a partial stop string is never emitted.

        Args:
            finished: True when the request has finished (nothing is held back).
            delta: True returns only the text not returned by an earlier delta call; False
                returns all the text so far.
        """
        buffer_length = 0 if finished else self.stop_buffer_length
        length = max(0, len(self._text) - buffer_length)
        if not delta:
            return self._text[:length] if buffer_length else self._text
        last = self._last_output_text_offset
        if last < length:
            self._last_output_text_offset = length
            return self._text[last:length]
        return ""
