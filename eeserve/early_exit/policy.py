"""Exit policies: which decode rows of a batch leave at an exit point.

- ``none``: nobody leaves (all layers; the baseline).
- ``batch``: the seed paper (Miao et al. 2024, arXiv 2407.20272, section 3): the decode rows
  leave together, and only when every one of them is confident. A row that may not leave (its
  request turned early exit off, or, under ``verify_exits``, it may not draft) is never
  confident, so it keeps the whole batch together, and nobody is scored.
- ``token``: every row leaves as soon as it is confident; the rest of the batch is compacted and
  goes on (DREX's rebatching, Bajpai & Hanawal 2025): nobody exits before it is confident and
  nobody waits for another.

``exit_decision`` is a pure function on boolean tensors; ``ExitPolicy`` adds what the executor
asks per step and per request (eligibility, per-request thresholds, the batch-size limit). Both
are testable without a model.
"""

from __future__ import annotations

import torch

from eeserve.config import EXIT_POLICIES, EarlyExitConfig
from eeserve.early_exit.drafts import may_draft
from eeserve.request import Request


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
    raise ValueError(f"exit_policy must be one of {', '.join(EXIT_POLICIES)}, got {policy!r}")


class ExitPolicy:
    """The exit policy of an engine's early-exit settings.

    Args:
        config: validated early-exit settings.
        device_type: ``cpu``, ``cuda``, ... (the default batch-size limit depends on it).
    """

    def __init__(self, config: EarlyExitConfig, device_type: str) -> None:
        self.config = config
        self.policy = config.exit_policy
        self.limit = config.exit_batch_limit(device_type)
        self.thresholds = {e: config.threshold_at(i) for i, e in enumerate(config.exit_layers)}

    def checks_exits(self, num_decode: int) -> bool:
        """Whether a step with ``num_decode`` decode rows checks its exit points
        (``max_exit_batch``: larger steps run all layers and pay no check)."""
        return not self.limit or num_decode <= self.limit

    def eligible(self, req: Request, is_decode: bool) -> bool:
        """Whether the request's row may leave early this step: a decode row, early exit not
        turned off for the request, and under ``verify_exits`` room for a draft (``may_draft``)."""
        if not is_decode:
            return False
        ov = req.sampling_params.early_exit
        if ov is not None and not ov.enabled:
            return False
        cfg = self.config
        return not cfg.verify_exits or may_draft(req.num_output_tokens, req.max_tokens, req.num_draft_tokens,
                                                 cfg.max_draft_tokens)

    def threshold(self, req: Request, exit_layer: int) -> float:
        """The request's threshold at ``exit_layer``: its own override, else the engine's."""
        ov = req.sampling_params.early_exit
        if ov is not None and ov.threshold is not None:
            return ov.threshold
        return self.thresholds[exit_layer]

    def to_score(self, eligible: list[bool]) -> list[int]:
        """Indices of the decode rows to score at an exit point, given which may leave: under
        ``batch`` all of them, or none when one may not leave (nobody would); else the eligible."""
        if self.policy == "none" or (self.policy == "batch" and not all(eligible)):
            return []
        return [i for i, ok in enumerate(eligible) if ok]

    def decide(self, confident: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
        """[N] bool rows that leave, over the decode rows (``exit_decision``); rows not scored
        count as not confident."""
        return exit_decision(self.policy, confident, eligible)
