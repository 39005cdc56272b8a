"""Attention over a paged KV cache for a packed batch of rows from many sequences.

Terms follow vLLM's PagedAttention (Kwon et al. 2023, arXiv 2309.06180): the cache of each layer
is a flat array of slots (``num_blocks * block_size`` plus one always-zero padding slot); a
sequence's token at position p lives in slot ``block_table[p // block_size] * block_size +
p % block_size``.

Sequences with at most ``BATCHED_MAX_ROWS`` query rows (decode tokens, alone or with a few
pending rows riding along under early exit) are attended in one padded batched call; longer
chunks (prefill) one sequence at a time with a causal mask, so a long prefill chunk never pads
the decode rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqAttention:
    """Attention layout of one sequence in the packed batch.

    Attributes:
        rows: row indices of this sequence's queries in the packed batch, [n] int64.
        positions: positions of those rows, [n] int64 (increasing).
        kv_slots: slots of positions 0..context_len-1, [context_len] int64.
    """

    rows: torch.Tensor
    positions: torch.Tensor
    kv_slots: torch.Tensor


BATCHED_MAX_ROWS = 4  # sequences with up to this many query rows share the batched call


@dataclass(frozen=True)
class AttentionMetadata:
    """Forward metadata of one step for the rows currently in the batch.

    Attributes:
        positions: [T] int64, position of each row in its sequence.
        slot_mapping: [T] int64, cache slot each row's K/V is written to.
        batch_rows: [B, n] int64, query rows of the sequences attended in the batched call, one
            sequence per line; a sequence with fewer than n rows repeats its last row.
        batch_valid: [B, n] bool, False on the repeats; None when n == 1.
        batch_kv_slots: [B, Lmax] int64, context slots of those sequences, padded with ``pad_slot``.
        batch_mask: [B, 1, n, Lmax] bool, True where a query may attend a key (causal and inside
            the context); None when every query may attend its whole padded context.
        chunks: the other sequences (more than ``BATCHED_MAX_ROWS`` rows), attended one by one.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    batch_rows: torch.Tensor
    batch_valid: torch.Tensor | None
    batch_kv_slots: torch.Tensor
    batch_mask: torch.Tensor | None
    chunks: tuple[SeqAttention, ...]

    @property
    def num_rows(self) -> int:
        return int(self.positions.shape[0])


def build_attention_metadata(
    seqs: list[SeqAttention], num_rows: int, slot_mapping: torch.Tensor, pad_slot: int
) -> AttentionMetadata:
    """Pack per-sequence layouts into one ``AttentionMetadata``.

    Args:
        seqs: one entry per sequence; their ``rows`` together cover 0..num_rows-1 exactly once.
        num_rows: T, rows in the packed batch.
        slot_mapping: [T] int64 write slots.
        pad_slot: an always-zero slot used to pad contexts.
    """
    device = slot_mapping.device
    positions = torch.empty(num_rows, dtype=torch.long, device=device)
    batched = [s for s in seqs if s.rows.numel() <= BATCHED_MAX_ROWS]
    chunks = tuple(s for s in seqs if s.rows.numel() > BATCHED_MAX_ROWS)
    for s in seqs:
        positions[s.rows] = s.positions
    if not batched:
        empty = torch.empty(0, 1, dtype=torch.long, device=device)
        return AttentionMetadata(positions, slot_mapping, empty, None, empty, None, chunks)
    n = max(int(s.rows.numel()) for s in batched)
    lens = [int(s.kv_slots.numel()) for s in batched]
    lmax = max(lens)
    kv = torch.full((len(batched), lmax), pad_slot, dtype=torch.long, device=device)
    rows = torch.empty(len(batched), n, dtype=torch.long, device=device)
    pos = torch.empty(len(batched), n, dtype=torch.long, device=device)
    for i, s in enumerate(batched):
        k = int(s.rows.numel())
        kv[i, : lens[i]] = s.kv_slots
        rows[i, :k], rows[i, k:] = s.rows, s.rows[-1]
        pos[i, :k], pos[i, k:] = s.positions, s.positions[-1]
    valid = None
    if n > 1:
        valid = torch.arange(n, device=device)[None, :] < torch.tensor([int(s.rows.numel()) for s in batched],
                                                                        device=device)[:, None]
    if n == 1 and min(lens) == lmax:
        mask = None  # one query per sequence, contexts of one length
    else:
        keys = torch.arange(lmax, device=device)
        lens_t = torch.tensor(lens, device=device)
        mask = ((keys[None, None, :] <= pos[:, :, None]) & (keys[None, None, :] < lens_t[:, None, None]))[:, None]
    return AttentionMetadata(positions, slot_mapping, rows, valid, kv, mask, chunks)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Scaled dot-product attention of packed queries against the paged cache.

    The K/V of the current rows must already be written into the cache.

    Args:
        q: [T, num_heads, head_dim] queries (RoPE applied).
        k_cache, v_cache: [num_slots, num_kv_heads, head_dim] one layer's cache.
        meta: layout of the rows.
        scale: softmax scale (1/sqrt(head_dim) for Llama).

    Returns:
        [T, num_heads * head_dim] attention output.
    """
    num_rows, num_heads, head_dim = q.shape
    out = q.new_empty(num_rows, num_heads, head_dim)
    if meta.batch_rows.numel() > 0:
        qb = q[meta.batch_rows].transpose(1, 2)  # [B, nh, n, hd]
        kb = k_cache[meta.batch_kv_slots].transpose(1, 2)  # [B, nkv, L, hd]
        vb = v_cache[meta.batch_kv_slots].transpose(1, 2)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=meta.batch_mask, scale=scale, enable_gqa=True)
        ob = ob.transpose(1, 2)  # [B, n, nh, hd]
        if meta.batch_valid is None:
            out[meta.batch_rows[:, 0]] = ob[:, 0]
        else:
            out[meta.batch_rows[meta.batch_valid]] = ob[meta.batch_valid]
    for c in meta.chunks:
        qc = q[c.rows].transpose(0, 1)  # [nh, n, hd]
        kc = k_cache[c.kv_slots].transpose(0, 1)  # [nkv, ctx, hd]
        vc = v_cache[c.kv_slots].transpose(0, 1)
        ctx = torch.arange(c.kv_slots.numel(), device=q.device)
        mask = ctx[None, :] <= c.positions[:, None]  # [n, ctx] causal
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
        out[c.rows] = oc.transpose(0, 1)
    return out.reshape(num_rows, num_heads * head_dim)
