"""Looking inside MiniGPT-4: where the queries look, and what the LLM reads in the visual tokens.

MiniGPT-4 trains one linear layer (Sec. 3.1) between a frozen Q-Former and a frozen LLM; these
functions show what flows through it. Each plotting function returns `(figure, data)`: a
matplotlib Figure and the numbers drawn in it.

- `qformer_cross_attention`: which image patches each learned query reads (the frozen BLIP-2 part);
- `llm_attention_to_image`: how much each generated word attends to the visual tokens, and where
  in the image that points once composed with the Q-Former's cross-attention;
- `projected_token_lens`: the vocabulary tokens nearest to each projected visual token (a lens);
- `lens_hits` / `lens_hit_rate`: the lens as numbers over many scenes;
- `explorer`: the three readings of one image as an interactive widget (ipywidgets).
(Plots of training, of alignment as geometry and of the data are in `viz`.)
"""

from __future__ import annotations

import html
import io
import textwrap
from contextlib import contextmanager

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from . import toyworld as tw
from .chat import GenerationSettings, generate
from .evaluate import scene_features
from .processing import denormalize
from .prompts import build_example, collate, stage2_prompt

STOPWORDS = {"a", "an", "the", "is", "are", "and", "of", "in", "on", "at", "to", "it", "its",
             "with", "there", "this", "that", "image", "picture", "i", "see", "sits", "one"}


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
    ax.set_xticks([]), ax.set_yticks([]), ax.set_title(title or "", fontsize=9)
    return im


def _token_text(tokenizer, token_id: int) -> str:
    """How a token reads: its text without the word-initial space (raw token or repr if odd)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:  # a piece of a multi-byte character
        text = tokenizer.convert_ids_to_tokens(token_id)
    return text.strip() if text.strip().isprintable() and text.strip() else repr(text)


@torch.no_grad()
def nearest_tokens(model, vectors: torch.Tensor, k: int):
    """Cosine top-k of `vectors` [M, d] among the LLM's input embeddings: (cos, ids), [M, k]."""
    emb = F.normalize(model.llm.get_input_embeddings().weight.float(), dim=-1)
    top = (F.normalize(vectors.float().to(emb.device), dim=-1) @ emb.T).topk(k, dim=-1)
    return top.values.cpu(), top.indices.cpu()


@torch.no_grad()
def qformer_attention_weights(model, pixels: torch.Tensor) -> torch.Tensor:
    """The Q-Former's raw cross-attention of one image: [cross layers, heads, Q, 1+N], CLS first.

    Row `[layer, head, q]` is query q's attention over the ViT's tokens (CLS, then the patches
    row by row); it sums to 1. Chapter 5's first exercise turns it into one query's map.
    """
    tokens = model.vit(_one(pixels).to(model.vit.patch_embed.weight.device))
    cross = torch.stack(model.qformer(tokens, return_attentions=True)[1]["cross"])
    return cross[:, 0].float().cpu()


def _cross_attention(model, pixels, layer="mean", heads="mean") -> torch.Tensor:
    """Q-Former cross-attention of one image [Q, 1+N] (CLS first); every row sums to 1."""
    cross = qformer_attention_weights(model, pixels)  # [cross layers, heads, Q, 1+N]
    cross = cross.mean(0) if layer == "mean" else cross[layer]
    return cross.mean(0) if heads == "mean" else cross[heads]


