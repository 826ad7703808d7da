"""Looking inside MiniGPT-4: where the queries look, what the LLM reads, how alignment moves tokens.

MiniGPT-4 trains one linear layer (Sec. 3.1) between a frozen Q-Former and a frozen LLM. These
figures show what that layer does. Every function returns `(figure, data)`: the matplotlib Figure
and the numbers drawn in it, so notebooks and tests can check them.

- `qformer_cross_attention`: which image patches each learned query reads (frozen BLIP-2 part);
- `llm_attention_to_image`: how much each generated word attends to the visual tokens, and where
  in the image that points when composed with the Q-Former's cross-attention;
- `projected_token_lens`: the vocabulary words nearest to each projected visual token (a "lens");
- `alignment_pca`: visual tokens moving into the LLM's word-embedding space, stage by stage;
- `training_curves`: loss and learning rate of training runs;
- `lens_hit_rate`: a number for the lens: do the nearest words name the objects in the scene?
"""

from __future__ import annotations

import copy
import json
import textwrap
from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from . import toyworld as tw
from .chat import GenerationSettings, generate
from .checkpoints import read_projection
from .data import stage2_prompt
from .evaluate import scene_features
from .model import MiniGPT4
from .processing import denormalize

STOPWORDS = {"a", "an", "the", "is", "are", "and", "of", "in", "on", "at", "to", "it", "its",
             "with", "there", "this", "that", "image", "picture", "i", "see", "which", "one"}
POSITION_WORDS = tuple(dict.fromkeys(tw.ROWS + tw.COLS))  # top middle bottom left center right
DEFAULT_WORDS = tw.COLOURS + tw.SHAPES + POSITION_WORDS + tw.SIZES + ("empty", "background")


# --- small helpers --------------------------------------------------------------------------------
@contextmanager
def eager_attention(llm):
    """Switch a transformers model to eager attention while inside, then restore it.

    transformers' default SDPA kernel never materialises the attention matrix: with
    `output_attentions=True` it returns empty tuples (TOOLCHAIN.md). Eager computes the softmax.
    """
    before = llm.config._attn_implementation
    if before != "eager":
        llm.set_attn_implementation("eager")
    try:
        yield llm
    finally:
        if before != "eager":
            llm.set_attn_implementation(before)


def _one(pixels: torch.Tensor) -> torch.Tensor:
    """A single image as a batch of one [1, 3, S, S]."""
    return (pixels if pixels.dim() == 4 else pixels.unsqueeze(0))[:1]


def _grid(model) -> int:
    return model.cfg.vision.image_size // model.cfg.vision.patch_size


def _show(ax, pixels, heat=None, vmax=None, title=None):
    """The (denormalised) image, upscaled without smoothing, with an optional patch heatmap."""
    img = denormalize(pixels.detach().float().cpu()).permute(1, 2, 0).numpy()
    ax.imshow(img, interpolation="nearest", extent=(0, 1, 1, 0))
    im = None
    if heat is not None:
        im = ax.imshow(np.asarray(heat), cmap="magma", alpha=0.6, interpolation="nearest",
                       extent=(0, 1, 1, 0), vmin=0, vmax=vmax)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return im


def _token_text(tokenizer, token_id: int) -> str:
    """How one token reads: its decoded text without the word-initial space (repr if blank)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:  # a piece of a multi-byte character: show the raw token instead
        text = tokenizer.convert_ids_to_tokens(token_id)
    return text.strip() if text.strip().isprintable() and text.strip() else repr(text)


@torch.no_grad()
def _nearest_tokens(model, vectors: torch.Tensor, k: int):
    """Cosine top-k of `vectors` [M, d] against the LLM's input embeddings: (cos [M,k], ids)."""
    emb = F.normalize(model.llm.get_input_embeddings().weight.float(), dim=-1)
    cos = F.normalize(vectors.float().to(emb.device), dim=-1) @ emb.T
    top = cos.topk(k, dim=-1)
    return top.values.cpu(), top.indices.cpu()


