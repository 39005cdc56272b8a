"""Verified exits (``verify_exits``): the rule for which rows may draft, how drafts are settled
against the full model's tokens, and what a sequence's steps cost.

An early-exit token is a *draft* (self-speculative decoding with the exit head as the draft
model, as LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710): the deferred ``recompute`` pass of
its position, one step later, computes the full model's prediction there, which settles it.
This module is shared by the engine (``ExitPolicy`` asks ``may_draft``; the scheduler calls
``settle_drafts``) and by calibration (``simulate_verified`` replays generation with the same
rule and prices it with ``verified_step_costs``, built from the engine's ``CostModel``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eeserve.core.interfaces import SampledToken
from eeserve.request import Request
from eeserve.worker.flops import CostModel

NEVER = 2.0  # a probability threshold that no confidence reaches: the exit is off


def may_draft(num_output_tokens: int, max_tokens: int, num_draft_tokens: int, max_draft_tokens: int) -> bool:
    """Whether a decode row may leave early as a draft: it needs a next step to be verified in (it
    does not make the request's last token), and its sequence holds fewer than
    ``max_draft_tokens`` unverified drafts (0 = no limit).

    Args:
        num_output_tokens: output tokens the request holds before this row's token.
        max_tokens: the request's output budget.
        num_draft_tokens: unverified drafts among them.
        max_draft_tokens: ``EarlyExitConfig.max_draft_tokens``.
    """
    return num_output_tokens + 1 < max_tokens and (not max_draft_tokens or num_draft_tokens < max_draft_tokens)


@dataclass(frozen=True)
class Settlement:
    """What settling a request's drafts did.

    Attributes:
        accepted: drafts equal to the full model's token, kept.
        rejected: drafts replaced by the full model's token (0 or 1: the rest is discarded).
        discarded: decode rows computed after the replaced draft (this step's included), whose
            tokens are dropped; 0 when every draft was kept.
    """

    accepted: int = 0
    rejected: int = 0
    discarded: int = 0


def settle_drafts(req: Request, verified: Sequence[SampledToken]) -> Settlement:
    """Compare ``req``'s drafts with their full-depth tokens, in order: a draft equal to its token
    is kept (with the full model's logprobs); the first that differs is replaced by it, every
    token after it is dropped, and ``num_computed_tokens`` goes back to the replaced position (its
    K/V slots are simply written again). Called by ``Scheduler.update_from_output``, which owns
    the request.

    Raises:
        RuntimeError: ``verified`` and the request's drafts differ in number (a bug).
    """
    if not verified:
        return Settlement()
    if len(verified) != req.num_draft_tokens:
        raise RuntimeError(f"request {req.request_id!r}: {len(verified)} verified tokens for {req.num_draft_tokens} drafts")
    first = req.num_output_tokens - req.num_draft_tokens
    req.num_draft_tokens = 0
    accepted = 0
    for i, tok in enumerate(verified):
        j = first + i
        if tok.logprobs is not None:
            req.output_logprobs[j] = tok.logprobs
        if tok.token_id == req.output_token_ids[j]:
            accepted += 1
            continue
        discarded = req.num_output_tokens - j  # the rows that computed outputs j + 1 .. m
        req.output_token_ids[j] = tok.token_id
        req.exit_layers[j] = tok.exit_layer
        req.truncate_outputs(j + 1)
        req.num_computed_tokens = req.num_prompt_tokens + j  # the position whose input changed
        return Settlement(accepted, 1, discarded)
    return Settlement(accepted, 0, 0)


# ---- the cost of verified generation, for calibration ----------------------------------------


@dataclass(frozen=True)
class StepCosts:
    """Costs under ``verify_exits``, in full-depth steps (L layers + the LM head), counted in FLOPs.

    Attributes:
        draft: [X] a step whose row drafts at exit i (its layers, the checks passed, the draft head).
        ride: [X] a pending row from exit i riding a later step (layers i..L and the verifying head).
        full: a step whose row runs all layers (with the checks of every enabled exit).
        unchecked: a step whose row runs all layers unchecked, as it may not draft
            (``may_draft``); None: the same as ``full``.
    """

    draft: tuple[float, ...]
    ride: tuple[float, ...]
    full: float
    unchecked: float | None = None

    @property
    def full_unchecked(self) -> float:
        return self.full if self.unchecked is None else self.unchecked


def verified_step_costs(args, exit_layers: Sequence[int], thresholds: Sequence[float], check_flops: float,
                        exit_head_flops: Sequence[float]) -> StepCosts:
    """FLOP costs of the steps of one sequence under ``verify_exits`` (``StepCosts``), from the
    engine's ``CostModel``: what its ``FlopMeter`` counts for such a row. Checks run at every
    enabled exit point (threshold below ``NEVER``) a row passes.

    Args:
        args: the model's ``ModelArgs``.
        check_flops: one confidence check (``CostModel``'s check of the measure).
        exit_head_flops: [X] a draft's logits at each exit (0 when the check computed them).
    """
    c = CostModel(args)
    checks, drafts, rides = 0.0, [], []
    for e, t, head in zip(exit_layers, thresholds, exit_head_flops):
        if t < NEVER:
            checks += check_flops
        drafts.append((c.layers(e) + checks + head) / c.full_depth)
        rides.append((c.layers(c.num_layers - e) + c.head) / c.full_depth)
    return StepCosts(tuple(drafts), tuple(rides), (c.full_depth + checks) / c.full_depth, 1.0)


@dataclass(frozen=True)
class VerifiedOutcome:
    """What a threshold setting does under ``verify_exits`` (output always equal to full depth).

    Attributes:
        kept: share of decode tokens that were drafts and are kept (their exit layer counts).
        replaced: drafts replaced by the full-depth token, per decode token.
        mean_layers: mean exit layer per decode token (kept drafts at their exit, others at L).
        cost: modeled time per decode token, in full-depth steps (``verified_step_costs``).
    """

    kept: float
    replaced: float
    mean_layers: float
    cost: float

    @property
    def speedup(self) -> float:
        return 1.0 / self.cost if self.cost > 0 else float("inf")


def simulate_verified(conf: torch.Tensor, correct: torch.Tensor, seq: torch.Tensor, thresholds: Sequence[float],
                      exit_layers: Sequence[int], num_layers: int, costs: StepCosts,
                      max_draft_tokens: int = 0) -> VerifiedOutcome:
    """Replay ``verify_exits`` greedy generation over scored full-depth answers.

    Under verification the output is the full-depth answer, so its teacher-forced scores are what
    each row sees, except rows computed after a wrong draft (discarded later), for which the
    scores of the same position stand in. Per answer, rows run in order: a row whose confidence
    reaches its threshold at exit i drafts (``costs.draft[i]``) and the next row follows it; a
    row may draft only when ``may_draft`` allows it (the engine's rule), and is not checked
    otherwise (``costs.full_unchecked``). A row that runs all layers (``costs.full``, plus
    ``costs.ride`` for each pending draft carried along but the first, which rides free: a CPU
    step pads one row to two, a GPU step at batch 1 is bound by reading the weights) verifies
    the drafts before it: they are kept up to the first wrong one, which is replaced, and
    generation resumes after it. Measured on the development CPU (docs/benchmarks.md), chains of
    more than one draft cost more than this model says; ``max_draft_tokens`` 1 avoids them.

    Args:
        conf, correct: [N, X] per loss row and exit point, rows of one answer contiguous and in
            order (``score_windows``); the first row of an answer (the prompt's last position)
            and its last row (beyond the answer) are not decode rows and are skipped.
        seq: [N] answer index of each row.
        thresholds: X values.
        costs: from ``verified_step_costs``.
    """
    thr = torch.tensor(list(thresholds), dtype=conf.dtype)
    fire = conf >= thr[None, :]  # [N, X]
    first = torch.where(fire.any(1), fire.float().argmax(1), torch.full((conf.shape[0],), -1)).tolist()
    ok = correct.bool().tolist()
    bounds = torch.unique_consecutive(seq, return_counts=True)[1].tolist()
    kept = replaced = tokens = 0
    layers = cost = 0.0
    start = 0
    for n in bounds:
        rows = list(range(start + 1, start + n - 1))  # decode rows of this answer
        start += n
        # row t makes output token t + 1 of an answer of len(rows) + 1 tokens
        t, chain = 0, []  # chain: (index in rows, exit index) of drafts awaiting verification
        while t < len(rows):
            room = may_draft(t + 1, len(rows) + 1, len(chain), max_draft_tokens)
            x = first[rows[t]] if room else -1
            if x >= 0:
                cost += costs.draft[x]
                chain.append((t, x))
                t += 1
                continue
            cost += (costs.full if room else costs.full_unchecked) + sum(costs.ride[xi] for _, xi in chain[1:])
            bad = next((k for k, (i, xi) in enumerate(chain) if not ok[rows[i]][xi]), None)
            good = chain if bad is None else chain[:bad]
            kept += len(good)
            layers += sum(exit_layers[xi] - num_layers for _, xi in good)
            if bad is None:
                t += 1
            else:
                replaced += 1
                t = chain[bad][0] + 1
            chain = []
        tokens += len(rows)
        layers += len(rows) * num_layers
    d = max(1, tokens)
    return VerifiedOutcome(kept / d, replaced / d, layers / d, cost / d)
