"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over an ``AsyncLLMEngine``.

Routes: POST /v1/completions, POST /v1/chat/completions (JSON or SSE streams), GET /v1/models,
GET /health, GET /metrics (Prometheus), POST /tokenize, POST /detokenize. Errors use OpenAI's
error object ``{"error": {"message", "type", "param", "code"}}``: every bad input is a 4xx (a body
that is not JSON, nests too deeply or holds text that is not valid Unicode included), and an
unexpected failure is a 500 that leaves the keep-alive connection usable. Request bodies are read
as JSON whatever their Content-Type. A client that disconnects from a stream cancels the response
generator, which aborts its requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from eeserve.config import EngineConfig
from eeserve.engine.async_engine import AsyncLLMEngine
from eeserve.entrypoints.chat_utils import parse_chat_messages
from eeserve.entrypoints.openai import protocol as P
from eeserve.entrypoints.openai.metrics import CONTENT_TYPE, RequestTracker, ServerMetrics
from eeserve.outputs import CompletionOutput, RequestOutput
from eeserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_JSON_DEPTH = 32  # nesting levels a request body may have (the deepest valid body has 6)


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        msg = _printable(self.message)
        param = None if self.param is None else _printable(self.param)
        return P.ErrorResponse(error=P.ErrorInfo(message=msg, type=self.type, param=param, code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _printable(text: str) -> str:
    """``text`` with characters that cannot be UTF-8 encoded (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _from_value_error(e: ValueError, prompt_param: str = "prompt") -> APIError:
    """A 400 for a refused request; ``prompt_param`` is the field that held the prompt."""
    param = getattr(e, "param", None)
    if param == "prompt":
        param = prompt_param
    return APIError(400, str(e), param=param, code=getattr(e, "code", None))


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _field_path(loc: tuple) -> str:
    """A pydantic error location as the request's field path (``stop``, ``messages.0``), without
    the union-member tags pydantic adds (``stop.list[str]``)."""
    parts = []
    for x in loc:
        if x == "body":
            continue
        if isinstance(x, str) and ("[" in x or "-" in x or x in _UNION_TAGS):
            break
        parts.append(str(x))
    return ".".join(parts)


def _validation_error(errors: list[dict]) -> APIError:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    param = _field_path(first.get("loc", ())) or None
    seen: dict[str, list[str]] = {}  # a union's members fail at one path: "a valid string, or ..."
    for e in errors:
        msgs_at = seen.setdefault(_field_path(e.get("loc", ())) or "body", [])
        if e.get("msg", "") not in msgs_at:
            msgs_at.append(e.get("msg", ""))
    msgs = "; ".join(f"{where}: {', or '.join(m)}" for where, m in list(seen.items())[:5])
    return APIError(400, msgs or "invalid request", param=param)


# ---- output conversion ----------------------------------------------------------------------


def _completion_logprobs(c: CompletionOutput, start: int, text_offset: int, n_top: int) -> P.CompletionLogprobs:
    out = P.CompletionLogprobs()
    for tid, lp in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        chosen = lp[tid]
        tok = chosen.decoded_token or ""
        out.tokens.append(tok)
        out.token_logprobs.append(chosen.logprob)
        out.text_offset.append(text_offset)
        text_offset += len(tok)
        top = sorted((v for v in lp.values() if v.rank <= n_top), key=lambda v: v.rank)
        out.top_logprobs.append({(v.decoded_token or ""): v.logprob for v in top})
    return out


def _chat_logprobs(c: CompletionOutput, start: int, n_top: int) -> P.ChatLogprobs:
    content = []
    for tid, lp in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        chosen = lp[tid]
        tok = chosen.decoded_token or ""
        top = sorted((v for v in lp.values() if v.rank <= n_top), key=lambda v: v.rank)
        content.append(P.ChatTokenLogprob(
            token=tok, logprob=chosen.logprob, bytes=list(tok.encode()),
            top_logprobs=[P.ChatTopLogprob(token=v.decoded_token or "", logprob=v.logprob,
                                           bytes=list((v.decoded_token or "").encode())) for v in top],
        ))
    return P.ChatLogprobs(content=content)


def _usage(prompt_lens: list[int], outs: list[RequestOutput | None]) -> P.UsageInfo:
    completion = sum(len(c.token_ids) for o in outs if o is not None for c in o.outputs)
    prompt = sum(prompt_lens)
    return P.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' output streams as (stream index, output)."""
    if len(streams) == 1:
        async for o in streams[0]:
            yield 0, o
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for o in s:
                q.put_nowait((i, o))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            q.put_nowait((i, e))
            return
        q.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse_events(engine: AsyncLLMEngine, rids: list[str], streams: list[AsyncIterator[RequestOutput]],
                      trackers: list[RequestTracker], prompt_lens: list[int], include_usage: bool,
                      make_choice: Callable[[int, CompletionOutput, int, int], Any],
                      make_chunk: Callable[[list, P.UsageInfo | None], Any], first: Any = None) -> AsyncIterator[str]:
    """The server-sent events of one streamed request (completions or chat).

    Args:
        make_choice: (prompt index, output, chars already sent, tokens already sent) -> a choice
            holding only what is new.
        make_chunk: (choices, usage or None) -> the response chunk model.
        first: a chunk sent before any output (chat's role chunk).

    Every chunk is ``data: <json>``; the stream ends with a usage chunk (when asked) and
    ``data: [DONE]``. Engine errors become an OpenAI error object. The requests are aborted when
    the stream ends for any reason (a client that disconnects included), so their blocks are freed.
    """
    excl = None if include_usage else {"usage"}
    deltas = _Deltas()
    finals: list[RequestOutput | None] = [None] * len(streams)
    try:
        if first is not None:
            yield _sse(first.model_dump(exclude=excl))
        async for i, out in _merge(streams):
            trackers[i].observe(out)
            finals[i] = out
            choices = []
            for c in out.outputs:
                step = deltas.advance((i, c.index), c)
                if step is not None:
                    choices.append(make_choice(i, c, *step))
            if choices:
                yield _sse(make_chunk(choices, None).model_dump(exclude=excl))
        if include_usage:
            yield _sse(make_chunk([], _usage(prompt_lens, finals)).model_dump())
        yield _sse("[DONE]")
    except Exception as e:  # noqa: BLE001 - the stream has started: the error goes in it
        logger.exception("error in a stream")
        yield _sse(APIError(500, str(e), type="server_error").body())
        yield _sse("[DONE]")
    finally:
        for rid in rids:
            engine.abort_nowait(rid)


# ---- the app --------------------------------------------------------------------------------


class _Server:
    """The request handlers, sharing the engine, the model name and the metrics."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def params(self, req: P.CompletionRequest | P.ChatCompletionRequest) -> SamplingParams:
        """Check what the request asks for and build its ``SamplingParams`` (the checks the Python
        API runs); the engine checks the rest when the request is added.

        Raises:
            APIError: 400 naming the field.
        """
        msg = req.check_stream_options()
        if msg is not None:
            raise APIError(400, msg, param="stream_options")
        try:
            req.check_supported()
            return req.to_sampling_params()
        except P.UnsupportedFieldError as e:
            raise APIError(400, str(e), param=e.param, code="unsupported")
        except ValueError as e:
            err = _from_value_error(e)
            if str(e).startswith("top_logprobs"):
                err.param = "top_logprobs"
            raise err

    async def tokenize_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        try:
            return await self.engine.call(lambda engine: engine.tokenize(prompt, add_special_tokens)[1])
        except ValueError as e:
            raise _from_value_error(e)

    async def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        try:
            msgs = parse_chat_messages(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages")

        def run(engine) -> list[int]:
            text = engine.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
            return engine.tokenizer.encode(text, add_special_tokens=False)

        try:
            ids = await self.engine.call(run)
        except Exception as e:  # noqa: BLE001 - template errors are the client's input
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages")
        if not ids:
            raise APIError(400, "messages render to an empty prompt", param="messages")
        return ids

    async def start(self, prompts: list[list[int]], params: SamplingParams, base_id: str,
                    prompt_param: str = "prompt") -> tuple[list[str], list[AsyncIterator[RequestOutput]]]:
        """Add every prompt; an engine refusal (``LLMEngine.check_params``: the context length,
        token ids, the early-exit threshold) aborts the ones already added and becomes a 400."""
        ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        streams = []
        try:
            for rid, p in zip(ids, prompts):
                streams.append(await self.engine.add_request(rid, p, params))
        except BaseException as e:
            for rid in ids:
                self.engine.abort_nowait(rid)
            if isinstance(e, ValueError):
                raise _from_value_error(e, prompt_param)
            raise
        return ids, streams

    async def run_all(self, streams, trackers: list[RequestTracker], request: Request) -> list[RequestOutput | None]:
        """Collect the final outputs; a client that goes away cancels the collection (and so aborts)."""
        finals: list[RequestOutput | None] = [None] * len(streams)

        async def collect() -> None:
            async for i, out in _merge(streams):
                trackers[i].observe(out)
                finals[i] = out

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    raise APIError(499, "client disconnected")
            task.result()
        finally:
            task.cancel()
        return finals


class _APIKeyMiddleware:
    """Pure ASGI check of ``Authorization: Bearer <key>`` on /v1 routes (leaves disconnects visible)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(token, self.api_key):
                err = APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _InternalErrorMiddleware:
    """Answers an unexpected exception with a 500 error object and keeps the connection open.

    Starlette's own last-resort handler answers and then re-raises, and uvicorn closes the
    keep-alive connection on an exception after a response started, so the client's next request
    on it fails with a read error. Here the exception ends with the answer.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:  # noqa: BLE001 - the last resort: logged, answered with a 500
            logger.exception("unhandled error")
            if started:
                raise
            await APIError(500, f"internal error: {exc!r}", type="server_error").response()(scope, receive, send)


class _Deltas:
    """What each streamed choice added since its last chunk (one owner for the stream's progress)."""

    def __init__(self) -> None:
        self._chars: dict[tuple[int, int], int] = {}  # (prompt index, choice index) -> text chars sent
        self._tokens: dict[tuple[int, int], int] = {}  # -> tokens sent
        self._done: set[tuple[int, int]] = set()

    def advance(self, key: tuple[int, int], c) -> tuple[int, int] | None:
        """Record that ``c`` (a CompletionOutput) is being sent.

        Returns:
            (chars already sent, tokens already sent), or None when the choice has nothing new
            (no new token and not finished, or already finished).
        """
        if key in self._done:
            return None
        old_chars, old_n = self._chars.get(key, 0), self._tokens.get(key, 0)
        if len(c.token_ids) == old_n and c.finish_reason is None:
            return None
        self._chars[key], self._tokens[key] = len(c.text), len(c.token_ids)
        if c.finish_reason is not None:
            self._done.add(key)
        return old_chars, old_n


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None) -> FastAPI:
    """Build the FastAPI app. The engine thread starts with the app's lifespan.

    Args:
        engine: the async engine (not yet started).
        served_model_name: the model id clients must send.
        api_key: when set, /v1 routes need ``Authorization: Bearer <api_key>``.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="eeserve", lifespan=lifespan)
    metrics = ServerMetrics(served_model_name, lambda: engine.snapshot, engine.engine.args.num_layers)
    srv = _Server(engine, served_model_name, metrics)
    app.state.server = srv

    app.add_middleware(_InternalErrorMiddleware)
    if api_key is not None:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    app.openapi = lambda: _openapi(app, _BODIES)  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return APIError(503, "the engine is not running", type="server_error").response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.export(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        card = P.ModelCard(id=served_model_name, root=engine.engine.config.model.model, max_model_len=engine.max_model_len)
        return P.ModelList(data=[card]).model_dump()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json_body(request)
        if isinstance(body, dict) and "messages" in body:
            req = _parse(P.TokenizeChatRequest, body)
            srv.check_model(req.model)
            ids = await srv.render_chat(req.messages, req.add_generation_prompt)
        else:
            req = _parse(P.TokenizeCompletionRequest, body)
            srv.check_model(req.model)
            ids = await srv.tokenize_prompt(req.prompt, req.add_special_tokens)
        return P.TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = _parse(P.DetokenizeRequest, await _json_body(request))
        srv.check_model(req.model)
        vocab = engine.engine.args.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        text = await engine.call(lambda e: e.tokenizer.decode(req.tokens))
        return P.DetokenizeResponse(prompt=text).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(P.CompletionRequest, await _json_body(request))
        srv.check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported")
        params = srv.params(req)
        try:
            prompts_in = req.prompts()
        except ValueError as e:
            raise APIError(400, str(e), param="prompt")
        prompts = [await srv.tokenize_prompt(p) for p in prompts_in]
        resp_id = P.random_id("cmpl")
        rids, streams = await srv.start(prompts, params, resp_id)
        trackers = [metrics.tracker() for _ in streams]
        n_top = params.logprobs or 0
        lens = [len(p) for p in prompts]
        if not req.stream:
            try:
                finals = await srv.run_all(streams, trackers, request)
            finally:
                for rid in rids:
                    engine.abort_nowait(rid)
            choices = []
            for i, out in enumerate(finals):
                for c in out.outputs:
                    choices.append(P.CompletionChoice(
                        index=i * params.n + c.index, text=c.text, finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason, exit_layers=c.exit_layers,
                        logprobs=_completion_logprobs(c, 0, 0, n_top) if params.logprobs is not None else None,
                    ))
            return P.CompletionResponse(id=resp_id, model=served_model_name, choices=choices,
                                        usage=_usage(lens, finals)).model_dump()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())

        def choice(i: int, c: CompletionOutput, old_chars: int, old_n: int) -> P.CompletionChoice:
            return P.CompletionChoice(
                index=i * params.n + c.index, text=c.text[old_chars:], finish_reason=c.finish_reason,
                stop_reason=c.stop_reason, exit_layers=c.exit_layers[old_n:],
                logprobs=_completion_logprobs(c, old_n, old_chars, n_top) if params.logprobs is not None else None,
            )

        def chunk(choices: list, usage: P.UsageInfo | None) -> P.CompletionResponse:
            return P.CompletionResponse(id=resp_id, created=created, model=served_model_name, choices=choices,
                                        usage=usage)

        events = _sse_events(engine, rids, streams, trackers, lens, include_usage, choice, chunk)
        return StreamingResponse(events, media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse(P.ChatCompletionRequest, await _json_body(request))
        srv.check_model(req.model)
        params = srv.params(req)
        ids = await srv.render_chat(req.messages, req.add_generation_prompt)
        resp_id = P.random_id("chatcmpl")
        rids, streams = await srv.start([ids], params, resp_id, prompt_param="messages")
        trackers = [metrics.tracker()]
        n_top = params.logprobs or 0
        if not req.stream:
            try:
                finals = await srv.run_all(streams, trackers, request)
            finally:
                for rid in rids:
                    engine.abort_nowait(rid)
            out = finals[0]
            choices = [
                P.ChatCompletionChoice(
                    index=c.index, message=P.ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason, exit_layers=c.exit_layers,
                    logprobs=_chat_logprobs(c, 0, n_top) if params.logprobs is not None else None,
                )
                for c in out.outputs
            ]
            return P.ChatCompletionResponse(id=resp_id, model=served_model_name, choices=choices,
                                            usage=_usage([len(ids)], finals)).model_dump()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())

        first = P.ChatCompletionChunk(
            id=resp_id, created=created, model=served_model_name,
            choices=[P.ChatStreamChoice(index=j, delta=P.DeltaMessage(role="assistant", content=""))
                     for j in range(params.n)],
        )

        def choice(i: int, c: CompletionOutput, old_chars: int, old_n: int) -> P.ChatStreamChoice:
            return P.ChatStreamChoice(
                index=c.index, delta=P.DeltaMessage(content=c.text[old_chars:]), finish_reason=c.finish_reason,
                stop_reason=c.stop_reason, exit_layers=c.exit_layers[old_n:],
                logprobs=_chat_logprobs(c, old_n, n_top) if params.logprobs is not None else None,
            )

        def chunk(choices: list, usage: P.UsageInfo | None) -> P.ChatCompletionChunk:
            return P.ChatCompletionChunk(id=resp_id, created=created, model=served_model_name, choices=choices,
                                         usage=usage)

        events = _sse_events(engine, rids, streams, trackers, [len(ids)], include_usage, choice, chunk, first)
        return StreamingResponse(events, media_type="text/event-stream")

    return app


# Each POST route's body model(s), for the OpenAPI schema (the routes parse bodies themselves).
_BODIES: dict[str, tuple[type[BaseModel], ...]] = {
    "/v1/completions": (P.CompletionRequest,),
    "/v1/chat/completions": (P.ChatCompletionRequest,),
    "/tokenize": (P.TokenizeCompletionRequest, P.TokenizeChatRequest),
    "/detokenize": (P.DetokenizeRequest,),
}


def _openapi(app: FastAPI, bodies: dict[str, tuple[type[BaseModel], ...]]) -> dict:
    """The app's OpenAPI schema with the request bodies of the POST routes filled in."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        models = sorted({m for ms in bodies.values() for m in ms}, key=lambda m: m.__name__)
        _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        for path, ms in bodies.items():
            refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in ms]
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}},
            }
        app.openapi_schema = schema
    return app.openapi_schema


