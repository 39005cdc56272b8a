"""Chat messages in OpenAI's form, checked once for ``LLM.chat`` and the server alike."""

from __future__ import annotations

from collections.abc import Mapping

from eeserve.errors import InvalidRequestError
from eeserve.inputs import check_text

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _bad(where: str, allowed: str, value: object) -> InvalidRequestError:
    return InvalidRequestError(f"{where} must be {allowed}, got {value!r:.80}", param="messages")


def _content_text(content: object, where: str) -> str:
    """A message's content as text: a string, or OpenAI's list of ``{"type": "text", "text": ...}``
    parts joined with newlines."""
    if isinstance(content, str):
        return check_text(content, where)
    allowed = "a string or a list of {'type': 'text', 'text': str} parts"
    if not isinstance(content, (list, tuple)) or not content:
        raise _bad(where, allowed, content)
    parts = []
    for j, part in enumerate(content):
        w = f"{where}[{j}]"
        if not isinstance(part, Mapping):
            raise _bad(w, "a {'type': 'text', 'text': str} part", part)
        if part.get("type") != "text":
            raise _bad(f"{w}.type", "'text' (only text parts are supported)", part.get("type"))
        if not isinstance(part.get("text"), str):
            raise _bad(f"{w}.text", "a string", part.get("text"))
        parts.append(check_text(part["text"], f"{w}.text"))
    return "\n".join(parts)


def parse_chat_messages(messages: object) -> list[dict[str, str]]:
    """Check a conversation and return it as ``[{"role": str, "content": str}, ...]`` for the chat
    template.

    Args:
        messages: a non-empty list of dicts with ``role`` (one of ``CHAT_ROLES``) and ``content``
            (a string or a list of text parts); ``name`` (a string) may be given and is ignored.

    Raises:
        InvalidRequestError: naming the message and the field (``messages[1].role``).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise _bad("messages", "a non-empty list of {'role': ..., 'content': ...} dicts", messages)
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise _bad(where, "a dict with 'role' and 'content'", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise _bad(f"{where}.role", f"one of {', '.join(CHAT_ROLES)}", role)
        if "content" not in m:
            raise _bad(where, "a dict with 'role' and 'content'", m)
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise _bad(f"{where}.name", "a string", m["name"])
        out.append({"role": role, "content": _content_text(m["content"], f"{where}.content")})
    return out
