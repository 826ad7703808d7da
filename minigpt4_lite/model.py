"""`MiniGPT4`: frozen ViT + frozen Q-Former -> one trainable linear layer -> frozen LLM (Sec. 3).

Data flow (the one path that training, chat, evaluation and visualisation share):

    pixels --vit--> patch tokens (+ln_vision) --qformer--> query outputs   (frozen, cacheable)
           --llama_proj--> visual tokens in the LLM's input space            (the trained layer)
           --prompts.build_example/collate--> [BOS] [prompt before] [image] [prompt after] [answer]
           --> LLM: loss (train) | generate (chat, eval) | attentions (viz)

`prompts.build_example` is the one place where a prompt is split at `<ImageHere>` and where labels
are masked (the prompt wrap); `insert_image_embeds` is the one place where visual tokens are put
into the LLM's input sequence; the loss is the LLM's own cross-entropy over the answer tokens.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import MiniGPT4Config
from .qformer import QFormer
from .vision import VisionTransformer

log = logging.getLogger(__name__)

class MiniGPT4(nn.Module):
    """The MiniGPT-4 model. Only `llama_proj` is trainable by default (paper Sec. 3.1).

    Build it with `checkpoints.load_model(cfg)` (weights from assets/, the hub or local folders) or
    `MiniGPT4(cfg, llm, tokenizer)` with any transformers causal LM and its tokenizer.
    """

    def __init__(self, cfg: MiniGPT4Config, llm: nn.Module, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(cfg.vision)
        if cfg.ln_vision == "fresh":  # the official Llama-2 model's: never loaded nor trained,
            self.vit.ln_vision = nn.LayerNorm(cfg.vision.width)  # weight 1, bias 0, eps 1e-5
        self.qformer = QFormer(cfg.qformer, cfg.vision.width) if cfg.use_qformer else None
        feat_dim = cfg.qformer.hidden if cfg.use_qformer else 4 * cfg.vision.width
        d_llm = llm.config.hidden_size
        if cfg.projection == "linear":
            self.llama_proj = nn.Linear(feat_dim, d_llm)
        else:  # the "3-layer MLP" of the paper's ablation (Table 5)
            self.llama_proj = nn.Sequential(nn.Linear(feat_dim, d_llm), nn.GELU(),
                                            nn.Linear(d_llm, d_llm), nn.GELU(),
                                            nn.Linear(d_llm, d_llm))
        self.llm = llm
        self.tokenizer = tokenizer
        self.freeze()

    # --- frozen parts ---------------------------------------------------------------------------
    def freeze(self) -> None:
        """Freeze ViT, ln_vision, LLM and (unless `freeze_qformer=False`) Q-Former + queries."""
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        frozen = [self.vit, self.llm]
        if self.qformer is not None and self.cfg.freeze_qformer:
            frozen.append(self.qformer)
        return frozen

    def train(self, mode: bool = True) -> "MiniGPT4":
        """Like `nn.Module.train`, but frozen parts stay in eval mode (no dropout, as official)."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    # --- the visual path --------------------------------------------------------------------------
    def visual_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen part of the visual path: pixels [B,3,S,S] -> Q-Former outputs [B, Q, hidden].

        With `use_qformer=False`, the ViT's patch tokens (CLS dropped), 4 adjacent ones
        concatenated as in the MiniGPT-4 Llama-2 variant (256 x 1408 -> 64 x 5632; padded with
        zeros if the count is not a multiple of 4, where the official reshape would fail).
        """
        pixels = pixels.to(self.vit.patch_embed.weight.device)
        with torch.no_grad():  # the ViT is always frozen: no graph needed through it
            image_tokens = self.vit(pixels)
        if self.qformer is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_qformer):
                return self.qformer(image_tokens)
        patches = image_tokens[:, 1:, :]
        B, N, C = patches.shape
        pad = (-N) % 4
        if pad:
            patches = torch.cat([patches, patches.new_zeros(B, pad, C)], dim=1)
        return patches.reshape(B, (N + pad) // 4, 4 * C)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The trained layer: visual features -> LLM input embeddings [B, Q, d_llm]."""
        w = self.llm.get_input_embeddings().weight
        proj_dtype = next(self.llama_proj.parameters()).dtype
        out = self.llama_proj(features.to(w.device, proj_dtype))
        return out.to(w.dtype)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,S,S] -> visual tokens in the LLM's input space [B, Q, d_llm] (Fig. 1)."""
        return self.project(self.visual_features(pixels))

    # --- sequences (built by `prompts.build_example` / `prompts.collate`) -----------------------
    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor,
              image_embeds: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings with the visual tokens put into the image slots, in order."""
        return insert_image_embeds(self.llm, input_ids, image_mask, image_embeds)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # --- training -------------------------------------------------------------------------------
    def forward(self, batch: dict, output_attentions: bool = False):
        """Loss forward. `batch` holds `pixels` or precomputed `features`, plus `collate`'s fields.

        Returns the transformers output; `.loss` is the mean cross-entropy over answer tokens.
        """
        features = batch["features"] if "features" in batch else self.visual_features(
            batch["pixels"])
        image_embeds = self.project(features)
        inputs_embeds = self.embed(batch["input_ids"], batch["image_mask"], image_embeds)
        return self.llm(inputs_embeds=inputs_embeds,
                        attention_mask=batch["attention_mask"].to(self.device),
                        labels=batch["labels"].to(self.device),
                        output_attentions=output_attentions)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- counting -----------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameter counts by part, as printed by `python -m minigpt4_lite info`."""
        def count(m):
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        q_tokens = self.qformer.query_tokens.numel() if self.qformer is not None else 0
        return {
            "vision_params": count(self.vit),
            "qformer_params": count(self.qformer) - q_tokens,
            "query_tokens": q_tokens,
            "llm_params": count(self.llm),
            "projection_params": count(self.llama_proj),
            "trainable_params": sum(p.numel() for p in self.trainable_parameters()),
        }


def insert_image_embeds(llm: nn.Module, input_ids: torch.Tensor, image_mask: torch.Tensor,
                        image_embeds: torch.Tensor) -> torch.Tensor:
    """`llm`'s input embeddings of `input_ids`, with `image_embeds` [N, Q, d] in the image slots.

    The slots (`image_mask`, from `prompts.collate`) are filled in order: the first image's Q
    visual tokens go into the first Q slots, and so on (the official code concatenates the
    embedded text before the image, the image and the text after it: the same sequence).
    """
    emb = llm.get_input_embeddings()
    inputs = emb(input_ids.to(emb.weight.device))
    image_mask = image_mask.to(inputs.device)
    n_slots, n_given = int(image_mask.sum()), image_embeds.shape[0] * image_embeds.shape[1]
    if n_slots != n_given:
        raise ValueError(f"The sequences have {n_slots} image slots but {n_given} visual "
                         "tokens were given (one image per <ImageHere>).")
    return inputs.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(inputs.dtype))
