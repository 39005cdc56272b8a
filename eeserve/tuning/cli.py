"""``eeserve tune``, ``eeserve calibrate`` and ``eeserve eval-exits``."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from eeserve.config import DTYPES
from eeserve.entrypoints.cli_args import _float_in, _int_at_least, _int_list
from eeserve.tuning.backbone import load_llm

DEFAULT_EXITS = (4, 6, 8, 12, 16)
CLASSIFIER_FEATURES = ("logits", "hidden", "hidden+logits")
_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


_PROBABILITY = _float_in(0.0, 1.0)


def add_commands(sub) -> None:
    """Register the tuning commands on the ``eeserve`` sub-parser."""
    t = sub.add_parser("tune", help="train exit heads (+ classifier) by distillation, backbone frozen")
    t.add_argument("--model", default="smollm2-135m", help="alias, .gguf file or HF folder (default smollm2-135m)")
    t.add_argument("--exit-layers", type=_int_list, default=DEFAULT_EXITS,
                   help="exit points, each in 1..L-1 (default 4,6,8,12,16)")
    t.add_argument("--head", choices=("adapter", "mlp", "untied"), default="mlp", help="head type (default mlp)")
    t.add_argument("--head-hidden", type=_POSITIVE, default=512, help="hidden size of mlp heads (default 512)")
    t.add_argument("--no-classifier", action="store_true", help="train no classifier confidence head")
    t.add_argument("--classifier-hidden", type=_NON_NEGATIVE, default=0,
                   help="hidden size of the classifier MLP; 0 for a linear probe (default 0)")
    t.add_argument("--classifier-vocab", type=_NON_NEGATIVE, default=1024,
                   help="candidate ids whose exit-head logits feed the classifier; 0 for none (default 1024)")
    t.add_argument("--classifier-features", choices=CLASSIFIER_FEATURES, default="logits",
                   help="the classifier's input: statistics of the candidate logits (default), the hidden "
                        "state, or both")
    t.add_argument("--classifier-rows", type=_POSITIVE, default=20000,
                   help="training rows labelled for the classifiers (default 20000)")
    t.add_argument("--classifier-steps", type=_POSITIVE, default=400, help="classifier steps per exit (default 400)")
    t.add_argument("--data", nargs="+", default=["builtin"],
                   help="text (.txt) or JSONL files, or builtin / builtin:pydoc / builtin:answers (default builtin)")
    t.add_argument("--out", required=True, help="output folder (heads, config, loss curve, checkpoint)")
    t.add_argument("--steps", type=_POSITIVE, default=400, help="Adam steps on the heads (default 400)")
    t.add_argument("--batch-rows", type=_POSITIVE, default=512, help="tokens per step (default 512)")
    t.add_argument("--lr", type=_float_in(0.0, 1.0), default=3e-3, help="peak learning rate (default 0.003)")
    t.add_argument("--ce-weight", type=_float_in(0.0, 100.0, low_open=False), default=0.5,
                   help="weight of CE to the final layer's argmax, >= 0 (default 0.5)")
    t.add_argument("--window", type=_int_at_least(8), default=128, help="tokens per training sequence (default 128)")
    t.add_argument("--max-train-tokens", type=_NON_NEGATIVE, default=16000,
                   help="cap on text tokens besides answers; 0 for no cap (default 16000)")
    t.add_argument("--answer-tokens", type=_POSITIVE, default=96,
                   help="max tokens of each self-generated answer (default 96)")
    t.add_argument("--answer-samples", type=_NON_NEGATIVE, default=3,
                   help="sampled answers per prompt besides the greedy one (default 3)")
    t.add_argument("--answer-temperature", type=_float_in(0.0, 2.0, high_open=False), default=0.8,
                   help="temperature of the sampled answers, in (0, 2] (default 0.8)")
    t.add_argument("--heldout", type=_PROBABILITY, default=0.1,
                   help="held-out fraction of the windows, in (0, 1); they fit the classifiers (default 0.1)")
    t.add_argument("--seed", type=int, default=0, help="data split, sampling and initialisation seed (default 0)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--dtype", default="float32", choices=DTYPES, help="backbone dtype (default float32)")
    t.set_defaults(func=cmd_tune)

    c = sub.add_parser("calibrate", help="choose exit thresholds for a target token agreement")
    c.add_argument("--model", default="smollm2-135m", help="alias, .gguf file or HF folder (default smollm2-135m)")
    c.add_argument("--exit-heads", required=True, help="heads folder (from eeserve tune)")
    c.add_argument("--target-agreement", type=_float_in(0.0, 1.0, high_open=False), default=0.95,
                   help="token agreement to reach, in (0, 1] (default 0.95)")
    c.add_argument("--delta", type=_PROBABILITY, default=0.1,
                   help="error rate of the agreement bound (Learn-then-Test), in (0, 1) (default 0.1)")
    c.add_argument("--per-exit", action=argparse_bool(), default=True, help="per-exit thresholds (default) or one global")
    c.add_argument("--confidence", choices=("auto", "classifier", "softmax"), default="auto",
                   help="confidence measure; auto picks the one with fewer expected FLOPs (default auto)")
    c.add_argument("--kv-fill", choices=("propagate", "recompute"), default="recompute",
                   help="KV fill written into the serving settings and used in generation (default recompute)")
    c.add_argument("--num-prompts", type=_POSITIVE, default=50,
                   help="test prompts for the final generation check (default 50)")
    c.add_argument("--max-tokens", type=_POSITIVE, default=64, help="greedy tokens per answer (default 64)")
    c.add_argument("--ladder-steps", type=_POSITIVE, default=200,
                   help="candidate thresholds per exit on the per-exit path (default 200)")
    c.add_argument("--no-verify", action="store_true",
                   help="no generation: choose on teacher-forced scores alone (split in halves, bound on one)")
    c.add_argument("--verify-exits", action="store_true",
                   help="serve with verify_exits (output equal to full depth): choose the threshold with the least "
                        "modeled time per token instead of one for --target-agreement; needs --kv-fill recompute")
    c.add_argument("--max-draft-tokens", type=_NON_NEGATIVE, default=1,
                   help="with --verify-exits: most unverified drafts per sequence, modeled and written into the "
                        "serving settings; 0 = no limit (default 1)")
    c.add_argument("--cache", default=None, help="folder to cache the full-depth answers in (default: none)")
    c.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    c.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("eval-exits", help="per-exit agreement, KL and calibration error on held-out text")
    ev.add_argument("--model", default="smollm2-135m", help="alias, .gguf file or HF folder (default smollm2-135m)")
    ev.add_argument("--exit-heads", default=None, help="tuned heads folder (default: the shipped one)")
    ev.add_argument("--exit-layers", type=_int_list, default=None, help="exit points (default: the heads')")
    ev.add_argument("--num-prompts", type=_POSITIVE, default=50, help="test prompts answered (default 50)")
    ev.add_argument("--max-tokens", type=_POSITIVE, default=64, help="greedy tokens per answer (default 64)")
    ev.add_argument("--cache", default=None, help="folder to cache the full-depth answers in (default: none)")
    ev.add_argument("--pydoc-tokens", type=_NON_NEGATIVE, default=2000, help="held-out pydoc tokens (default 2000)")
    ev.set_defaults(func=cmd_eval_exits)


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def builtin_windows(llm, sources: list[str], window: int, answer_tokens: int, max_tokens: int, seed: int,
                    cache_dir: Path | None, prompt_split: str = "train", answer_samples: int = 0,
                    answer_temperature: float = 0.8):
    """Windows of the requested sources (see ``eeserve.tuning.data``).

    Raises:
        ValueError / FileNotFoundError: empty or unreadable data.
    """
    from eeserve.tuning import data

    tok = llm.tokenizer

    def encode(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    text_docs, answer_docs = [], []
    for src in sources:
        if src in ("builtin", "builtin:pydoc"):
            text_docs.extend(data.pydoc_documents())
        if src in ("builtin", "builtin:answers"):
            prompts = data.load_prompts(prompt_split)
            cache = cache_dir / f"answers_{prompt_split}.jsonl" if cache_dir else None
            answer_docs.extend(data.generate_answers(llm, prompts, answer_tokens, cache, answer_samples,
                                                     answer_temperature, seed))
        if src not in data.BUILTIN_SOURCES:
            text_docs.extend(data.read_documents(src))
    wins = data.tokenize_documents(text_docs, encode, window)
    if max_tokens > 0:
        wins = data.limit_tokens(wins, max_tokens, seed)
    return wins + data.tokenize_documents(answer_docs, encode, window)


def cmd_tune(args) -> int:
    import torch

    from eeserve.model import loader
    from eeserve.model.exit_heads import ExitHeads
    from eeserve.tuning import data, distill

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a folder (it is created if missing)")
    if args.resume and not (out / "checkpoint.pt").is_file():
        raise ValueError(f"--resume: {str(out / 'checkpoint.pt')!r} does not exist; run without --resume to start afresh")
    for src in args.data:
        if src.startswith("builtin") and src not in data.BUILTIN_SOURCES:
            raise ValueError(f"--data {src!r}: the built-in sources are {', '.join(data.BUILTIN_SOURCES)}")
        if src not in data.BUILTIN_SOURCES and not Path(src).is_file():
            raise FileNotFoundError(f"--data file {src!r} does not exist")
    t_start = time.perf_counter()
    llm = load_llm(args.model, args.dtype)
    model = llm.engine.model
    try:
        distill.check_exit_layers(args.exit_layers, model.args.num_layers)  # before any work
    except ValueError as err:
        raise ValueError(f"--exit-layers: {err}") from None
    if args.classifier_vocab and not 2 <= args.classifier_vocab <= model.args.vocab_size:
        raise ValueError(f"--classifier-vocab must be 0 or in 2..{model.args.vocab_size}, got {args.classifier_vocab}")
    if "logits" in args.classifier_features and not args.classifier_vocab and not args.no_classifier:
        raise ValueError(f"--classifier-features {args.classifier_features} needs candidate logits: "
                         f"--classifier-vocab must be in 2..{model.args.vocab_size}, got 0")
    torch.manual_seed(args.seed)
    wins = builtin_windows(llm, args.data, args.window, args.answer_tokens, args.max_train_tokens, args.seed, out,
                           answer_samples=args.answer_samples, answer_temperature=args.answer_temperature)
    train_w, held_w = data.split_windows(wins, args.heldout, args.seed)
    n_train = sum(w.num_loss_rows for w in train_w)
    print(f"data: {len(train_w)} training windows ({n_train} loss tokens), {len(held_w)} held out; "
          f"{time.perf_counter() - t_start:.0f} s so far")
    feats = distill.collect_features(model, train_w, args.exit_layers, progress=True)
    held = distill.collect_features(model, held_w, args.exit_layers, progress=True)
    print(f"features: {time.perf_counter() - t_start:.0f} s so far")
    heads = ExitHeads(tuple(args.exit_layers), args.head, model, classifier=not args.no_classifier,
                      head_hidden=args.head_hidden, classifier_hidden=args.classifier_hidden,
                      classifier_vocab=args.classifier_vocab if "logits" in args.classifier_features else 0,
                      classifier_hidden_state="hidden" in args.classifier_features)
    cfg = distill.TrainConfig(steps=args.steps, batch_rows=args.batch_rows, lr=args.lr, ce_weight=args.ce_weight,
                              seed=args.seed)
    log = distill.train_heads(model, heads, feats, held, cfg, out / "checkpoint.pt", args.resume, progress=True)
    distill.plot_losses(log, args.exit_layers, out / "loss_curve.png")
    label_share = None
    if heads.spec.classifier:
        ccfg = distill.ClassifierConfig(rows=args.classifier_rows, steps=args.classifier_steps, seed=args.seed)
        distill.choose_candidates(model, heads, feats)
        # fitted on the held-out rows: on their own training rows the heads look better than they are
        label_share = distill.fit_classifiers(model, heads, held, ccfg, progress=True)
    serving = {"exit_policy": "token", "confidence": "classifier" if heads.spec.classifier else "softmax",
               "kv_fill": "propagate", "threshold": 0.9, "min_exit_layer": min(args.exit_layers)}
    extra = {"tuning": {"data": args.data, "steps": args.steps, "batch_rows": args.batch_rows, "lr": args.lr,
                        "ce_weight": args.ce_weight, "window": args.window, "seed": args.seed,
                        "classifier_features": args.classifier_features,
                        "answer_tokens": args.answer_tokens, "answer_samples": args.answer_samples,
                        "answer_temperature": args.answer_temperature,
                        "train_tokens": n_train, "heldout_kl": log.heldout[-1][1] if log.heldout else None,
                        "heldout_agreement_at_exits": [round(v, 4) for v in label_share] if label_share else None,
                        "train_seconds": round(log.seconds, 1),
                        "total_seconds": round(time.perf_counter() - t_start, 1)}}
    # fp16 on disk (half the size); ExitHeads.load converts to the model's dtype
    copy.deepcopy(heads).half().save(out, loader.model_identity(llm.engine.model_files), serving, extra)
    print(f"wrote {out}/exit_heads.safetensors, exit_config.json, loss_curve.png "
          f"({time.perf_counter() - t_start:.0f} s in all); held-out KL per exit: "
          + ", ".join(f"{e}: {k:.3f}" for e, k in zip(args.exit_layers, log.heldout[-1][1] if log.heldout else [])))
    return 0


def check_folders(args) -> None:
    """``--cache`` must be a folder (or not exist yet), ``--exit-heads`` a heads folder: checked
    before the model loads.

    Raises:
        ValueError / FileNotFoundError: naming the flag.
    """
    if args.cache and Path(args.cache).exists() and not Path(args.cache).is_dir():
        raise ValueError(f"--cache {args.cache!r} is a file; give a folder (it is created if missing)")
    if args.exit_heads and not (Path(args.exit_heads) / "exit_config.json").is_file():
        raise FileNotFoundError(f"--exit-heads {args.exit_heads!r} is not a heads folder (no exit_config.json in it; "
                                f"make one with eeserve tune --out DIR)")


def cmd_calibrate(args) -> int:
    from eeserve.tuning.calibrate import run_calibration

    check_folders(args)
    if args.verify_exits and args.kv_fill != "recompute":
        raise ValueError(f"--verify-exits needs --kv-fill recompute (exits are verified by the deferred pass over "
                         f"their skipped layers), got --kv-fill {args.kv_fill}")
    if args.verify_exits and args.no_verify:
        raise ValueError("--verify-exits chooses by a cost model and checks on test prompts; it cannot be combined "
                         "with --no-verify")
    return run_calibration(args)


def cmd_eval_exits(args) -> int:
    from eeserve.tuning.evaluate import run_eval

    check_folders(args)
    return run_eval(args)