@torch.no_grad()
def _cross_attention(model, pixels, layer="mean", heads="mean") -> torch.Tensor:
    """Q-Former cross-attention of one image [Q, 1+N] (CLS first); every row sums to 1."""
    tokens = model.vit(_one(pixels).to(model.vit.patch_embed.weight.device))
    _, att = model.qformer(tokens, return_attentions=True)
    cross = torch.stack(att["cross"])[:, 0].float().cpu()  # [layers, heads, Q, 1+N]
    cross = cross.mean(0) if layer == "mean" else cross[layer]
    return cross.mean(0) if heads == "mean" else cross[heads]


def _patch_maps(att: torch.Tensor, g: int) -> torch.Tensor:
    """Drop the CLS column and renormalise over the patches: [Q, 1+N] -> [Q, g, g]."""
    patches = att[:, 1:]
    return (patches / patches.sum(-1, keepdim=True)).view(-1, g, g)


# --- 1. the frozen Q-Former -----------------------------------------------------------------------
def qformer_cross_attention(model, pixels: torch.Tensor, layer="mean", heads="mean"):
    """Where each learned query looks: Q-Former cross-attention over the ViT's patches (Sec. 3).

    `layer` indexes the cross-attention layers (0 = the Q-Former's layer 0, 1 = its layer 2, ...)
    or averages them ("mean"); `heads` picks one head or averages them. The queries also attend
    to the ViT's CLS token: its share is reported per query (`cls_mass`, in the panel titles),
    and the maps show the *patch* attention renormalised to sum to 1 over the patches.
    Returns `(fig, {"attention": [Q, 1+N] raw rows, "cls_mass": [Q], "patch_attention":
    [Q, g, g]})`.
    """
    att = _cross_attention(model, pixels, layer, heads)
    maps = _patch_maps(att, _grid(model))
    Q, cols = att.shape[0], 5 if att.shape[0] <= 10 else 8
    rows = -(-Q // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.8, 2.0 * rows + 0.6),
                             squeeze=False, layout="constrained")
    vmax = float(maps.max())
    for q, ax in enumerate(axes.flat):
        if q >= Q:
            ax.axis("off")
            continue
        im = _show(ax, _one(pixels)[0], maps[q], vmax, f"query {q} · CLS {att[q, 0]:.0%}")
    fig.colorbar(im, ax=axes, shrink=0.7, label="share of patch attention")
    fig.suptitle(f"Q-Former cross-attention (layer {layer}, heads {heads}): patch attention "
                 "renormalised over patches; CLS share in titles", fontsize=10)
    return fig, {"attention": att, "cls_mass": att[:, 0], "patch_attention": maps,
                 "layer": layer, "heads": heads}


# --- 2. the LLM reading the image -----------------------------------------------------------------
def _word_spans(tokenizer, ids: list[int]) -> list[list[int]]:
    """Group token positions into words: a token opens a word when its text starts with a space."""
    spans, before = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1])
        piece, before = text[len(before):], text
        if not spans or piece[:1].isspace():
            spans.append([i])
        else:
            spans[-1].append(i)
    return spans


