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


# --- the ablation discussion is computed from the rows -------------------------------------------
def _row(qa: float, failure: float, hallucination: float = 0.0, params: int = 33024,
         seconds: float = 100.0, caption: float = 0.9) -> dict:
    return {"qa": {"accuracy": qa},
            "detailed": {"failure_rate": failure, "hallucination_rate": hallucination,
                         "object_recall": 0.9},
            "caption": {"object_recall": caption},
            "trainable_params": params, "train_seconds": seconds}


def _discussion(rows: dict, n_eval: int = 100, **extra) -> dict[str, str]:
    from minigpt4_lite.pipeline import ablation_discussion

    lines = ablation_discussion({"rows": rows, "n_eval": n_eval, **extra})
    return {line.split("**")[1]: line for line in lines}


def test_ablation_verdicts_follow_the_rows():
    """Swap which row wins and the sentence, its figures and the agreement with the paper swap."""
    base = _row(0.70, 0.10)
    worse = _discussion({"linear (MiniGPT-4)": base, "3-layer MLP": _row(0.50, 0.30,
                                                                           params=164608)})
    mlp = worse["3-layer MLP"]
    assert "worse than the linear projection" in mlp and "Q&A 0.50 vs 0.70" in mlp
    assert "agrees" in mlp and "differs" not in mlp  # the paper found the MLP worse too
    assert "164,608 parameters (5.0x" in mlp

    better = _discussion({"linear (MiniGPT-4)": base, "3-layer MLP": _row(0.90, 0.02)})
    mlp = better["3-layer MLP"]
    assert "better than the linear projection" in mlp and "Q&A 0.90 vs 0.70" in mlp
    assert "differs" in mlp and "agrees" not in mlp

    tie = _discussion({"linear (MiniGPT-4)": base, "no Q-Former": _row(0.72, 0.08)})
    assert "about equal to" in tie["no Q-Former"]  # 0.02 gaps on 100 scenes are within noise
    assert "about equal to" not in _discussion(
        {"linear (MiniGPT-4)": base, "no Q-Former": _row(0.72, 0.08)}, n_eval=100000
    )["no Q-Former"]


def test_ablation_commentary_is_labelled_and_only_where_it_fits():
    """Explanations that are not measured are marked, and only follow a verdict they explain."""
    from minigpt4_lite.pipeline import COMMENTARY

    base = _row(0.70, 0.10)
    rows = {"linear (MiniGPT-4)": base, "no Q-Former": _row(0.50, 0.30),
            "finetuned Q-Former": _row(0.90, 0.02)}
    lines = _discussion(rows)
    assert f"{COMMENTARY}: the projection then reads 4 concatenated" in lines["no Q-Former"]
    assert COMMENTARY not in lines["finetuned Q-Former"]  # it won: "moves the features" is moot
    for line in lines.values():  # every sentence before the label is computed
        assert "Context:" not in line


def test_stage1_data_sentence_follows_the_rows():
    base = _row(0.70, 0.10, caption=0.94)
    rising = _discussion({"linear (MiniGPT-4)": base, "stage-1 data 10%": _row(0.40, 0.50),
                          "stage-1 data 100%": base}, n_train=5000)["Stage-1 data"]
    assert "aligned on 100% of the captions is better than the one aligned on 10%" in rising
    assert "agrees" in rising and "Commentary" not in rising
    assert "10%: caption recall 0.90 / Q&A 0.40 / failure 0.50" in rising

    flat = _discussion({"linear (MiniGPT-4)": base, "stage-1 data 10%": _row(0.66, 0.04),
                        "stage-1 data 100%": base}, n_train=5000)["Stage-1 data"]
    assert "is worse than the one aligned on 10%" in flat and "differs" in flat
    assert "Commentary, not measured" in flat and "500 scenes" in flat


@needs_assets
def test_demo_draws_the_recipes_pools_unless_told(tmp_path, monkeypatch):
    """`run_demo` trains with the tiny recipes' length-sorted pools (8 batches) by default, with
    random batches when asked (`bucket=1`), and records which in metrics.json."""
    from minigpt4_lite import pipeline

    real, seen = pipeline.recipe, []

    def short(name, **kw):  # the demo's own recipes, two steps of four samples each
        cfg = real(name, steps=2, batch_size=4, **kw)
        seen.append((name, cfg.bucket))
        return cfg

    monkeypatch.setattr(pipeline, "recipe", short)
    metrics = pipeline.run_demo(tmp_path / "pools", n_eval=2, n_train=16)
    assert seen[:2] == [("tiny-stage1", 8), ("tiny-stage2", 8)] and metrics["bucket"] == 8
    seen.clear()
    metrics = pipeline.run_demo(tmp_path / "random", n_eval=2, n_train=16, bucket=1)
    assert seen[:2] == [("tiny-stage1", 1), ("tiny-stage2", 1)] and metrics["bucket"] == 1
    assert json.loads((tmp_path / "random" / "metrics.json").read_text())["bucket"] == 1
