"""The paged KV cache tensors (one K and one V array per layer).

Block bookkeeping (which request owns which block) lives in ``eeserve.core.kv_manager``; this
module only holds the memory.
"""

from __future__ import annotations

import torch


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


class KVCache:
    """Per-layer K and V arrays of shape [num_blocks * block_size + 1, num_kv_heads, head_dim].

    The last slot (``pad_slot``) is never written and always zero: padded attention reads it
    under a False mask, so a NaN debug fill elsewhere cannot leak through ``0 * NaN``.

    Args:
        debug_nan_fill: fill every other slot with NaN at start, so that attention reading a slot
            that was never written yields NaN (used by tests to prove no such read happens).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        debug_nan_fill: bool = False,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        self.pad_slot = self.num_slots
        fill = float("nan") if debug_nan_fill else 0.0
        shape = (self.num_slots + 1, num_kv_heads, head_dim)
        self.k = [torch.full(shape, fill, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.full(shape, fill, dtype=dtype, device=device) for _ in range(num_layers)]
        for t in self.k + self.v:
            t[self.pad_slot].zero_()

    def poison_blocks(self, block_ids: list[int]) -> None:
        """Fill the given blocks with NaN in every layer (debug mode: a freed block must be written
        again before anything reads it)."""
        if not block_ids:
            return
        bs = self.block_size
        idx = torch.tensor([b * bs + i for b in block_ids for i in range(bs)], dtype=torch.long, device=self.k[0].device)
        for t in self.k + self.v:
            t.index_fill_(0, idx, float("nan"))

    def slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """Slots of positions start..end-1 of a sequence whose block table is ``block_ids``."""
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]
