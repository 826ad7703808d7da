"""Chapter 5's exercises: reading the attention maps and the lens yourself (paper Sec. 3, 3.1).

- `check_query_map` (build it yourself): from the Q-Former's raw cross-attention [layers, heads,
  Q, 1+N], one query's map over the patch grid and the share it gives the ViT's CLS token;
- `check_word_heatmap`: where a generated word looked in the image: its attention renormalised over
  the visual tokens, composed with the queries' maps (word -> visual tokens -> patches);
- `check_nearest_words`: the lens: the vocabulary tokens nearest (cosine) to projected tokens.
Each compares with what `minigpt4_lite.interpret` computes for chapter 5's figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import interpret
from . import ExerciseError, attempt, checker, compare_ids


def _where(mine: torch.Tensor, reference: torch.Tensor) -> str:
    """The grid cell where two [g, g] maps differ most, in words."""
    r, c = divmod(int((mine - reference).abs().argmax()), reference.shape[-1])
    return (f"the largest difference is at row {r}, column {c}: yours {float(mine[r, c]):.4f}, "
            f"the library's {float(reference[r, c]):.4f}")


def _compare_map(mine, reference: torch.Tensor, case: str, atol: float = 1e-5) -> None:
    """A [g, g] patch map against the library's, with a hint for the usual slips."""
    mine = torch.as_tensor(mine).detach().float().cpu()
    g = reference.shape[-1]
    if mine.numel() == g * g + 1:
        raise ExerciseError(f"{case}: your map has {g * g + 1} values: column 0 of the weights is "
                            f"the CLS token, drop it to keep the {g * g} patches.")
    if mine.shape != reference.shape and mine.numel() == g * g:
        raise ExerciseError(f"{case}: your map has shape {list(mine.shape)}; reshape the {g * g} "
                            f"patches row by row into the grid {[g, g]}.")
    if mine.shape != reference.shape:
        raise ExerciseError(f"{case}: your map has shape {list(mine.shape)}, the library's "
                            f"{list(reference.shape)}.")
    if torch.allclose(mine, reference, atol=atol):
        return
    total = float(mine.sum())
    if torch.allclose(mine, reference.T, atol=atol):
        hint = "yours is the library's transposed: the patches come row by row (row-major)."
    elif abs(total - 1) > 1e-3:
        hint = (f"yours sums to {total:.4f} over the patches, the library's to 1: after dropping "
                "what is not a patch, divide by the sum of what is left.")
    else:
        hint = "did you average over every layer and every head (dims 0 and 1)?"
    raise ExerciseError(f"{case}: the maps differ; {_where(mine, reference)}. Hint: {hint}")


@checker("one query's attention map")
def check_query_map(query_map, model, pixels: torch.Tensor, queries=(0, 4, 9)) -> str:
    """`query_map(weights, q) -> (patch_map [g, g], cls_share)` on the raw weights of `pixels`.

    The library's reading (`interpret.qformer_cross_attention`): mean over cross-attention layers
    and heads; the CLS share is column 0; the map drops CLS, renormalises over the patches (sums
    to 1) and reshapes them row by row into the grid.
    """
    weights = interpret.qformer_attention_weights(model, pixels)
    mean = weights.mean((0, 1))  # [Q, 1+N]
    maps = interpret.patch_maps(model, mean)
    queries = [q for q in queries if q < len(mean)]
    for q in queries:
        out = attempt(query_map, weights.clone(), q)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ExerciseError(f"query {q}: return two things, (patch_map, cls_share); yours "
                                f"returned {type(out).__name__}.")
        mine, cls = out
        _compare_map(mine, maps[q], f"query {q}")
        cls, want = float(torch.as_tensor(cls)), float(mean[q, 0])
        if abs(cls - want) > 1e-5:
            hint = (" That is the patches' share: the CLS share is column 0."
                    if abs(cls - (1 - want)) < 1e-5 else "")
            raise ExerciseError(f"query {q}: your CLS share is {cls:.4f}, the library's "
                                f"{want:.4f}.{hint}")
    q = queries[0]
    return (f"maps and CLS shares of queries {', '.join(map(str, queries))} match the library's; "
            f"query {q} gives {float(mean[q, 0]):.0%} of its attention to CLS, "
            f"{1 - float(mean[q, 0]):.0%} to the patches.")


@checker("where a word looked")
def check_word_heatmap(word_heatmap, look: dict, n_words: int = 3) -> str:
    """`word_heatmap(row, visual_mask, query_maps) -> [g, g]` for the first content words of
    `look` (the data of `interpret.llm_attention_to_image`): `row` [T] is the word's attention
    over the sequence, `visual_mask` [T] marks the visual tokens, `query_maps` [Q, g, g]."""
    words = (look["content_words"] or list(range(len(look["words"]))))[:n_words]
    for i in words:
        mine = attempt(word_heatmap, look["attention"][i].clone(), look["visual_mask"].clone(),
                       look["query_maps"].clone())
        _compare_map(mine, look["heatmaps"][i], f"word {i} ({look['words'][i]!r})")
    return (f"the heatmaps of {', '.join(repr(look['words'][i]) for i in words)} match the "
            "library's (each sums to 1 over the patches).")


@checker("the lens: nearest words")
def check_nearest_words(nearest_words, model, pixels: torch.Tensor, k: int = 5) -> str:
    """`nearest_words(tokens [Q, d], table [V, d], k) -> ids [Q, k]`, best first, by cosine."""
    with torch.no_grad():
        tokens = model.encode_image(pixels if pixels.dim() == 4 else pixels[None])[0].float()
        table = model.llm.get_input_embeddings().weight.float()
    _, want = interpret.nearest_tokens(model, tokens, k)
    mine = torch.as_tensor(attempt(nearest_words, tokens.clone(), table.clone(), k))
    if mine.shape != want.shape:
        raise ExerciseError(f"your ids have shape {list(mine.shape)}, the library's "
                            f"{list(want.shape)} (one row of k ids per visual token).")
    by_dot = (tokens @ table.T).topk(k, dim=-1).indices.cpu()
    for q in range(len(want)):
        if mine[q].tolist() != want[q].tolist() and mine[q].tolist() == by_dot[q].tolist():
            raise ExerciseError(f"visual token {q}: you ranked by dot product; the lens ranks by "
                                "cosine (normalise the tokens and the table rows first).")
        compare_ids(mine[q], want[q].tolist(), "nearest ids", f"visual token {q}", model.tokenizer)
    words = [model.tokenizer.decode([int(i)]).strip() for i in want[1]]
    cos = F.cosine_similarity(tokens[1:2], table[want[1]]).tolist()
    return (f"all {len(want)} visual tokens' top-{k} match; token 1 is nearest to "
            + ", ".join(f"{w!r} ({c:.2f})" for w, c in zip(words, cos)) + ".")
