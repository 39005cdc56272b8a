"""Turns a batch of next-token logits into sampled token ids (vLLM's sampler semantics).

Order of operations, per row of logits:

1. logprobs (chosen token, its rank, top-N) from ``log_softmax`` of the RAW logits;
2. ``min_tokens``: EOS and ``stop_token_ids`` masked to -inf until enough tokens were produced;
   ``logit_bias`` added to its token ids' logits (vLLM's and OpenAI's order: before penalties);
3. penalties: repetition (prompt + output ids), then frequency and presence (output counts);
4. greedy rows (temperature < 1e-5) take the argmax;
5. other rows: temperature, top-k, top-p, min-p, then the exponential race
   ``argmax(probs / Exponential(1))``, which is an exact sample from ``probs``. A seeded row draws
   its noise only from its own generator, so its tokens do not depend on its batch mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eeserve.request import TokenLogprobs
from eeserve.sampling_params import SamplingParams

_GREEDY_EPS = 1e-5


@dataclass
class SamplingMetadata:
    """What the sampler needs per row of logits; every list has one entry per row (length B)."""

    params: list[SamplingParams]  # the request's sampling parameters
    prompt_token_ids: list[list[int]]  # prompt ids (repetition penalty)
    output_token_ids: list[list[int]]  # ids generated so far (penalties, min_tokens)
    generators: list[torch.Generator | None]  # per-request RNG when the request has a seed
    eos_token_ids: list[int | None]  # the request's EOS id (masked until min_tokens)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, the sampled token of each row
    logprobs: list[TokenLogprobs | None]  # per row; None unless params.logprobs is not None
    probs: torch.Tensor | None = None  # [B, V] float32 distribution sampled from (with return_probs)


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Apply vLLM's repetition, frequency and presence penalties, in place.

    Repetition penalty r applies to every id seen in prompt or output: a logit > 0 is divided
    by r, any other logit multiplied by r. Then, with c the count of an id in the output,
    ``logit -= frequency * c + presence * (c > 0)``.

    Args:
        logits: [B, V] float logits, modified in place.
        prompt_token_ids: B lists of prompt ids.
        output_token_ids: B lists of generated ids.
        repetition_penalties: [B] (1.0 = off).
        frequency_penalties: [B] (0.0 = off).
        presence_penalties: [B] (0.0 = off).

    Returns:
        ``logits`` (the same tensor).
    """
    B, V = logits.shape
    device = logits.device
    counts = _token_counts(output_token_ids, B, V, device)  # [B, V] float
    output_seen = counts > 0  # [B, V]
    rep = repetition_penalties.to(device=device, dtype=logits.dtype).unsqueeze(1)  # [B, 1]
    if bool((rep != 1.0).any()):
        prompt_seen = _token_counts(prompt_token_ids, B, V, device) > 0  # [B, V]
        seen = prompt_seen | output_seen  # [B, V]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)  # [B, V]
        logits.copy_(torch.where(seen, penalized, logits))
    freq = frequency_penalties.to(device=device, dtype=logits.dtype).unsqueeze(1)  # [B, 1]
    pres = presence_penalties.to(device=device, dtype=logits.dtype).unsqueeze(1)  # [B, 1]
    logits -= freq * counts + pres * output_seen.to(logits.dtype)
    return logits


def _token_counts(
    token_ids: list[list[int]], B: int, V: int, device: torch.device
) -> torch.Tensor:
    """Count each id per row: [B, V] float32 (ids outside [0, V) are ignored)."""
    counts = torch.zeros(B, V, dtype=torch.float32, device=device)
    rows = [i for i, ids in enumerate(token_ids) for _ in ids]
    if not rows:
        return counts
    cols = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long, device=device)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    valid = (cols >= 0) & (cols < V)
    flat = rows_t[valid] * V + cols[valid]  # [N]
    counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    return counts


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask to -inf every token outside the row's top-k and top-p sets (one sort), in place.

    top-p keeps the smallest set of most likely tokens whose probability mass is >= p (always
    at least one token); it is computed on the distribution left after top-k.

    Args:
        logits: [B, V] float, already divided by temperature.
        top_k: [B] int64, 0 = off.
        top_p: [B] float, 1.0 = off.
    """
    V = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V], [B, V]
    positions = torch.arange(V, device=logits.device).unsqueeze(0)  # [1, V]
    k = torch.where(top_k > 0, top_k, V).to(logits.device).unsqueeze(1)  # [B, 1]
    sorted_logits = sorted_logits.masked_fill(positions >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V] mass of strictly better tokens
    p = top_p.to(device=logits.device, dtype=probs.dtype).unsqueeze(1)  # [B, 1]
    drop_sorted = (mass_before >= p) & (positions > 0)
    drop_sorted |= positions >= k
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)  # [B, V]
    return logits.masked_fill_(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf tokens whose probability is < min_p * (the row's max probability), in place.

    Args:
        logits: [B, V] float.
        min_p: [B] float, 0.0 = off.
    """
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = min_p.to(device=logits.device, dtype=probs.dtype).unsqueeze(1) * probs.amax(
        dim=-1, keepdim=True
    )  # [B, 1]
    return logits.masked_fill_(probs < threshold, float("-inf"))


