"""Threshold search for calibration: what a setting does on scored tokens, the paths of
settings from "never exit" down, and the tests that pick one (``eeserve calibrate``; the method
is in ``eeserve.tuning.calibrate``'s docstring).

A threshold above 1 (``NEVER``) disables an exit for probability-valued confidences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eeserve.early_exit.drafts import NEVER


@dataclass(frozen=True)
class Outcome:
    """What a threshold setting does on scored tokens.

    Attributes:
        agreement: share of tokens whose exit's top-1 equals the final layer's.
        mean_layers: mean layers run per token.
        exit_share: per exit point, then L: share of tokens leaving there.
    """

    agreement: float
    mean_layers: float
    exit_share: tuple[float, ...]


def simulate(conf: torch.Tensor, correct: torch.Tensor, thresholds: Sequence[float], exit_layers: Sequence[int],
             num_layers: int) -> Outcome:
    """Apply thresholds to scored tokens.

    Args:
        conf: [N, X] confidence per token and exit point (higher = more confident).
        correct: [N, X] bool, exit top-1 == final top-1.
        thresholds: X values.
    """
    n, x = conf.shape
    thr = torch.tensor(list(thresholds), dtype=conf.dtype)
    fire = conf >= thr[None, :]  # [N, X]
    any_fire = fire.any(1)
    first = torch.where(any_fire, fire.float().argmax(1), torch.full((n,), x))
    layers = torch.tensor(list(exit_layers) + [num_layers], dtype=torch.float32)[first]
    ok_ext = torch.cat([correct.bool(), torch.ones(n, 1, dtype=torch.bool)], 1)
    ok = ok_ext[torch.arange(n), first]
    share = torch.bincount(first, minlength=x + 1).float() / max(1, n)
    return Outcome(float(ok.float().mean()), float(layers.mean()), tuple(share.tolist()))


def _ladder(values: torch.Tensor, steps: int) -> list[float]:
    """Candidate thresholds for one exit: observed confidences (at most ``steps`` of them, evenly
    spaced in rank), decreasing."""
    uniq = torch.unique(values.float()).flip(0)  # decreasing
    if uniq.numel() > steps:
        idx = torch.linspace(0, uniq.numel() - 1, steps).round().long()
        uniq = uniq[idx]
    return [float(v) for v in uniq]


def global_path(conf: torch.Tensor, steps: int = 200) -> list[tuple[float, ...]]:
    """Settings with one threshold for every exit, from ``NEVER`` down."""
    x = conf.shape[1]
    return [(NEVER,) * x] + [(t,) * x for t in _ladder(conf.flatten(), steps)]


def greedy_path(conf: torch.Tensor, correct: torch.Tensor, exit_layers: Sequence[int], num_layers: int,
                floor: float, steps: int = 40) -> list[tuple[float, ...]]:
    """Per-exit settings from ``NEVER`` down, greedily: each step lowers the one exit threshold that
    saves the most layers per unit of agreement lost; stops when agreement would drop below ``floor``."""
    x = conf.shape[1]
    ladders = [_ladder(conf[:, i], steps) for i in range(x)]
    pos = [-1] * x  # -1: NEVER
    cur = tuple([NEVER] * x)
    path = [cur]
    base = simulate(conf, correct, cur, exit_layers, num_layers)
    while True:
        best, best_score, best_out = None, -math.inf, None
        for i in range(x):
            if pos[i] + 1 >= len(ladders[i]):
                continue
            cand = list(cur)
            cand[i] = ladders[i][pos[i] + 1]
            out = simulate(conf, correct, cand, exit_layers, num_layers)
            if out.agreement < floor:
                continue
            saved = base.mean_layers - out.mean_layers
            lost = base.agreement - out.agreement
            score = saved / (max(lost, 0.0) + 1e-4)
            if score > best_score:
                best, best_score, best_out = i, score, out
        if best is None:
            return path
        pos[best] += 1
        cur = tuple(ladders[i][pos[i]] if pos[i] >= 0 else NEVER for i in range(x))
        path.append(cur)
        base = best_out


def binomial_upper(k: int, n: int, delta: float) -> float:
    """Clopper-Pearson upper confidence bound: the u with P(Binomial(n, u) <= k) = delta, i.e. a
    risk that exceeds u would give k or fewer failures in n with probability below delta."""
    if k >= n:
        return 1.0

    def cdf(u: float) -> float:
        if u <= 0.0:
            return 1.0
        if u >= 1.0:
            return 0.0
        lu, l1u = math.log(u), math.log1p(-u)
        terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lu + (n - i) * l1u
                 for i in range(k + 1)]
        m = max(terms)
        return math.exp(m) * sum(math.exp(t - m) for t in terms)

    lo, hi = k / n, 1.0
    for _ in range(60):  # bisection; cdf decreases in u
        mid = (lo + hi) / 2
        if cdf(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def passes(disagreements: int, n: int, target: float, delta: float | None) -> bool:
    """Whether ``disagreements`` of ``n`` tokens meet ``target``: the Clopper-Pearson upper bound
    at level ``delta`` (or, with None, the plain share) is at most ``1 - target``."""
    risk = binomial_upper(disagreements, n, delta) if delta is not None else disagreements / max(1, n)
    return risk <= (1.0 - target) + 1e-9


def fixed_sequence_test(path: Sequence[tuple[float, ...]], conf: torch.Tensor, correct: torch.Tensor,
                        exit_layers: Sequence[int], num_layers: int, target: float,
                        delta: float | None) -> tuple[float, ...]:
    """The last setting along ``path`` (in order) that passes; the first one must be ``NEVER``."""
    n = conf.shape[0]
    chosen = path[0]
    for thr in path:
        out = simulate(conf, correct, thr, exit_layers, num_layers)
        if not passes(round((1.0 - out.agreement) * n), n, target, delta):
            break
        chosen = thr
    return chosen


def choose_thresholds(conf: torch.Tensor, correct: torch.Tensor, exit_layers: Sequence[int], num_layers: int,
                      target: float, delta: float | None = 0.1, per_exit: bool = True,
                      seq: torch.Tensor | None = None, steps: int = 40) -> tuple[float, ...]:
    """Thresholds whose teacher-forced agreement meets ``target`` (method: module docstring).

    Args:
        conf, correct: [N, X] scores of calibration tokens.
        delta: error rate of the bound; None: plain empirical rule on all tokens, no split.
        per_exit: per-exit thresholds (greedy path) or one global threshold.
        seq: [N] sequence index of each token: the split keeps sequences whole (default: by token).
        steps: candidate thresholds per exit on the per-exit path.

    Raises:
        ValueError: ``target`` outside (0, 1], or no tokens.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target agreement must be in (0, 1], got {target}")
    if conf.shape[0] == 0:
        raise ValueError("no calibration tokens")
    if delta is None:
        learn = test = torch.ones(conf.shape[0], dtype=torch.bool)
    else:
        key = seq if seq is not None else torch.arange(conf.shape[0])
        learn = key % 2 == 0
        test = ~learn
    floor = target - 0.1 if delta is not None else target
    path = (greedy_path(conf[learn], correct[learn], exit_layers, num_layers, floor, steps) if per_exit
            else global_path(conf[learn]))
    return fixed_sequence_test(path, conf[test], correct[test], exit_layers, num_layers, target, delta)


