"""Threshold calibration for a target token agreement (``eeserve calibrate``).

Method (a Learn-then-Test procedure, Angelopoulos et al. 2021, arXiv 2110.01052, as CALM,
Schuster et al. 2022, arXiv 2207.07061, section 4, with the risk measured on generation):

1. Scores: the model's full-depth greedy answers to held-out ``calib`` prompts, teacher-forced once
   through the backbone. Per answer token t and exit point x: the confidence c[t, x] and
   ok[t, x] = (exit x's top-1 == the final layer's top-1). A token under thresholds thr exits at
   the first x with c[t, x] >= thr[x] and agrees when ok[t, x] (or when it runs all layers).
2. Path: an ordered list of threshold settings from "never exit" to ever looser, learned on the
   scores. Global: one threshold for all exits, the distinct confidence quantiles in decreasing
   order. Per exit: greedy; each move lowers one exit's threshold to its next quantile, choosing
   the move that saves the most layers per agreement lost.
3. Test by generation (``generation_test``): a few settings along the path, those whose
   teacher-forced agreement first falls below target + 0.03, + 0.025, ..., - 0.02, are run as
   real early-exit greedy generation on the same ``calib`` prompts, and DESIGN.md's token
   agreement is measured (the output teacher-forced through the full-depth model). They are
   tested in path order (fixed-sequence testing: no multiple-test correction) and the last one
   whose disagreement passes the binomial (Clopper-Pearson) upper bound at level delta,
   ``upper_delta(disagreements, tokens) <= 1 - target``, is kept. Generation is what serving
   does: with ``recompute`` a token that exits changes what follows it, and fewer tokens exit in
   generation than under teacher forcing at the same threshold, so teacher-forced agreement is
   a poor stand-in (docs/exit_heads.md measures both). The bound treats tokens as i.i.d.; tokens
   of one answer are correlated, so it is a margin, not a guarantee.
4. Check (``run_calibration``): generate on ``test`` prompts, never used above, with the chosen
   thresholds and report agreement, mean layers and speed.

``choose_thresholds`` is the teacher-forced variant (split the scores in halves: path on one,
bound on the other); ``--no-verify`` uses it alone, without generation.

A threshold above 1 (``NEVER``) disables an exit for probability-valued confidences.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

NEVER = 2.0  # a probability threshold that no confidence reaches
TIME_TOLERANCE = 0.01  # --verify-exits: modeled times this close to the least count as equal


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


@dataclass(frozen=True)
class StepCosts:
    """Costs under ``verify_exits``, in full-depth steps (L layers + the LM head), counted in FLOPs.

    Attributes:
        draft: [X] a step whose row drafts at exit i (its layers, the checks passed, the draft head).
        ride: [X] a pending row from exit i riding a later step (layers i..L and the verifying head).
        full: a step whose row runs all layers (with the checks of every enabled exit).
    """

    draft: tuple[float, ...]
    ride: tuple[float, ...]
    full: float


def verified_step_costs(args, exit_layers: Sequence[int], thresholds: Sequence[float], check_flops: float,
                        exit_head_flops: Sequence[float]) -> StepCosts:
    """FLOP costs of the steps of one sequence under ``verify_exits`` (``StepCosts``). FLOPs
    stand for time at one sequence, where a step reads every weight once. Checks run at every
    enabled exit point a row passes. (``simulate_verified`` lets the first riding row go free.)
    """
    full = args.full_depth_flops()
    checks, drafts, rides = 0.0, [], []
    for e, t, head in zip(exit_layers, thresholds, exit_head_flops):
        if t < NEVER:
            checks += check_flops
        drafts.append((e * args.layer_flops() + checks + head) / full)
        rides.append(((args.num_layers - e) * args.layer_flops() + args.head_flops()) / full)
    return StepCosts(tuple(drafts), tuple(rides), (full + checks) / full)


def simulate_verified(conf: torch.Tensor, correct: torch.Tensor, seq: torch.Tensor, thresholds: Sequence[float],
                      exit_layers: Sequence[int], num_layers: int, costs: StepCosts,
                      max_draft_tokens: int = 0) -> VerifiedOutcome:
    """Replay ``verify_exits`` greedy generation over scored full-depth answers.

    Under verification the output is the full-depth answer, so its teacher-forced scores are what
    each row sees, except rows computed after a wrong draft (discarded later), for which the
    scores of the same position stand in. Per answer, rows run in order: a row whose confidence
    reaches its threshold at exit i drafts (``costs.draft[i]``) and the next row follows it,
    unless the sequence already holds ``max_draft_tokens`` drafts (0 = no limit) or it is the
    answer's last token (the engine drafts neither). A row that runs all layers (``costs.full``,
    plus ``costs.ride`` for each pending draft carried along but the first, which rides free: a
    CPU step pads one row to two, a GPU step at batch 1 is bound by reading the weights) verifies
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
        t, chain = 0, []  # chain: (index in rows, exit index) of drafts awaiting verification
        while t < len(rows):
            room = t < len(rows) - 1 and (not max_draft_tokens or len(chain) < max_draft_tokens)
            x = first[rows[t]] if room else -1
            if x >= 0:
                cost += costs.draft[x]
                chain.append((t, x))
                t += 1
                continue
            cost += costs.full + sum(costs.ride[xi] for _, xi in chain[1:])
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


