"""Looking inside MiniGPT-4: where the queries look, what the LLM reads, how alignment moves tokens.

MiniGPT-4 trains one linear layer (Sec. 3.1) between a frozen Q-Former and a frozen LLM. Every
function here returns `(figure, data)`: a matplotlib Figure and the numbers drawn in it.

- `qformer_cross_attention`: which image patches each learned query reads (the frozen BLIP-2 part);
- `llm_attention_to_image`: how much each generated word attends to the visual tokens, and where
  in the image that points once composed with the Q-Former's cross-attention;
- `projected_token_lens`: the vocabulary tokens nearest to each projected visual token (a lens);
- `alignment_pca`: visual tokens moving next to the words that describe them, stage by stage;
- `training_curves`: loss and learning rate; `LiveLoss`: the loss curve drawn while `train` runs;
- `lens_hit_rate`: the lens as one number;
- the workbook's pictures: `scene_texts` (each scene above the texts written about it),
  `loss_mask` (the token sequence and which positions carry a loss), `metrics_table` (text).
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
from .errors import DataError
from .evaluate import scene_features
from .model import Example, MiniGPT4
from .processing import denormalize

STOPWORDS = {"a", "an", "the", "is", "are", "and", "of", "in", "on", "at", "to", "it", "its",
             "with", "there", "this", "that", "image", "picture", "i", "see", "sits", "one"}
POSITION_WORDS = tuple(dict.fromkeys(tw.ROWS + tw.COLS))  # top middle bottom left center right
WORD_GROUPS = {"colour": tw.COLOURS, "shape": tw.SHAPES, "position": POSITION_WORDS}


# --- helpers --------------------------------------------------------------------------------------
@contextmanager
def eager_attention(llm):
    """Eager attention inside the block, then the previous kernel again.

    SDPA (transformers' default) never materialises the attention matrix: with
    `output_attentions=True` it returns empty tuples (docs/toolchain.md). Eager computes them.
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


def _show(ax, pixels, heat=None, vmax=None, title=None):
    """The denormalised image, upscaled without smoothing, under an optional patch heatmap."""
    img = denormalize(pixels.detach().float().cpu()).permute(1, 2, 0).numpy()
    ax.imshow(img, interpolation="nearest", extent=(0, 1, 1, 0))
    im = None
    if heat is not None:  # attention per patch; nearest keeps the patch grid visible
        im = ax.imshow(np.asarray(heat), cmap="magma", alpha=0.6, vmin=0, vmax=vmax,
                       interpolation="nearest", extent=(0, 1, 1, 0))
    ax.set_xticks([]), ax.set_yticks([]), ax.set_title(title or "", fontsize=8)
    return im


def _token_text(tokenizer, token_id: int) -> str:
    """How a token reads: its text without the word-initial space (raw token or repr if odd)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:  # a piece of a multi-byte character
        text = tokenizer.convert_ids_to_tokens(token_id)
    return text.strip() if text.strip().isprintable() and text.strip() else repr(text)


@torch.no_grad()
def _nearest_tokens(model, vectors: torch.Tensor, k: int):
    """Cosine top-k of `vectors` [M, d] among the LLM's input embeddings: (cos, ids), [M, k]."""
    emb = F.normalize(model.llm.get_input_embeddings().weight.float(), dim=-1)
    top = (F.normalize(vectors.float().to(emb.device), dim=-1) @ emb.T).topk(k, dim=-1)
    return top.values.cpu(), top.indices.cpu()


@torch.no_grad()
def _cross_attention(model, pixels, layer="mean", heads="mean") -> torch.Tensor:
    """Q-Former cross-attention of one image [Q, 1+N] (CLS first); every row sums to 1."""
    tokens = model.vit(_one(pixels).to(model.vit.patch_embed.weight.device))
    cross = torch.stack(model.qformer(tokens, return_attentions=True)[1]["cross"])
    cross = cross[:, 0].float().cpu()  # [cross layers, heads, Q, 1+N]
    cross = cross.mean(0) if layer == "mean" else cross[layer]
    return cross.mean(0) if heads == "mean" else cross[heads]


def _patch_maps(model, att: torch.Tensor) -> torch.Tensor:
    """Drop the CLS column and renormalise over the patches: [Q, 1+N] -> [Q, g, g]."""
    g = model.cfg.vision.image_size // model.cfg.vision.patch_size
    return (att[:, 1:] / att[:, 1:].sum(-1, keepdim=True)).view(-1, g, g)


# --- 1. the frozen Q-Former -----------------------------------------------------------------------
def qformer_cross_attention(model, pixels: torch.Tensor, layer="mean", heads="mean"):
    """Where each learned query looks: Q-Former cross-attention over the ViT's tokens (Sec. 3).

    `layer` indexes the cross-attention layers (0 = the Q-Former's layer 0, 1 = its layer 2, ...)
    or averages them ("mean"); `heads` picks one head or averages them. The queries also attend
    to the ViT's CLS token: its share is reported per query (`cls_mass`, panel titles), and the
    maps show the *patch* attention renormalised to sum to 1 over the patches.
    data: `attention` [Q, 1+N] (raw rows, sum 1), `cls_mass` [Q], `patch_attention` [Q, g, g].
    """
    att = _cross_attention(model, pixels, layer, heads)
    maps = _patch_maps(model, att)
    Q, cols = len(att), 5 if len(att) <= 10 else 8
    rows = -(-Q // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.8, 2.0 * rows + 0.6),
                             squeeze=False, layout="constrained")
    for q, ax in enumerate(axes.flat):
        if q < Q:
            im = _show(ax, _one(pixels)[0], maps[q], float(maps.max()),
                       f"query {q} · CLS {att[q, 0]:.0%}")
        else:
            ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.7, label="share of the patch attention")
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
        spans.append([i]) if not spans or piece[:1].isspace() else spans[-1].append(i)
    return spans


