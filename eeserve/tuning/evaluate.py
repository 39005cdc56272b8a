"""Per-exit quality of exit heads on held-out text (``eeserve eval-exits``).

For every exit point: top-1 agreement with the final layer, KL(final || exit) over the full
vocabulary, and expected calibration error (ECE, 10 equal-width bins; Guo et al. 2017) of the
confidence as a predictor of that agreement: the max softmax probability, and for heads with a
classifier the classifier's probability.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from eeserve.model.exit_heads import ExitHeads
from eeserve.model.kv_cache import KVCache
from eeserve.model.llama import LlamaModel
from eeserve.tuning.data import Window
from eeserve.tuning.distill import BLOCK, _pack
from eeserve.worker.forward import teacher_forced


@dataclass(frozen=True)
class ExitScores:
    """Per loss row and exit point (N rows, X exits).

    Attributes:
        exit_layers: the X exit points.
        softmax: [N, X] max probability of the exit head.
        classifier: [N, X] classifier probability, or None.
        correct: [N, X] bool, exit top-1 == final top-1.
        kl: [N, X] KL(final || exit), nats.
        seq: [N] int64 index of the window each row belongs to.
    """

    exit_layers: tuple[int, ...]
    softmax: torch.Tensor
    classifier: torch.Tensor | None
    correct: torch.Tensor
    kl: torch.Tensor
    seq: torch.Tensor


@torch.no_grad()
def score_windows(model: LlamaModel, heads: ExitHeads, windows: Sequence[Window], batch_tokens: int = 1024) -> ExitScores:
    """Run the backbone over ``windows`` and score every exit head on the loss rows."""
    L = model.args.num_layers
    exits = heads.exit_layers
    out: dict[str, list[torch.Tensor]] = {"sm": [], "cls": [], "ok": [], "kl": [], "seq": []}
    batches, cur, n = [], [], 0
    for i, w in enumerate(windows):
        if cur and n + w.token_ids.numel() > batch_tokens:
            batches.append(cur)
            cur, n = [], 0
        cur.append((i, w))
        n += w.token_ids.numel()
    if cur:
        batches.append(cur)
    nblocks = max(sum(-(-w.token_ids.numel() // BLOCK) for _, w in b) for b in batches)
    kv = KVCache(L, nblocks, BLOCK, model.args.num_kv_heads, model.args.head_dim, model.dtype, model.device)
    for b in batches:
        ids, meta, rows = _pack(model, [w for _, w in b], kv)
        seq = torch.cat([torch.full((w.num_loss_rows,), i, dtype=torch.long) for i, w in b])
        res = teacher_forced(model, kv, ids, meta, rows, tuple(exits))
        at = res.at_stops  # per exit [N, H]
        final = torch.log_softmax(model.compute_logits(res.final), -1)  # [N, V]
        top = final.argmax(-1)
        sm, cls, ok, kl = [], [], [], []
        for e, he in zip(exits, at):
            head = heads[e]
            lp = torch.log_softmax(head.logits(model, he), -1)  # [N, V]
            sm.append(lp.max(-1).values.exp())
            ok.append(lp.argmax(-1) == top)
            kl.append((final.exp() * (final - lp)).sum(-1))
            if heads.spec.classifier:
                cls.append(head.classifier_prob(he, model))
        out["sm"].append(torch.stack(sm, 1))
        out["ok"].append(torch.stack(ok, 1))
        out["kl"].append(torch.stack(kl, 1))
        if cls:
            out["cls"].append(torch.stack(cls, 1))
        out["seq"].append(seq)
    return ExitScores(tuple(exits), torch.cat(out["sm"]).cpu(), torch.cat(out["cls"]).cpu() if out["cls"] else None,
                      torch.cat(out["ok"]).cpu(), torch.cat(out["kl"]).cpu(), torch.cat(out["seq"]))


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, bins: int = 10) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the
    bin's share of rows. conf, correct: [N]."""
    conf = conf.float()
    correct = correct.float()
    idx = torch.clamp((conf * bins).long(), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += float(m.float().mean()) * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return ece


def exit_table(scores: ExitScores) -> list[dict]:
    """One row per exit point: agreement, mean KL, ECE (softmax, classifier)."""
    rows = []
    for i, e in enumerate(scores.exit_layers):
        ok = scores.correct[:, i]
        rows.append({
            "exit": e,
            "agreement": float(ok.float().mean()),
            "kl": float(scores.kl[:, i].mean()),
            "ece_softmax": expected_calibration_error(scores.softmax[:, i], ok),
            "ece_classifier": (expected_calibration_error(scores.classifier[:, i], ok)
                               if scores.classifier is not None else None),
        })
    return rows


def heldout_windows(llm, num_prompts: int, max_tokens: int, pydoc_tokens: int, seed: int = 0, window: int = 128,
                    heldout: float = 0.1, cache: Path | None = None) -> list[Window]:
    """Held-out text: the model's answers to ``test`` prompts (never used in tuning) and pydoc
    windows from the held-out part of ``eeserve tune``'s split (same seed, window, fraction)."""
    from eeserve.tuning import data

    tok = llm.tokenizer
    cache_file = cache / f"answers_test{num_prompts}_{max_tokens}.jsonl" if cache else None
    docs = data.generate_answers(llm, data.load_prompts("test")[:num_prompts], max_tokens, cache_file)
    ans = data.tokenize_documents(docs, lambda s: tok.encode(s, add_special_tokens=False), 4096)
    wins = data.tokenize_documents(data.pydoc_documents(), lambda s: tok.encode(s, add_special_tokens=False), window)
    _, held = data.split_windows(wins, heldout, seed)
    return ans + data.limit_tokens(held, pydoc_tokens, seed)


def run_eval(args) -> int:
    from eeserve.early_exit.defaults import shipped_heads
    from eeserve.model import loader
    from eeserve.tuning.backbone import load_llm

    t0 = time.perf_counter()
    folder = args.exit_heads or shipped_heads(args.model)
    if folder is None:
        raise ValueError(f"no tuned heads shipped for {args.model!r}: pass --exit-heads DIR")
    llm = load_llm(args.model)
    model = llm.engine.model
    tuned = ExitHeads.load(Path(folder), model, loader.model_identity(llm.engine.model_files), args.exit_layers)
    shared = ExitHeads(tuned.exit_layers, "shared", model)
    wins = heldout_windows(llm, args.num_prompts, args.max_tokens, args.pydoc_tokens,
                           cache=Path(args.cache) if args.cache else None)
    n = sum(w.num_loss_rows for w in wins)
    print(f"held-out: {len(wins)} windows, {n} tokens (answers to {args.num_prompts} test prompts + held-out pydoc)")
    s_shared = exit_table(score_windows(model, shared, wins))
    s_tuned = exit_table(score_windows(model, tuned, wins))
    print(format_eval_table(s_shared, s_tuned))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


def format_eval_table(shared: list[dict], tuned: list[dict]) -> str:
    """Markdown table: shared vs tuned per exit."""
    header = ("| exit | agreement shared | agreement tuned | KL shared | KL tuned | ECE softmax shared | "
              "ECE softmax tuned | ECE classifier tuned |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for s, t in zip(shared, tuned):
        cls = f"{t['ece_classifier']:.3f}" if t["ece_classifier"] is not None else "-"
        lines.append(f"| {s['exit']} | {s['agreement']:.3f} | {t['agreement']:.3f} | {s['kl']:.2f} | {t['kl']:.2f} | "
                     f"{s['ece_softmax']:.3f} | {t['ece_softmax']:.3f} | {cls} |")
    return "\n".join(lines)


@torch.no_grad()
def _full_argmax(model: LlamaModel, window: Window) -> torch.Tensor:
    """Full-depth greedy pick at the loss rows of one window: [num_loss_rows] int64."""
    n = window.token_ids.numel()
    kv = KVCache(model.args.num_layers, -(-n // BLOCK), BLOCK, model.args.num_kv_heads, model.args.head_dim,
                 model.dtype, model.device)
    ids, meta, rows = _pack(model, [window], kv)
    return model.compute_logits(teacher_forced(model, kv, ids, meta, rows).final).argmax(-1).cpu()