def expected_flops(outcome: Outcome, thresholds: Sequence[float], exit_layers: Sequence[int], args,
                   measure: str, classifier_flops: float = 0.0) -> float:
    """FLOPs per decode token under the executor's accounting: layers run, a confidence check at
    every enabled exit point passed (``classifier_flops``, or a full-vocabulary head for softmax),
    and the output head. Serving keeps only the enabled exits (``enabled_exits``)."""
    check = classifier_flops if measure == "classifier" else args.head_flops()
    flops = outcome.mean_layers * args.layer_flops() + args.head_flops()
    reach = 1.0  # share of tokens still running at exit i
    for i in range(len(exit_layers)):
        if thresholds[i] < NEVER:
            flops += reach * check
        reach -= outcome.exit_share[i]
    return flops


def enabled_exits(thresholds: Sequence[float], exit_layers: Sequence[int]) -> tuple[list[int], list[float]]:
    """The exit points a setting uses and their thresholds (``NEVER`` ones dropped); when none is
    enabled, the last exit with ``NEVER`` (exits nothing, output equals full depth)."""
    pairs = [(e, t) for e, t in zip(exit_layers, thresholds) if t < NEVER]
    if not pairs:
        pairs = [(exit_layers[-1], NEVER)]
    return [e for e, _ in pairs], [round(t, 6) for _, t in pairs]


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


