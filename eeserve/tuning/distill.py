"""Exit-head distillation with the backbone frozen (EE-Tuning, Pan et al. 2024, arXiv 2402.00518).

1. ``collect_features``: the frozen backbone runs once over every window (``run_layers`` over a
   scratch paged cache); the residual stream at each exit point, the final normed hidden state and
   the teacher's top-k ids are kept in memory (fp16 / int32).
2. ``train_heads``: Adam on the heads only. Per step, a batch of rows and a sub-vocabulary: the
   union of the teacher's top-k ids of those rows plus random ids. Teacher and student logits on
   that sub-vocabulary, each renormalised over it, give the loss
   ``KL(teacher || exit)`` (temperature 1) ``+ ce_weight * CE(exit, teacher argmax)``.
   The full vocabulary (V=49152 for the default model) would cost ~10x more per step; the
   teacher's mass outside its top-k of the batch is tiny for a distilled head.
3. ``fit_classifiers``: with the heads trained and frozen, each exit's classifier probe (CALM's
   early-exit classifier, Schuster et al. 2022, arXiv 2207.07061, section 3.5) is fitted with BCE
   on exact labels, "argmax of the exit head over the full vocabulary == the teacher's top-1", on
   rows the heads were not trained on (the held-out windows).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from eeserve.model.attention import SeqAttention, build_attention_metadata
from eeserve.model.exit_heads import ExitHeads
from eeserve.model.kv_cache import KVCache
from eeserve.model.llama import LlamaModel
from eeserve.tuning.data import Window
from eeserve.worker.forward import teacher_forced

BLOCK = 16


@dataclass
class Features:
    """What the frozen backbone produced for the loss rows of a set of windows.

    Attributes:
        exit_layers: the exit points, in the order of ``hidden``'s second axis.
        hidden: [N, X, H] float16 residual stream after e layers, per exit point.
        final: [N, H] float16 final normed hidden state (teacher logits = ``model.lm_head(final)``).
        top_ids: [N, k] int64 teacher's top-k ids (full vocabulary), best first.
    """

    exit_layers: tuple[int, ...]
    hidden: torch.Tensor
    final: torch.Tensor
    top_ids: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.final.shape[0])


def _pack(model: LlamaModel, windows: Sequence[Window], kv: KVCache):
    """Rows, attention layout and loss rows of a batch of windows (each its own sequence)."""
    device = model.device
    seqs, ids, loss_rows, row0, block0 = [], [], [], 0, 0
    for w in windows:
        n = w.token_ids.numel()
        nb = -(-n // BLOCK)
        slots = torch.tensor(kv.slots(list(range(block0, block0 + nb)), 0, n), dtype=torch.long, device=device)
        seqs.append(SeqAttention(torch.arange(row0, row0 + n, device=device), torch.arange(n, device=device), slots))
        ids.append(w.token_ids)
        loss_rows.extend(range(row0 + max(0, w.first_target - 1), row0 + n))
        row0, block0 = row0 + n, block0 + nb
    slot_mapping = torch.cat([s.kv_slots for s in seqs])
    meta = build_attention_metadata(seqs, row0, slot_mapping, kv.pad_slot)
    return torch.cat(ids).to(device), meta, torch.tensor(loss_rows, dtype=torch.long, device=device)


@torch.no_grad()
def collect_features(model: LlamaModel, windows: Sequence[Window], exit_layers: Sequence[int], top_k: int = 32,
                     batch_tokens: int = 2048, progress: bool = False) -> Features:
    """Run the frozen backbone once over ``windows`` and keep what distillation needs.

    Args:
        exit_layers: exit points, each in 1..L-1.
        top_k: teacher ids kept per row.
        batch_tokens: tokens per backbone pass.

    Raises:
        ValueError: no windows, or an exit layer outside 1..L-1.
    """
    L = model.args.num_layers
    check_exit_layers(exit_layers, L)
    if not windows:
        raise ValueError("no windows to collect features from")
    max_len = max(w.token_ids.numel() for w in windows)
    batch_tokens = max(batch_tokens, max_len)
    batches, cur, n = [], [], 0
    for w in windows:
        if cur and n + w.token_ids.numel() > batch_tokens:
            batches.append(cur)
            cur, n = [], 0
        cur.append(w)
        n += w.token_ids.numel()
    batches.append(cur)
    kv = KVCache(L, max(sum(-(-w.token_ids.numel() // BLOCK) for w in b) for b in batches), BLOCK,
                 model.args.num_kv_heads, model.args.head_dim, model.dtype, model.device)
    hidden, final, top = [], [], []
    bar = _bar(len(batches), "backbone", progress)
    for b in batches:
        ids, meta, rows = _pack(model, b, kv)
        res = teacher_forced(model, kv, ids, meta, rows, tuple(exit_layers))
        at_exit = [he.half() for he in res.at_stops]  # per exit [N, H]
        x = model.final_norm(res.final)  # [N, H]
        for i in range(0, x.shape[0], 512):  # full-vocabulary teacher logits in pieces
            top.append(model.lm_head(x[i : i + 512]).topk(top_k, dim=-1).indices)
        hidden.append(torch.stack(at_exit, dim=1))  # [N, X, H]
        final.append(x.half())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return Features(tuple(exit_layers), torch.cat(hidden), torch.cat(final), torch.cat(top))


def check_exit_layers(exit_layers: Sequence[int], num_layers: int) -> None:
    """Raises ValueError unless the exit layers are strictly increasing and in 1..L-1."""
    if not exit_layers:
        raise ValueError("give at least one exit layer (--exit-layers 12,16,20,24)")
    bad = [e for e in exit_layers if not 1 <= e < num_layers]
    if bad:
        raise ValueError(f"exit layers must be in 1..{num_layers - 1} for this {num_layers}-layer model, got {bad}")
    if list(exit_layers) != sorted(set(exit_layers)):
        raise ValueError(f"exit layers must be strictly increasing, got {list(exit_layers)}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of ``train_heads``.

    Attributes:
        steps: Adam steps.
        batch_rows: rows (tokens) per step.
        lr: peak learning rate (cosine decay to 10% after a 5% warm-up).
        union_k: teacher top-k ids per row that join the step's sub-vocabulary.
        negatives: random ids added to the sub-vocabulary.
        ce_weight: weight of CE to the teacher's argmax.
        eval_every: steps between held-out losses.
        ckpt_every: steps between checkpoints.
        seed: sampling and initialisation seed.
    """

    steps: int = 300
    batch_rows: int = 512
    lr: float = 2e-3
    union_k: int = 16
    negatives: int = 512
    ce_weight: float = 0.0
    eval_every: int = 50
    ckpt_every: int = 100
    seed: int = 0


