"""The frozen image encoder: an EVA-style ViT followed by `ln_vision` (paper Sec. 3).

MiniGPT-4 reuses BLIP-2's EVA-CLIP ViT-g/14 (39 blocks, width 1408). This file computes exactly
what transformers' `Blip2VisionModel` computes (its `post_layernorm` is BLIP-2's `ln_vision`), in
one screen: patchify with a strided convolution, prepend a CLS token, add learned positions, then
pre-norm transformer blocks. `HF_VISION_KEYS` maps our parameter names to the HF checkpoint's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (EVA/BLIP-2 layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)  # HF keeps q/v bias; k bias is zero there
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if need_weights:  # explicit softmax so that the attention map can be returned
            att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            att = att.softmax(dim=-1)
            y = att @ v
        else:  # fused kernel (flash / memory-efficient) when nobody needs the map
            att, y = None, F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), att


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ln2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        a, att = self.attn(self.ln1(x), need_weights)
        x = x + a
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x, att


class VisionTransformer(nn.Module):
    """ViT + `ln_vision`: image [B, 3, S, S] -> tokens [B, 1 + (S/P)^2, width] (CLS first)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size,
                                     stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_vision = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, return_attentions: bool = False):
        dtype = self.patch_embed.weight.dtype
        x = self.patch_embed(pixels.to(dtype)).flatten(2).transpose(1, 2)  # [B, N, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        attentions = []
        for block in self.blocks:
            x, att = block(x, need_weights=return_attentions)
            attentions.append(att)
        x = self.ln_vision(x)
        return (x, attentions) if return_attentions else x


def hf_vision_keys(cfg: VisionConfig, prefix: str = "vision_model.") -> dict[str, str]:
    """Our parameter name -> the name in an HF BLIP-2 checkpoint (`Blip2VisionModel`)."""
    keys = {
        "patch_embed.weight": "embeddings.patch_embedding.weight",
        "patch_embed.bias": "embeddings.patch_embedding.bias",
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "ln_vision.weight": "post_layernorm.weight",
        "ln_vision.bias": "post_layernorm.bias",
    }
    for i in range(cfg.layers):
        ours, hf = f"blocks.{i}.", f"encoder.layers.{i}."
        for a, b in [("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
                     ("attn.proj", "self_attn.projection"), ("fc1", "mlp.fc1"),
                     ("fc2", "mlp.fc2")]:
            for p in ("weight", "bias"):
                keys[f"{ours}{a}.{p}"] = f"{hf}{b}.{p}"
    return {k: prefix + v for k, v in keys.items()}