def run_calibration(args) -> int:
    """``eeserve calibrate``: score, choose along a path by generation, check on test prompts,
    write exit_config.json."""
    from eeserve.model import loader
    from eeserve.model.exit_heads import ExitHeads
    from eeserve.tuning import data
    from eeserve.tuning.cli import load_llm
    from eeserve.tuning.evaluate import score_windows

    t0 = time.perf_counter()
    folder = Path(args.exit_heads)
    llm = load_llm(args.model)
    model, margs = llm.engine.model, llm.engine.args
    heads = ExitHeads.load(folder, model, loader.model_identity(llm.engine.model_files))
    exits, L = heads.exit_layers, margs.num_layers
    tok = llm.tokenizer
    calib_prompts = data.load_prompts("calib")
    cache = Path(args.cache) / f"answers_calib_{args.max_tokens}.jsonl" if args.cache else None
    docs = data.generate_answers(llm, calib_prompts, args.max_tokens, cache)
    wins = data.tokenize_documents(docs, lambda s: tok.encode(s, add_special_tokens=False), 4096)
    scores = score_windows(model, heads, wins)
    print(f"calibration: {len(wins)} held-out prompts, {scores.correct.shape[0]} answer tokens "
          f"({time.perf_counter() - t0:.0f} s)")
    measures = ["classifier", "softmax"] if args.confidence == "auto" else [args.confidence]
    if scores.classifier is None:
        measures = [m for m in measures if m != "classifier"] or ["softmax"]
    full_flops = margs.full_depth_flops()
    clf_flops = heads[exits[0]].classifier_flops(margs.hidden_size)
    if getattr(args, "verify_exits", False):
        return _calibrate_verified(args, llm, heads, scores, measures, folder, t0)
    target = args.target_agreement
    by_generation = not args.no_verify
    rows = []
    for m in measures:
        conf = scores.classifier if m == "classifier" else scores.softmax
        for per_exit in ([True, False] if args.per_exit else [False]):
            if by_generation:  # the path on all scores; generation tests it
                path = (greedy_path(conf, scores.correct, exits, L, target - 0.1, args.ladder_steps) if per_exit
                        else global_path(conf))
                thr = fixed_sequence_test(path, conf, scores.correct, exits, L, target, None)
            else:
                path = None
                thr = choose_thresholds(conf, scores.correct, exits, L, target, args.delta, per_exit, scores.seq,
                                        args.ladder_steps)
            out = simulate(conf, scores.correct, thr, exits, L)
            rows.append({"confidence": m, "per_exit": per_exit, "thresholds": thr, "outcome": out, "path": path,
                         "conf": conf, "flops": expected_flops(out, thr, exits, margs, m, clf_flops)})
    how = "plain rule" if by_generation else f"bound at delta {args.delta}"
    print(f"teacher-forced choice at target {target:.3f} ({how}):")
    print("| confidence | thresholds | agreement (teacher-forced) | mean layers | FLOPs vs full |")
    print("|---|---|---|---|---|")
    for r in rows:
        kind = "per exit" if r["per_exit"] else "global"
        print(f"| {r['confidence']} {kind} | {_fmt(r['thresholds'])} | {r['outcome'].agreement:.3f} | "
              f"{r['outcome'].mean_layers:.2f} | {r['flops'] / full_flops:.2f} |")
    best = min(rows, key=lambda r: r["flops"])
    result = {"target_agreement": target, "delta": args.delta, "calib_tokens": int(scores.correct.shape[0]),
              "confidence": best["confidence"], "per_exit": best["per_exit"]}
    thr = best["thresholds"]
    if by_generation:
        settings = settings_to_test(best["path"], best["conf"], scores.correct, exits, L, target)
        calib_ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in calib_prompts]

        def run(t: tuple[float, ...]) -> GenerationCheck:
            c = generation_check(llm, args, folder, _serving(t, exits, best["confidence"], args.kv_fill), calib_ids)
            print(f"  generation on {len(calib_ids)} calib prompts, thresholds {_fmt(t)}: agreement "
                  f"{c.agreement:.4f} ({c.disagreements}/{c.tokens} differ), mean layers {c.mean_layers:.2f}",
                  flush=True)
            return c

        print(f"testing {len(settings)} settings along the {best['confidence']} path by generation "
              f"(Clopper-Pearson at delta {args.delta}):")
        chosen, checks = generation_test(settings, run, target, args.delta)
        thr = chosen if chosen is not None else tuple([NEVER] * len(exits))
        result["generation_tests"] = [{"thresholds": [round(v, 6) for v in c.thresholds], "agreement": round(c.agreement, 4),
                                       "tokens": c.tokens, "mean_layers": round(c.mean_layers, 3)} for c in checks]
        if chosen is None:
            print("no setting passed: every exit is disabled (output equals full depth)")
    out = simulate(best["conf"], scores.correct, thr, exits, L)
    result.update({"teacher_forced_agreement": round(out.agreement, 4), "teacher_forced_mean_layers": round(out.mean_layers, 3)})
    serving = _serving(thr, exits, best["confidence"], args.kv_fill)
    if by_generation:
        result.update(verify(args, folder, serving, llm))
        if result["generation_agreement"] < target:
            print(f"note: on the test prompts agreement is {result['generation_agreement']:.4f}, below the target "
                  f"{target}: the bound is a margin over calibration prompts, not a guarantee")
    return _finish(args, folder, serving, result, t0)


