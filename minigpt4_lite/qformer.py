"""The frozen Q-Former: learned queries that read the image through cross-attention (paper Sec. 3).

BLIP-2's Querying Transformer is BERT-base with its text branch removed. A fixed set of learned
query vectors (32 in MiniGPT-4) goes through post-norm BERT layers: the queries attend to each other
(self-attention), and in every second layer (0, 2, 4, ...) they also attend to the ViT's patch
tokens (cross-attention). The output is one vector per query, whatever the image size: these are
the "visual tokens" that MiniGPT-4's single linear layer projects into the LLM's input space.
This computes exactly what transformers' `Blip2QFormerModel` computes (with
`query_embeds=query_tokens`); `hf_qformer_keys` maps names to that checkpoint layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QFormerConfig


class MultiHeadAttention(nn.Module):
    """Attention of the queries over `context` (themselves, or the image tokens)."""

    def __init__(self, hidden: int, heads: int, context_width: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_width, hidden)
        self.value = nn.Linear(context_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln = nn.LayerNorm(hidden, eps=eps)  # BERT is post-norm: ln(x + attn(x))

    def forward(self, x: torch.Tensor, context: torch.Tensor, need_weights: bool = False):
        B, Tq, C = x.shape
        h = self.heads

        def split(t):  # [B, T, C] -> [B, heads, T, C/heads]
            return t.view(B, t.shape[1], h, C // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
        if need_weights:
            att = ((q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)).softmax(dim=-1)
            y = att @ v
        else:
            att, y = None, F.scaled_dot_product_attention(q, k, v)
        y = self.out(y.transpose(1, 2).reshape(B, Tq, C))
        return self.ln(x + y), att


class QFormerLayer(nn.Module):
    """Self-attention among queries, optional cross-attention to the image, then a feed-forward."""

    def __init__(self, cfg: QFormerConfig, vision_width: int, cross: bool):
        super().__init__()
        eps = cfg.layer_norm_eps
        self.self_attn = MultiHeadAttention(cfg.hidden, cfg.heads, cfg.hidden, eps)
        self.cross_attn = (MultiHeadAttention(cfg.hidden, cfg.heads, vision_width, eps)
                           if cross else None)
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=eps)

    def forward(self, x: torch.Tensor, image: torch.Tensor, need_weights: bool = False):
        x, self_att = self.self_attn(x, x, need_weights)
        cross_att = None
        if self.cross_attn is not None:
            x, cross_att = self.cross_attn(x, image, need_weights)
        x = self.ln(x + self.fc2(F.gelu(self.fc1(x))))
        return x, self_att, cross_att


class QFormer(nn.Module):
    """Image tokens [B, N, vision_width] -> query outputs [B, num_query_tokens, hidden]."""

    def __init__(self, cfg: QFormerConfig, vision_width: int):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden))
        self.ln_queries = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, vision_width, cross=(i % cfg.cross_attention_every == 0))
            for i in range(cfg.layers)
        )

    def forward(self, image_tokens: torch.Tensor, return_attentions: bool = False):
        x = self.ln_queries(self.query_tokens.expand(image_tokens.shape[0], -1, -1))
        image_tokens = image_tokens.to(x.dtype)
        self_atts, cross_atts = [], []
        for layer in self.layers:
            x, sa, ca = layer(x, image_tokens, need_weights=return_attentions)
            self_atts.append(sa)
            if ca is not None:
                cross_atts.append(ca)
        if return_attentions:
            return x, {"self": self_atts, "cross": cross_atts}
        return x


def hf_qformer_keys(cfg: QFormerConfig) -> dict[str, str]:
    """Our parameter name -> the name in an HF BLIP-2 checkpoint (`qformer.*`, `query_tokens`)."""
    keys = {"query_tokens": "query_tokens",
            "ln_queries.weight": "qformer.layernorm.weight",
            "ln_queries.bias": "qformer.layernorm.bias"}
    for i in range(cfg.layers):
        ours, hf = f"layers.{i}.", f"qformer.encoder.layer.{i}."
        parts = [("self_attn", "attention")]
        if i % cfg.cross_attention_every == 0:
            parts.append(("cross_attn", "crossattention"))
        for a, b in parts:
            for x, y in [("query", "attention.query"), ("key", "attention.key"),
                         ("value", "attention.value"), ("out", "output.dense"),
                         ("ln", "output.LayerNorm")]:
                for p in ("weight", "bias"):
                    keys[f"{ours}{a}.{x}.{p}"] = f"{hf}{b}.{y}.{p}"
        for x, y in [("fc1", "intermediate_query.dense"), ("fc2", "output_query.dense"),
                     ("ln", "output_query.LayerNorm")]:
            for p in ("weight", "bias"):
                keys[f"{ours}{x}.{p}"] = f"{hf}{y}.{p}"
    return keys
