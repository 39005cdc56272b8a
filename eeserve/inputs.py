"""Prompt forms accepted by ``LLM.generate``, the CLI's prompts file and the server (vLLM's forms).

A prompt is a string, a list of token ids, ``{"prompt": str}`` or ``{"prompt_token_ids": [ids]}``
(vLLM's ``TextPrompt`` / ``TokensPrompt``). The engine's ``tokenize`` checks what needs the model
(ids against the vocabulary, an empty result).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from eeserve.config import is_int
from eeserve.errors import InvalidRequestError

PromptType = Union[str, list[int], Mapping]
_DICT_KEYS = ("prompt", "prompt_token_ids")


def check_text(text: str, where: str) -> str:
    """Refuse a string that is not valid Unicode text (a lone surrogate such as ``\\ud800``, which
    JSON's ``\\u`` escapes and Python strings can hold but no tokenizer can encode).

    Raises:
        InvalidRequestError: naming ``where`` and the position of the first bad character.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{where} must be valid Unicode text: it holds a lone surrogate {text[e.start]!r} at character {e.start}",
            param=where.split("[", 1)[0] if where.startswith("prompt") else where,
        ) from None
    return text


def _is_ids(p: object) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(is_int(t) for t in p)


def parse_prompt(p: object, where: str = "prompt") -> str | list[int]:
    """One prompt as a string or a list of token ids.

    Raises:
        InvalidRequestError: any other form, naming ``where``.
    """
    if isinstance(p, str):
        return check_text(p, where)
    if _is_ids(p):
        return [int(t) for t in p]  # type: ignore[union-attr]
    if isinstance(p, Mapping):
        keys = [k for k in _DICT_KEYS if k in p]
        extra = [k for k in p if k not in _DICT_KEYS]
        if len(keys) != 1 or extra:
            raise InvalidRequestError(
                f"{where} as a dict must have exactly one of the keys 'prompt' (a string) or 'prompt_token_ids' "
                f"(a list of token ids), got keys {list(p)}", param="prompt")
        v = p[keys[0]]
        if keys[0] == "prompt" and isinstance(v, str):
            return check_text(v, f"{where}.prompt")
        if keys[0] == "prompt_token_ids" and _is_ids(v):
            return [int(t) for t in v]
        raise InvalidRequestError(
            f"{where}.{keys[0]} must be {'a string' if keys[0] == 'prompt' else 'a non-empty list of token ids'}, "
            f"got {v!r:.80}", param="prompt")
    raise InvalidRequestError(
        f"{where} must be a string, a non-empty list of token ids, {{'prompt': str}} or "
        f"{{'prompt_token_ids': [ids]}}, got {type(p).__name__} {p!r:.80}", param="prompt")


def parse_prompts(prompts: object) -> list[str | list[int]]:
    """One prompt or a list of prompts (any of the forms above) as a list of strings / id lists.

    A list of ints is one prompt of token ids; an empty list is no prompt.

    Raises:
        InvalidRequestError: a prompt of another form, naming its index.
    """
    if isinstance(prompts, (str, Mapping)) or _is_ids(prompts):
        return [parse_prompt(prompts)]
    if not isinstance(prompts, (list, tuple)):
        return [parse_prompt(prompts)]  # raises, naming the type
    return [parse_prompt(p, f"prompt[{i}]") for i, p in enumerate(prompts)]
