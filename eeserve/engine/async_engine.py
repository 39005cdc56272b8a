"""Asynchronous front of ``LLMEngine`` for the server: one background thread runs the engine.

``LLMEngine`` is not thread-safe, so every call into it (add, abort, step, and tokenizer work)
happens on one thread that reads a command queue. Outputs go back to each request's
``asyncio.Queue`` on the event loop with ``loop.call_soon_threadsafe``. When no request is
unfinished, the thread blocks on the command queue instead of spinning.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from eeserve.engine.llm_engine import LLMEngine, PromptType
from eeserve.outputs import RequestOutput
from eeserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine state copied on the engine thread after each step, for metrics.

    Attributes:
        num_running, num_waiting: requests in the scheduler's queues.
        kv_cache_usage: used KV blocks / all blocks, in [0, 1].
        num_prompt_tokens, num_generation_tokens, num_preemptions: counters since start.
        exits: exit layer -> decode tokens that exited there (the last layer = full depth).
        decode_flops, decode_full_flops: FLOPs spent on decode tokens / at full depth.
        num_layers: decoder layers of the model.
        num_drafts_accepted, num_drafts_rejected: ``verify_exits`` drafts kept / replaced.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    exits: dict[int, int] = field(default_factory=dict)
    decode_flops: float = 0.0
    decode_full_flops: float = 0.0
    num_layers: int = 0
    num_drafts_accepted: int = 0
    num_drafts_rejected: int = 0


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    done: concurrent.futures.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    done: concurrent.futures.Future


_STOP = object()


class AsyncLLMEngine:
    """Runs one ``LLMEngine`` on a background thread and streams each request's outputs.

    Args:
        engine: the synchronous engine; after this call only the engine thread touches it.

    Use ``start()`` (inside a running event loop) before ``generate``; ``shutdown()`` at exit.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self.snapshot = EngineSnapshot(num_layers=engine.args.num_layers)

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The engine's tokenizer; use it through ``call`` for anything but reading attributes."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def start(self) -> None:
        """Start the engine thread; outputs are delivered to the current event loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="eeserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine thread (pending requests are left unfinished)."""
        if self._thread is None:
            return
        self._commands.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    # ---- API ------------------------------------------------------------------------------

    async def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Add a request; once the engine accepted it, return the stream of its cumulative outputs.

        Raises:
            ValueError: the engine refused the request (bad prompt, too long, id in use).
            EngineDeadError: the engine thread is not running.

        The stream ends with the finished output; it raises RuntimeError if a step failed.
        Closing it early aborts the request (so does ``abort``).
        """
        self._check_alive()
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Add(request_id, prompt, params, done))
        try:
            await asyncio.wrap_future(done)  # re-raises the engine's ValueError
        except BaseException:
            self.abort_nowait(request_id)  # cancelled while queued: the add may still run
            raise
        return self._stream(request_id, q)

    async def _stream(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort_nowait(request_id)

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs until the finished one.

        Raises:
            ValueError: the engine refused the request (bad prompt, too long, id in use).
            RuntimeError: the engine failed while running the request.

        Closing or cancelling the iterator before the end aborts the request.
        """
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are freed on the engine thread. Unknown ids are ignored."""
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """``abort`` for synchronous code (e.g. a ``finally`` of a cancelled generator)."""
        self._queues.pop(request_id, None)
        self._commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread (tokenizer use, introspection) and return its result."""
        self._check_alive()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Call(fn, done))
        return await asyncio.wrap_future(done)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine thread stopped: {self._dead!r}")
        if self._thread is None:
            raise EngineDeadError("AsyncLLMEngine.start() was not called")

    # ---- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                # Idle: block until a command arrives. Busy: take what is queued, then step.
                try:
                    cmd = self._commands.get(block=not busy, timeout=None)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd is _STOP:
                        return
                    self._handle(cmd)
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                if self.engine.has_unfinished_requests():
                    self._step()
                self._take_snapshot()
        except BaseException as e:
            logger.exception("engine thread died")
            self._dead = e
            self._fail_all(EngineDeadError(f"the engine thread stopped: {e!r}"))

    def _handle(self, cmd: Any) -> None:
        if isinstance(cmd, _Add):
            if cmd.done.set_running_or_notify_cancel():
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, arrival_time=time.time())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    cmd.done.set_exception(e)
                else:
                    cmd.done.set_result(None)
                    if cmd.request_id not in self._queues:  # the caller left before the add ran
                        self.engine.abort_request(cmd.request_id)
        elif isinstance(cmd, _Abort):
            self.engine.abort_request(cmd.request_id)
        elif isinstance(cmd, _Call) and cmd.done.set_running_or_notify_cancel():
            try:
                cmd.done.set_result(cmd.fn(self.engine))
            except Exception as e:  # noqa: BLE001 - handed to the caller
                cmd.done.set_exception(e)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # LLMEngine.step fails a request whose work breaks the model step on its own; what
            # still raises here (scheduling, bookkeeping) may touch any request: fail and free all
            # of them, keep serving.
            logger.exception("engine step failed; aborting the running requests")
            ids = self.engine.unfinished_request_ids()
            err = RuntimeError(f"engine step failed: {e!r}")
            try:
                self.engine.abort_request(ids)  # freed before the callers hear of the failure
            except Exception:
                logger.exception("abort after a failed step also failed")
                raise
            finally:
                for rid in ids:
                    self._deliver(rid, err)
            return
        for out in outputs:
            errors = [c.error for c in out.outputs if c.finish_reason == "error"]
            if errors:  # this request alone made the step fail; the others went on
                self._deliver(out.request_id, RuntimeError(f"request failed in the engine: {errors[0]}"))
            else:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: Any) -> None:
        q = self._queues.get(request_id)
        if q is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_all(self, err: BaseException) -> None:
        for rid in list(self._queues):
            self._deliver(rid, err)

    def _take_snapshot(self) -> None:
        e = self.engine
        s = e.stats
        self.snapshot = EngineSnapshot(
            num_running=len(e.scheduler.running),
            num_waiting=len(e.scheduler.waiting),
            kv_cache_usage=float(e.kv_manager.usage),
            num_prompt_tokens=s.num_prompt_tokens,
            num_generation_tokens=s.num_generation_tokens,
            num_preemptions=s.num_preemptions,
            exits=dict(s.exits),
            decode_flops=s.step.decode_flops,
            decode_full_flops=s.step.decode_full_flops,
            num_layers=e.args.num_layers,
            num_drafts_accepted=e.scheduler.num_drafts_accepted,
            num_drafts_rejected=e.scheduler.num_drafts_rejected,
        )
