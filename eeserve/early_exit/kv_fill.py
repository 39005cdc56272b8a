"""KV fill for the layers a token skipped.

``propagate`` (Miao et al. 2024, arXiv 2407.20272, section 3.2; CALM's state propagation,
Schuster et al. 2022, section 4): for a token exiting at e with residual hidden h, every skipped
layer j in e..L-1 gets ``k_j = RoPE(W_k^j · RMSNorm_j(h))``, ``v_j = W_v^j · RMSNorm_j(h)``
before the step ends. Since ``RMSNorm_j(h) = g_j ⊙ h / rms(h)``, the gains are folded into the
weights once (``W^j diag(g_j)``) and all skipped layers are filled with one product of
``h / rms(h)`` with the stacked weights (DESIGN.md section 3).

``recompute`` (EE-LLM, Chen et al. 2023, arXiv 2312.04916, section 4.2) is deferred: the
executor marks the positions pending in the KV manager and carries them along the sequence's
next deeper pass (see ``executor.py``).
"""

from __future__ import annotations

import torch

from eeserve.model.llama import LlamaModel, apply_rope, linear
from eeserve.worker.kv_cache import KVCache


class PropagateFiller:
    """Fills skipped layers' K/V from the exit hidden state.

    Args:
        model: the backbone (weights are read once; folded copies are kept per exit point).
        exit_layers: the exit points that may be taken.
    """

    def __init__(self, model: LlamaModel, exit_layers: tuple[int, ...]) -> None:
        a = model.args
        self.model = model
        self.num_layers = a.num_layers
        q_dim = a.num_heads * a.head_dim
        folded = []  # per layer [2 kv_dim, H] with g_j folded in
        biases = []
        for layer in model.layers:
            w = layer.qkv_w[q_dim:].float()  # [2kv, H]
            folded.append(w * layer.input_norm.float()[None, :])
            biases.append(layer.qkv_bias[q_dim:].float() if layer.qkv_bias is not None else None)
        self.weights: dict[int, torch.Tensor] = {}
        self.biases: dict[int, torch.Tensor | None] = {}
        for e in exit_layers:
            self.weights[e] = torch.cat(folded[e:], dim=0).to(model.dtype).contiguous()  # [(L-e)*2kv, H]
            self.biases[e] = torch.cat(biases[e:]).to(model.dtype) if biases[0] is not None else None

    def flops(self, exit_layer: int) -> float:
        """FLOPs to fill one token exiting at ``exit_layer``."""
        return 2.0 * self.weights[exit_layer].numel()

    def fill(self, exit_layer: int, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_cache: KVCache) -> None:
        """Write K/V of layers exit_layer..L-1 for the given tokens.

        Args:
            h: [N, H] residual hidden states at the exit (before any norm).
            positions: [N] int64 positions (for RoPE).
            slots: [N] int64 cache slots of those tokens.
        """
        a = self.model.args
        e = exit_layer
        n = h.shape[0]
        hf = h.float()
        x = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + a.rms_norm_eps)).to(h.dtype)  # [N, H]
        kv = linear(x, self.weights[e])  # [N, (L-e)*2kv]
        if self.biases[e] is not None:
            kv = kv + self.biases[e]
        kv = kv.view(n, self.num_layers - e, 2, a.num_kv_heads, a.head_dim)
        cos = self.model.rope_cos[positions]  # [N, hd]
        sin = self.model.rope_sin[positions]
        k = apply_rope(kv[:, :, 0].reshape(n, -1, a.head_dim), cos, sin).view(n, self.num_layers - e, a.num_kv_heads, a.head_dim)
        v = kv[:, :, 1]
        for i, j in enumerate(range(e, self.num_layers)):
            kv_cache.k[j].index_copy_(0, slots, k[:, i].to(kv_cache.k[j].dtype))
            kv_cache.v[j].index_copy_(0, slots, v[:, i].to(kv_cache.v[j].dtype))
