"""Iteration-level scheduler: which requests get how many tokens this step.

As in vLLM v1 there is no prefill or decode phase: every request simply needs its tokens
``num_computed_tokens .. num_tokens - 1`` computed; a step gives each running request as many of
them as the token budget allows (chunked prefill), then admits waiting requests. When blocks run
out, the most recently admitted running request is preempted by recompute: its blocks are freed
and it goes back to the front of the queue with ``num_computed_tokens = 0`` (Kwon et al. 2023,
arXiv 2309.06180, section 4.5).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from eeserve.config import SchedulerConfig
from eeserve.core.interfaces import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from eeserve.core.kv_manager import KVCacheManager
from eeserve.request import Request, RequestStatus


class Scheduler:
    """Owns the waiting queue and the running list.

    Args:
        config: batching limits.
        kv_manager: block allocator (owned by the scheduler from now on).
        max_model_len: context length; a request reaching it finishes with ``length``.
    """

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # total since start
        self._finished_in_schedule: list[str] = []  # finished for lack of room, reported once

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request.

        Raises:
            ValueError: if the id is in use, or the prompt cannot fit the context or the KV cache.
        """
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        n = request.num_prompt_tokens
        if n == 0:
            raise ValueError("prompt must contain at least one token")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt is {n} tokens, the context length (max_model_len) is {self.max_model_len}; "
                f"the prompt must be shorter than that to leave room for at least one generated token"
            )
        if n + 1 > self.kv.capacity_tokens:
            raise ValueError(
                f"prompt is {n} tokens but the whole KV cache holds only {self.kv.capacity_tokens} tokens; "
                "raise --num-kv-blocks or --kv-cache-memory"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (stop or abort) requests wherever they are and free their blocks.

        Unknown or already finished ids are ignored. Returns the requests finished.
        """
        done = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        req.finished_time = time.time()
        self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished_requests(self) -> bool:
        return self.num_unfinished > 0

    # ---- one step --------------------------------------------------------------------------

    def _entry(self, req: Request, n: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        end = start + n
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=tuple(req.all_token_ids[start:end]),
            start_position=start,
            block_ids=self.kv.block_ids(req.request_id),
            sample=end == req.num_tokens,
            is_decode=n == 1 and start >= req.num_prompt_tokens and req.num_output_tokens > 0 and end == req.num_tokens,
        )

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        """Choose this step's work. Allocates the blocks it needs; may preempt."""
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self._make_room(req, req.num_computed_tokens + n, preempted):
                scheduled[req.request_id] = n
                budget -= n
                i += 1
            # else req left the running list (preempted or finished); index i now holds the next.

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n):
                if not self.running:  # the whole cache is free and still too small
                    self.waiting.popleft()
                    self._finish(req, RequestStatus.FINISHED_LENGTH)
                    self._finished_in_schedule.append(req.request_id)
                    continue
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[req.request_id] = n
            budget -= n

        entries = tuple(self._entry(self.requests[rid], n) for rid, n in scheduled.items())
        out = SchedulerOutput(
            scheduled=entries,
            preempted_request_ids=tuple(preempted),
            num_batched_tokens=sum(scheduled.values()),
            finished_request_ids=tuple(self._finished_in_schedule),
        )
        self._finished_in_schedule = []
        return out

    def _make_room(self, req: Request, num_tokens: int, preempted: list[str]) -> bool:
        """Allocate slots for ``num_tokens`` positions of ``req``, preempting the most recently
        admitted running requests while needed.

        Returns:
            True when allocated; False when ``req`` itself had to leave the running list
            (preempted, or finished with ``length`` because the whole cache cannot hold it).
        """
        while not self.kv.allocate_slots(req.request_id, num_tokens):
            victim = self.running[-1]
            if victim is req and len(self.running) == 1:
                self.running.remove(req)
                self._finish(req, RequestStatus.FINISHED_LENGTH)
                self._finished_in_schedule.append(req.request_id)
                return False
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def update_from_output(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[Request]:
        """Advance computed counts, append sampled tokens and apply token-level stop rules
        (EOS, stop_token_ids, max_tokens, max_model_len). Stop strings are the engine's job
        (they need text); it calls ``finish_requests``.

        Returns:
            the requests that received a token this step (finished ones included).
        """
        now = time.time()
        updated = []
        for s in out.scheduled:
            req = self.requests.get(s.request_id)
            if req is None:  # aborted meanwhile
                continue
            req.num_computed_tokens += s.num_new_tokens
            tok = result.sampled.get(s.request_id)
            if tok is None:
                continue
            req.output_token_ids.append(tok.token_id)
            req.exit_layers.append(tok.exit_layer)
            if tok.logprobs is not None:
                req.output_logprobs.append(tok.logprobs)
            if s.request_id in result.request_flops:
                spent, full = result.request_flops[s.request_id]
                req.flops += spent
                req.full_flops += full
            if req.first_token_time is None:
                req.first_token_time = now
            status = self._stop_status(req, tok.token_id)
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
            updated.append(req)
        return updated

    def _stop_status(self, req: Request, token_id: int) -> RequestStatus | None:
        p = req.sampling_params
        if req.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and req.eos_token_id is not None and token_id == req.eos_token_id:
                return RequestStatus.FINISHED_STOPPED
            if token_id in p.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
