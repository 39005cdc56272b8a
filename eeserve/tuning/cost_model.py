"""Calibration's cost model: the FLOPs per decode token a threshold setting would spend, priced
by the engine's own ``CostModel`` (``eeserve.worker.flops``), so that what calibration minimizes
is what the engine's ``FlopMeter`` counts. Verified exits are priced by
``eeserve.early_exit.drafts.verified_step_costs`` from the same ``CostModel``.
"""

from __future__ import annotations

from collections.abc import Sequence

from eeserve.early_exit.drafts import NEVER
from eeserve.tuning.search import Outcome
from eeserve.worker.flops import CostModel


def check_flops(costs: CostModel, head, measure: str) -> float:
    """One confidence check of ``measure`` (``classifier`` or a full-vocabulary logit measure) at
    an exit with head ``head``, as the executor counts it."""
    return costs.classifier_check(head) if measure == "classifier" else costs.logit_check(head, None)


def draft_head_flops(costs: CostModel, head, measure: str, verify_exits: bool) -> float:
    """A leaving token's logits at an exit, beyond its check: none when the check computed them
    (an unpruned logit measure; a classifier with candidate logits under ``verify_exits``), else
    the exit head over the full vocabulary."""
    if measure != "classifier" or (verify_exits and head.spec.classifier_vocab > 0):
        return 0.0
    return costs.exit_head(head)


def expected_flops(outcome: Outcome, thresholds: Sequence[float], exit_layers: Sequence[int], args,
                   measure: str, classifier_flops: float = 0.0) -> float:
    """FLOPs per decode token under the executor's accounting: layers run, a confidence check at
    every enabled exit point passed (``classifier_flops``, or a full-vocabulary head for softmax),
    and the output head. Serving keeps only the enabled exits (``enabled_exits``)."""
    c = CostModel(args)
    check = classifier_flops if measure == "classifier" else c.head
    flops = outcome.mean_layers * c.layer + c.head
    reach = 1.0  # share of tokens still running at exit i
    for i in range(len(exit_layers)):
        if thresholds[i] < NEVER:
            flops += reach * check
        reach -= outcome.exit_share[i]
    return flops
