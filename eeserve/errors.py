"""The error a refused request raises, shared by the Python API and the HTTP server."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request that cannot be served as given: bad sampling parameters, a bad prompt, a prompt or
    ``max_tokens`` past the context. A ``ValueError``, so callers of the Python API catch it as one;
    the server answers it with HTTP 400 and OpenAI's error object.

    Attributes:
        param: the field at fault in the request's terms (``max_tokens``, ``early_exit.threshold``,
            ``prompt``), or None.
        code: a machine-readable reason (``context_length_exceeded``), or None.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
