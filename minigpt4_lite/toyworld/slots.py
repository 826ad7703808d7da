"""Slot vectors: a ToyWorld scene as input vectors built from the LLM's own word embeddings.

MiniGPT-4 (Sec. 3) relies on an LLM that can already read soft tokens: Vicuna-13B can, and
BLIP-2's Q-Former had been trained to talk to a frozen LLM. Our tiny LLM learns that skill in its
text-only pretraining (`build_llm`) by reading scenes as *slot vectors*: one input vector per grid
cell, the sum of the embeddings of that cell's words (position, size, colour, shape or "empty"),
plus one for the background. The same vectors serve as the target of the ViT + Q-Former's words
objective (`build_vision.GroundedHeads`) and as the ceiling of every projection
(`evaluate.slot_ceiling`): what a perfect projection would hand the LLM.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TINY_QFORMER
from . import world as tw

N_SLOTS = TINY_QFORMER.num_query_tokens  # 9 grid cells + the background


def slot_vocabulary() -> list[str]:
    """Every word a slot can hold (positions, sizes, colours, shapes, backgrounds), sorted."""
    words = {w for cell in tw.CELL_WORDS for w in cell}
    words |= set(tw.SIZES) | set(tw.COLOURS) | set(tw.SHAPES) | {"empty", "background"}
    words |= {w for phrase in tw.BACKGROUND_WORDS.values() for w in phrase.split()}
    return sorted(words)


def slot_words(scene: tw.Scene) -> list[list[str]]:
    """The words summed into each of the 10 slots: 9 cells (row-major) and the background.

    A cell's slot holds its position words and its content (size, colour, shape, or "empty").
    (A build whose slots held the content only, leaving the position to the slot's order, read
    positions worse: 27% of position questions right from exact slots instead of 52%.)
    """
    slots = []
    for cell in range(tw.GRID * tw.GRID):
        obj = scene.cells.get(cell)
        attrs = [obj.size, obj.colour, obj.shape] if obj else ["empty"]
        slots.append(list(tw.CELL_WORDS[cell]) + attrs)
    slots.append(["background"] + tw.BACKGROUND_WORDS[scene.background].split())
    return slots


def slot_word_counts(scenes: list[tw.Scene], index: dict[str, int] | None = None
                     ) -> torch.Tensor:
    """[B, 10, n_words]: how often each word of `slot_vocabulary` is in each slot of each scene."""
    index = index or {w: i for i, w in enumerate(slot_vocabulary())}
    counts = torch.zeros(len(scenes), N_SLOTS, len(index))
    for b, scene in enumerate(scenes):
        for s, words in enumerate(slot_words(scene)):
            for w in words:
                counts[b, s, index[w]] += 1
    return counts


def pin_slot_words(embedding: nn.Embedding, slots: "SlotEncoder", norm: float, seed: int
                   ) -> tuple[list[int], torch.Tensor]:
    """Set the input embeddings of every slot word's tokens to orthogonal vectors of length `norm`.

    Returns (token ids, their rows), which the LLM's pretraining writes back after each optimizer
    step, so that the rows stay fixed. Why: trained freely, the embeddings of words that appear in
    the same contexts drift together ("small" and "large" ended 0.95 cosine-similar, the shapes
    0.50), and a slot vector, their sum, then says little about which size or shape it holds. Kept
    orthogonal, each word is its own direction, in the slot and in the question that names it.
    Measured in a 1,500-step trial (docs/asset_history.md): sizes were read better (73% vs 56%),
    finding an object by its shape was not; off by default (`BuildConfig.slot_word_norm` = 0).
    """
    ids = sorted({i for token_ids in slots.token_ids for i in token_ids})
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(embedding.weight.shape[1], len(ids), generator=gen))
    rows = (q.T * norm).to(embedding.weight.device, embedding.weight.dtype)
    with torch.no_grad():
        embedding.weight[ids] = rows
    return ids, rows


class SlotEncoder:
    """Turns scenes into slot vectors with the LLM's (trainable) input embeddings.

    `encoder(scenes, embedding, noise)` -> [B, N_SLOTS, d]: each slot the sum of its words'
    embeddings, plus Gaussian noise of `noise` x the embedding std (0: the exact slots).
    """

    def __init__(self, tokenizer, scenes_vocab: list[str] | None = None):
        self.words = scenes_vocab or slot_vocabulary()
        self.index = {w: i for i, w in enumerate(self.words)}
        self.token_ids = [tokenizer(" " + w, add_special_tokens=False).input_ids
                          for w in self.words]

    def word_matrix(self, embedding: nn.Embedding) -> torch.Tensor:
        """[n_words, d]: each word's embedding (mean over its tokens)."""
        return torch.stack([embedding.weight[ids].mean(0) for ids in self.token_ids])

    def __call__(self, scenes: list[tw.Scene], embedding: nn.Embedding, noise: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        counts = slot_word_counts(scenes, self.index)
        W = self.word_matrix(embedding)
        slots = counts.to(W.device, W.dtype) @ W
        if noise > 0:
            eps = torch.randn(slots.shape, generator=generator).to(W.device, W.dtype)
            slots = slots + noise * embedding.weight.detach().std() * eps
        return slots
