"""Turns a ``SchedulerOutput`` into model inputs, runs the layers (with exit checks when early
exit is on), and samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eeserve.core.interfaces import (
    ModelRunnerOutput,
    SampledToken,
    ScheduledRequest,
    SchedulerOutput,
    StepStats,
)
from eeserve.model.attention import AttentionMetadata, SeqAttention, build_attention_metadata
from eeserve.model.llama import LlamaModel
from eeserve.request import Request
from eeserve.worker.kv_cache import KVCache
from eeserve.worker.sampler import Sampler, SamplingMetadata


@dataclass(frozen=True)
class BatchInputs:
    """Packed inputs of one step.

    Attributes:
        token_ids: [T] int64 tokens of all scheduled chunks, in schedule order.
        meta: attention layout of the T rows.
        sample_rows: [S] int64 row of the last token of each chunk that samples.
        sample_request_ids: the S requests, in the same order.
        decode_rows: [D] int64 rows that are decode tokens (candidates for early exit).
        decode_request_ids: the D requests, in the same order.
        seqs: per scheduled request (schedule order), its rows, positions and context slots.
        scheduled: the scheduled requests, in the same order.
    """

    token_ids: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor
    sample_request_ids: tuple[str, ...]
    decode_rows: torch.Tensor
    decode_request_ids: tuple[str, ...]
    seqs: tuple[SeqAttention, ...]
    scheduled: tuple[ScheduledRequest, ...]


def prepare_inputs(out: SchedulerOutput, kv_cache: KVCache, device: torch.device) -> BatchInputs:
    """Pack the scheduled chunks into one batch of rows with slots and attention layout."""
    tokens: list[int] = []
    slots: list[int] = []
    seqs: list[SeqAttention] = []
    sample_rows: list[int] = []
    sample_ids: list[str] = []
    decode_rows: list[int] = []
    decode_ids: list[str] = []
    for s in out.scheduled:
        row0 = len(tokens)
        end = s.start_position + s.num_new_tokens
        tokens.extend(s.token_ids)
        ctx_slots = kv_cache.slots(list(s.block_ids), 0, end)
        slots.extend(ctx_slots[s.start_position :])
        seqs.append(
            SeqAttention(
                rows=torch.arange(row0, row0 + s.num_new_tokens, device=device),
                positions=torch.arange(s.start_position, end, device=device),
                kv_slots=torch.tensor(ctx_slots, dtype=torch.long, device=device),
            )
        )
        if s.sample:
            sample_rows.append(len(tokens) - 1)
            sample_ids.append(s.request_id)
        if s.is_decode:
            decode_rows.append(row0)
            decode_ids.append(s.request_id)
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
    meta = build_attention_metadata(seqs, len(tokens), slot_mapping, kv_cache.pad_slot)
    return BatchInputs(
        token_ids=torch.tensor(tokens, dtype=torch.long, device=device),
        meta=meta,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
        sample_request_ids=tuple(sample_ids),
        decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
        decode_request_ids=tuple(decode_ids),
        seqs=tuple(seqs),
        scheduled=out.scheduled,
    )


@dataclass(frozen=True)
class ForwardResult:
    """Logits and exit layers for the rows that sample.

    Attributes:
        logits: [S, V] float32, from the head of the exit each row took.
        exit_layers: per sample row, layers run (L for rows that ran them all).
        stats: FLOP accounting.
        request_flops: request id -> (FLOPs spent, FLOPs at full depth) for decode rows.
        verify_logits: request id -> [k, V] float32 full-depth logits of its k pending rows, in
            position order (``verify_exits``): row i predicts the i-th of its k draft tokens.
    """

    logits: torch.Tensor
    exit_layers: list[int]
    stats: StepStats
    request_flops: dict[str, tuple[float, float]]
    verify_logits: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    """Executes steps of the model over the paged cache.

    Args:
        model: the loaded backbone.
        kv_cache: the cache tensors.
        sampler: token sampler.
        exit_executor: early-exit layer loop (``eeserve.early_exit.executor``), or None for
            full-depth execution.
    """

    def __init__(self, model: LlamaModel, kv_cache: KVCache, sampler: Sampler, exit_executor=None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.exit_executor = exit_executor

    def full_forward(self, inputs: BatchInputs) -> ForwardResult:
        """All layers for every row; the shared head on the sample rows."""
        model = self.model
        args = model.args
        h = model.embed(inputs.token_ids)  # [T, H]
        h = model.run_layers(h, 0, args.num_layers, inputs.meta, self.kv_cache)
        logits = model.compute_logits(h[inputs.sample_rows])  # [S, V]
        num_rows = inputs.meta.num_rows
        full = args.full_depth_flops()
        stats = StepStats(
            layer_flops=num_rows * args.num_layers * args.layer_flops(),
            head_flops=len(inputs.sample_request_ids) * args.head_flops(),
            decode_full_flops=len(inputs.decode_request_ids) * full,
            decode_flops=len(inputs.decode_request_ids) * full,
        )
        if inputs.decode_request_ids:
            stats.exits[args.num_layers] = len(inputs.decode_request_ids)
        request_flops = {rid: (full, full) for rid in inputs.decode_request_ids}
        exit_layers = [args.num_layers] * len(inputs.sample_request_ids)
        return ForwardResult(logits, exit_layers, stats, request_flops)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, requests: dict[str, Request]) -> ModelRunnerOutput:
        """Run one step.

        Args:
            out: the scheduler's decision.
            requests: id -> request for every scheduled id (read for sampling state).

        Returns:
            the sampled token (with its exit layer) of each request whose chunk samples.
        """
        inputs = prepare_inputs(out, self.kv_cache, self.model.device)
        if self.exit_executor is not None and self.exit_executor.needed(inputs, requests):
            result = self.exit_executor.forward(inputs, requests)
        else:
            result = self.full_forward(inputs)
        L = self.model.args.num_layers
        verify = self.exit_executor is not None and self.exit_executor.config.verify_exits
        sampled: dict[str, SampledToken] = {}
        if inputs.sample_request_ids:
            reqs = [requests[rid] for rid in inputs.sample_request_ids]
            sout = self.sampler(result.logits, _sampling_metadata(reqs, [r.num_output_tokens for r in reqs]))
            ids = sout.token_ids.tolist()
            for i, rid in enumerate(inputs.sample_request_ids):
                e = result.exit_layers[i]
                sampled[rid] = SampledToken(ids[i], e, sout.logprobs[i], draft=verify and e < L)
        return ModelRunnerOutput(sampled=sampled, stats=result.stats, request_flops=result.request_flops,
                                 verified=self._verify(result.verify_logits, requests))

    def _verify(self, verify_logits: dict[str, torch.Tensor], requests: dict[str, Request]) -> dict[str, tuple[SampledToken, ...]]:
        """The full-depth token of every draft position, each row sampled with the state (history,
        penalties, min_tokens, and the request's noise for that output index, ``Sampler``) that a
        full-depth step at that position would have had: the token a run without drafts makes
        there. The scheduler keeps a draft exactly when it equals it.

        Raises:
            RuntimeError: a request's pending rows and draft tokens differ in number (a bug: each
                draft leaves exactly one pending position).
        """
        if not verify_logits:
            return {}
        L = self.model.args.num_layers
        reqs, counts, owners = [], [], []
        for rid, logits in verify_logits.items():
            r = requests[rid]
            k = logits.shape[0]
            if k != r.num_draft_tokens:
                raise RuntimeError(f"request {rid!r}: {k} pending rows but {r.num_draft_tokens} draft tokens")
            first = r.num_output_tokens - k  # index of the first draft token
            reqs.extend([r] * k)
            counts.extend(range(first, first + k))
            owners.extend([rid] * k)
        sout = self.sampler(torch.cat(list(verify_logits.values())), _sampling_metadata(reqs, counts))
        out: dict[str, list[SampledToken]] = {}
        for rid, tid, lp in zip(owners, sout.token_ids.tolist(), sout.logprobs):
            out.setdefault(rid, []).append(SampledToken(tid, L, lp))
        return {rid: tuple(v) for rid, v in out.items()}


def _sampling_metadata(reqs: list[Request], num_outputs: list[int]) -> SamplingMetadata:
    """Sampler inputs for one row per entry: ``reqs[i]`` with its first ``num_outputs[i]`` output
    tokens as the history (penalties, min_tokens)."""
    return SamplingMetadata(
        params=[r.sampling_params for r in reqs],
        prompt_token_ids=[r.prompt_token_ids for r in reqs],
        output_token_ids=[r.output_token_ids if n == len(r.output_token_ids) else r.output_token_ids[:n]
                          for r, n in zip(reqs, num_outputs)],
        seeds=[r.seed for r in reqs],
        eos_token_ids=[r.eos_token_ids for r in reqs],
    )


def logits_for_prompt(
    model: LlamaModel, kv_cache: KVCache, token_ids: list[int], block_ids: list[int], layers: int | None = None
) -> torch.Tensor:
    """Prefill ``token_ids`` into the given blocks and return [n, V] logits of every position from
    the shared head after ``layers`` layers (default all). A test and tuning helper."""
    n = len(token_ids)
    device = model.device
    slots = torch.tensor(kv_cache.slots(block_ids, 0, n), dtype=torch.long, device=device)
    seq = SeqAttention(torch.arange(n, device=device), torch.arange(n, device=device), slots)
    meta = build_attention_metadata([seq], n, slots, kv_cache.pad_slot)
    with torch.inference_mode():
        h = model.embed(torch.tensor(token_ids, dtype=torch.long, device=device))
        h = model.run_layers(h, 0, layers if layers is not None else model.args.num_layers, meta, kv_cache)
        return model.compute_logits(h)