@torch.no_grad()
def llm_attention_to_image(model, pixels: torch.Tensor,
                           prompt_instruction: str = "Describe this image in detail.",
                           max_new_tokens: int = 40, n_heatmaps: int = 8):
    """How much each generated word attends to the image, and where (Sec. 3, Fig. 1).

    The answer is generated greedily, then re-read in one forward pass over prompt + answer with
    eager attention. A word's attention is that of the position(s) that *predicted* its tokens
    (the token before each of them), averaged over its tokens, all layers and all heads; each
    row splits into visual tokens / BOS / other prompt text / the answer so far (sums to 1).
    The heatmaps compose two attentions: word -> visual token [Q] (renormalised over the visual
    tokens) @ query -> patch [Q, N] (Q-Former cross-attention, mean over layers and heads, CLS
    dropped and renormalised). Like attention rollout this treats attention as the only path:
    it ignores residual connections, MLPs and the norms of the value vectors, so it shows where
    attention points, not what information flows. Each heatmap sums to 1 over the patches.
    """
    pixels = _one(pixels)
    image_embeds = model.encode_image(pixels)
    prompt = stage2_prompt(prompt_instruction)
    settings = GenerationSettings(do_sample=False, max_new_tokens=max_new_tokens)
    text = generate(model, [prompt], image_embeds, settings, stop="###")[0].text
    n_prompt = len(model.build_example(prompt).ids)
    example = model.build_example(prompt, text, end_sym="", max_txt_len=10**6)
    batch = model.collate([example])
    embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    with eager_attention(model.llm):
        out = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(
            embeds.device), output_attentions=True)
    att = torch.stack(out.attentions)[:, 0].float().mean((0, 1)).cpu()  # [T, T]
    visual = batch["image_mask"][0]
    is_prompt_text = ~visual & (torch.arange(len(visual)) < n_prompt)
    is_prompt_text[0] = False  # BOS is reported on its own: it is often an attention sink
    answer_ids = example.ids[n_prompt:]
    spans = _word_spans(model.tokenizer, answer_ids)
    words = [model.tokenizer.decode([answer_ids[i] for i in s]).strip() for s in spans]
    rows = torch.stack([att[[n_prompt + i - 1 for i in s]].mean(0) for s in spans]) if spans \
        else att.new_zeros(0, att.shape[0])
    mass = {"visual": rows[:, visual].sum(-1), "BOS": rows[:, 0],
            "prompt text": rows[:, is_prompt_text].sum(-1), "answer so far": rows[:, n_prompt:]
            .sum(-1)}
    to_visual = rows[:, visual] / rows[:, visual].sum(-1, keepdim=True)
    query_maps = _patch_maps(_cross_attention(model, pixels), _grid(model))
    heatmaps = torch.einsum("wq,qhv->whv", to_visual, query_maps)
    content = [i for i, w in enumerate(words)
               if w.strip(".,;:!?'\"").isalpha() and w.strip(".,;:!?").lower() not in STOPWORDS]
    shown = content[:n_heatmaps]

    fig = plt.figure(figsize=(max(10.0, 1.6 * (len(shown) + 1)), 6.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.2, 1])
    ax = top.subplots()
    x, bottom_stack = np.arange(len(words)), np.zeros(len(words))
    colours = {"visual": "tab:red", "BOS": "0.6", "prompt text": "tab:blue",
               "answer so far": "tab:green"}
    for name, values in mass.items():
        ax.bar(x, values.numpy(), bottom=bottom_stack, color=colours[name], label=name, width=0.8)
        bottom_stack += values.numpy()
    ax.set_xticks(x, words, rotation=60, ha="right", fontsize=8 if len(words) < 30 else 6)
    ax.set_ylim(0, 1), ax.set_xlim(-0.6, max(len(words), 1) - 0.4)
    ax.set_ylabel("attention share (mean over layers, heads)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_title(textwrap.shorten(f"{prompt_instruction!r} -> {text!r}", 150), fontsize=9)
    panels = bottom.subplots(1, len(shown) + 1, squeeze=False)[0]
    _show(panels[0], pixels[0], title="image")
    vmax = float(heatmaps[shown].max()) if shown else None
    im = None
    for ax, i in zip(panels[1:], shown):
        title = f"{words[i]!r}\nvisual {mass['visual'][i]:.0%}"
        im = _show(ax, pixels[0], heatmaps[i], vmax, title)
    if im is not None:
        bottom.colorbar(im, ax=panels, shrink=0.8, label="share over patches")
    bottom.suptitle("word -> visual tokens -> patches (attention only; ignores residuals, MLPs, "
                    "value norms)", fontsize=9)
    return fig, {"text": text, "words": words, "token_spans": spans, "mass": mass,
                 "to_visual": to_visual, "heatmaps": heatmaps, "content_words": content}


# --- 3. the lens: which words are the projected visual tokens near? -------------------------------
@torch.no_grad()
def projected_token_lens(model, pixels: torch.Tensor, k: int = 5, layers=None,
                         prompt: str | None = None, queries=None):
    """Read each projected visual token with the LLM's vocabulary (a lens, after Sec. 3.1).

    Two readings per visual token: its top-k cosine-nearest rows of the LLM's input-embedding
    table (what the token "looks like" to the LLM), and the logit lens at `layers` (final norm +
    lm_head applied to the hidden state at the token's position, in a forward over
    `[BOS] + visual tokens`, or over `prompt` with `<ImageHere>`). The logit lens is a
    *next-token* guess: in late layers it says what the LLM expects after that token.
    `layers` counts decoder layers (1..L; default about a third, two thirds and the last).
    `queries` picks which queries to draw (default: the first 12); `data` holds them all.
    """
    pixels, tok = _one(pixels), model.tokenizer
    n_layers = model.llm.config.num_hidden_layers
    layers = layers or sorted({max(1, n_layers // 3), max(1, 2 * n_layers // 3), n_layers})
    image_embeds = model.encode_image(pixels)
    cos, ids = _nearest_tokens(model, image_embeds[0], k)
    nearest = [[(_token_text(tok, i), float(c)) for i, c in zip(r.tolist(), cr)]
               for r, cr in zip(ids, cos)]
    batch = model.collate([model.build_example(prompt)])
    embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    out = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(embeds.device),
                    output_hidden_states=True)
    where = batch["image_mask"][0].nonzero().squeeze(-1)
    lens = {}
    for layer in layers:  # hidden_states[-1] is already normed: it gives out.logits
        logits = out.logits[0] if layer == n_layers else model.llm.lm_head(
            model.llm.model.norm(out.hidden_states[layer][0]))
        top = logits[where.to(logits.device)].topk(k, dim=-1).indices.cpu()
        lens[layer] = [[_token_text(tok, i) for i in r.tolist()] for r in top]
    maps = _patch_maps(_cross_attention(model, pixels), _grid(model))

    queries = list(queries if queries is not None else range(min(len(nearest), 12)))
    rows = -(-len(queries) // 2)
    fig, axes = plt.subplots(rows, 4, figsize=(13, 1.75 * rows + 0.7), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.6, 1, 2.6]}, layout="constrained")
    header = ["input emb. (cos)"] + [f"lens L{layer}" for layer in layers]
    for slot, (ax_img, ax_tab) in enumerate(axes.reshape(-1, 2)):
        ax_tab.axis("off")
        if slot >= len(queries):
            ax_img.axis("off")
            continue
        q = queries[slot]
        _show(ax_img, pixels[0], maps[q], title=f"query {q}")
        cells = [[f"{w} {c:.2f}"] + [lens[layer][q][j] for layer in layers]
                 for j, (w, c) in enumerate(nearest[q])]
        table = ax_tab.table(cellText=cells, colLabels=header, loc="center", cellLoc="left")
        table.auto_set_font_size(False), table.set_fontsize(7.5)
    fig.suptitle(f"Lens on the projected visual tokens: top-{k} nearest input embeddings "
                 f"(cosine) and logit lens ({'[BOS] + image' if prompt is None else 'prompt'}), "
                 "next to each query's cross-attention", fontsize=10)
    return fig, {"nearest": nearest, "nearest_ids": ids, "cos": cos, "logit_lens": lens,
                 "layers": list(layers), "cross_attention": maps}


# --- 4. alignment as geometry ---------------------------------------------------------------------
def _word_vectors(model, words) -> torch.Tensor:
    """Each word's input embedding as the LLM sees it in a sentence (" word"; mean over tokens)."""
    tok, table = model.tokenizer, model.llm.get_input_embeddings().weight
    vectors = []
    for w in words:
        ids = [i for i in tok(" " + w, add_special_tokens=False).input_ids
               if tok.decode([i]).strip()]  # SentencePiece may add a lone "▁" first
        vectors.append(table[ids].float().mean(0))
    return torch.stack(vectors).detach().cpu()


def _projector(value, base):
    """features -> visual tokens, from a model, a projection module, a state dict or a path."""
    if isinstance(value, MiniGPT4):
        return value.project
    if isinstance(value, (str, Path)):
        value = read_projection(value)
    if isinstance(value, dict):
        if any(k.startswith("llama_proj.") for k in value):  # a checkpoint, not a module's
            value = {k.removeprefix("llama_proj."): v for k, v in value.items()
                     if k.startswith("llama_proj.")}
        proj = copy.deepcopy(base.llama_proj)
        proj.load_state_dict(value)
        value = proj
    param = next(value.parameters())
    return lambda f: value(f.to(param.device, param.dtype))


@torch.no_grad()
def alignment_pca(projections: dict, pixels_batch: torch.Tensor, words=DEFAULT_WORDS, model=None):
    """Visual tokens moving into the LLM's word space: one PCA panel per projection (Sec. 3.1).

    `projections` maps a name ("untrained", "stage 1", "stage 2") to a `MiniGPT4`, a projection
    module, a projection state dict or a checkpoint path (then `model` gives the frozen parts).
    The 2-D PCA is fitted on the word embeddings only, so all panels share the same axes; the
    visual tokens of `pixels_batch` are projected onto them. Titles give the mean cosine of each
    visual token to its nearest word, which the 2-D picture alone can hide.
    """
    base = model or next(v for v in projections.values() if isinstance(v, MiniGPT4))
    W = _word_vectors(base, words)
    mean = W.mean(0)
    _, S, V = torch.linalg.svd(W - mean, full_matrices=False)
    axes2 = V[:2].T  # [d, 2]
    explained = (S[:2] ** 2 / (S ** 2).sum()).tolist()
    features = base.visual_features(pixels_batch)
    Q = features.shape[1]
    data = {"words": list(words), "word_xy": (W - mean) @ axes2, "explained": explained}
    for name, value in projections.items():
        tokens = _projector(value, base)(features).float().cpu().flatten(0, 1)
        cos = F.normalize(tokens, dim=-1) @ F.normalize(W, dim=-1).T
        data[name] = {"xy": (tokens - mean) @ axes2, "nearest_word_cos": float(cos.max(-1)
                      .values.mean()), "norm_ratio": float(tokens.norm(dim=-1).mean()
                      / W.norm(dim=-1).mean())}
    points = torch.cat([data["word_xy"]] + [data[n]["xy"] for n in projections])
    lo, hi = points.quantile(0.01, dim=0), points.quantile(0.99, dim=0)
    pad = 0.08 * (hi - lo)
    fig, axes = plt.subplots(1, len(projections), figsize=(5.2 * len(projections), 5.2),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    query = np.tile(np.arange(Q), len(pixels_batch))
    for ax, name in zip(axes[0], projections):
        xy = data[name]["xy"].numpy()
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=query, cmap="tab10" if Q <= 10 else "viridis",
                        s=9, alpha=0.45, linewidths=0)
        for w, (x, y) in zip(words, data["word_xy"].tolist()):
            colour = np.array(tw.COLOUR_RGB[w]) / 255 if w in tw.COLOUR_RGB else "black"
            ax.scatter([x], [y], marker="x", color=colour, s=30)
            ax.annotate(w, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8,
                        color=colour, fontweight="bold" if w in tw.SHAPES else "normal")
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0]), ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_title(f"{name}\nnearest-word cosine {data[name]['nearest_word_cos']:.2f}, "
                     f"|token|/|word| {data[name]['norm_ratio']:.1f}", fontsize=9)
        ax.set_xlabel(f"PC1 of word embeddings ({explained[0]:.0%})")
    axes[0, 0].set_ylabel(f"PC2 ({explained[1]:.0%})")
    fig.colorbar(sc, ax=axes, shrink=0.8, label="query index of the visual token")
    fig.suptitle("Projected visual tokens (dots) and word embeddings (x) in the LLM's input space;"
                 " PCA fitted on the words (1%-99% of points shown)", fontsize=10)
    return fig, data


