"""Llama-family decoder (Llama, Mistral, Qwen2) that runs any range of layers over a packed batch.

Architecture: Touvron et al. 2023 (arXiv 2302.13971): pre-RMSNorm blocks, rotary position
embeddings (Su et al. 2021, arXiv 2104.09864), SwiGLU MLP, grouped-query attention (Ainslie et al.
2023, arXiv 2305.13245). Qwen2 adds q/k/v biases.

Weights are stored as ``[out, in]`` (contiguous) with q/k/v and gate/up fused, and every
product goes through ``linear`` (``eeserve.model.kernels``), which runs the form measured fastest
on this machine for the weight's shape and the row count. The model keeps no per-forward state:
metadata and the KV cache are arguments of ``run_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eeserve.model.attention import AttentionMetadata, paged_attention
from eeserve.model.kernels import linear
from eeserve.model.kv_cache import KVCache

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelArgs:
    """Shapes of a Llama-family model (from its Hugging Face config)."""

    model_type: str
    num_layers: int  # L
    hidden_size: int  # H
    intermediate_size: int  # I
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # V
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg) -> ModelArgs:
        """Raises ValueError for architectures other than ``SUPPORTED_ARCHITECTURES``."""
        if cfg.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type {cfg.model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        qkv_bias = cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))
        return cls(
            model_type=cfg.model_type,
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            rms_norm_eps=cfg.rms_norm_eps,
            qkv_bias=qkv_bias,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_position_embeddings=cfg.max_position_embeddings,
        )

    def layer_flops(self) -> float:
        """FLOPs of one decoder layer for one token, without attention over the context
        (docs/design.md section 4)."""
        h, i = self.hidden_size, self.intermediate_size
        q_dim = self.num_heads * self.head_dim
        return 2.0 * h * (q_dim + 2 * self.kv_dim) + 2.0 * q_dim * h + 3 * 2.0 * h * i

    def head_flops(self, vocab: int | None = None) -> float:
        """FLOPs of an LM head over ``vocab`` ids (default: the full vocabulary) for one token."""
        return 2.0 * self.hidden_size * (self.vocab_size if vocab is None else vocab)

    def linear_shapes(self) -> list[tuple[int, int, int]]:
        """(out, in, products per token) of every weight the model multiplies by: fused q/k/v,
        o, fused gate/up, down in each layer, and the LM head."""
        h, i, q_dim, n = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.num_layers
        return [(q_dim + 2 * self.kv_dim, h, n), (h, q_dim, n), (2 * i, h, n), (h, i, n), (self.vocab_size, h, 1)]

    def full_depth_flops(self) -> float:
        """FLOPs of one token through all layers and the LM head (no early exit)."""
        return self.num_layers * self.layer_flops() + self.head_flops()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019) computed in float32 as transformers does. x: [T, H]."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_tables(cfg, head_dim: int, max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim] float32, from transformers' rope initialisation so that
    every ``rope_scaling`` type it knows (linear, dynamic, yarn, longrope, llama3) is honoured."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type == "default" or rope_type not in ROPE_INIT_FUNCTIONS:
        theta = (params.get("rope_theta") if isinstance(params, dict) else None) or getattr(cfg, "rope_theta", 10000.0)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    pos = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq.float())  # [P, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, hd]
    return (emb.cos() * scaling).to(device), (emb.sin() * scaling).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; cos/sin: [T, hd] (rows already gathered by position)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class DecoderLayer(nn.Module):
    """One pre-norm Llama block with fused, pre-transposed projections."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype, device: torch.device,
                 weight_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        h, q_dim, kv_dim, i = args.hidden_size, args.num_heads * args.head_dim, args.kv_dim, args.intermediate_size
        kw, wkw = dict(dtype=dtype, device=device), dict(dtype=weight_dtype or dtype, device=device)
        self.args = args
        self.input_norm = nn.Parameter(torch.ones(h, **kw), requires_grad=False)
        self.post_norm = nn.Parameter(torch.ones(h, **kw), requires_grad=False)
        self.qkv_w = nn.Parameter(torch.empty(q_dim + 2 * kv_dim, h, **wkw), requires_grad=False)
        self.qkv_bias = nn.Parameter(torch.zeros(q_dim + 2 * kv_dim, **kw), requires_grad=False) if args.qkv_bias else None
        self.o_w = nn.Parameter(torch.empty(h, q_dim, **wkw), requires_grad=False)
        self.gate_up_w = nn.Parameter(torch.empty(2 * i, h, **wkw), requires_grad=False)
        self.down_w = nn.Parameter(torch.empty(h, i, **wkw), requires_grad=False)
        self.scale = args.head_dim**-0.5

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] normed input -> [T, q_dim + 2 kv_dim]."""
        out = linear(x, self.qkv_w)
        if self.qkv_bias is not None:
            out = out + self.qkv_bias
        return out

    def forward(
        self,
        h: torch.Tensor,  # [T, H] residual stream
        cos: torch.Tensor,  # [T, hd]
        sin: torch.Tensor,  # [T, hd]
        meta: AttentionMetadata,
        k_cache: torch.Tensor,  # [S, nkv, hd]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        a = self.args
        num_rows = h.shape[0]
        qkv = self.qkv(rms_norm(h, self.input_norm, a.rms_norm_eps))  # [T, q+2kv]
        q_dim = a.num_heads * a.head_dim
        q = qkv[:, :q_dim].view(num_rows, a.num_heads, a.head_dim)
        k = qkv[:, q_dim : q_dim + a.kv_dim].view(num_rows, a.num_kv_heads, a.head_dim)
        v = qkv[:, q_dim + a.kv_dim :].view(num_rows, a.num_kv_heads, a.head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        attn = paged_attention(q, k_cache, v_cache, meta, self.scale)  # [T, q_dim]
        h = h + linear(attn, self.o_w)
        gate_up = linear(rms_norm(h, self.post_norm, a.rms_norm_eps), self.gate_up_w)  # [T, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        return h + linear(F.silu(gate) * up, self.down_w)


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head of a Llama-family model.

    Args:
        dtype: dtype of the residual stream, norms, rotary tables and KV cache.
        weight_dtype: dtype of the matrices (projections, embedding, LM head); default ``dtype``.
            bfloat16 weights with a float32 ``dtype`` run every product in bf16 with fp32
            accumulation and keep everything else in fp32.
    """

    def __init__(self, args: ModelArgs, hf_config, dtype: torch.dtype, device: torch.device, max_len: int,
                 weight_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.args = args
        self._dtype = dtype
        wdt = weight_dtype or dtype
        kw, wkw = dict(dtype=dtype, device=device), dict(dtype=wdt, device=device)
        self.embed_tokens = nn.Parameter(torch.empty(args.vocab_size, args.hidden_size, **wkw), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(args, dtype, device, wdt) for _ in range(args.num_layers))
        self.norm_weight = nn.Parameter(torch.ones(args.hidden_size, **kw), requires_grad=False)
        self.lm_head_w = nn.Parameter(torch.empty(args.vocab_size, args.hidden_size, **wkw), requires_grad=False)
        cos, sin = rope_tables(hf_config, args.head_dim, max_len, device)
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (residual stream, KV cache)."""
        return self._dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def linear_weights(self) -> list[torch.Tensor]:
        """Every matrix that goes through ``linear``: each layer's q/k/v, o, gate/up, down, and
        the LM head."""
        out = [w for layer in self.layers for w in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w)]
        return out + [self.lm_head_w]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named weights (``model.layers.N.self_attn.q_proj.weight`` ...) in.

        Raises:
            KeyError: naming the first missing tensor.
        """
        a = self.args

        def get(name: str) -> torch.Tensor:
            if name not in sd:
                raise KeyError(f"weight {name!r} missing from the checkpoint")
            return sd[name]

        self.embed_tokens.copy_(get("model.embed_tokens.weight"))
        self.norm_weight.copy_(get("model.norm.weight"))
        tied = a.tie_word_embeddings or "lm_head.weight" not in sd
        if tied:  # one [V, H] tensor serves as embedding and LM head (113 MB for the default model)
            self.lm_head_w.data = self.embed_tokens.data
        else:
            self.lm_head_w.copy_(sd["lm_head.weight"])
        for n, layer in enumerate(self.layers):
            p = f"model.layers.{n}."
            layer.input_norm.copy_(get(p + "input_layernorm.weight"))
            layer.post_norm.copy_(get(p + "post_attention_layernorm.weight"))
            qkv = torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"], 0)  # [q+2kv, H]
            layer.qkv_w.copy_(qkv)
            if layer.qkv_bias is not None:
                layer.qkv_bias.copy_(torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"], 0))
            layer.o_w.copy_(get(p + "self_attn.o_proj.weight"))
            gate_up = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], 0)
            layer.gate_up_w.copy_(gate_up)
            layer.down_w.copy_(get(p + "mlp.down_proj.weight"))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: [T] int64 -> [T, H] in the activation dtype."""
        return self.embed_tokens[token_ids].to(self._dtype)

    def run_layers(
        self, h: torch.Tensor, start: int, end: int, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        """Run layers ``start..end-1`` (0-based) on the packed rows.

        Args:
            h: [T, H] residual stream entering layer ``start``.
            meta: row layout; ``meta.num_rows == T``.
            kv_cache: the paged cache; K/V of these rows are written at ``meta.slot_mapping``.

        Returns:
            [T, H] residual stream after layer ``end - 1``.
        """
        cos = self.rope_cos[meta.positions]  # [T, hd]
        sin = self.rope_sin[meta.positions]
        for j in range(start, end):
            h = self.layers[j](h, cos, sin, meta, kv_cache.k[j], kv_cache.v[j])
        return h

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, H] final RMSNorm."""
        return rms_norm(h, self.norm_weight, self.args.rms_norm_eps)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] normed hidden -> [T, V] float32 logits."""
        return linear(x, self.lm_head_w).float()

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Shared head: final norm + LM head. [T, H] -> [T, V] float32."""
        return self.lm_head(self.final_norm(h))
