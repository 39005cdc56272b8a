"""Attention over a paged KV cache for a packed batch of rows from many sequences.

Terms follow vLLM's PagedAttention (Kwon et al. 2023, arXiv 2309.06180): the cache of each layer
is a flat array of slots (``num_blocks * block_size`` plus one always-zero padding slot); a
sequence's token at position p lives in slot ``block_table[p // block_size] * block_size +
p % block_size``.

Single-row sequences (decode tokens) are attended in one padded batched call; multi-row chunks
(prefill, or decode rows carrying pending positions along) are attended one sequence at a time
with a causal mask, so a long prefill chunk never pads the decode rows.
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


@dataclass(frozen=True)
class AttentionMetadata:
    """Forward metadata of one step for the rows currently in the batch.

    Attributes:
        positions: [T] int64, position of each row in its sequence.
        slot_mapping: [T] int64, cache slot each row's K/V is written to.
        decode_rows: [Bd] int64, rows that are the only query of their sequence.
        decode_kv_slots: [Bd, Lmax] int64, context slots of those rows, padded with ``pad_slot``.
        decode_mask: [Bd, 1, 1, Lmax] bool, True where a key may be attended; None if no padding.
        chunks: sequences with several query rows.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor
    decode_kv_slots: torch.Tensor
    decode_mask: torch.Tensor | None
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
        pad_slot: an always-zero slot used to pad decode contexts.
    """
    device = slot_mapping.device
    positions = torch.empty(num_rows, dtype=torch.long, device=device)
    singles = [s for s in seqs if s.rows.numel() == 1]
    chunks = tuple(s for s in seqs if s.rows.numel() > 1)
    for s in seqs:
        positions[s.rows] = s.positions
    if singles:
        decode_rows = torch.cat([s.rows for s in singles])
        lens = [int(s.kv_slots.numel()) for s in singles]
        lmax = max(lens)
        kv = torch.full((len(singles), lmax), pad_slot, dtype=torch.long, device=device)
        for i, s in enumerate(singles):
            kv[i, : lens[i]] = s.kv_slots
        if min(lens) == lmax:
            mask = None
        else:
            lens_t = torch.tensor(lens, device=device)
            mask = (torch.arange(lmax, device=device)[None, :] < lens_t[:, None])[:, None, None, :]
    else:
        decode_rows = torch.empty(0, dtype=torch.long, device=device)
        kv = torch.empty(0, 1, dtype=torch.long, device=device)
        mask = None
    return AttentionMetadata(positions, slot_mapping, decode_rows, kv, mask, chunks)


def select_rows(meta: AttentionMetadata, keep: torch.Tensor) -> AttentionMetadata:
    """Metadata for the subset of rows ``keep`` (batch compaction at an exit point).

    Args:
        keep: [T] bool, rows that go on. Rows of a multi-row chunk are kept or dropped
            together with the chunk (chunks never exit early).

    Returns:
        metadata whose rows are renumbered 0..keep.sum()-1 in the original order.
    """
    new_index = torch.cumsum(keep.long(), 0) - 1  # [T] new row number of each kept row
    keep_decode = keep[meta.decode_rows]
    decode_rows = new_index[meta.decode_rows[keep_decode]]
    decode_kv = meta.decode_kv_slots[keep_decode]
    mask = meta.decode_mask[keep_decode] if meta.decode_mask is not None else None
    chunks = tuple(
        SeqAttention(new_index[c.rows], c.positions, c.kv_slots) for c in meta.chunks if bool(keep[c.rows].all())
    )
    return AttentionMetadata(meta.positions[keep], meta.slot_mapping[keep], decode_rows, decode_kv, mask, chunks)


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
    if meta.decode_rows.numel() > 0:
        qd = q[meta.decode_rows].unsqueeze(2)  # [Bd, nh, 1, hd]
        kd = k_cache[meta.decode_kv_slots].transpose(1, 2)  # [Bd, nkv, L, hd]
        vd = v_cache[meta.decode_kv_slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out[meta.decode_rows] = od.squeeze(2)
    for c in meta.chunks:
        qc = q[c.rows].transpose(0, 1)  # [nh, n, hd]
        kc = k_cache[c.kv_slots].transpose(0, 1)  # [nkv, ctx, hd]
        vc = v_cache[c.kv_slots].transpose(0, 1)
        ctx = torch.arange(c.kv_slots.numel(), device=q.device)
        mask = ctx[None, :] <= c.positions[:, None]  # [n, ctx] causal
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
        out[c.rows] = oc.transpose(0, 1)
    return out.reshape(num_rows, num_heads * head_dim)