# --- 5. training ----------------------------------------------------------------------------------
def read_history(path: str | Path) -> list[dict]:
    """The history `[{step, loss, lr, ...}]` stored in a training checkpoint (`train.py`)."""
    from safetensors import safe_open

    path = Path(path)
    path = path / "checkpoint.safetensors" if path.is_dir() else path
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])["history"]


def _ema(values, alpha: float) -> np.ndarray:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, m = [], 0.0
    for i, v in enumerate(values, 1):
        m = alpha * m + (1 - alpha) * v
        out.append(m / (1 - alpha ** i))
    return np.array(out)


def training_curves(histories, smoothing: float = 0.9):
    """Loss (raw, faint; EMA-smoothed, bold) and learning rate (twin axis) against the step.

    `histories`: one history (list of `{step, loss, lr}` as returned by `train`), a checkpoint
    path, or a dict `name -> history/path` (one panel each, e.g. stage 1 and stage 2).
    """
    if not isinstance(histories, dict):
        histories = {"training": histories}
    fig, axes = plt.subplots(1, len(histories), figsize=(5.5 * len(histories), 3.8),
                             squeeze=False, layout="constrained")
    data = {}
    for ax, (name, history) in zip(axes[0], histories.items()):
        history = read_history(history) if isinstance(history, (str, Path)) else history
        step = np.array([r["step"] for r in history])
        loss = np.array([r["loss"] for r in history], dtype=float)
        lr = np.array([r.get("lr", np.nan) for r in history], dtype=float)
        smooth = _ema(loss, smoothing)
        data[name] = {"step": step, "loss": loss, "smoothed": smooth, "lr": lr}
        ax.plot(step, loss, color="tab:blue", alpha=0.25, lw=1, label="loss")
        ax.plot(step, smooth, color="tab:blue", lw=2, label=f"loss, EMA {smoothing}")
        ax.set_xlabel("step"), ax.set_ylabel("loss (answer tokens)", color="tab:blue")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(step, lr, color="tab:orange", lw=1.2, ls="--", label="learning rate")
        twin.set_ylabel("learning rate", color="tab:orange")
        twin.set_ylim(bottom=0)
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.set_title(f"{name}: {len(step)} steps, final smoothed loss "
                     f"{smooth[-1] if len(smooth) else float('nan'):.3f}", fontsize=10)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, frameon=False,
                  ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    return fig, data


