"""Chapter 5's explorer (`interpret.explorer`): it builds on the real tiny model, each tab shows
the data of its figure function, and picking a word, a query or a visual token redraws its view."""


import matplotlib
import pytest
import torch
from helpers import STAGE2, stage2_model_and_scene

from minigpt4_lite import interpret

matplotlib.use("Agg")
pytestmark = pytest.mark.skipif(not STAGE2.is_dir(),
                                reason="needs the tiny model and its stage-2 projection in assets/")


@pytest.fixture(scope="module")
def built():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, pixels = stage2_model_and_scene()
    yield model, pixels, interpret.explorer(model, pixels, max_new_tokens=24)
    torch.set_num_threads(before)


def test_the_explorer_has_three_tabs_with_a_picture_each(built):
    _, _, tab = built
    assert set(tab.controls) == {"word", "query", "token"}
    assert len(tab.children) == 3
    for image, text in tab.views.values():
        assert image.value[:8] == b"\x89PNG\r\n\x1a\n" and text.value
    assert [o[1] for o in tab.controls["query"].options] == list(range(10))
    words = tab.data["look"]["words"]
    assert [o[1] for o in tab.controls["word"].options] == list(range(len(words))) and words


@pytest.mark.parametrize("name", ["word", "query", "token"])
def test_picking_another_item_redraws_its_view(built, name):
    _, _, tab = built
    pick, (image, text) = tab.controls[name], tab.views[name]
    seen = {(image.value, text.value)}
    for value in [o[1] for o in pick.options][:4]:
        pick.value = value
        seen.add((image.value, text.value))
    assert len(seen) >= 3, f"the {name} view does not change with the choice"


def test_the_views_say_what_the_figures_computed(built):
    _, _, tab = built
    look, cross, lens = tab.data["look"], tab.data["cross"], tab.data["lens"]
    tab.controls["query"].value = 3
    cls = float(cross["cls_mass"][3])
    assert f"CLS token {cls:.0%}" in tab.views["query"][1].value
    assert f"image patches {1 - cls:.0%}" in tab.views["query"][1].value
    tab.controls["token"].value = 1
    assert all(word in tab.views["token"][1].value for word, _ in lens["nearest"][1]
               if word.isalpha())
    i = look["content_words"][0]
    tab.controls["word"].value = i
    assert look["words"][i] in tab.views["word"][1].value
    assert tab.views["word"][0].value == interpret.overlay_png(built[1], look["heatmaps"][i])
