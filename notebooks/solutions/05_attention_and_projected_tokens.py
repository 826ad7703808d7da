# Solutions of chapter 5's exercises (tests/test_solutions.py runs them through the checks).

# %% EXERCISE: query_map
def query_map(weights, q):
    """Query q's attention as a map over the patch grid, and the share it gives the CLS token.

    weights: [cross layers, heads, queries, 1 + patches], CLS first; each row sums to 1.
    Returns (patch_map [6, 6] summing to 1 over the patches, cls_share as a float).
    """
    att = weights.mean((0, 1))[q]  # mean over layers and heads: [1 + patches]
    patches = att[1:] / att[1:].sum()  # drop CLS, renormalise over the patches
    g = int(round(patches.numel() ** 0.5))
    return patches.view(g, g), float(att[0])  # row by row into the grid


# %% EXERCISE: word_heatmap
def word_heatmap(row, visual_mask, query_maps):
    """The word's attention over the patches: [T], [T] bool, [Q, g, g] -> [g, g], sums to 1."""
    to_visual = row[visual_mask] / row[visual_mask].sum()  # [Q]: over the visual tokens only
    return torch.einsum("q,qij->ij", to_visual, query_maps)


# %% EXERCISE: nearest_words
import torch.nn.functional as F


def nearest_words(tokens, table, k):
    """Ids [Q, k] of the k input embeddings nearest to each token by cosine, best first."""
    cos = F.normalize(tokens, dim=-1) @ F.normalize(table, dim=-1).T  # [Q, vocabulary]
    return cos.topk(k, dim=-1).indices
