"""Small helpers shared by the tests (plain functions; the fixtures are in conftest.py)."""

from minigpt4_lite.prompts import build_example


def example(model, prompt, answer=None, **kwargs):
    """`prompts.build_example` with the model's tokenizer and number of visual tokens."""
    return build_example(model.tokenizer, prompt, answer,
                         n_image_tokens=model.cfg.num_visual_tokens, **kwargs)
