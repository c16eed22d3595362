"""T5 v1.1 encoder: the transformers reference model and per-layer modules for export.

The reference is transformers' ``T5EncoderModel`` (what Open-Sora uses). The exporter works
on the per-layer modules below, which hold the same tensors under the same keys and are
checked against ``T5EncoderModel`` in the tests:

* ``T5Embed``: token lookup, and the relative position bias of layer 0 plus the padding
  mask, computed once and passed to every layer (T5 shares layer 0's bias).
* ``T5Layer``: self-attention and gated-GELU feed-forward, each pre-normed with RMSNorm.
* ``T5FinalNorm``: the final RMSNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sorakit.export.stdit3 import RMSNorm, dims  # one RMSNorm for both models (see its docstring)
from sorakit.presets import T5Config

MASK_MIN = torch.finfo(torch.float32).min  # what transformers adds for padded keys


def hf_config(cfg: T5Config):
    from transformers import T5Config as HFT5Config

    return HFT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj=cfg.feed_forward_proj,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=False,
    )


def build_t5_encoder(cfg: T5Config):
    """transformers T5EncoderModel for this config (fp32, eval mode, eager attention)."""
    from transformers import T5EncoderModel

    config = hf_config(cfg)
    config._attn_implementation = "eager"
    return T5EncoderModel(config).eval()


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucketing (mesh-tensorflow's scheme)."""
    num_buckets //= 2
    buckets = (relative_position > 0).to(torch.long) * num_buckets
    n = torch.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, n, large)


class _Bias(nn.Module):
    """Holds ``SelfAttention.relative_attention_bias`` under its transformers key."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)


class T5Embed(nn.Module):
    """(input_ids [B,L] int64, attention_mask [B,L]) -> hidden [B,L,D], position_bias [B,H,L,L].

    With ``lookup_outside=True`` the graph takes ``inputs_embeds`` [B,L,D] instead of ids:
    the 32k-row table then stays out of the graph (Core ML rejects dims over 16384).
    """

    def __init__(self, cfg: T5Config, lookup_outside: bool = False):
        super().__init__()
        self.cfg = cfg
        self.lookup_outside = lookup_outside
        if not lookup_outside:
            self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layer0 = _Bias(cfg)

    def position_bias(self, attention_mask: torch.Tensor) -> torch.Tensor:
        L = dims(attention_mask)[1]
        pos = torch.arange(L, dtype=torch.long)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        )
        bias = self.layer0.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # [1,H,L,L]
        pad = (1.0 - attention_mask.to(torch.float32))[:, None, None, :] * MASK_MIN
        return bias + pad

    def forward(self, ids_or_embeds: torch.Tensor, attention_mask: torch.Tensor):
        hidden = ids_or_embeds if self.lookup_outside else self.shared(ids_or_embeds)
        return hidden, self.position_bias(attention_mask)

    @staticmethod
    def checkpoint_keys(lookup_outside: bool = False) -> dict[str, str]:
        """module key -> checkpoint key."""
        keys = {
            "layer0.relative_attention_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        }
        if not lookup_outside:
            keys["shared.weight"] = "shared.weight"
        return keys


class _SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = dims(x)
        q, k, v = (p(x).reshape(B, L, self.num_heads, self.d_kv).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(2, 3) + position_bias  # T5 does not scale by 1/sqrt(d)
        attn = scores.float().softmax(dim=-1).to(v.dtype)
        return self.o((attn @ v).transpose(1, 2).reshape(B, L, -1))


class _AttentionSub(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.SelfAttention = _SelfAttention(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class _DenseGated(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class _FFSub(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = _DenseGated(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Layer(nn.Module):
    """One encoder block; keys as ``encoder.block.{i}.`` minus the prefix."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.layer = nn.ModuleList([_AttentionSub(cfg), _FFSub(cfg)])

    def forward(self, hidden: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        hidden = hidden + attn.SelfAttention(attn.layer_norm(hidden), position_bias)
        return hidden + ff.DenseReluDense(ff.layer_norm(hidden))


class T5FinalNorm(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(hidden)


class T5Stack(nn.Module):
    """The per-layer modules chained: equal to T5EncoderModel(...).last_hidden_state."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.embed = T5Embed(cfg)
        self.layers = nn.ModuleList(T5Layer(cfg) for _ in range(cfg.num_layers))
        self.final = T5FinalNorm(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden, bias = self.embed(input_ids, attention_mask)
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return self.final(hidden)