def _calibrate_verified(args, llm, heads, scores, measures: Sequence[str], folder: Path, t0: float) -> int:
    """``eeserve calibrate --verify-exits``: under ``verify_exits`` the output is the full model's
    whatever the thresholds, so they only trade drafts kept against drafts replaced. Along the
    global path, ``simulate_verified`` replays generation on the calibration answers; the highest
    threshold whose modeled time per token is within ``TIME_TOLERANCE`` of the least is kept (the
    time curve is flat near its minimum, while FLOPs spent on replaced drafts keep growing), and
    checked by generation on test prompts."""

    margs = llm.engine.args
    exits, L, H = heads.exit_layers, margs.num_layers, margs.hidden_size
    best = None
    print("| confidence | threshold | drafts kept | drafts replaced | mean layers | modeled speed-up |")
    print("|---|---|---|---|---|---|")
    for m in measures:
        conf = scores.classifier if m == "classifier" else scores.softmax
        check = heads[exits[0]].classifier_flops(H) if m == "classifier" else margs.head_flops()
        # a draft's logits: the classifier's candidate logits (computed by the check) or a full head
        free = m == "classifier" and heads.spec.classifier_vocab > 0
        exit_head = [0.0 if free else margs.head_flops() + heads[e].transform_flops(H) for e in exits]
        path = global_path(conf, args.ladder_steps)
        outs = []
        for thr in path:
            costs = verified_step_costs(margs, exits, thr, check, exit_head)
            outs.append(simulate_verified(conf, scores.correct, scores.seq, thr, exits, L, costs,
                                          args.max_draft_tokens))
        # the first setting along the path (the highest threshold: fewest drafts replaced, fewest
        # FLOPs) whose modeled time is within TIME_TOLERANCE of the least
        least = min(o.cost for o in outs)
        i = next(k for k, o in enumerate(outs) if o.cost <= least * (1 + TIME_TOLERANCE))
        for k in sorted({*range(0, len(path), max(1, len(path) // 8)), i}):
            o = outs[k]
            mark = " (chosen)" if k == i else ""
            print(f"| {m} | {_fmt(path[k])}{mark} | {o.kept:.3f} | {o.replaced:.3f} | {o.mean_layers:.2f} | "
                  f"{o.speedup:.3f}x |")
        if best is None or outs[i].cost < best[2].cost:
            best = (m, path[i], outs[i])
    m, thr, o = best
    result = {"verify_exits": True, "method": f"highest threshold within {TIME_TOLERANCE:.0%} of the least modeled "
                                               "time per token (calibrate.simulate_verified)",
              "calib_tokens": int(scores.correct.shape[0]), "confidence": m,
              "modeled": {"drafts_kept": round(o.kept, 4), "drafts_replaced": round(o.replaced, 4),
                          "mean_layers": round(o.mean_layers, 3), "speedup": round(o.speedup, 3)}}
    serving = _serving(thr, exits, m, "recompute", verify_exits=True)
    serving["max_draft_tokens"] = args.max_draft_tokens  # as modeled (0 too: the engine's default is 1)
    result.update(verify(args, folder, serving, llm))
    return _finish(args, folder, serving, result, t0)


def _finish(args, folder: Path, serving: dict, result: dict, t0: float) -> int:
    """Print the result; unless ``--dry-run``, write ``serving`` and ``result`` (as
    ``calibration``) into the heads folder's exit_config.json. Verified settings keep an
    unverified ``serving`` there as ``serving_unverified`` (with its ``calibration_unverified``):
    the engine falls back to it when exits are not verified (``defaults.resolve_early_exit``).
    Unverified settings replace both."""
    import json

    print(json.dumps(result, indent=2))
    if not args.dry_run:
        cfg_path = folder / "exit_config.json"
        cfg = json.loads(cfg_path.read_text())
        old = cfg.get("serving")
        if serving.get("verify_exits") and old and not old.get("verify_exits"):
            cfg["serving_unverified"] = old
            cfg["calibration_unverified"] = cfg.get("calibration")
        elif not serving.get("verify_exits"):
            cfg.pop("serving_unverified", None)
            cfg.pop("calibration_unverified", None)
        cfg["serving"] = serving
        cfg["calibration"] = result
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        print(f"wrote thresholds into {cfg_path}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


def _fmt(thresholds: Sequence[float]) -> str:
    return ", ".join("-" if t >= NEVER else f"{t:.3f}" for t in thresholds)


def _serving(thresholds: Sequence[float], exit_layers: Sequence[int], confidence: str, kv_fill: str,
             verify_exits: bool = False) -> dict:
    """The ``serving`` part of exit_config.json for a setting (only its enabled exits). With none
    enabled, exit policy ``none``: ``NEVER`` is outside every measure's threshold range, which
    ``EarlyExitConfig`` refuses."""
    used, used_thr = enabled_exits(thresholds, exit_layers)
    out = {"exit_layers": used, "exit_policy": "token", "confidence": confidence, "threshold": used_thr,
           "kv_fill": kv_fill, "min_exit_layer": used[0]}
    if all(t >= NEVER for t in used_thr):
        out["exit_policy"] = "none"
        del out["threshold"]
    if verify_exits:
        out["verify_exits"] = True
    return out


def token_agreement(model, prompts: Sequence[list[int]], outputs: Sequence[list[int]]) -> tuple[int, int]:
    """DESIGN.md's token agreement as counts: the outputs teacher-forced through the full-depth
    model; (generated tokens equal to its greedy pick given the same prefix, generated tokens)."""
    from eeserve.tuning.data import Window
    from eeserve.tuning.evaluate import _full_argmax

    agree = total = 0
    for p, o in zip(prompts, outputs):
        if not o:
            continue
        picks = _full_argmax(model, Window(torch.tensor(p + o, dtype=torch.long), len(p)))  # [len(o)+1]
        agree += sum(int(a == b) for a, b in zip(picks[: len(o)].tolist(), o))
        total += len(o)
    return agree, total


def generation_check(llm, args, folder: Path, serving: dict, prompt_ids: Sequence[list[int]]) -> GenerationCheck:
    """Greedy early-exit generation (``args.max_tokens`` per prompt) with ``serving`` switched into
    ``llm``'s engine (exits checked at every batch size), then back to full depth; agreement by
    teacher forcing."""
    from eeserve import SamplingParams
    from eeserve.early_exit.defaults import resolve_early_exit

    # max_exit_batch 0: every prompt runs at once here, and each must take the exits it would alone
    over = {"exit_heads": str(folder), "max_exit_batch": 0,
            **{k: tuple(v) if isinstance(v, list) else v for k, v in serving.items()}}
    llm.engine.set_early_exit(resolve_early_exit(args.model, over))
    try:
        t = time.perf_counter()
        out = llm.generate(list(prompt_ids), SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
        dt = time.perf_counter() - t
    finally:
        llm.engine.set_early_exit(resolve_early_exit(args.model, {"exit_heads": "none"}))
    outs = [list(o.outputs[0].token_ids) for o in out]
    layers = [e for o in out for e in o.outputs[0].exit_layers]
    agree, total = token_agreement(llm.engine.model, prompt_ids, outs)
    return GenerationCheck(tuple(serving.get("threshold", [NEVER])), total, total - agree, sum(layers) / max(1, len(layers)),
                           len(layers) / dt)


def verify(args, folder: Path, serving: dict, full_llm) -> dict:
    """Generate on ``test`` prompts with early exit and at full depth; agreement and speed."""
    from eeserve import SamplingParams
    from eeserve.tuning import data

    prompts = data.load_prompts("test")[: args.num_prompts]
    ids = [full_llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    t = time.perf_counter()
    full_out = full_llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
    t_full = time.perf_counter() - t
    n_full = sum(len(o.outputs[0].token_ids) for o in full_out)
    if args.cache:  # the full-depth answers to test prompts are eval-exits' held-out text
        data.save_answers(Path(args.cache) / f"answers_test{len(ids)}_{args.max_tokens}.jsonl", prompts, ids,
                          [list(o.outputs[0].token_ids) for o in full_out], data.answer_settings(args.max_tokens))
    c = generation_check(full_llm, args, folder, serving, ids)
    L = full_llm.engine.args.num_layers
    return {"verify_prompts": len(ids), "verify_tokens": c.tokens, "generation_agreement": round(c.agreement, 4),
            "generation_mean_layers": round(c.mean_layers, 3), "generation_layer_share": round(c.mean_layers / L, 4),
            "full_tok_s": round(n_full / t_full, 1), "ee_tok_s": round(c.tok_s, 1),
            "speedup": round(c.tok_s / (n_full / t_full), 3)}
