"""Request and response bodies of the OpenAI-compatible API (OpenAI's field names, vLLM's extras).

Requests forbid unknown fields, so a typo is a 400 rather than a silently ignored setting, and
types are strict (``"max_tokens": true`` or ``"stream": "yes"`` is a 400, as at OpenAI). The models
check only the JSON types: value ranges are checked by ``SamplingParams`` and the engine, and
prompts and messages by ``eeserve.inputs`` / ``chat_utils``, the same code the Python API runs, so
the two never disagree. Each choice carries ``exit_layers``: per generated token, the number of
layers it ran.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from eeserve.entrypoints.chat_utils import CHAT_ROLES
from eeserve.inputs import parse_prompts
from eeserve.sampling_params import EarlyExitOverride, SamplingParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class UnsupportedFieldError(ValueError):
    """An OpenAI field this server cannot honour; ``param`` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


# ---- errors ---------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- request parts --------------------------------------------------------------------------


class EarlyExitRequest(_Strict):
    """Per-request early exit: ``enabled: false`` runs every layer; ``threshold`` overrides the engine's."""

    enabled: bool = True
    threshold: float | None = None


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: only ``{"type": "text"}`` (plain text) can be honoured here."""

    type: str
    json_schema: dict[str, Any] | None = None


class _SamplingRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored (OpenAI: an end-user id for abuse monitoring)
    response_format: ResponseFormat | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    early_exit: EarlyExitRequest | None = None

    def check_stream_options(self) -> str | None:
        """An error message when stream_options is set without stream, else None."""
        if self.stream_options is not None and not self.stream:
            return "stream_options can only be set when stream is true"
        return None

    def check_supported(self) -> None:
        """Refuse what cannot be honoured (JSON output).

        Raises:
            UnsupportedFieldError: naming the field.
        """
        rf = self.response_format
        if rf is not None and rf.type != "text":
            raise UnsupportedFieldError(
                f"response_format type {rf.type!r} is not supported: this server cannot constrain the output "
                "to JSON; only {'type': 'text'} is accepted", "response_format")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Build ``SamplingParams``; raises ValueError (InvalidRequestError) naming the field."""
        ee = None
        if self.early_exit is not None:
            ee = EarlyExitOverride(enabled=self.early_exit.enabled, threshold=self.early_exit.threshold)
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self.logit_bias,
            early_exit=ee,
        )


# ---- completions ----------------------------------------------------------------------------


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request (OpenAI allows one or a batch, as text or token ids).

        Raises:
            InvalidRequestError: an empty batch, an empty id list, or text that is not valid Unicode.
        """
        prompts = parse_prompts(self.prompt)
        if not prompts:
            raise ValueError("prompt must not be empty")
        return prompts


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    exit_layers: list[int] = Field(default_factory=list)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- chat -----------------------------------------------------------------------------------


# The shape of a chat message, for the OpenAPI schema only: messages are checked by
# ``chat_utils.parse_chat_messages``, as in ``LLM.chat``.
_MESSAGE_SCHEMA = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": list(CHAT_ROLES)},
        "content": {"anyOf": [
            {"type": "string"},
            {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}},
        ]},
        "name": {"type": "string"},
    },
}


def _messages_field() -> Any:
    return Field(json_schema_extra={"items": _MESSAGE_SCHEMA, "minItems": 1})


class ChatCompletionRequest(_SamplingRequest):
    messages: list[dict[str, Any]] = _messages_field()
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    # OpenAI's tool calling cannot be honoured here: refused unless empty / "none"
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted and ignored (no tools are called)
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise UnsupportedFieldError(f"{name} are not supported: this server cannot call tools", name)
        for name in ("tool_choice", "function_call"):
            v = getattr(self, name)
            if v is not None and v != "none":
                raise UnsupportedFieldError(
                    f"{name} {v!r} is not supported: this server cannot call tools (only 'none' is accepted)", name)

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    exit_layers: list[int] = Field(default_factory=list)


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    exit_layers: list[int] = Field(default_factory=list)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---- models, tokenizer ----------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "eeserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[dict[str, Any]] = _messages_field()
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
