"""The curation pipeline (paper Sec. 3.2), the ablations, and the demo job, at miniature scale."""

import json

import pytest

from minigpt4_lite import toyworld as tw
from minigpt4_lite.checkpoints import load_model
from minigpt4_lite.config import ASSETS, preset
from minigpt4_lite.curate import Draft, curate, keep, rule_fixer
from minigpt4_lite.data import CCSBUAlignDataset

needs_assets = pytest.mark.skipif(not (ASSETS / "projections" / "stage1").exists(),
                                  reason="assets/ not built")


def test_rule_fixer_removes_repeats_junk_and_fragments():
    text = "A red circle is here. A red circle is here. ### A blue star sits on the left. It is"
    assert rule_fixer(text) == "A red circle is here. A blue star sits on the left."
    assert rule_fixer("@@@ ~~~") == ""


def test_keep_filters_apologies_short_and_empty():
    scene = tw.make_scene(1)
    assert keep(Draft(scene, "", 0, fixed="")) == (False, "unfixable")
    assert keep(Draft(scene, "", 0, fixed="Sorry, I cannot see the image clearly at all."))[1] \
        == "apology"
    assert keep(Draft(scene, "", 0, fixed="A red circle."))[1] == "too short"
    ok = "There are two shapes here. A red circle sits in the top left corner of it."
    assert keep(Draft(scene, "", 0, fixed=ok)) == (True, "")


@needs_assets
def test_curation_writes_ccsbu_folder_the_loader_reads(tmp_path):
    model = load_model(preset("tiny"), projection=str(ASSETS / "projections" / "stage1"))
    report = curate(model, tw.make_scenes("train", 6, start=90000), tmp_path / "cur")
    assert report["generated"] == 6 and 0 < report["kept"] <= 6
    data = CCSBUAlignDataset(tmp_path / "cur")
    assert len(data) == report["kept"]
    assert data[0].prompt.startswith("###Human: <Img><ImageHere></Img>")
    assert report["kept_quality"]["object_recall"] > 0

    # stage 2 on the curated set vs on the exact descriptions of the very same images
    from minigpt4_lite.pipeline import compare_curated

    cmp = compare_curated(tmp_path / "cur", tmp_path / "cmp", n_eval=2, steps=2)
    rows = cmp["rows"]
    assert list(rows) == ["curated by the stage-1 model", "ground-truth descriptions"]
    assert rows["curated by the stage-1 model"]["n_train"] == rows["ground-truth descriptions"][
        "n_train"] == report["kept"]
    assert {"detailed", "poem", "qa"} <= set(rows["ground-truth descriptions"])
    assert "| ground-truth descriptions |" in (tmp_path / "cmp" / "comparison.md").read_text()


@needs_assets
@pytest.mark.slow
def test_ablations_reduced(tmp_path):
    from minigpt4_lite.pipeline import ARCHITECTURES, run_ablations

    names = ("linear (MiniGPT-4)", "no Q-Former")  # CI runs a reduced table
    report = run_ablations(tmp_path, n_eval=2, steps_scale=0.005, n_train=20,
                           architectures=names, fractions=(0.1,))
    assert set(names) <= set(report["rows"]) and set(names) <= set(ARCHITECTURES)
    assert {"stage-1 data 10%", "stage-1 data 100%"} <= set(report["rows"])
    table = (tmp_path / "ablations.md").read_text()
    assert "58.2 / 32.2" in table and "1.62" in table
    assert "**no Q-Former**" in table and "**Stage-1 data** (10%" in table  # the discussion
    assert json.loads((tmp_path / "ablations.json").read_text())["n_eval"] == 2