@torch.no_grad()
def llm_attention_to_image(model, pixels: torch.Tensor,
                           prompt_instruction: str = "Describe this image in detail.",
                           max_new_tokens: int = 48, n_heatmaps: int = 8):
    """How much each generated word attends to the image, and where (Sec. 3, Fig. 1).

    The answer is generated greedily, then re-read in one forward pass over prompt + answer with
    eager attention. A word's attention is that of the position(s) that *predicted* its tokens
    (the token before each), averaged over its tokens, all layers and all heads; each row splits
    into visual tokens / BOS / the rest of the prompt / the answer so far (sums to 1).
    Heatmaps compose two attentions: word -> visual token [Q] (renormalised over the visual
    tokens) @ query -> patch [Q, N] (Q-Former cross-attention, mean over layers and heads, CLS
    dropped, renormalised); each sums to 1 over the patches. Like attention rollout, this treats
    attention as the only path: it ignores residual connections, MLPs and the norms of the value
    vectors, so it shows where attention points, not what information flows.
    """
    pixels, tok = _one(pixels), model.tokenizer
    image_embeds = model.encode_image(pixels)
    prompt = stage2_prompt(prompt_instruction)
    settings = GenerationSettings(do_sample=False, max_new_tokens=max_new_tokens)
    text = generate(model, [prompt], image_embeds, settings, stop="###")[0].text
    n_prompt = len(model.build_example(prompt).ids)
    example = model.build_example(prompt, text, end_sym="", max_txt_len=10**6)
    batch = model.collate([example])
    embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    with eager_attention(model.llm):
        out = model.llm(inputs_embeds=embeds, output_attentions=True,
                        attention_mask=batch["attention_mask"].to(embeds.device))
    att = torch.stack(out.attentions)[:, 0].float().mean((0, 1)).cpu()  # [T, T]
    visual = batch["image_mask"][0]
    prompt_text = ~visual & (torch.arange(len(visual)) < n_prompt)
    prompt_text[0] = False  # BOS on its own: it is often an "attention sink"
    spans = _word_spans(tok, example.ids[n_prompt:])
    words = [tok.decode([example.ids[n_prompt + i] for i in s]).strip() for s in spans]
    rows = (torch.stack([att[[n_prompt + i - 1 for i in s]].mean(0) for s in spans]) if spans
            else att.new_zeros(0, len(att)))  # [words, T]
    mass = {"visual": rows[:, visual].sum(-1), "BOS": rows[:, 0],
            "prompt text": rows[:, prompt_text].sum(-1),
            "answer so far": rows[:, n_prompt:].sum(-1)}
    to_visual = rows[:, visual] / rows[:, visual].sum(-1, keepdim=True)
    query_maps = _patch_maps(model, _cross_attention(model, pixels))  # [Q, g, g]
    heatmaps = torch.einsum("wq,qij->wij", to_visual, query_maps)
    content = [i for i, w in enumerate(words) if w.strip(".,;:!?").isalpha()
               and w.strip(".,;:!?").lower() not in STOPWORDS]
    shown = content[:n_heatmaps]

    fig = plt.figure(figsize=(max(10.0, 1.6 * (len(shown) + 1)), 6.0), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.3, 0.8])
    ax, x, stack = top.subplots(), np.arange(len(words)), np.zeros(len(words))
    for (name, values), colour in zip(mass.items(), ("tab:red", "0.6", "tab:blue", "tab:green")):
        ax.bar(x, values.numpy(), bottom=stack, color=colour, label=name, width=0.8)
        stack += values.numpy()
    ax.set_xticks(x, words, rotation=60, ha="right", fontsize=8 if len(words) < 30 else 6)
    ax.set_ylim(0, 1), ax.set_xlim(-0.6, max(len(words), 1) - 0.4)
    ax.set_ylabel("attention share\n(mean over layers, heads)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_title(textwrap.shorten(f"{prompt_instruction!r} -> {text!r}", 150), fontsize=9)
    panels = bottom.subplots(1, len(shown) + 1, squeeze=False)[0]
    _show(panels[0], pixels[0], title="image")
    for ax, i in zip(panels[1:], shown):
        im = _show(ax, pixels[0], heatmaps[i], float(heatmaps[shown].max()),
                   f"{words[i]!r}\nvisual {mass['visual'][i]:.0%}")
    if shown:
        bottom.colorbar(im, ax=panels, shrink=0.8, label="share over patches")
    bottom.suptitle("word -> visual tokens -> patches (attention only; ignores residuals, MLPs, "
                    "value norms)", fontsize=9)
    return fig, {"text": text, "words": words, "token_spans": spans, "mass": mass,
                 "to_visual": to_visual, "heatmaps": heatmaps, "content_words": content}


# --- 3. the lens: which tokens are the projected visual tokens near? ------------------------------
@torch.no_grad()
def projected_token_lens(model, pixels: torch.Tensor, k: int = 5, layers=None,
                         prompt: str | None = None, queries=None):
    """Read each projected visual token with the LLM's vocabulary (a lens on Sec. 3.1's output).

    Two readings per visual token: its top-k cosine-nearest rows of the LLM's input-embedding
    table (what the token "looks like" to the LLM), and the logit lens at `layers` (final norm +
    lm_head applied to the hidden state at the token's position, in a forward over
    `[BOS] + visual tokens`, or over `prompt` with `<ImageHere>`). The logit lens is a
    *next-token* guess: in late layers it says what the LLM expects after that position.
    `layers` counts decoder layers (1..L; default about a third, two thirds and the last).
    `queries` picks which queries to draw (default: the first 12); `data` holds them all.
    """
    pixels, tok = _one(pixels), model.tokenizer
    n_layers = model.llm.config.num_hidden_layers
    layers = layers or sorted({max(1, n_layers // 3), max(1, 2 * n_layers // 3), n_layers})
    image_embeds = model.encode_image(pixels)
    cos, ids = _nearest_tokens(model, image_embeds[0], k)
    nearest = [[(_token_text(tok, i), c) for i, c in zip(r, cr)]
               for r, cr in zip(ids.tolist(), cos.tolist())]
    batch = model.collate([model.build_example(prompt)])
    embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    out = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(embeds.device),
                    output_hidden_states=True)
    where = batch["image_mask"][0].nonzero().squeeze(-1).to(out.logits.device)
    lens = {}
    for layer in layers:  # hidden_states[-1] is already normed: it gives out.logits
        logits = out.logits[0] if layer == n_layers else model.llm.get_output_embeddings()(
            model.llm.get_decoder().norm(out.hidden_states[layer][0]))
        top = logits[where].topk(k, dim=-1).indices.cpu()
        lens[layer] = [[_token_text(tok, i) for i in r] for r in top.tolist()]
    maps = _patch_maps(model, _cross_attention(model, pixels))

    queries = list(queries if queries is not None else range(min(len(nearest), 12)))
    fig, axes = plt.subplots(-(-len(queries) // 2), 4, squeeze=False, layout="constrained",
                             figsize=(13, 1.75 * -(-len(queries) // 2) + 0.7),
                             gridspec_kw={"width_ratios": [1, 2.6, 1, 2.6]})
    header = ["input emb. (cos)"] + [f"lens L{layer}" for layer in layers]
    for slot, (ax_img, ax_tab) in enumerate(axes.reshape(-1, 2)):
        ax_tab.axis("off")
        if slot >= len(queries):
            ax_img.axis("off")
            continue
        q = queries[slot]
        _show(ax_img, pixels[0], maps[q], float(maps.max()), f"query {q}")
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
    """Each word's input embedding as in a sentence (" word"; mean over its tokens) [n, d]."""
    tok, table = model.tokenizer, model.llm.get_input_embeddings().weight
    ids = [[i for i in tok(" " + w, add_special_tokens=False).input_ids
            if tok.decode([i]).strip()] for w in words]  # SentencePiece may add a lone "▁"
    return torch.stack([table[i].float().mean(0) for i in ids]).detach().cpu()


def _projector(value, base):
    """features -> visual tokens, from a model, a projection module, a state dict or a path."""
    if isinstance(value, MiniGPT4):
        return value.project
    value = read_projection(value) if isinstance(value, (str, Path)) else value
    if isinstance(value, dict):
        if any(k.startswith("llama_proj.") for k in value):  # a checkpoint's names
            value = {k[len("llama_proj."):]: v for k, v in value.items()
                     if k.startswith("llama_proj.")}
        proj = copy.deepcopy(base.llama_proj)
        proj.load_state_dict(value)
        value = proj
    param = next(value.parameters())
    return lambda f: value(f.to(param.device, param.dtype))


def _word_colour(word: str):
    """ToyWorld colour words in their colour, shape words in a fixed palette, others black."""
    if word in tw.COLOUR_RGB:
        return tuple(np.array(tw.COLOUR_RGB[word]) / 255)
    return plt.cm.Dark2(tw.SHAPES.index(word)) if word in tw.SHAPES else (0, 0, 0, 1)


def _label_words(ax, xy: np.ndarray, words, lo: np.ndarray, hi: np.ndarray) -> None:
    """Words as X marks in the frame [lo, hi]. Nearly coinciding words share a stacked label;
    labels in the right quarter go left of their mark (so nothing overlaps or is clipped)."""
    groups: list[tuple[np.ndarray, list[str]]] = []
    for w, p in zip(words, xy):
        near = [g for g in groups if np.linalg.norm(g[0] - p) < 0.03 * np.linalg.norm(hi - lo)]
        near[0][1].append(w) if near else groups.append((p, [w]))
        ax.scatter(*p, marker="X", color=_word_colour(w), s=70, edgecolors="white", zorder=3)
    for p, group in groups:
        left = p[0] > lo[0] + 0.75 * (hi[0] - lo[0])
        for j, w in enumerate(group):
            ax.annotate(w, p, xytext=(-6 if left else 6, 3 - 10 * j), textcoords="offset points",
                        ha="right" if left else "left", fontsize=9, color=_word_colour(w),
                        fontweight="bold", zorder=4)


@torch.no_grad()
def alignment_pca(projections: dict, pixels_batch: torch.Tensor, words=WORD_GROUPS, model=None,
                  scenes=None, directions: bool = True):
    """Visual tokens moving next to the words that describe them, stage by stage (Sec. 3.1).

    `projections` maps a name ("untrained", "stage 1", "stage 2") to a `MiniGPT4`, a projection
    module, a projection state dict or a checkpoint path (then `model` gives the frozen parts).
    `words` maps a group name to words (or is one list): one row of panels per group, each with a
    2-D PCA fitted on that group's word embeddings only, so the panels of a row share axes; the
    visual tokens of `pixels_batch` are projected onto them. With `directions`, each token is
    first rescaled to the mean word norm: the lens compares directions (cosine), and trained
    tokens are many times longer than words (the ratio is in the titles). Dots are coloured by
    query index, or, given the ToyWorld `scenes` of `pixels_batch`, in the colour and shape rows
    like the word of the object in the query's cell (grey: empty cell or background).
    """
    base = model or next(v for v in projections.values() if isinstance(v, MiniGPT4))
    groups = dict(words) if isinstance(words, dict) else {"words": list(words)}
    features = base.visual_features(pixels_batch)
    B, Q = features.shape[:2]
    tokens = {n: _projector(v, base)(features).float().cpu().flatten(0, 1)
              for n, v in projections.items()}
    every = _word_vectors(base, [w for g in groups.values() for w in g])
    word_norm = every.norm(dim=-1).mean()
    data = {n: {"nearest_word_cos": float((F.normalize(t, dim=-1) @ F.normalize(every, dim=-1).T)
                                          .max(-1).values.mean()),
                "norm_ratio": float(t.norm(dim=-1).mean() / word_norm)} for n, t in tokens.items()}
    fig, axes = plt.subplots(len(groups), len(tokens), squeeze=False, layout="constrained",
                             figsize=(4.6 * len(tokens), 4.3 * len(groups) + 0.5))
    for row, (group, group_words) in zip(axes, groups.items()):
        W = _word_vectors(base, group_words)
        _, S, V = torch.linalg.svd(W - W.mean(0), full_matrices=False)
        word_xy = ((W - W.mean(0)) @ V[:2].T).numpy()
        xy = {n: ((F.normalize(t, dim=-1) * word_norm if directions else t) - W.mean(0)) @ V[:2].T
              for n, t in tokens.items()}
        data[group] = {"words": list(group_words), "word_xy": word_xy, "xy": xy,
                       "explained": (S[:2] ** 2 / (S ** 2).sum()).tolist()}
        all_xy = torch.cat(list(xy.values()))  # frame: every word and 98% of the tokens
        lo = np.minimum(word_xy.min(0), all_xy.quantile(0.01, dim=0).numpy())
        hi = np.maximum(word_xy.max(0), all_xy.quantile(0.99, dim=0).numpy())
        lo, hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
        by_query = scenes is None or group not in ("colour", "shape")  # query q reads cell q
        dots = np.tile(np.arange(Q), B) if by_query else [
            _word_colour(getattr(s.cells[q], group)) if q in s.cells else (0.75, 0.75, 0.75, 1)
            for s in scenes for q in range(Q)]
        for ax, points in zip(row, xy.values()):
            sc = ax.scatter(*points.numpy().T, c=dots, s=10, alpha=0.55, linewidths=0,
                            cmap=("tab10" if Q <= 10 else "viridis") if by_query else None)
            _label_words(ax, word_xy, group_words, lo, hi)
            ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xticks=[], yticks=[])
            ax.set_xlabel(f"PC1 of the {group} words", fontsize=8)
            ax.set_ylabel(f"PC2 of the {group} words", fontsize=8)
        if by_query:
            fig.colorbar(sc, ax=row, shrink=0.8, label="query index (ToyWorld: cell)")
    for ax, name in zip(axes[0], tokens):
        ax.set_title(f"{name}\nnearest-word cosine {data[name]['nearest_word_cos']:.2f}, "
                     f"|token| = {data[name]['norm_ratio']:.1f} x |word|", fontsize=10)
    fig.suptitle(f"Projected visual tokens (dots{', rescaled to word norm' if directions else ''})"
                 " among word embeddings (X); each row: PCA fitted on one group of words",
                 fontsize=11)
    return fig, data


# --- 5. training ----------------------------------------------------------------------------------
def read_history(path: str | Path) -> list[dict]:
    """The history `[{step, loss, lr, ...}]` kept in a training checkpoint (`train.py`)."""
    from safetensors import safe_open

    path = Path(path) / "checkpoint.safetensors" if Path(path).is_dir() else Path(path)
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])["history"]


def training_curves(histories, smoothing: float = 0.9):
    """Loss (raw, faint; EMA-smoothed, bold) and learning rate (twin axis) against the step.

    `histories`: one history (list of `{step, loss, lr}` as returned by `train`), a checkpoint
    path, or a dict `name -> history/path` (one panel each, e.g. stage 1 and stage 2). The EMA is
    bias-corrected (as TensorBoard's smoothing), so it starts at the first loss, not at 0.
    """
    histories = histories if isinstance(histories, dict) else {"training": histories}
    fig, axes = plt.subplots(1, len(histories), figsize=(5.5 * len(histories), 3.8),
                             squeeze=False, layout="constrained")
    data = {}
    for ax, (name, history) in zip(axes[0], histories.items()):
        history = read_history(history) if isinstance(history, (str, Path)) else history
        step, loss, lr = (np.array([r.get(key, np.nan) for r in history], dtype=float)
                          for key in ("step", "loss", "lr"))
        m, ema = 0.0, []  # m_t = a m_(t-1) + (1 - a) loss_t, divided by (1 - a^t)
        for t, value in enumerate(loss, 1):
            m = smoothing * m + (1 - smoothing) * value
            ema.append(m / (1 - smoothing ** t))
        data[name] = {"step": step, "loss": loss, "smoothed": np.array(ema), "lr": lr}
        ax.plot(step, loss, color="tab:blue", alpha=0.25, lw=1, label="loss")
        ax.plot(step, ema, color="tab:blue", lw=2, label=f"loss, EMA {smoothing}")
        ax.set_xlabel("step"), ax.set_ylabel("loss (answer tokens)", color="tab:blue")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(step, lr, color="tab:orange", lw=1.2, ls="--", label="learning rate")
        twin.set_ylabel("learning rate", color="tab:orange"), twin.set_ylim(bottom=0)
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.set_title(f"{name}: {len(step)} steps, final smoothed loss "
                     f"{ema[-1] if ema else float('nan'):.3f}", fontsize=10)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, frameon=False,
                  ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    return fig, data


class LiveLoss:
    """A loss curve that redraws itself while `train` runs: `train(..., callback=LiveLoss(steps))`.

    Every `every` steps, and at the last one, the curve and its title are redrawn in place in the
    notebook's output. Outside IPython nothing is shown; the records are kept (`steps`, `losses`).
    """

    def __init__(self, total: int, every: int = 10, name: str = "stage 1",
                 ylabel: str = "loss (caption tokens)"):
        from IPython import get_ipython
        from IPython.display import display

        self.total, self.every, self.name = total, every, name
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.fig, self.ax = plt.subplots(figsize=(6.5, 3))
        self.ax.set(xlim=(0, total), xlabel="step", ylabel=ylabel)
        self.line, = self.ax.plot([], [], color="tab:blue")
        self.handle = display(self.fig, display_id=True) if get_ipython() else None
        plt.close(self.fig)  # shown through the handle only, not a second time at the cell's end

    def __call__(self, record: dict) -> None:
        self.steps.append(record["step"])
        self.losses.append(record["loss"])
        if record["step"] % self.every == 0 or record["step"] >= self.total:
            self.line.set_data(self.steps, self.losses)
            self.ax.relim(), self.ax.autoscale_view()
            self.ax.set_title(f"{self.name}, step {record['step']}: loss {record['loss']:.3f}")
            if self.handle is not None:
                self.handle.update(self.fig)


# --- 6. the lens as a number ----------------------------------------------------------------------
@torch.no_grad()
def lens_hits(model, scenes: list[tw.Scene], k: int = 5, batch_size: int = 256) -> dict:
    """Per scene and per object: do the lens's nearest tokens name the scene's objects?

    For each scene, the top-k cosine-nearest vocabulary tokens (input embeddings) of every
    projected visual token (all Q, the background query included) are pooled into one set of
    words (token text, stripped, lower-cased: a word counts only as one whole token). An object
    is hit when its colour word and its shape word are both in the set (from any visual tokens,
    not necessarily the same one); a scene is hit when all its objects are. The rates measure
    recall only, so `precision` adds the share of the colour/shape words in the pooled sets that
    do name something in the scene (a lens listing every colour would hit but not be precise).
    """
    tok, cache, vocab = model.tokenizer, {}, set(tw.COLOURS + tw.SHAPES)
    features = scene_features(model, scenes)
    scene_hit, object_hit, named, right = [], [], 0, 0
    for i in range(0, len(scenes), batch_size):
        tokens = model.project(features[i:i + batch_size])
        _, ids = _nearest_tokens(model, tokens.flatten(0, 1), k)
        for scene, row in zip(scenes[i:i + batch_size], ids.view(tokens.shape[0], -1).tolist()):
            found = {cache.setdefault(t, tok.decode([t]).strip().lower()) for t in row}
            hits = [o.colour in found and o.shape in found for o in scene.objects]
            object_hit += hits
            scene_hit.append(all(hits))
            named += len(found & vocab)
            right += len(found & {w for o in scene.objects for w in (o.colour, o.shape)})
    return {"scene_rate": float(np.mean(scene_hit)), "object_rate": float(np.mean(object_hit)),
            "precision": right / max(1, named), "scene_hits": scene_hit, "k": k,
            "n_scenes": len(scenes)}


def lens_hit_rate(model, scenes: list[tw.Scene], k: int = 5) -> float:
    """Share of scenes whose pooled top-k lens words name every object (see `lens_hits`)."""
    return lens_hits(model, scenes, k)["scene_rate"]


# --- 7. the workbook's pictures: what the model wrote, what it reads ------------------------------
def scene_texts(scenes: list[tw.Scene], texts: dict[str, list[str]], show=None, width: int = 34,
                height: float = 4.6, size: int = 120):
    """Each scene's picture above the texts written about it (Sec. 3.1-3.2: captions, descriptions).

    `texts` maps a name ("stage 1", "poem") to one text per scene, in the order of `scenes`; `show`
    picks the panels by index into both (default: all), so a text is only ever drawn under its own
    scene's picture. Texts are shortened to 300 characters and wrapped at `width`.
    data: one `{"index", "scene", "texts": {name: text}}` per panel, left to right.
    """
    for name, column in texts.items():
        if len(column) != len(scenes):
            raise DataError(f"texts[{name!r}] holds {len(column)} texts for {len(scenes)} scenes; "
                            "pass one text per scene, in the scenes' order, and pick the panels "
                            "with `show`.")
    show = list(range(len(scenes)) if show is None else show)
    fig, axes = plt.subplots(1, len(show), figsize=(3.3 * len(show), height), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.98, bottom=1 - 3.0 / height, wspace=0.1)
    data = []
    for ax, i in zip(axes[0], show):
        panel = {name: column[i] for name, column in texts.items()}
        ax.imshow(tw.render(scenes[i], size)), ax.set_xticks([]), ax.set_yticks([])
        body = "\n\n".join(textwrap.fill(f"{name}: " + textwrap.shorten(text, 300), width)
                            for name, text in panel.items())
        ax.text(0, -0.04, body, transform=ax.transAxes, ha="left", va="top", fontsize=7.5)
        data.append({"index": i, "scene": scenes[i], "texts": panel})
    return fig, data


KIND_COLOUR = {"BOS": "#9ca3af", "prompt": "#93c5fd", "image": "#fca5a5", "answer": "#86efac"}


def loss_mask(tokenizer, examples: dict[str, Example], per_row: int = 28):
    """The sequences the LLM reads: a coloured cell per position, its label under it (Sec. 3.1-3.2).

    `examples` maps a panel title to `model.build_example(...)`. A cell is BOS, prompt text, an
    image slot (id -1: one per visual token, filled by `model.embed`) or answer; the label under
    it is -100 (no loss) or the token the position is trained to produce: only answer tokens and
    the end symbol carry a loss. data: per title, one `{"text", "kind", "label"}` per position.
    """
    rows = [-(-len(ex.ids) // per_row) for ex in examples.values()]
    fig, axes = plt.subplots(len(examples), 1, squeeze=False,
                             figsize=(15, 1.0 * sum(rows) + 0.8 * len(examples)),
                             gridspec_kw={"height_ratios": [r + 0.6 for r in rows]})
    data = {}
    for ax, (title, ex) in zip(axes[:, 0], examples.items()):
        cells = []
        for i, (t, label) in enumerate(zip(ex.ids, ex.labels)):
            kind = ("BOS" if i == 0 else "image" if t == -1 else "prompt" if label == -100
                    else "answer")
            text = "img" if t == -1 else tokenizer.decode([t]).replace("\n", "\\n").strip() or "␣"
            cells.append({"text": text, "kind": kind, "label": label})
            r, c = divmod(i, per_row)
            ax.add_patch(plt.Rectangle((c, -2 * r), 0.94, 0.9, color=KIND_COLOUR[kind]))
            ax.text(c + 0.47, -2 * r + 0.45, text[:8], ha="center", va="center", fontsize=6)
            ax.text(c + 0.47, -2 * r - 0.3, str(label), ha="center", va="center", fontsize=5.5,
                    color="0.55" if label == -100 else "darkgreen")
        ax.set_xlim(-0.2, per_row), ax.set_ylim(-2 * ((len(ex.ids) - 1) // per_row) - 0.8, 1.1)
        ax.axis("off"), ax.set_title(title, fontsize=10, loc="left")
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, label=k)
                           for k, c in KIND_COLOUR.items()],
                  ncol=4, fontsize=8, loc="lower right", bbox_to_anchor=(1, 1), frameon=False)
        data[title] = cells
    fig.tight_layout()
    return fig, data


def metrics_table(results: dict[str, dict], register: str, keys, title: str | None = None) -> str:
    """`evaluate` results as a plain-text table: one row per model, one column per metric."""
    lines = [f"{title or register:<32}" + "".join(f"{k:>19}" for k in keys)]
    lines += [f"{name:<32}" + "".join(f"{r[register][k]:>19.3f}" for k in keys)
              for name, r in results.items()]
    return "\n".join(lines)
