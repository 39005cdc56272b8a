"""Turns a batch of next-token logits into sampled token ids (vLLM's sampler semantics).

Order of operations, per row of logits:

1. logprobs (chosen token, its rank, top-N) from ``log_softmax`` of the RAW logits;
2. ``min_tokens``: EOS and ``stop_token_ids`` masked to -inf until enough tokens were produced;
   ``logit_bias`` added to its token ids' logits (vLLM's and OpenAI's order: before penalties);
3. penalties: repetition (prompt + output ids), then frequency and presence (output counts);
4. greedy rows (temperature < 1e-5) take the argmax;
5. other rows: temperature, top-k, top-p, min-p, then the exponential race
   ``argmax(probs / E)``, E ~ Exponential(1) i.i.d. per vocabulary entry, an exact sample from
   ``probs`` (the Gumbel-max trick in another form). A row with a seed draws E for its j-th output
   token from a generator seeded with (seed, j) alone, so its tokens depend neither on its batch
   mates nor on how many times the row was sampled before: a draft made by an early exit and the
   full model's token at the same position see the same E, and a draft is kept exactly when it is
   the token the full model draws (``verify_exits``: the output is the full model's, token for
   token, for sampling as for greedy decoding).

Rows that ask for no top-k / top-p / min-p filtering are never touched by those steps, so their
distribution is bit for bit the same whatever their batch mates ask.
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
    seeds: list[int | None]  # per-request sampling seed (noise keyed by seed and output index); None: shared RNG
    eos_token_ids: list[tuple[int, ...]]  # the request's EOS ids (masked until min_tokens)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, the sampled token of each row
    logprobs: list[TokenLogprobs | None]  # per row; None unless params.logprobs is not None


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
    at least one token); it is computed on the distribution left after top-k. Rows that filter
    nothing (k = 0 or k >= V, and p = 1) are left untouched, bit for bit; so is the top-p part of
    a row with p = 1 (a cumulative sum that rounds to 1 before the last token never masks it).

    Args:
        logits: [B, V] float, already divided by temperature.
        top_k: [B] int64, 0 = off (as are values >= V).
        top_p: [B] float, 1.0 = off.
    """
    V = logits.shape[1]
    device = logits.device
    top_k = top_k.to(device)
    top_p = top_p.to(device=device, dtype=torch.float32)
    use_k = (top_k > 0) & (top_k < V)  # [B]
    use_p = top_p < 1.0  # [B]
    rows = (use_k | use_p).nonzero().flatten()  # [R] rows that filter
    if rows.numel() == 0:
        return logits
    sub = logits[rows]  # [R, V]
    sorted_logits, order = sub.sort(dim=-1, descending=True)  # [R, V], [R, V]
    positions = torch.arange(V, device=device).unsqueeze(0)  # [1, V]
    k = torch.where(use_k[rows], top_k[rows], V).unsqueeze(1)  # [R, 1]
    outside_k = positions >= k  # [R, V]
    probs = sorted_logits.masked_fill(outside_k, float("-inf")).softmax(dim=-1)  # [R, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V] mass of strictly better tokens
    p = top_p[rows].to(probs.dtype).unsqueeze(1)  # [R, 1]
    drop_sorted = (mass_before >= p) & (positions > 0) & use_p[rows].unsqueeze(1)
    drop_sorted |= outside_k
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)  # [R, V]
    logits[rows] = sub.masked_fill_(drop, float("-inf"))
    return logits


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


def _mix_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed from (request seed, output index): splitmix64 of a combination, so
    neighbouring seeds and indices give unrelated streams."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xD1B54A32D192ED03) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def keyed_noise(seed: int, index: int, V: int, device: torch.device) -> torch.Tensor:
    """[V] float32 Exponential(1) noise for the ``index``-th output token of a request with
    ``seed``: a pure function of (seed, index, V)."""
    g = torch.Generator(device=device)
    g.manual_seed(_mix_seed(seed, index))
    return torch.empty(V, dtype=torch.float32, device=device).exponential_(generator=g)


def exponential_race(
    probs: torch.Tensor,
    seeds: list[int | None],
    indices: list[int],
    default_generator: torch.Generator | None,
) -> torch.Tensor:
    """Sample one id per row as ``argmax(probs / E)``, E ~ Exponential(1) i.i.d.

    A row with a seed takes E = ``keyed_noise(seed, index)``; the other rows share one draw from
    ``default_generator``.

    Args:
        probs: [B, V] float, rows summing to 1.
        seeds: B entries, a seed or None.
        indices: B output indices (which output token of its request each row samples).

    Returns:
        [B] int64 sampled ids.
    """
    B, V = probs.shape
    q = torch.empty(B, V, dtype=torch.float32, device=probs.device)  # [B, V]
    unseeded = [i for i, s in enumerate(seeds) if s is None]
    if unseeded:
        noise = torch.empty(len(unseeded), V, dtype=torch.float32, device=probs.device)
        noise.exponential_(generator=default_generator)
        q[unseeded] = noise
    for i, s in enumerate(seeds):
        if s is not None:
            q[i] = keyed_noise(s, indices[i], V, probs.device)
    return (probs / q).argmax(dim=-1)


class Sampler:
    """Samples the next token of each row of a logits batch (see the module docstring)."""

    def __init__(self, default_generator: torch.Generator | None):
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """Sample.

        Args:
            logits: [B, V] float32 next-token logits (not modified).
            meta: per-row parameters and histories.

        Returns:
            SamplerOutput with [B] int64 ids and per-row logprobs.
        """
        logits, raw_logprobs = self._penalized(logits, meta)
        token_ids = logits.argmax(dim=-1)  # [B]; greedy rows keep it
        random_rows = [i for i, p in enumerate(meta.params) if p.temperature >= _GREEDY_EPS]
        if random_rows:
            probs = self._random_probs(logits[random_rows], random_rows, meta)  # [R, V]
            token_ids[random_rows] = exponential_race(
                probs, [meta.seeds[i] for i in random_rows],
                [len(meta.output_token_ids[i]) for i in random_rows], self.default_generator)
        return SamplerOutput(token_ids, self._logprobs(raw_logprobs, token_ids, meta))

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
            blocked = set(p.stop_token_ids) | set(meta.eos_token_ids[i])
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
        V = logits.shape[1]
        top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]  # >= V filters nothing
        if any(top_k) or any(p.top_p < 1.0 for p in params):
            apply_top_k_top_p(
                logits,
                torch.tensor(top_k, dtype=torch.long, device=device),
                torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            )
        if any(p.min_p > 0.0 for p in params):
            apply_min_p(
                logits, torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
            )
        return logits.softmax(dim=-1)  # [R, V]


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
