"""`ToyWorldDataset`: ToyWorld scenes with their texts, as training samples of either stage.

Stage 1 (paper Sec. 3.1) reads image-caption pairs; stage 2 (Sec. 3.2) detailed descriptions under
the official instructions, in the stage-2 template.
"""

from __future__ import annotations

import random

from ..data import Sample
from ..processing import clean_caption
from ..prompts import pick_instruction, stage2_prompt
from . import language, world


class ToyWorldDataset:
    """ToyWorld scenes with their text: stage 1 captions or stage 2 dialogues.

    `stage=1`: cleaned short captions, no prompt. `stage=2`: detailed descriptions under the
    official instructions, plus Q&A, poems and stories in the same template (`kinds` / weights).
    Deterministic: item `i` always gives the same text for a given `seed`.
    """

    def __init__(self, stage: int, n: int, split: str = "train", seed: int = 0, start: int = 0,
                 kinds: dict[str, float] | None = None):
        self.stage, self.seed = stage, seed
        self.scenes = world.make_scenes(split, n, start=start)
        self.kinds = kinds or {"detailed": 0.7, "qa": 0.2, "poem": 0.05, "story": 0.05}

    @classmethod
    def from_scenes(cls, stage: int, scenes: list[world.Scene], seed: int = 0,
                    kinds: dict[str, float] | None = None) -> ToyWorldDataset:
        """The same texts for given scenes (e.g. exactly the images a curated set kept)."""
        ds = cls(stage, 0, seed=seed, kinds=kinds)
        ds.scenes = list(scenes)
        return ds

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> Sample:
        scene = self.scenes[i]
        rng = random.Random(f"{self.seed}:{scene.seed}")
        if self.stage == 1:
            caption = clean_caption(language.caption(scene, rng))
            return Sample(f"toyworld-{scene.seed}", scene, None, caption)
        kind = rng.choices(list(self.kinds), weights=list(self.kinds.values()))[0]
        if kind == "detailed":
            instruction = pick_instruction(str(scene.seed), self.seed)
            answer = language.detailed_description(scene, rng)
        else:
            instruction, answer = language.sample_task(scene, rng, kind)
        return Sample(f"toyworld-{scene.seed}", scene, stage2_prompt(instruction), answer)