def patch_maps(model, att: torch.Tensor) -> torch.Tensor:
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
    maps = patch_maps(model, att)
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
    data: `text`, `words`, `mass` (the four shares per word), `attention` [words, T] (the rows),
    `visual_mask` [T], `to_visual` [words, Q], `query_maps` [Q, g, g], `heatmaps` [words, g, g].
    """
    pixels, tok = _one(pixels), model.tokenizer
    image_embeds = model.encode_image(pixels)
    prompt = stage2_prompt(prompt_instruction)
    settings = GenerationSettings(do_sample=False, max_new_tokens=max_new_tokens)
    text = generate(model, [prompt], image_embeds, settings, stop="###")[0].text
    tok, n_img = model.tokenizer, model.cfg.num_visual_tokens
    n_prompt = len(build_example(tok, prompt, n_image_tokens=n_img).ids)
    example = build_example(tok, prompt, text, n_image_tokens=n_img, end_sym="", max_txt_len=10**6)
    batch = collate([example], tok.pad_token_id)
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
    query_maps = patch_maps(model, _cross_attention(model, pixels))  # [Q, g, g]
    heatmaps = torch.einsum("wq,qij->wij", to_visual, query_maps)
    content = [i for i, w in enumerate(words) if w.strip(".,;:!?").isalpha()
               and w.strip(".,;:!?").lower() not in STOPWORDS]
    shown = content[:n_heatmaps]

    per_row = 18  # words per row of bars: labels stay at 10 pt however long the answer
    chunks = [list(range(s, min(s + per_row, len(words)))) for s in range(0, len(words) or 1,
                                                                          per_row)]
    fig = plt.figure(figsize=(11.0, 2.3 * len(chunks) + 2.9), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.3 * len(chunks), 2.9])
    bar_axes = top.subplots(len(chunks), 1, squeeze=False)[:, 0]
    for ax, chunk in zip(bar_axes, chunks):
        x, stack = np.arange(len(chunk)), np.zeros(len(chunk))
        for (name, values), colour in zip(mass.items(), ("tab:red", "0.6", "tab:blue",
                                                         "tab:green")):
            ax.bar(x, values[chunk].numpy(), bottom=stack, color=colour, label=name, width=0.8)
            stack += values[chunk].numpy()
        ax.set_xticks(x, [words[i] for i in chunk], rotation=45, ha="right", fontsize=10)
        ax.set_ylim(0, 1), ax.set_xlim(-0.6, per_row - 0.4), ax.set_ylabel("attention share")
    bar_axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    top.suptitle(textwrap.shorten(f"{prompt_instruction!r} -> {text!r}", 150) + "\nshare of "
                 "each word's attention (mean over layers and heads)", fontsize=10)
    panels = bottom.subplots(1, len(shown) + 1, squeeze=False)[0]
    _show(panels[0], pixels[0], title="image")
    for ax, i in zip(panels[1:], shown):
        im = _show(ax, pixels[0], heatmaps[i], float(heatmaps[shown].max()),
                   f"{words[i]!r}\nvisual {mass['visual'][i]:.0%}")
    if shown:
        bottom.colorbar(im, ax=panels, shrink=0.8, label="share over patches")
    bottom.suptitle("word -> visual tokens -> patches (attention only; ignores residuals, MLPs, "
                    "value norms)", fontsize=10)
    return fig, {"text": text, "words": words, "token_spans": spans, "mass": mass,
                 "attention": rows, "visual_mask": visual, "to_visual": to_visual,
                 "query_maps": query_maps, "heatmaps": heatmaps, "content_words": content}


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
    cos, ids = nearest_tokens(model, image_embeds[0], k)
    nearest = [[(_token_text(tok, i), c) for i, c in zip(r, cr)]
               for r, cr in zip(ids.tolist(), cos.tolist())]
    batch = collate([build_example(model.tokenizer, prompt,
                                   n_image_tokens=model.cfg.num_visual_tokens)],
                    model.tokenizer.pad_token_id)
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
    maps = patch_maps(model, _cross_attention(model, pixels))

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


# --- 4. the lens as a number ----------------------------------------------------------------------
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
        _, ids = nearest_tokens(model, tokens.flatten(0, 1), k)
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


# --- 5. the three readings as a widget ------------------------------------------------------------
def overlay_png(pixels: torch.Tensor, heat=None, size: int = 220) -> bytes:
    """One image [3, S, S] with a patch heatmap [g, g] blended on top (magma), as PNG bytes."""
    from PIL import Image

    img = denormalize(pixels.detach().float().cpu()).permute(1, 2, 0).clamp(0, 1).numpy()
    if heat is not None:  # nearest upscaling keeps the patch grid visible
        heat = torch.as_tensor(heat).float().cpu().numpy()
        heat = heat / max(float(heat.max()), 1e-12)
        big = Image.fromarray(heat).resize(img.shape[1::-1], Image.NEAREST)
        img = 0.4 * img + 0.6 * plt.get_cmap("magma")(np.asarray(big))[..., :3]
    out = Image.fromarray((img * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()


def explorer(model, pixels: torch.Tensor, prompt_instruction: str = "Describe this image in "
             "detail.", max_new_tokens: int = 48, k: int = 5):
    """Chapter 5 to click through (ipywidgets, works in Colab): three tabs over one image.

    *Words*: pick a generated word, see where the LLM looked in the image (the heatmap of
    `llm_attention_to_image`) and how its attention splits; *Queries*: pick a learned query, see
    its Q-Former cross-attention and its CLS share (`qformer_cross_attention`); *Visual tokens*:
    pick a projected visual token, see its nearest words and logit lens (`projected_token_lens`).
    Returns an `ipywidgets.Tab` with `.controls` (name -> Dropdown), `.views` (name -> (Image,
    HTML)) and `.data` (the three functions' data). Nothing is printed, the figures are closed.
    """
    import ipywidgets as w

    pixels = _one(pixels)
    data = {}
    for name, (draw, kwargs) in {
            "look": (llm_attention_to_image, {"prompt_instruction": prompt_instruction,
                                              "max_new_tokens": max_new_tokens}),
            "cross": (qformer_cross_attention, {}),
            "lens": (projected_token_lens, {"k": k, "queries": [0]})}.items():
        fig, data[name] = draw(model, pixels, **kwargs)
        plt.close(fig)
    look, cross, lens = data["look"], data["cross"], data["lens"]
    maps = cross["patch_attention"]

    def word_view(i):
        shares = " · ".join(f"{n} {v[i]:.0%}" for n, v in look["mass"].items())
        top = look["to_visual"][i].topk(min(3, maps.shape[0]))
        tokens = ", ".join(f"token {q} ({v:.0%})" for v, q in zip(top.values, top.indices))
        return look["heatmaps"][i], (f"<b>{html.escape(look['words'][i])}</b><br>{shares}<br>"
                                     f"most read visual tokens: {tokens}")

    def query_view(q):
        cls = float(cross["cls_mass"][q])
        return maps[q], (f"<b>query {q}</b><br>CLS token {cls:.0%} of its attention, image "
                         f"patches {1 - cls:.0%} (the map shows the patches' share)")

    def token_view(q):
        rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{c:.2f}</td></tr>"
                       for t, c in lens["nearest"][q])
        deep = "<br>".join(f"logit lens L{layer}: " + html.escape(" ".join(guess[q]))
                           for layer, guess in lens["logit_lens"].items())
        return maps[q], (f"<b>visual token {q}</b> (from query {q}; map: where the query looks)"
                         f"<table><tr><th>nearest word</th><th>cosine</th></tr>{rows}</table>"
                         f"{deep}")

    words = [(f"{i}: {word}", i) for i, word in enumerate(look["words"])]
    Q = maps.shape[0]
    tab, tab.controls, tab.views = w.Tab(), {}, {}
    for name, options, view, start in (
            ("word", words, word_view, (look["content_words"] or [0])[0]),
            ("query", [(f"query {q}", q) for q in range(Q)], query_view, 0),
            ("token", [(f"visual token {q}", q) for q in range(Q)], token_view, 0)):
        pick = w.Dropdown(options=options, value=start if options else None, description=name)
        image, text = w.Image(format="png", width=220, height=220), w.HTML()

        def update(change=None, pick=pick, image=image, text=text, view=view):
            if pick.value is not None:
                heat, image_html = view(pick.value)
                image.value, text.value = overlay_png(pixels[0], heat), image_html

        pick.observe(update, names="value")
        update()
        tab.controls[name], tab.views[name] = pick, (image, text)
        tab.children = (*tab.children, w.VBox([pick, w.HBox([image, text])]))
    for i, title in enumerate(("Words: where the LLM looked", "Queries: Q-Former",
                               "Visual tokens: nearest words")):
        tab.set_title(i, title)
    tab.data = data
    return tab