def _check_json(body: Any) -> None:
    """Refuse a body nesting deeper than ``MAX_JSON_DEPTH`` or holding a string (a key included)
    that is not valid Unicode (a lone surrogate from a ``\\ud800`` escape): no tokenizer or
    JSON encoder can take one. Walks iteratively, so depth costs no recursion.

    Raises:
        APIError: 400 naming the place.
    """
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                where = path or "body"
                raise APIError(400, f"{where} must be valid Unicode text: it holds a lone surrogate "
                               f"{v[e.start]!r} at character {e.start}", param=path or None)
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels (at {path or 'body'})",
                               param=path or None)
            if isinstance(v, dict):
                for k, x in v.items():
                    stack.append((k, depth, path))  # keys are strings too
                    key = _printable(k)
                    stack.append((x, depth + 1, f"{path}.{key}" if path else key))
            else:
                stack.extend((x, depth + 1, f"{path}[{i}]") for i, x in enumerate(v))


async def _json_body(request: Request) -> Any:
    """The request body parsed as JSON, whatever its Content-Type (a client that forgot the
    header still gets its request served), then ``_check_json``'d.

    Raises:
        APIError: 400 for a body that is not UTF-8 JSON, nests too deeply or holds invalid text.
    """
    raw = await request.body()
    ctype = request.headers.get("content-type")
    hint = "" if ctype is None or "json" in ctype else f" (sent with Content-Type {ctype!r}; send application/json)"
    if not raw.strip():
        raise APIError(400, f"request body is empty: send a JSON object{hint}")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}{hint}")
    _check_json(body)
    return body


def _parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a parsed body against a request model (strict JSON types).

    Raises:
        APIError: 400 naming the first fields at fault.
    """
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(list(e.errors()))


def default_model_name(config: EngineConfig) -> str:
    """The name clients use when --served-model-name is not given: the alias or the file/folder name."""
    m = config.model.model.rstrip("/")
    return os.path.basename(m) if os.sep in m else m


def run_server(
    config: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
    api_key: str | None = None, served_model_name: str | None = None, sock: socket.socket | None = None,
) -> None:
    """Load the model, then serve until interrupted; prints the address once the server listens.

    Args:
        sock: a socket already bound to (host, port), as the CLI binds it before the model loads;
            None lets uvicorn bind.
    """
    import uvicorn

    from eeserve.engine.llm_engine import LLMEngine

    name = served_model_name or default_model_name(config)
    engine = AsyncLLMEngine(LLMEngine(config))
    app = build_app(engine, name, api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))

    async def serve() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock] if sock is not None else None))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(f"eeserve: serving {name!r} at http://{host}:{port} (OpenAI API under /v1)", flush=True)
        await task

    asyncio.run(serve())
