"""The peer of `stage1_step.py`: transformers' BLIP-2 holding exactly our weights (Sec. 3.1).

MiniGPT-4's architecture is BLIP-2's frozen ViT + Q-Former with one linear layer into a frozen LLM,
which is what transformers' `Blip2ForConditionalGeneration` computes when its text model is a
LLaMA. `build_peer` makes one from a `MiniGPT4`: the ViT and Q-Former copied through the inverse
key maps (`hf_vision_keys`, `hf_qformer_keys`), `language_projection` = our `llama_proj`, the LLM
copied or shared. The same batch then gives the same loss in both, so their step times compare the
same work. Not a benchmark itself: `stage1_step.py` imports it (`import peer`).
"""

from __future__ import annotations

import copy

import harness  # noqa: F401 - puts the repository on sys.path, keeps transformers offline
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

from minigpt4_lite.model import MiniGPT4
from minigpt4_lite.qformer import hf_qformer_keys
from minigpt4_lite.vision import hf_vision_keys


def blip2_config(model: MiniGPT4) -> Blip2Config:
    """The `Blip2Config` of our shapes (ViT, Q-Former, and the LLM's own config as text model)."""
    v, q = model.cfg.vision, model.cfg.qformer
    return Blip2Config(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp,
                           num_hidden_layers=v.layers, num_attention_heads=v.heads,
                           image_size=v.image_size, patch_size=v.patch_size,
                           layer_norm_eps=v.layer_norm_eps, qkv_bias=True),
        qformer_config=dict(hidden_size=q.hidden, num_hidden_layers=q.layers,
                            num_attention_heads=q.heads, intermediate_size=q.mlp,
                            cross_attention_frequency=q.cross_attention_every,
                            encoder_hidden_size=v.width, layer_norm_eps=q.layer_norm_eps),
        text_config=model.llm.config.to_dict(), num_query_tokens=q.num_query_tokens,
        image_token_index=model.tokenizer.pad_token_id)  # never in our unpadded batches


def build_peer(model: MiniGPT4, share_llm: bool, vision_dtype: torch.dtype):
    """`Blip2ForConditionalGeneration` holding our weights (built on meta, tensors assigned).

    As `from_pretrained(dtype=...)` would: the ViT in `vision_dtype`, the Q-Former and query
    tokens in float32 (`_keep_in_fp32_modules`); the projection float32 (it is trained).
    """
    v, q = model.cfg.vision, model.cfg.qformer
    cfg = blip2_config(model)
    with torch.device("meta"):
        peer = Blip2ForConditionalGeneration(cfg)
    vit, qformer = model.vit.state_dict(), model.qformer.state_dict()
    state = {hf: vit[ours].detach().to(vision_dtype, copy=True)
             for ours, hf in hf_vision_keys(v).items()}
    state.update({hf: qformer[ours].detach().float().clone()
                  for ours, hf in hf_qformer_keys(q).items()})
    state["language_projection.weight"] = model.llama_proj.weight.detach().float().clone()
    state["language_projection.bias"] = model.llama_proj.bias.detach().float().clone()
    missing, unexpected = peer.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(not k.startswith("language_model.") for k in missing):
        raise RuntimeError(f"peer weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    peer.language_model = model.llm if share_llm else copy.deepcopy(model.llm)
    meta = [n for n, t in [*peer.named_parameters(), *peer.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"peer tensors left on the meta device: {meta[:3]}")
    peer.eval()
    for p in peer.parameters():
        p.requires_grad_(False)
    peer.language_projection.requires_grad_(True)
    return peer


def peer_input_ids(batch: dict, peer) -> torch.Tensor:
    """Our `input_ids` with every image slot holding the peer's image token (where it puts the
    visual tokens); refuses a batch whose text already holds that id."""
    hf_ids = batch["input_ids"].clone()
    image_token = peer.config.image_token_index
    if (hf_ids[~batch["image_mask"]] == image_token).any():
        raise RuntimeError("the peer's image token id occurs in the text")
    hf_ids[batch["image_mask"]] = image_token
    return hf_ids
