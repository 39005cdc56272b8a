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
from eeserve.early_exit.drafts import settle_drafts
from eeserve.request import Request, RequestStatus


class UpdatedRequests(list):
    """``Scheduler.update_from_output``'s result: the requests whose final tokens changed this
    step, or that finished (a list of ``Request``), and ``num_rows_discarded``, the decode rows
    computed after a replaced draft (``verify_exits``) whose tokens were dropped this step."""

    def __init__(self) -> None:
        super().__init__()
        self.num_rows_discarded = 0


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
        self.num_drafts_accepted = 0  # verify_exits: draft tokens equal to the full-depth token
        self.num_drafts_rejected = 0  # ... and replaced by it
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
        # Unverified drafts go: the recomputed prefill samples that position at full depth.
        req.truncate_outputs(req.num_confirmed_tokens)
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
            n = self._num_new_tokens(req, budget)
            if self._make_room(req, req.num_computed_tokens + n, preempted):
                scheduled[req.request_id] = n
                budget -= n
                i += 1
            # else req left the running list (preempted or finished); index i now holds the next.

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = self._num_new_tokens(req, budget)
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

    @staticmethod
    def _num_new_tokens(req: Request, budget: int) -> int:
        """Tokens to compute for ``req`` this step: what it lacks, within ``budget``. A sequence
        recomputed after preemption stops one short of its last token, which then runs alone as
        a decode row, exactly as it would have without the preemption (it may exit early; a
        chunk's rows run all layers)."""
        remaining = req.num_tokens - req.num_computed_tokens
        if req.num_output_tokens > 0 and remaining > 1:
            remaining -= 1
        return min(remaining, budget)

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

    def update_from_output(self, out: SchedulerOutput, result: ModelRunnerOutput) -> UpdatedRequests:
        """Advance computed counts, append sampled tokens, settle verified drafts and apply
        token-level stop rules (EOS, stop_token_ids, max_tokens, max_model_len) to the tokens that
        became final. Stop strings are the engine's job (they need text); it calls
        ``finish_requests``.

        Drafts (``verify_exits``): a draft token is appended like any other (it is the next
        step's input) but stays out of the stop rules until its full-depth token arrives in
        ``result.verified``. Drafts equal to it are kept (with the full-depth logprobs); the first
        that differs is replaced by it, and every token after it is dropped and its position
        recomputed: ``num_computed_tokens`` goes back to that position (its K/V slots are simply
        written again; the pending rows were completed in this step).

        Returns:
            the requests whose final tokens changed this step, or that finished, with the number
            of decode rows discarded after replaced drafts (``num_rows_discarded``).
        """
        now = time.time()
        updated = UpdatedRequests()
        for s in out.scheduled:
            req = self.requests.get(s.request_id)
            if req is None:  # aborted meanwhile
                continue
            req.num_computed_tokens += s.num_new_tokens
            first_new = req.num_confirmed_tokens  # index of the first output token to settle
            settled = settle_drafts(req, result.verified.get(s.request_id, ()))
            self.num_drafts_accepted += settled.accepted
            self.num_drafts_rejected += settled.rejected
            discarded = settled.discarded
            updated.num_rows_discarded += discarded
            kept = discarded == 0
            if s.request_id in result.request_flops:
                # FLOPs spent count every row; the full-depth cost counts the tokens kept, so that
                # rows discarded after a replaced draft show as extra spending.
                spent, full = result.request_flops[s.request_id]
                req.flops += spent
                req.full_flops += full * (1 - discarded)
            tok = result.sampled.get(s.request_id)
            if tok is not None and kept:
                req.output_token_ids.append(tok.token_id)
                req.exit_layers.append(tok.exit_layer)
                if tok.logprobs is not None:
                    req.output_logprobs.append(tok.logprobs)
                if tok.draft:
                    req.num_draft_tokens += 1
            if req.first_token_time is None and req.output_token_ids:
                req.first_token_time = now
            for j in range(first_new, req.num_confirmed_tokens):
                status = self._stop_status(req, req.output_token_ids[j], j + 1)
                if status is not None:
                    req.truncate_outputs(j + 1)
                    self.running.remove(req)
                    self._finish(req, status)
                    break
            if req.num_confirmed_tokens > first_new or req.is_finished:
                updated.append(req)
        return updated

    def _stop_status(self, req: Request, token_id: int, num_output: int) -> RequestStatus | None:
        """Stop rule for the ``num_output``-th output token (1-based), ``token_id``."""
        p = req.sampling_params
        if num_output >= p.min_tokens:
            if not p.ignore_eos and token_id in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in p.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if num_output >= req.max_tokens or req.num_prompt_tokens + num_output >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
