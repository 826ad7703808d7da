"""Small helpers shared by the tests (plain functions; the fixtures are in conftest.py)."""

from minigpt4_lite import toyworld as tw
from minigpt4_lite.checkpoints import load_model
from minigpt4_lite.config import ASSETS, preset
from minigpt4_lite.data import Sample, image_tensor
from minigpt4_lite.prompts import build_example

STAGE2 = ASSETS / "projections" / "stage2"  # the shipped reference projection after stage 2


def example(model, prompt, answer=None, **kwargs):
    """`prompts.build_example` with the model's tokenizer and number of visual tokens."""
    return build_example(model.tokenizer, prompt, answer,
                         n_image_tokens=model.cfg.num_visual_tokens, **kwargs)


def stage2_model_and_scene():
    """The tiny model with the shipped stage-2 projection, and one held-out scene's pixels."""
    model = load_model(preset("tiny"), projection=str(STAGE2))
    scene = tw.make_scenes("heldout", 1)[0]
    return model, image_tensor(Sample("", scene, None, ""), model.cfg.vision.image_size)