def exponential_race(
    probs: torch.Tensor,
    generators: list[torch.Generator | None],
    default_generator: torch.Generator | None,
) -> torch.Tensor:
    """Sample one id per row as ``argmax(probs / q)``, q ~ Exponential(1) i.i.d.

    Rows with a generator draw their noise from it alone (one [V] draw per call); the other
    rows share one draw from ``default_generator``.

    Args:
        probs: [B, V] float, rows summing to 1.
        generators: B entries, a generator or None.

    Returns:
        [B] int64 sampled ids.
    """
    V = probs.shape[1]
    q = torch.empty_like(probs)  # [B, V]
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise = torch.empty(len(unseeded), V, dtype=probs.dtype, device=probs.device)
        noise.exponential_(generator=default_generator)
        q[unseeded] = noise
    for i, g in enumerate(generators):
        if g is not None:
            q[i].exponential_(generator=g)
    return (probs / q).argmax(dim=-1)


class Sampler:
    """Samples the next token of each row of a logits batch (see the module docstring)."""

    def __init__(self, default_generator: torch.Generator | None):
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata, return_probs: bool = False) -> SamplerOutput:
        """Sample.

        Args:
            logits: [B, V] float32 next-token logits (not modified).
            meta: per-row parameters and histories.
            return_probs: also return each row's distribution (greedy rows: one-hot).

        Returns:
            SamplerOutput with [B] int64 ids and per-row logprobs.
        """
        token_ids, random_rows, rprobs, raw_logprobs = self._distributions(logits, meta)
        probs = None
        if return_probs:  # greedy rows: one-hot at their token
            probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
            probs.scatter_(1, token_ids[:, None], 1.0)
        if random_rows:
            token_ids[random_rows] = exponential_race(
                rprobs, [meta.generators[i] for i in random_rows], self.default_generator)
            if probs is not None:
                probs[random_rows] = rprobs
        return SamplerOutput(token_ids, self._logprobs(raw_logprobs, token_ids, meta), probs)

    def verify(self, logits: torch.Tensor, meta: SamplingMetadata, drafts: torch.Tensor,
               draft_probs: list[torch.Tensor | None]) -> SamplerOutput:
        """The token of each row given a draft for it: speculative sampling (Leviathan et al.
        2023, arXiv 2211.17192, section 2.3; Chen et al. 2023, arXiv 2302.01318, algorithm 2).
        With p the row's distribution and q the draft's, the draft x is kept with probability
        min(1, p(x) / q(x)), else a token is drawn from max(0, p - q), normalized: the result is
        distributed as p. Greedy rows, and rows without ``draft_probs``, take their own sample
        (``__call__``): a draft is then kept exactly when it equals it.

        Args:
            logits: [B, V] float32 logits of the verifying (full-depth) rows.
            meta: their parameters and histories.
            drafts: [B] int64 draft tokens.
            draft_probs: per row, the [V] distribution the draft was sampled from, or None.

        Returns:
            SamplerOutput with the [B] tokens (equal to the draft where kept) and their logprobs.
        """
        token_ids, random_rows, probs, raw_logprobs = self._distributions(logits, meta)
        for k, i in enumerate(random_rows):
            gen = meta.generators[i]
            q = draft_probs[i]
            if q is None:
                token_ids[i] = exponential_race(probs[k : k + 1], [gen], self.default_generator)[0]
            else:
                token_ids[i] = speculative_accept(probs[k], q.to(probs), int(drafts[i]),
                                                  gen if gen is not None else self.default_generator)
        return SamplerOutput(token_ids, self._logprobs(raw_logprobs, token_ids, meta))

    def _distributions(self, logits: torch.Tensor, meta: SamplingMetadata
                       ) -> tuple[torch.Tensor, list[int], torch.Tensor | None, torch.Tensor | None]:
        """What both sampling and verification start from.

        Returns:
            ([B] int64 argmax of the penalized logits (the greedy rows' tokens), the R non-greedy
            rows, [R, V] their distributions or None when R = 0, [B, V] raw log-softmax when some
            row wants logprobs).
        """
        logits, raw_logprobs = self._penalized(logits, meta)
        token_ids = logits.argmax(dim=-1)  # [B]
        random_rows = [i for i, p in enumerate(meta.params) if p.temperature >= _GREEDY_EPS]
        probs = self._random_probs(logits[random_rows], random_rows, meta) if random_rows else None
        return token_ids, random_rows, probs, raw_logprobs

    def _logprobs(self, raw_logprobs: torch.Tensor | None, token_ids: torch.Tensor,
                  meta: SamplingMetadata) -> list[TokenLogprobs | None]:
        if raw_logprobs is None:
            return [None] * token_ids.shape[0]
        return _gather_logprobs(raw_logprobs, token_ids, meta.params)

    def _penalized(self, logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([B, V] logits with min_tokens and the penalties applied, [B, V] raw log-softmax when
        some row wants logprobs)."""
        B = logits.shape[0]
        params = meta.params
        assert len(params) == B, f"{len(params)} params for {B} rows"
        device = logits.device
        logits = logits.to(torch.float32).clone()  # [B, V]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]

        self._apply_min_tokens(logits, meta)
        self._apply_logit_bias(logits, meta)
        rep = [p.repetition_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        if any(r != 1.0 for r in rep) or any(freq) or any(pres):
            apply_penalties(
                logits,
                meta.prompt_token_ids,
                meta.output_token_ids,
                torch.tensor(rep, dtype=torch.float32, device=device),
                torch.tensor(freq, dtype=torch.float32, device=device),
                torch.tensor(pres, dtype=torch.float32, device=device),
            )
        return logits, raw_logprobs

    def _apply_min_tokens(self, logits: torch.Tensor, meta: SamplingMetadata) -> None:
        """Mask EOS and stop token ids to -inf for rows that have not reached min_tokens."""
        V = logits.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        for i, p in enumerate(meta.params):
            if len(meta.output_token_ids[i]) >= p.min_tokens:
                continue
            blocked = set(p.stop_token_ids)
            if meta.eos_token_ids[i] is not None:
                blocked.add(meta.eos_token_ids[i])
            for t in blocked:
                if 0 <= t < V:
                    rows.append(i)
                    cols.append(t)
        if rows:
            logits[rows, cols] = float("-inf")

    def _apply_logit_bias(self, logits: torch.Tensor, meta: SamplingMetadata) -> None:
        """Add each row's ``logit_bias`` to its token ids' logits, in place (ids were checked
        against the vocabulary when the request was added)."""
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for i, p in enumerate(meta.params):
            for t, b in (p.logit_bias or {}).items():
                rows.append(i)
                cols.append(t)
                vals.append(b)
        if rows:
            logits[rows, cols] += torch.tensor(vals, dtype=logits.dtype, device=logits.device)

    def _random_probs(
        self, logits: torch.Tensor, rows: list[int], meta: SamplingMetadata
    ) -> torch.Tensor:
        """The distribution the non-greedy rows sample from.

        Args:
            logits: [R, V] penalized logits of those rows.
            rows: their R row indices in the batch.

        Returns:
            [R, V] float32 probabilities after temperature, top-k, top-p and min-p.
        """
        device = logits.device
        params = [meta.params[i] for i in rows]
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        logits = logits / temps.unsqueeze(1)  # [R, V]
        if any(p.top_k > 0 for p in params) or any(p.top_p < 1.0 for p in params):
            apply_top_k_top_p(
                logits,
                torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
                torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            )
        if any(p.min_p > 0.0 for p in params):
            apply_min_p(
                logits, torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
            )
        return logits.softmax(dim=-1)  # [R, V]


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator | None) -> int:
    """One step of speculative sampling (``Sampler.verify``).

    Args:
        p: [V] target distribution; q: [V] the draft's distribution, q[draft] > 0.
        draft: the drafted id, sampled from q.
        generator: the row's RNG (one uniform draw, and one [V] draw on rejection).

    Returns:
        ``draft`` with probability min(1, p[draft] / q[draft]), else an id from max(0, p - q)
        normalized (from p when that is empty); overall distributed as p.
    """
    u = torch.rand((), generator=generator, device=p.device)
    if float(u) * float(q[draft]) <= float(p[draft]):
        return draft
    residual = (p - q).clamp_(min=0.0)
    total = float(residual.sum())
    residual = residual / total if total > 0 else p
    return int(exponential_race(residual[None], [generator], generator)[0])


def _gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    """Per row: the chosen id's raw logprob, its 1-based rank, and the top-N pairs.

    The rank counts the ids whose logprob is >= the chosen one's (vLLM's convention).

    Args:
        logprobs: [B, V] raw log-softmax.
        token_ids: [B] chosen ids.
    """
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [B, 1]
    ranks = (logprobs >= chosen).sum(dim=-1).tolist()  # [B]
    max_n = max(p.logprobs or 0 for p in params)
    top_vals: list[list[float]] = [[] for _ in params]
    top_ids: list[list[int]] = [[] for _ in params]
    if max_n > 0:
        vals, ids = logprobs.topk(max_n, dim=-1)  # [B, N]
        top_vals, top_ids = vals.tolist(), ids.tolist()
    chosen_list = chosen.squeeze(1).tolist()
    ids_list = token_ids.tolist()
    out: list[TokenLogprobs | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            out.append(None)
            continue
        n = p.logprobs
        out.append(
            TokenLogprobs(
                token_id=ids_list[i],
                logprob=chosen_list[i],
                rank=int(ranks[i]),
                top=tuple(zip(top_ids[i][:n], top_vals[i][:n])),
            )
        )
    return out
