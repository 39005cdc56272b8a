"""Exit policies: which decode rows of a batch leave at an exit point.

- ``none``: nobody leaves (all layers; the baseline).
- ``batch``: the seed paper (Miao et al. 2024, arXiv 2407.20272, section 3): the decode rows
  leave together, and only when every one of them is confident.
- ``token``: every row leaves as soon as it is confident; the rest of the batch is compacted and
  goes on (DREX's rebatching, Bajpai & Hanawal 2025): nobody exits before it is confident and
  nobody waits for another.

Pure functions on boolean tensors: testable without a model.
"""

from __future__ import annotations

import torch


def exit_decision(policy: str, confident: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Rows that exit at this exit point.

    Args:
        policy: ``none``, ``batch`` or ``token``.
        confident: [N] bool, the row's confidence passes its threshold.
        eligible: [N] bool, the row may exit at all (early exit not turned off for its request).
            Under ``batch`` an ineligible row is never confident, so it keeps the batch together.

    Returns:
        [N] bool mask of rows that leave.

    Raises:
        ValueError: for an unknown policy.
    """
    ok = confident & eligible
    if policy == "none":
        return torch.zeros_like(ok)
    if policy == "token":
        return ok
    if policy == "batch":
        return ok if bool(ok.all()) else torch.zeros_like(ok)
    raise ValueError(f"exit_policy must be one of none, batch, token, got {policy!r}")
