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
   real early-exit greedy generation on the same ``calib`` prompts, and docs/design.md's token
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

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from eeserve.early_exit.defaults import serving_settings
from eeserve.early_exit.drafts import NEVER, simulate_verified, verified_step_costs
from eeserve.tuning import report
from eeserve.tuning.cost_model import check_flops, draft_head_flops, expected_flops
from eeserve.tuning.search import (
    GenerationCheck,
    choose_thresholds,
    fixed_sequence_test,
    generation_test,
    global_path,
    greedy_path,
    settings_to_test,
    simulate,
)

TIME_TOLERANCE = 0.01  # --verify-exits: modeled times this close to the least count as equal


def enabled_exits(thresholds: Sequence[float], exit_layers: Sequence[int]) -> tuple[list[int], list[float]]:
    """The exit points a setting uses and their thresholds (``NEVER`` ones dropped); when none is
    enabled, the last exit with ``NEVER`` (exits nothing, output equals full depth)."""
    pairs = [(e, t) for e, t in zip(exit_layers, thresholds) if t < NEVER]
    if not pairs:
        pairs = [(exit_layers[-1], NEVER)]
    return [e for e, _ in pairs], [round(t, 6) for _, t in pairs]


def run_calibration(args) -> int:
    """``eeserve calibrate``: score, choose along a path by generation, check on test prompts,
    write exit_config.json."""
    from eeserve.model import loader
    from eeserve.model.exit_heads import ExitHeads
    from eeserve.tuning import data
    from eeserve.tuning.backbone import load_llm
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
    report.teacher_forced_table(rows, target, how, margs.full_depth_flops())
    best = min(rows, key=lambda r: r["flops"])
    result = {"target_agreement": target, "delta": args.delta, "calib_tokens": int(scores.correct.shape[0]),
              "confidence": best["confidence"], "per_exit": best["per_exit"]}
    thr = best["thresholds"]
    if by_generation:
        settings = settings_to_test(best["path"], best["conf"], scores.correct, exits, L, target)
        calib_ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in calib_prompts]

        def run(t: tuple[float, ...]) -> GenerationCheck:
            c = generation_check(llm, args, folder, _serving(t, exits, best["confidence"], args.kv_fill), calib_ids)
            report.generation_line(len(calib_ids), t, c)
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

    from eeserve.worker.flops import CostModel

    margs = llm.engine.args
    exits, L = heads.exit_layers, margs.num_layers
    cm = CostModel(margs)
    best = None
    report.verified_header()
    for m in measures:
        conf = scores.classifier if m == "classifier" else scores.softmax
        # as the engine counts them: the check, and a draft's logits unless the check made them
        check = check_flops(cm, heads[exits[0]], m)
        exit_head = [draft_head_flops(cm, heads[e], m, verify_exits=True) for e in exits]
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
            report.verified_row(m, path[k], outs[k], chosen=k == i)
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


def _serving(thresholds: Sequence[float], exit_layers: Sequence[int], confidence: str, kv_fill: str,
             verify_exits: bool = False) -> dict:
    """The ``serving`` part of exit_config.json for a setting (only its enabled exits). With none
    enabled, exit policy ``none``: ``NEVER`` is outside every measure's threshold range, which
    ``EarlyExitConfig`` refuses."""
    used, used_thr = enabled_exits(thresholds, exit_layers)
    out = serving_settings(exit_layers=used, exit_policy="token", confidence=confidence, threshold=used_thr,
                           kv_fill=kv_fill, min_exit_layer=used[0])
    if all(t >= NEVER for t in used_thr):
        out["exit_policy"] = "none"
        del out["threshold"]
    if verify_exits:
        out["verify_exits"] = True
    return out


def token_agreement(model, prompts: Sequence[list[int]], outputs: Sequence[list[int]]) -> tuple[int, int]:
    """docs/design.md's token agreement as counts: the outputs teacher-forced through the full-depth
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
