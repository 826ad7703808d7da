"""The tiny "BLIP-2": a ViT + Q-Former pretrained on rendered ToyWorld scenes, then frozen.

MiniGPT-4 (Sec. 3) takes BLIP-2's ViT and Q-Former as they are: frozen, already trained to turn an
image into a few query outputs that a frozen LLM can read through one fully-connected layer. Ours
is pretrained here with a grounded representation objective in the spirit of BLIP-2's first
stage (`GroundedHeads`): query i must predict the content of grid cell i (shape, colour, size or
"empty"), query 9 the background; and, by least squares through one linear layer, the bag of
words of its cell, our miniature of BLIP-2's second stage (Li et al. 2023, Sec. 3.3).

Also here: the linear probes and the least-squares read-out that measure what the frozen query
outputs hold (`probe_accuracy`, `linear_readout_r2`), and the export in the HF BLIP-2 layout that
the real-checkpoint loaders read (`save_vision_qformer`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints import atomic_save_file
from ..config import TINY_QFORMER, TINY_VISION
from ..evaluate import scene_features
from ..processing import CLIP_MEAN, CLIP_STD
from ..qformer import QFormer, hf_qformer_keys
from ..speed import compile_with_fallback
from ..train import warmup_cosine
from ..vision import VisionTransformer, hf_vision_keys
from . import world as tw
from .recipe import BuildConfig, build_autocast, finite_loss
from .slots import SlotEncoder, slot_vocabulary, slot_word_counts


def render_batch(scenes: list[tw.Scene]) -> torch.Tensor:
    """Rendered, CLIP-normalised images [B, 3, S, S] (the eval transform at the native size)."""
    arr = np.stack([np.asarray(tw.render(s, TINY_VISION.image_size)) for s in scenes])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def cell_targets(scenes: list[tw.Scene]) -> dict[str, torch.Tensor]:
    """Per-cell class targets: 0 = empty, else 1 + index of the shape / colour / size."""
    n_cells = tw.GRID * tw.GRID
    t = {k: torch.zeros(len(scenes), n_cells, dtype=torch.long)
         for k in ("shape", "colour", "size")}
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            t["shape"][b, obj.cell] = 1 + tw.SHAPES.index(obj.shape)
            t["colour"][b, obj.cell] = 1 + tw.COLOURS.index(obj.colour)
            t["size"][b, obj.cell] = 1 + tw.SIZES.index(obj.size)
    t["background"] = torch.tensor([tw.BACKGROUNDS.index(s.background) for s in scenes])
    t["words"] = slot_word_counts(scenes)  # what each query's slot says in words (10 slots)
    return t


class GroundedHeads(nn.Module):
    """The pretraining heads (thrown away after the build).

    Query i (i < 9) predicts grid cell i's shape, colour and size (0 = empty), query 9 the
    background. An auxiliary dense objective on the ViT's patch tokens (each patch predicts its own
    cell's content and which cell it lies in) gives the ViT local, position-aware features first,
    as CLIP pretraining does for BLIP-2's ViT; without it the queries take far longer to find
    their cells.

    With `words_weight > 0`, every query's output must also give, through one shared linear
    layer, the bag of words of its slot (`slot_word_counts`: the cell's position words and its
    size, colour and shape, or "empty"; the background's words for query 9), by least squares.
    The cross-entropy heads make the attributes linearly *separable*; this makes the words
    linearly *readable*, so that some linear projection maps the query outputs onto any LLM's slot
    vectors (sums of word embeddings) almost exactly: R^2 0.93 -> 0.999 for the shipped LLM. It is
    our miniature of BLIP-2's second stage, which trained the Q-Former until one fully-connected
    layer could hand its outputs to a frozen LLM (Li et al. 2023, Sec. 3.3; MiniGPT-4 Sec. 3).
    The words are words, not any LLM's embeddings: the ViT + Q-Former never see the LLM.
    """

    def __init__(self, hidden: int, vit_width: int, words_weight: float = 0.0):
        super().__init__()
        self.words_weight = words_weight
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, 1 + n) for k, n in self.SIZES.items()})
        self.background = nn.Linear(hidden, len(tw.BACKGROUNDS))
        self.patch = nn.ModuleDict({k: nn.Linear(vit_width, 1 + n) for k, n in self.SIZES.items()})
        self.patch_cell = nn.Linear(vit_width, tw.GRID * tw.GRID)
        grid = TINY_VISION.image_size // TINY_VISION.patch_size  # patches per side
        cell_of_patch = [(r * tw.GRID // grid) * tw.GRID + c * tw.GRID // grid
                         for r in range(grid) for c in range(grid)]
        self.register_buffer("cell_of_patch", torch.tensor(cell_of_patch), persistent=False)
        if words_weight > 0:  # created last: the other heads start as in builds without it
            self.words = nn.Linear(hidden, len(slot_vocabulary()))

    SIZES = {"shape": len(tw.SHAPES), "colour": len(tw.COLOURS), "size": len(tw.SIZES)}

    def loss(self, patches: torch.Tensor, queries: torch.Tensor, t: dict) -> torch.Tensor:
        cells = queries[:, :9]
        loss = F.cross_entropy(self.background(queries[:, 9]), t["background"])
        for k in self.SIZES:
            loss = loss + F.cross_entropy(self.heads[k](cells).flatten(0, 1), t[k].flatten())
            patch_target = t[k][:, self.cell_of_patch]  # each patch: its cell's attribute
            loss = loss + F.cross_entropy(self.patch[k](patches).flatten(0, 1),
                                          patch_target.flatten())
        where = self.cell_of_patch.expand(patches.shape[0], -1)
        loss = loss + F.cross_entropy(self.patch_cell(patches).flatten(0, 1), where.flatten())
        if self.words_weight > 0:  # squared error summed over the words, averaged over queries
            error = self.words(queries) - t["words"]
            loss = loss + self.words_weight * error.pow(2).sum(-1).mean()
        return loss


def pretrain_vision(cfg: BuildConfig, scenes: list[tw.Scene]):
    """Pretrain a ViT + Q-Former with `GroundedHeads` on rendered `scenes`; both in eval mode."""
    torch.manual_seed(cfg.seed + 1)
    vit, qformer = VisionTransformer(TINY_VISION), QFormer(TINY_QFORMER, TINY_VISION.width)
    for module in (vit, qformer):  # BERT/ViT-style init (the zeros of __init__ are placeholders)
        for name, p in module.named_parameters():
            if p.dim() > 1 or name in ("cls_token", "pos_embed", "query_tokens"):
                nn.init.trunc_normal_(p, std=0.02)
    heads = GroundedHeads(TINY_QFORMER.hidden, TINY_VISION.width, cfg.vision_words_weight)
    params = [*vit.parameters(), *qformer.parameters(), *heads.parameters()]
    for m in (vit, qformer, heads):
        m.to(cfg.device).train()
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.05)
    images = render_batch(scenes)  # rendered once: the vision pretraining reuses them
    targets = cell_targets(scenes)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    total = cfg.steps(cfg.vision_steps)

    def step_loss(x, t):
        if cfg.vision_attention == "explicit":  # the maps' code path, maps unused: see BuildConfig
            tokens = vit(x, return_attentions=True)[0]
            queries = qformer(tokens, return_attentions=True)[0]
        else:
            tokens = vit(x)
            queries = qformer(tokens)
        return heads.loss(tokens[:, 1:].float(), queries.float(), t)

    if cfg.vision_compile:  # fixed shapes: one static graph for the whole run
        step_loss = compile_with_fallback(step_loss, dynamic=False)
    bar = tqdm(range(total), desc="ViT + Q-Former (grounded)")
    for step in bar:
        # the project's one schedule, MiniGPT-4's (`train.warmup_cosine`); builds before
        # 2026-11-29 ran their cosine over the steps after warmup (docs/asset_history.md)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, total, max(1, total // 15), cfg.vision_lr,
                                        cfg.vision_lr / 20)
        idx = torch.randint(len(scenes), (cfg.vision_batch,), generator=gen)
        with build_autocast(cfg):
            loss = step_loss(images[idx].to(cfg.device),
                             {k: v[idx].to(cfg.device) for k, v in targets.items()})
        value = finite_loss(loss, step, "ViT + Q-Former")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{value:.3f}")
    return vit.eval(), qformer.eval()


@torch.no_grad()
def query_features(vit, qformer, scenes: list[tw.Scene], batch: int = 256) -> torch.Tensor:
    """The frozen query outputs [B, 10, hidden] of rendered `scenes`, in float32 on the CPU."""
    device = vit.patch_embed.weight.device
    return torch.cat([qformer(vit(render_batch(scenes[i:i + batch]).to(device))).float().cpu()
                      for i in range(0, len(scenes), batch)])


def probe_accuracy(vit, qformer, train: list[tw.Scene], heldout: list[tw.Scene],
                   steps: int = 300) -> dict:
    """Linear probes on the frozen query outputs: each object's shape, colour and position.

    One linear classifier per attribute, shared by the 9 cell queries, trained on `train` scenes
    and measured on `heldout` ones: shape/colour accuracy over held-out objects (read from the
    query of the object's cell), position accuracy = occupied-vs-empty right for every cell;
    cell accuracy = which cell a query stands for, read from that one query's output (what a
    shared linear projection needs to put the position words into each visual token).
    """
    f_tr, f_ho = query_features(vit, qformer, train), query_features(vit, qformer, heldout)
    t_tr, t_ho = cell_targets(train), cell_targets(heldout)
    for t in (t_tr, t_ho):  # class c + 1 for cell c: 0 stays "no class"
        t["cell"] = torch.arange(1, 10).expand(len(t["background"]), -1)
    result = {}
    for attr, n_cls in (("shape", 1 + len(tw.SHAPES)), ("colour", 1 + len(tw.COLOURS)),
                        ("cell", 10)):
        probe = nn.Linear(f_tr.shape[-1], n_cls)
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        x, y = f_tr[:, :9].flatten(0, 1), t_tr[attr].flatten()
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(probe(x), y).backward()
            opt.step()
        pred, gold = probe(f_ho[:, :9]).argmax(-1), t_ho[attr]
        occupied = gold > 0
        result[f"{attr}_accuracy"] = float((pred[occupied] == gold[occupied]).float().mean())
        if attr == "shape":  # position: the probe finds an object exactly where there is one
            result["position_accuracy"] = float(((pred > 0) == occupied).float().mean())
    return {k: round(v, 4) for k, v in result.items()}


@torch.no_grad()
def linear_readout_r2(model, train: list[tw.Scene], heldout: list[tw.Scene]) -> float:
    """How well *some* linear projection can turn query outputs into the LLM's slot vectors.

    Fits the least-squares linear map (with bias, shared by the 10 queries) from the frozen
    query outputs of `train` scenes to their exact slot vectors (`SlotEncoder`, no noise), and
    returns its R^2 on `heldout` scenes: 1.0 means the projection that stage 1 looks for exists
    and hands the LLM exactly what it read in pretraining.
    """
    slots, emb = SlotEncoder(model.tokenizer), model.llm.get_input_embeddings()

    def design(scenes):  # rows: one query output (+ a 1 for the bias) -> its exact slot vector
        f = scene_features(model, scenes).float().flatten(0, 1).cpu()
        target = slots(scenes, emb, 0.0).float().flatten(0, 1).cpu()
        return torch.cat([f, torch.ones(len(f), 1)], 1), target

    (x, y), (x_ho, y_ho) = design(train), design(heldout)
    w = torch.linalg.solve(x.T @ x + 1e-3 * torch.eye(x.shape[1]), x.T @ y)
    residual = (x_ho @ w - y_ho).pow(2).sum()
    return round(float(1 - residual / (y_ho - y_ho.mean(0)).pow(2).sum()), 4)


# --- saving in the HF BLIP-2 layout ------------------------------------------------------------
def save_vision_qformer(vit, qformer, folder: Path) -> None:
    """Save in the HF BLIP-2 layout (`vision_model.*`, `qformer.*`, `query_tokens`)."""
    state = {}
    for module, key_map in ((vit, hf_vision_keys(TINY_VISION)), (qformer,
                                                                 hf_qformer_keys(TINY_QFORMER))):
        own = module.state_dict()
        state.update({theirs: own[ours].float() for ours, theirs in key_map.items()})
    atomic_save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    v, q = TINY_VISION, TINY_QFORMER
    config = {
        "model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"],
        "num_query_tokens": q.num_query_tokens,
        "vision_config": {"hidden_size": v.width, "intermediate_size": v.mlp,
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                          "image_size": v.image_size, "patch_size": v.patch_size,
                          "layer_norm_eps": v.layer_norm_eps, "qkv_bias": True},
        "qformer_config": {"hidden_size": q.hidden, "num_hidden_layers": q.layers,
                           "num_attention_heads": q.heads, "intermediate_size": q.mlp,
                           "cross_attention_frequency": q.cross_attention_every,
                           "encoder_hidden_size": v.width, "layer_norm_eps": q.layer_norm_eps},
        "note": "ToyWorld ViT + Q-Former of minigpt4-lite; no language model is included.",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
