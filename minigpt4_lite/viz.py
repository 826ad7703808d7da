"""The workbook's plots: training curves, alignment as geometry, and pictures of the data.

- `training_curves`: loss and learning rate; `LiveLoss`: the loss curve drawn while `train` runs;
- `alignment_pca`: visual tokens moving next to the words that describe them, stage by stage
  (what the trained projection of Sec. 3.1 does, seen in the LLM's input space);
- the workbook's pictures: `scene_texts` (each scene above the texts written about it),
  `loss_mask` (the token sequence and which positions carry a loss), `metrics_table` (text);
- `architecture_diagram`: the paper's Fig. 1 drawn from a model's (or a preset's) real sizes.
(Attention maps and the lens, looking inside the model, are in `interpret`.)
"""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from . import toyworld as tw
from .checkpoints import build_meta, read_projection
from .errors import DataError
from .model import MiniGPT4
from .prompts import Example

POSITION_WORDS = tuple(dict.fromkeys(tw.ROWS + tw.COLS))  # top middle bottom left center right
WORD_GROUPS = {"colour": tw.COLOURS, "shape": tw.SHAPES, "position": POSITION_WORDS}


# --- 1. alignment as geometry ---------------------------------------------------------------------
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


# --- 2. training ----------------------------------------------------------------------------------
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


# --- 3. the workbook's pictures: what the model wrote, what it reads ------------------------------
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

    `examples` maps a panel title to `prompts.build_example(...)`. A cell is BOS, prompt text, an
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


def metrics_table(results: dict[str, dict], register: str, keys, title: str | None = None,
                  markdown: bool = False) -> str:
    """`evaluate` results as a table: one row per model, one column per metric. Plain text, or
    with `markdown=True` a Markdown table (show it with `IPython.display.Markdown`)."""
    if markdown:
        rows = [f"| {title or register} | " + " | ".join(keys) + " |",
                "|---|" + "---:|" * len(keys)]
        return "\n".join(rows + [f"| {name} | " + " | ".join(f"{r[register][k]:.3f}" for k in keys)
                                 + " |" for name, r in results.items()])
    lines = [f"{title or register:<32}" + "".join(f"{k:>19}" for k in keys)]
    lines += [f"{name:<32}" + "".join(f"{r[register][k]:>19.3f}" for k in keys)
              for name, r in results.items()]
    return "\n".join(lines)


# --- 4. the architecture (paper Fig. 1) -----------------------------------------------------------
FROZEN, TRAINED = "#bfdbfe", "#fdba74"  # box colours: blue = frozen, orange = trained


def _architecture(model: MiniGPT4) -> dict:
    """The numbers `architecture_diagram` draws, read from a model (real or on the meta device)."""
    cfg, counts = model.cfg, model.param_counts()
    S, width = cfg.vision.image_size, cfg.vision.width
    N, d_llm = cfg.vision.num_patches, model.llm.config.hidden_size
    first = model.llama_proj if cfg.projection == "linear" else model.llama_proj[0]
    Q, feat, grid = cfg.num_visual_tokens, first.in_features, S // cfg.vision.patch_size

    def trained(module) -> bool:
        return module is not None and any(p.requires_grad for p in module.parameters())

    bridge = ({"name": "Q-Former", "detail": f"{Q} learned queries",
               "params": counts["qformer_params"] + counts["query_tokens"],
               "trained": trained(model.qformer)} if model.qformer is not None else
              {"name": "no Q-Former", "detail": "4 adjacent patches concatenated", "params": 0,
               "trained": False})
    parts = [
        {"name": "ViT + ln_vision", "detail": f"{cfg.vision.layers} blocks, {grid}x{grid} patches",
         "params": counts["vision_params"],
         "trained": trained(model.vit)},
        bridge,
        {"name": "linear projection" if cfg.projection == "linear" else "3-layer MLP",
         "detail": "llama_proj", "params": counts["projection_params"],
         "trained": trained(model.llama_proj)},
        {"name": "LLM", "detail": f"{model.llm.config.num_hidden_layers} layers, "
         f"vocab {model.llm.config.vocab_size:,}", "params": counts["llm_params"],
         "trained": trained(model.llm)},
    ]
    shapes = [[3, S, S], [1 + N, width], [Q, feat], [Q, d_llm]]
    return {"preset": cfg.name, "image_size": S, "n_patches": N, "vit_width": width,
            "n_visual_tokens": Q, "feature_dim": feat, "d_llm": d_llm,
            "trainable_params": counts["trainable_params"], "parts": parts, "shapes": shapes}


