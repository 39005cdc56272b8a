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

All functions take a batch of rows and return one float per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGIT_MEASURES = ("softmax", "margin", "entropy")


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
    if measure == "entropy":
        return score <= threshold
    return score >= threshold