# --- 6. the lens as a number ----------------------------------------------------------------------
@torch.no_grad()
def lens_hits(model, scenes: list[tw.Scene], k: int = 5, batch_size: int = 256) -> dict:
    """Per scene and per object: do the lens's nearest words name the scene's objects?

    For each scene, take the top-k cosine-nearest vocabulary tokens (input embeddings) of every
    projected visual token (all Q, background query included) and pool them into one set of
    words (token text, stripped, lower-cased; a word must be one whole token). An object is hit
    when both its colour word and its shape word are in the set (from any tokens, not
    necessarily the same one); a scene is hit when all its objects are.
    """
    tok, cache = model.tokenizer, {}
    features = scene_features(model, scenes)
    scene_hit, object_hit = [], []
    for i in range(0, len(scenes), batch_size):
        tokens = model.project(features[i:i + batch_size])
        _, ids = _nearest_tokens(model, tokens.flatten(0, 1), k)
        for scene, row in zip(scenes[i:i + batch_size], ids.view(tokens.shape[0], -1).tolist()):
            found = {cache.setdefault(t, tok.decode([t]).strip().lower()) for t in row}
            hits = [o.colour in found and o.shape in found for o in scene.objects]
            object_hit += hits
            scene_hit.append(all(hits))
    return {"scene_rate": float(np.mean(scene_hit)), "object_rate": float(np.mean(object_hit)),
            "scene_hits": scene_hit, "k": k, "n_scenes": len(scenes)}


def lens_hit_rate(model, scenes: list[tw.Scene], k: int = 5) -> float:
    """Share of scenes whose pooled top-k lens words name every object (see `lens_hits`)."""
    return lens_hits(model, scenes, k)["scene_rate"]