@dataclass
class TrainLog:
    """Loss history. ``train``: (step, mean KL over exits); ``heldout``: (step, [KL per exit])."""

    train: list[tuple[int, float]] = field(default_factory=list)
    heldout: list[tuple[int, list[float]]] = field(default_factory=list)
    seconds: float = 0.0


def distill_loss(model: LlamaModel, heads: ExitHeads, feats: Features, rows: torch.Tensor, vocab: torch.Tensor,
                 ce_weight: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """Loss of a batch of rows on a sub-vocabulary.

    Args:
        rows: [B] int64 rows of ``feats``.
        vocab: [U] int64 ids (must hold the teacher's top-1 of every row when ``ce_weight`` > 0).

    Returns:
        (scalar loss to minimise, KL per exit point as floats).
    """
    dtype = model.dtype
    w_t = model.lm_head_w[vocab].t()  # [H, U]
    teacher = torch.log_softmax((feats.final[rows].to(dtype) @ w_t).float(), dim=-1)  # [B, U]
    p_t = teacher.exp()
    t_top = teacher.argmax(-1)  # [B]
    total = torch.zeros((), dtype=torch.float32)
    kls = []
    for i, e in enumerate(feats.exit_layers):
        head = heads[e]
        h = feats.hidden[rows, i].to(dtype)  # [B, H]
        w = w_t if head.spec.head_type != "untied" else head.lm_head_w[vocab].t()
        student = torch.log_softmax((head.normed(model, h) @ w).float(), dim=-1)  # [B, U]
        kl = (p_t * (teacher - student)).sum(-1).mean()
        loss = kl
        if ce_weight:
            loss = loss + ce_weight * F.nll_loss(student, t_top)
        total = total + loss
        kls.append(float(kl.detach()))
    return total, kls


def _sub_vocab(feats: Features, rows: torch.Tensor, union_k: int, negatives: int, vocab_size: int,
               gen: torch.Generator) -> torch.Tensor:
    ids = feats.top_ids[rows, :union_k].flatten()
    if negatives:
        ids = torch.cat([ids, torch.randint(0, vocab_size, (negatives,), generator=gen)])
    return torch.unique(ids)


def heldout_kl(model: LlamaModel, heads: ExitHeads, feats: Features, cfg: TrainConfig, max_rows: int = 2048) -> list[float]:
    """Mean KL per exit on (up to ``max_rows``) held-out rows, on fixed sub-vocabularies."""
    gen = torch.Generator().manual_seed(1234)
    n = min(feats.num_rows, max_rows)
    sums = [0.0] * len(feats.exit_layers)
    with torch.no_grad():
        for i in range(0, n, cfg.batch_rows):
            rows = torch.arange(i, min(n, i + cfg.batch_rows))
            vocab = _sub_vocab(feats, rows, cfg.union_k, cfg.negatives, model.args.vocab_size, gen)
            _, kls = distill_loss(model, heads, feats, rows, vocab)
            sums = [s + k * rows.numel() for s, k in zip(sums, kls)]
    return [s / n for s in sums]


def _lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_heads(model: LlamaModel, heads: ExitHeads, train: Features, heldout: Features | None, cfg: TrainConfig,
                checkpoint: Path | None = None, resume: bool = False, progress: bool = False,
                stop_after: int | None = None) -> TrainLog:
    """Adam on the heads (not their classifiers: ``fit_classifiers``); the backbone stays frozen.

    Args:
        checkpoint: file for periodic checkpoints (heads, optimiser, log, step).
        resume: continue from ``checkpoint`` when it exists.
        stop_after: stop (checkpointed) after this many steps in this call; resume later.

    Returns:
        the loss history.
    """
    heads.requires_grad_(True)
    for e in heads.exit_layers:
        if heads[e].classifier is not None:
            heads[e].classifier.requires_grad_(False)
    opt = torch.optim.Adam([p for p in heads.parameters() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    log, start = TrainLog(), 0
    if resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        _check_checkpoint(state, heads, cfg, checkpoint)
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        log, start = state["log"], state["step"]
    bar = _bar(cfg.steps, "tune", progress)
    if bar is not None:
        bar.update(start)
    t0 = time.perf_counter() - log.seconds
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        rows = torch.randint(0, train.num_rows, (min(cfg.batch_rows, train.num_rows),), generator=gen)
        vocab = _sub_vocab(train, rows, cfg.union_k, cfg.negatives, model.args.vocab_size, gen)
        loss, kls = distill_loss(model, heads, train, rows, vocab, cfg.ce_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.train.append((step + 1, sum(kls) / len(kls)))
        if heldout is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            log.heldout.append((step + 1, heldout_kl(model, heads, heldout, cfg)))
        log.seconds = time.perf_counter() - t0
        if checkpoint is not None and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == end):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"heads": heads.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "log": log, "step": step + 1, "exit_layers": list(heads.exit_layers),
                        "head_type": heads.spec.head_type, "steps": cfg.steps}, checkpoint)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"kl {log.train[-1][1]:.3f}")
    if bar is not None:
        bar.close()
    heads.requires_grad_(False)
    return log