def architecture_diagram(source, image=None):
    """MiniGPT-4 as in the paper's Fig. 1 (Sec. 3), drawn from a model's real configuration.

    image -> ViT (+ln_vision) -> Q-Former -> linear projection -> LLM -> text, each part coloured
    frozen (blue) or trained (orange, whatever `requires_grad` says) with its parameter count,
    and the tensor shape of one image on every arrow (batch dimension left out). `source` is a
    `MiniGPT4` (the shapes of the loaded model) or a `MiniGPT4Config` with `llm_arch`, such as
    `preset("minigpt4-7b")`: then the model is built on the meta device (nothing is downloaded
    or allocated). `image` (an RGB array) is drawn as the input, else a plain box.
    data: `parts` (name, params, trained), `shapes` (one per arrow) and the sizes they come from.
    """
    model = source if isinstance(source, MiniGPT4) else build_meta(source)
    data = _architecture(model)
    fig, ax = plt.subplots(figsize=(16, 3.5), layout="constrained")
    ax.set(xlim=(0, 17.1), ylim=(-1.2, 1.9), aspect="equal"), ax.axis("off")
    xs, w, h = [3.7, 7.1, 10.5, 13.9], 2.2, 1.5  # box centres; the image sits left, text right
    if image is not None:
        ax.imshow(image, extent=(0.2, 1.4, 0.05, 1.25), zorder=2, aspect="auto")
    else:
        ax.add_patch(plt.Rectangle((0.2, 0.05), 1.2, 1.2, fc="white", ec="0.3", ls="--"))
        ax.text(0.8, 0.65, "image", ha="center", va="center", fontsize=10)
    for x, part in zip(xs, data["parts"]):
        ax.add_patch(plt.Rectangle((x - w / 2, 0.65 - h / 2), w, h, lw=1.2, ec="0.25",
                                   fc=TRAINED if part["trained"] else FROZEN, zorder=2))
        ax.text(x, 0.95, part["name"], ha="center", va="center", fontsize=10.5,
                fontweight="bold", zorder=3)
        ax.text(x, 0.55, part["detail"], ha="center", va="center", fontsize=8, zorder=3)
        ax.text(x, 0.2, f"{'trained' if part['trained'] else 'frozen'}: {part['params']:,}",
                ha="center", va="center", fontsize=8.5, zorder=3)
    names = ["pixels", "CLS + patches", "query outputs", "visual tokens"]
    starts = [1.45] + [x + w / 2 for x in xs[:3]]
    for x0, x1, shape, name in zip(starts, [x - w / 2 for x in xs], data["shapes"], names):
        ax.annotate("", (x1 - 0.03, 0.65), (x0 + 0.03, 0.65),
                    arrowprops=dict(arrowstyle="-|>", lw=1.5))
        ax.text((x0 + x1) / 2, 0.78, str(shape), ha="center", va="bottom", fontsize=9)
        ax.text((x0 + x1) / 2, 0.52, name, ha="center", va="top", fontsize=7.5, color="0.35")
    llm_x = xs[3]
    ax.annotate("", (llm_x + w / 2 + 0.95, 0.65), (llm_x + w / 2 + 0.03, 0.65),
                arrowprops=dict(arrowstyle="-|>", lw=1.5))
    ax.text(llm_x + w / 2 + 1.05, 0.65, "text,\none token\nat a time", va="center", fontsize=9)
    ax.annotate("", (llm_x, 0.65 - h / 2), (llm_x, -0.7), arrowprops=dict(arrowstyle="-|>"))
    ax.text(llm_x, -0.75, f"prompt tokens; the {data['n_visual_tokens']} visual tokens fill the "
            "<ImageHere> slot", ha="center", va="top", fontsize=8.5)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, fc=FROZEN, ec="0.25", label="frozen"),
                       plt.Rectangle((0, 0), 1, 1, fc=TRAINED, ec="0.25", label="trained")],
              loc="lower left", fontsize=9, frameon=False, ncol=2)
    ax.set_title(f"MiniGPT-4 ({data['preset']}): shapes per image on the arrows, "
                 f"{data['trainable_params']:,} trained parameters", fontsize=11)
    return fig, data
