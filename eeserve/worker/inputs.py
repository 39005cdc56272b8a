"""The hand-off between input preparation, the layer loop (full depth or with early exit) and
the sampler: ``BatchInputs`` in, ``ForwardResult`` out. Both ``worker.model_runner`` and
``early_exit.executor`` import it; neither imports the other's internals."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eeserve.core.interfaces import ScheduledRequest, SchedulerOutput, StepStats
from eeserve.model.attention import AttentionMetadata, SeqAttention, build_attention_metadata
from eeserve.model.kv_cache import KVCache


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