@dataclass(frozen=True)
class ClassifierConfig:
    """Hyper-parameters of ``fit_classifiers``.

    Attributes:
        rows: training rows labelled (a seeded subset; labels cost one full LM head per row and exit).
        steps: AdamW steps per exit point.
        batch_rows: rows per step.
        lr: learning rate.
        weight_decay: AdamW weight decay.
        seed: subset, initialisation and batch seed.
    """

    rows: int = 20000
    steps: int = 400
    batch_rows: int = 2048
    lr: float = 2e-3
    weight_decay: float = 0.1
    seed: int = 0


@torch.no_grad()
def exit_labels(model: LlamaModel, heads: ExitHeads, feats: Features, rows: torch.Tensor,
                chunk: int = 1024) -> torch.Tensor:
    """[len(rows), X] bool: the exit head's top-1 over the full vocabulary equals the teacher's."""
    out = torch.zeros(rows.numel(), len(feats.exit_layers), dtype=torch.bool)
    teacher = feats.top_ids[rows, 0]
    for i, e in enumerate(feats.exit_layers):
        head = heads[e]
        for s in range(0, rows.numel(), chunk):
            h = feats.hidden[rows[s : s + chunk], i].to(model.dtype)
            out[s : s + chunk, i] = head.logits(model, h).argmax(-1).cpu() == teacher[s : s + chunk].cpu()
    return out


def choose_candidates(model: LlamaModel, heads: ExitHeads, feats: Features) -> None:
    """Give every head the ``classifier_vocab`` ids most often predicted by the final layer in
    ``feats`` as the candidates whose logits feed its probe (no-op without candidate logits)."""
    if not heads.spec.classifier_vocab:
        return
    counts = torch.bincount(feats.top_ids[:, 0].cpu(), minlength=model.args.vocab_size)
    candidates = counts.topk(heads.spec.classifier_vocab).indices.to(model.device)
    for e in feats.exit_layers:
        heads[e].set_candidates(candidates)