def settings_to_test(path: Sequence[tuple[float, ...]], conf: torch.Tensor, correct: torch.Tensor,
                     exit_layers: Sequence[int], num_layers: int, target: float, above: float = 0.03,
                     below: float = 0.02, step: float = 0.005) -> list[tuple[float, ...]]:
    """The settings along ``path`` (in its order, duplicates dropped) at which the teacher-forced
    agreement first falls below each of the levels ``target + above``, ``target + above - step``,
    ..., ``target - below``: for each level, the last setting still at or above it."""
    agreements = [simulate(conf, correct, thr, exit_layers, num_layers).agreement for thr in path]
    levels = [target + above - i * step for i in range(int(round((above + below) / step)) + 1)]
    picked: list[tuple[float, ...]] = []
    for level in levels:
        keep = None
        for thr, agr in zip(path, agreements):
            if agr < level - 1e-9:
                break
            keep = thr
        if keep is not None and keep not in picked:
            picked.append(keep)
    return picked


@dataclass(frozen=True)
class GenerationCheck:
    """Early-exit greedy generation measured against full depth.

    Attributes:
        thresholds: the setting's thresholds at its enabled exit points (``enabled_exits``).
        tokens: generated tokens.
        disagreements: tokens unequal to the full-depth model's greedy pick given the same prefix.
        mean_layers: mean layers run per generated token.
        tok_s: output tokens per second of the run.
    """

    thresholds: tuple[float, ...]
    tokens: int
    disagreements: int
    mean_layers: float
    tok_s: float

    @property
    def agreement(self) -> float:
        return 1.0 - self.disagreements / max(1, self.tokens)


def generation_test(settings: Sequence[tuple[float, ...]], run, target: float,
                    delta: float | None) -> tuple[tuple[float, ...] | None, list[GenerationCheck]]:
    """Fixed-sequence test of ``settings`` (in order) by generation.

    Args:
        run: ``run(thresholds) -> GenerationCheck``.
        delta: level of the Clopper-Pearson bound; None: the plain rule, disagreement share
            <= 1 - target.

    Returns:
        (the last setting that passed, or None when the first fails; the checks run).
    """
    chosen, checks = None, []
    for thr in settings:
        c = run(thr)
        checks.append(c)
        if not passes(c.disagreements, c.tokens, target, delta):
            break
        chosen = thr
    return chosen, checks
