"""Confidence measures for early exit.

- ``softmax``: max probability of the exit head's distribution (Schuster et al. 2022, CALM,
  arXiv 2207.07061, section 3.5 "softmax response").
- ``margin``: top-1 minus top-2 probability (CALM's softmax-difference variant).
- ``entropy``: Shannon entropy in nats (DeeBERT, Xin et al. 2020); a token exits when it is
  *at most* the threshold.
- ``saturation``: cosine similarity of the hidden state with the previous exit point's (CALM
  "hidden-state saturation").
- ``classifier``: a learned probability that this exit's top-1 equals the final layer's top-1
  (CALM's "early-exit classifier"), computed from the hidden state alone.

All functions take a batch of rows and return one float per row. ``build_scorer`` gives the
executor one ``Scorer`` object per measure, chosen once when the engine starts: it computes
the scores of the rows at an exit point, says which are confident, and prices its check from
the ``CostModel``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from eeserve.config import CONFIDENCE_MEASURES
from eeserve.worker.flops import CostModel

LOWER_IS_CONFIDENT = ("entropy",)  # measures where a lower score is more confident


def softmax_confidence(logits: torch.Tensor) -> torch.Tensor:
    """logits: [N, V'] (full or pruned vocabulary) -> [N] max probability."""
    return torch.softmax(logits.float(), dim=-1).max(dim=-1).values


def margin_confidence(logits: torch.Tensor) -> torch.Tensor:
    """logits: [N, V'] -> [N] top-1 minus top-2 probability."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits: [N, V'] -> [N] entropy in nats (lower = more confident)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def saturation(h: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
    """h, h_prev: [N, H] hidden states at this and the previous exit point -> [N] cosine similarity."""
    return F.cosine_similarity(h.float(), h_prev.float(), dim=-1)


def is_confident(measure: str, score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """[N] bool: ``score <= threshold`` for entropy, ``score >= threshold`` otherwise.

    Args:
        score: [N] values of ``measure``.
        threshold: [N] per-row thresholds.
    """
    if measure in LOWER_IS_CONFIDENT:
        return score <= threshold
    return score >= threshold


@dataclass(frozen=True)
class Scores:
    """A check of N rows at one exit point.

    Attributes:
        score: [N] float32 values of the measure.
        cost: FLOPs of the check per row.
        logits: [N, V] float32 full-vocabulary logits of the exit head when the check computed
            them (an unpruned logit measure), else None.
        candidate_logits: [N, K] float32 logits of the head's ``candidate_ids`` when a classifier
            check computed them, else None.
    """

    score: torch.Tensor
    cost: float
    logits: torch.Tensor | None = None
    candidate_logits: torch.Tensor | None = None


class ScoredRow(Protocol):
    """Per-row state a scorer keeps between the exit points of one step."""

    top_ids: torch.Tensor | None  # [K] pruned vocabulary (logit measures with vocab_prune_k)
    prev_hidden: torch.Tensor | None  # [H] hidden state at the previous exit point (saturation)


class Scorer(Protocol):
    """One confidence measure."""

    def start(self, rows: list[ScoredRow], h: torch.Tensor, row_index: list[int]) -> None:
        """Before layer 0: ``h[row_index[i]]`` ([H]) is the embedding of ``rows[i]``'s last row."""
        ...

    def score(self, head, model, rows: list[ScoredRow], h: torch.Tensor) -> Scores:
        """Score rows (h: [N, H] their hidden states) with the exit head ``head``."""
        ...

    def confident(self, score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """[N] bool: the score passes the [N] thresholds."""
        ...


class LogitScorer:
    """``softmax``, ``margin`` or ``entropy`` of the exit head's logits; with ``vocab_prune_k`` K >
    0, over the top-K ids of the row's first exit point from the second on (arXiv 2410.18952).

    Args:
        fn: [N, V'] logits -> [N] score.
        lower_is_confident: True for entropy.
        vocab_prune_k: 0 for the full vocabulary everywhere.
        costs: the model's ``CostModel``.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], lower_is_confident: bool, vocab_prune_k: int,
                 costs: CostModel) -> None:
        self.fn = fn
        self.lower = lower_is_confident
        self.k = vocab_prune_k
        self.costs = costs

    def start(self, rows: list[ScoredRow], h: torch.Tensor, row_index: list[int]) -> None:
        pass

    def score(self, head, model, rows: list[ScoredRow], h: torch.Tensor) -> Scores:
        k = self.k
        if k > 0 and all(r.top_ids is not None for r in rows):
            ids = torch.stack([r.top_ids for r in rows])  # [N, K]
            return Scores(self.fn(head.logits(model, h, ids)), self.costs.logit_check(head, k))
        full = head.logits(model, h)  # [N, V]
        if k > 0:
            for r, t in zip(rows, full.topk(k, dim=-1).indices):
                r.top_ids = t
        return Scores(self.fn(full), self.costs.logit_check(head, None), logits=full)

    def confident(self, score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return score <= threshold if self.lower else score >= threshold


class SaturationScorer:
    """Cosine of the row's hidden state with the one at its previous exit point (its embedding at
    the first)."""

    def __init__(self, costs: CostModel) -> None:
        self.costs = costs

    def start(self, rows: list[ScoredRow], h: torch.Tensor, row_index: list[int]) -> None:
        for r, i in zip(rows, row_index):
            r.prev_hidden = h[i]

    def score(self, head, model, rows: list[ScoredRow], h: torch.Tensor) -> Scores:
        prev = torch.stack([r.prev_hidden for r in rows])
        out = Scores(saturation(h, prev), self.costs.saturation_check())
        for r, row in zip(rows, h):
            r.prev_hidden = row
        return out

    def confident(self, score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return score >= threshold


class ClassifierScorer:
    """The exit head's learned classifier (needs heads trained with one)."""

    def __init__(self, costs: CostModel) -> None:
        self.costs = costs

    def start(self, rows: list[ScoredRow], h: torch.Tensor, row_index: list[int]) -> None:
        pass

    def score(self, head, model, rows: list[ScoredRow], h: torch.Tensor) -> Scores:
        prob, cand = head.classifier_check(h, model)
        return Scores(prob, self.costs.classifier_check(head), candidate_logits=cand)

    def confident(self, score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return score >= threshold


def build_scorer(measure: str, vocab_prune_k: int, costs: CostModel) -> Scorer:
    """The scorer of a confidence measure (one of ``config.CONFIDENCE_MEASURES``).

    Raises:
        ValueError: an unknown measure.
    """
    if measure in _LOGIT_FNS:
        return LogitScorer(_LOGIT_FNS[measure], measure in LOWER_IS_CONFIDENT, vocab_prune_k, costs)
    if measure == "saturation":
        return SaturationScorer(costs)
    if measure == "classifier":
        return ClassifierScorer(costs)
    raise ValueError(f"confidence must be one of {', '.join(CONFIDENCE_MEASURES)}, got {measure!r}")


_LOGIT_FNS = {"softmax": softmax_confidence, "margin": margin_confidence, "entropy": entropy}