def _fold_standardization(probe: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make ``probe(x)`` equal the probe as trained on ``(x - mean) / std``: the first linear
    layer absorbs the affine map (``W' = W / std``, ``b' = b - W' mean``)."""
    first = probe if isinstance(probe, torch.nn.Linear) else probe[0]
    with torch.no_grad():
        w = first.weight / std.to(first.weight.dtype)
        first.bias.sub_(w @ mean.to(w.dtype))
        first.weight.copy_(w)


def fit_classifiers(model: LlamaModel, heads: ExitHeads, feats: Features, cfg: ClassifierConfig,
                    progress: bool = False) -> list[float]:
    """Fit every exit's classifier probe (BCE, AdamW) on exact labels; the heads stay frozen.

    ``feats`` should be rows the heads were not trained on (``eeserve tune`` uses its held-out
    windows): on their own training rows the heads agree with the final layer more often, and
    more confidently, than on new text, and a probe fitted there is over-confident (measured in
    docs/exit_heads.md). Inputs are standardised over the rows while fitting; the scaling is then
    folded into the probe's first layer. Candidates (``choose_candidates``) must be set first.

    Returns:
        per exit point, the share of labelled rows whose exit top-1 equals the teacher's.

    Raises:
        ValueError: the heads have no classifiers, or ``feats`` holds no rows.
    """
    if not heads.spec.classifier:
        raise ValueError("these exit heads have no classifier to fit")
    if feats.num_rows == 0:
        raise ValueError("no rows to fit the classifiers on (the held-out split is empty)")
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = torch.randperm(feats.num_rows, generator=gen)[: cfg.rows]
    labels = exit_labels(model, heads, feats, rows)
    bar = _bar(len(feats.exit_layers) * cfg.steps, "classifiers", progress)
    for i, e in enumerate(feats.exit_layers):
        clf = heads[e].classifier
        clf.requires_grad_(True)
        opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        with torch.no_grad():  # the probe's inputs, once (they do not depend on the probe)
            x = torch.cat([heads[e].classifier_inputs(model, feats.hidden[rows[s : s + 4096], i].to(model.dtype))
                           for s in range(0, rows.numel(), 4096)]).float()
            mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-4)
            x = ((x - mean) / std).to(next(clf.parameters()).dtype)
        y = labels[:, i].float().to(model.device)
        for _ in range(cfg.steps):
            idx = torch.randint(0, rows.numel(), (min(cfg.batch_rows, rows.numel()),), generator=gen)
            loss = F.binary_cross_entropy_with_logits(clf(x[idx]).squeeze(-1).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
        clf.requires_grad_(False)
        _fold_standardization(clf, mean, std)
    if bar is not None:
        bar.close()
    return labels.float().mean(0).tolist()


def _check_checkpoint(state: dict, heads: ExitHeads, cfg: TrainConfig, path: Path) -> None:
    """Raises ValueError when a checkpoint was made for other heads than the ones being trained."""
    fix = f"start afresh without --resume, or delete {path}"
    if "heads" not in state or "step" not in state:
        raise ValueError(f"{path} is not an eeserve tune checkpoint; {fix}")
    theirs = (state.get("exit_layers"), state.get("head_type"))
    mine = (list(heads.exit_layers), heads.spec.head_type)
    if theirs[0] is not None and (theirs[0], theirs[1]) != mine:
        raise ValueError(f"checkpoint {path} holds {theirs[1]} heads at exit layers {theirs[0]}, but this run trains "
                         f"{mine[1]} heads at exit layers {mine[0]}; {fix}")
    if state.get("steps", cfg.steps) != cfg.steps:
        raise ValueError(f"checkpoint {path} was made for --steps {state['steps']}, this run asks for "
                         f"--steps {cfg.steps} (the learning-rate schedule depends on it); {fix}")
    mine_keys = set(heads.state_dict())
    if set(state["heads"]) != mine_keys:
        raise ValueError(f"checkpoint {path} does not match the heads being trained (classifier on/off or "
                         f"another head type); {fix}")


def plot_losses(log: TrainLog, exit_layers: Sequence[int], path: Path) -> None:
    """Loss-curve PNG: training KL (mean over exits, smoothed) and held-out KL per exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if log.train:
        steps = [s for s, _ in log.train]
        vals = [v for _, v in log.train]
        k = max(1, len(vals) // 50)
        smooth = [sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))]
        ax.plot(steps, smooth, color="black", label="train (mean over exits)")
    if log.heldout:
        steps = [s for s, _ in log.heldout]
        for i, e in enumerate(exit_layers):
            ax.plot(steps, [v[i] for _, v in log.heldout], marker=".", label=f"held-out, exit {e}")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(final || exit), nats")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bar(total: int, desc: str, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)
