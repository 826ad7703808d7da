"""ToyWorld: the tiny world that stands in for photos and captions, and the factory of its models.

MiniGPT-4 aligns two models that were pretrained elsewhere (BLIP-2's ViT + Q-Former, Vicuna). This
package is everything ToyWorld adds to make that story run on a laptop CPU; the MiniGPT-4 library
itself (`minigpt4_lite.model`, `.prompts`, `.train`, ...) never imports it.

- `world`: scenes, their splits and their rendering;
- `language`: their texts (captions, descriptions, Q&A, poems, stories, the instructions);
  `questions`: the wordings of the short questions, those training texts use and those none does;
- `dataset`: `ToyWorldDataset`, the training samples of both stages;
- the factory of `assets/` (`python -m minigpt4_lite build-assets`), not part of MiniGPT-4.
  `build` runs it (`recipe`: its settings); `slots`: a scene as input vectors built from the
  LLM's word embeddings; `build_llm`: the tokenizer and the LLM's text-only pretraining;
  `build_vision`: the ViT + Q-Former's grounded pretraining; `card`: the model card
  (`assets/README.md`). They are imported by name (`minigpt4_lite.toyworld.build`), not here.

`from minigpt4_lite import toyworld as tw` gives the names of `world` and `language` directly
(`tw.make_scenes`, `tw.caption`).
"""

from .dataset import ToyWorldDataset  # noqa: F401
from .language import *  # noqa: F403 - the texts, as `tw.caption`, `tw.qa_pairs`, ...
from .world import *  # noqa: F403 - the world's names, as `tw.make_scenes`, `tw.render`, ...
