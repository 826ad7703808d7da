"""The figures of `viz.py`: shapes, normalisation, eager attention restored, and the lens number.

The model is the tiny preset when `assets/` holds it, else a random tiny BLIP-2 + LLaMA built by
the shared fixtures (every code path runs; the pictures mean nothing then).
"""

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers import example

from minigpt4_lite import interpret, viz
from minigpt4_lite import toyworld as tw
from minigpt4_lite.checkpoints import load_model, load_projection
from minigpt4_lite.config import MiniGPT4Config, preset
from minigpt4_lite.data import Sample, image_tensor
from minigpt4_lite.errors import DataError
from minigpt4_lite.prompts import stage2_prompt

matplotlib.use("Agg")  # no window, whatever the machine
ASSETS = Path(__file__).resolve().parent.parent / "assets"
HAVE_TINY = (ASSETS / "llm").is_dir() and (ASSETS / "vision_qformer").is_dir()
STAGE2 = ASSETS / "projections" / "stage2"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads; on a busy CPU they cost 10x (spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(request, one_thread):
    torch.manual_seed(0)
    if HAVE_TINY:
        return load_model(preset("tiny"))
    blip2, _ = request.getfixturevalue("blip2_dir")
    llama = request.getfixturevalue("llama_dir")
    return load_model(MiniGPT4Config(llm=str(llama), vision_qformer=str(blip2)))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def pixels(model, n=1, start=0):
    size = model.cfg.vision.image_size
    scenes = tw.make_scenes("heldout", n, start=start)
    return torch.stack([image_tensor(Sample("", s, None, ""), size) for s in scenes])


def grid(model):
    return model.cfg.vision.image_size // model.cfg.vision.patch_size


def heatmaps_drawn(fig) -> list[np.ndarray]:
    """The heatmaps a figure shows: the second image of every panel that has two (image, map)."""
    return [np.asarray(ax.images[1].get_array()) for ax in fig.axes if len(ax.images) == 2]


@pytest.mark.parametrize("layer,heads", [("mean", "mean"), (0, 1), (-1, "mean")])
def test_cross_attention_rows_are_distributions(model, layer, heads):
    fig, d = interpret.qformer_cross_attention(model, pixels(model)[0], layer=layer, heads=heads)
    Q, g = model.cfg.num_visual_tokens, grid(model)
    drawn = heatmaps_drawn(fig)  # one panel per query, showing that query's map
    assert len(drawn) == Q
    for q in range(Q):
        np.testing.assert_allclose(drawn[q], d["patch_attention"][q].numpy())
    assert d["attention"].shape == (Q, 1 + g * g)
    torch.testing.assert_close(d["attention"].sum(-1), torch.ones(Q))
    torch.testing.assert_close(d["cls_mass"], d["attention"][:, 0])
    assert d["patch_attention"].shape == (Q, g, g)
    torch.testing.assert_close(d["patch_attention"].sum((1, 2)), torch.ones(Q))


def test_llm_attention_to_image(model):
    before = model.llm.config._attn_implementation
    fig, d = interpret.llm_attention_to_image(model, pixels(model)[0], max_new_tokens=12)
    bars = fig.axes[0].containers  # one stacked bar series per part of the attention
    assert len(bars) == len(d["mass"])
    for series, values in zip(bars, d["mass"].values()):
        np.testing.assert_allclose([b.get_height() for b in series], values.numpy(), rtol=1e-6)
    shown = d["content_words"][:8]  # the heatmaps of the first content words, in order
    drawn = heatmaps_drawn(fig)
    assert len(drawn) == len(shown)
    for i, heat in zip(shown, drawn):
        np.testing.assert_allclose(heat, d["heatmaps"][i].numpy())
    assert model.llm.config._attn_implementation == before  # eager only inside the function
    W, Q, g = len(d["words"]), model.cfg.num_visual_tokens, grid(model)
    assert W > 0 and len(d["token_spans"]) == W
    total = sum(d["mass"].values())  # visual + BOS + prompt text + answer so far
    torch.testing.assert_close(total, torch.ones(W))
    assert d["to_visual"].shape == (W, Q)
    assert d["heatmaps"].shape == (W, g, g)
    torch.testing.assert_close(d["heatmaps"].sum((1, 2)), torch.ones(W))


def test_word_spans_group_tokens_into_words(model):
    tok = model.tokenizer
    ids = tok("a red circle", add_special_tokens=False).input_ids
    spans = interpret._word_spans(tok, ids)
    assert [tok.decode([ids[i] for i in s]).strip() for s in spans] == ["a", "red", "circle"]


def test_projected_token_lens(model):
    n_layers = model.llm.config.num_hidden_layers
    fig, d = interpret.projected_token_lens(model, pixels(model)[0], k=3, layers=(1, n_layers))
    Q = model.cfg.num_visual_tokens
    tables = [t for ax in fig.axes for t in ax.tables]  # one per query shown (at most 12)
    assert len(tables) == min(Q, 12)
    for q, table in enumerate(tables):
        cells = table.get_celld()
        for j, (word, cos) in enumerate(d["nearest"][q]):
            assert cells[(j + 1, 0)].get_text().get_text() == f"{word} {cos:.2f}"
            assert cells[(j + 1, 2)].get_text().get_text() == d["logit_lens"][n_layers][q][j]
    assert d["nearest_ids"].shape == d["cos"].shape == (Q, 3)
    assert (d["cos"][:, :-1] >= d["cos"][:, 1:]).all()  # sorted, nearest first
    assert set(d["logit_lens"]) == {1, n_layers}
    assert all(len(row) == 3 for row in d["logit_lens"][n_layers])
    assert len(d["logit_lens"][1]) == Q
    # the lens also runs inside the stage-2 prompt
    interpret.projected_token_lens(model, pixels(model)[0], k=2, prompt=stage2_prompt("Hi."))


def test_alignment_pca_accepts_models_modules_and_state_dicts(model):
    untrained = {k: torch.randn_like(v) for k, v in model.llama_proj.state_dict().items()}
    batch, scenes = pixels(model, 4), tw.make_scenes("heldout", 4)
    fig, d = viz.alignment_pca({"untrained": untrained, "module": model.llama_proj,
                                "model": model}, batch, model=model, scenes=scenes)
    panels = [ax for ax in fig.axes if ax.get_xlabel().startswith("PC1")]  # not the colorbars
    assert len(panels) == len(viz.WORD_GROUPS) * 3
    for ax, (group, name) in zip(panels, [(g, n) for g in viz.WORD_GROUPS
                                          for n in ("untrained", "module", "model")]):
        np.testing.assert_allclose(ax.collections[0].get_offsets(),
                                   d[group]["xy"][name].numpy(), rtol=1e-5, atol=1e-5)
    Q = model.cfg.num_visual_tokens
    for group, words in viz.WORD_GROUPS.items():
        assert d[group]["word_xy"].shape == (len(words), 2)
        assert abs(d[group]["word_xy"].mean(0)).max() < 1e-4  # PCA centred on the words
        for name in ("untrained", "module", "model"):
            assert d[group]["xy"][name].shape == (4 * Q, 2)
        torch.testing.assert_close(d[group]["xy"]["module"], d[group]["xy"]["model"])
    assert 0 < d["model"]["nearest_word_cos"] <= 1 and d["model"]["norm_ratio"] > 0
    fig, d = viz.alignment_pca({"model": model}, batch, words=["red", "star", "top"])
    assert d["words"]["xy"]["model"].shape == (4 * Q, 2)


def test_training_curves():
    history = [{"step": i + 1, "loss": 2.0, "lr": 1e-3} for i in range(30)]
    fig, d = viz.training_curves(history)
    loss_line, ema_line = fig.axes[0].get_lines()
    assert list(loss_line.get_ydata()) == [2.0] * 30
    np.testing.assert_allclose(ema_line.get_ydata(), d["training"]["smoothed"])
    assert d["training"]["smoothed"] == pytest.approx([2.0] * 30)  # EMA is bias-corrected
    fig, d = viz.training_curves({"stage 1": history, "stage 2": history[:5]})
    assert list(d) == ["stage 1", "stage 2"] and len(fig.axes) == 4  # two panels + twin axes


def test_lens_hits_definition(model, monkeypatch):
    """A projection that outputs exactly the object words hits; dropping one word misses."""
    tok, table = model.tokenizer, model.llm.get_input_embeddings().weight
    word_ids = {w: tok(" " + w, add_special_tokens=False).input_ids
                for w in tw.COLOURS + tw.SHAPES}
    if any(len(ids) != 1 for ids in word_ids.values()):
        pytest.skip("this vocabulary does not spell every colour/shape as one token")
    scenes = [s for s in tw.make_scenes("heldout", 20) if len(s.objects) >= 2][:4]
    Q = model.cfg.num_visual_tokens

    def project(features):  # feature i -> the word embeddings of scene i's objects
        rows = []
        for i in features[:, 0, 0].long().tolist():
            words = [w for o in scenes[i].objects for w in (o.colour, o.shape)]
            if i == 0:
                words = words[:-1]  # scene 0 loses its last object's shape word
            vecs = [table[word_ids[w][0]] for w in words][:Q]
            rows.append(torch.stack(vecs + [vecs[0]] * (Q - len(vecs))))
        return torch.stack(rows)

    monkeypatch.setattr(interpret, "scene_features",
                        lambda m, s: torch.arange(len(s)).float().view(-1, 1, 1))
    monkeypatch.setattr(model, "project", project)
    hits = interpret.lens_hits(model, scenes, k=1)
    assert hits["scene_hits"] == [False, True, True, True]
    n_objects = sum(len(s.objects) for s in scenes)
    assert hits["object_rate"] == pytest.approx((n_objects - 1) / n_objects)
    assert hits["precision"] == 1.0  # every colour/shape word found names an object


@pytest.mark.skipif(not (HAVE_TINY and STAGE2.exists()),
                    reason="needs assets/llm, assets/vision_qformer and assets/projections/stage2 "
                           "(built by the demo run: python -m minigpt4_lite demo)")
def test_lens_hit_rate_stage2_beats_untrained():
    torch.manual_seed(0)
    model = load_model(preset("tiny"), projection="")  # untrained: seeded random init
    scenes = tw.make_scenes("heldout", 50)
    untrained = interpret.lens_hit_rate(model, scenes, k=5)
    load_projection(model, STAGE2)
    stage2 = interpret.lens_hit_rate(model, scenes, k=5)
    assert stage2 >= untrained + 0.3, (untrained, stage2)


# --- the workbook's pictures ----------------------------------------------------------------------
def drawn_text(ax) -> str:
    """Everything written in an axes' texts, with the wrapping undone."""
    return " ".join(" ".join(t.get_text().split()) for t in ax.texts)


def test_scene_texts_draws_each_scene_above_its_own_texts():
    """Chapter 2 once drew scenes 0-2's texts under scenes 4-6: every panel must match."""
    scenes = tw.make_scenes("heldout", 8)
    texts = {"truth": [tw.scene_in_words(s) for s in scenes],
             "id": [f"text of scene {i}." for i in range(len(scenes))]}
    fig, data = viz.scene_texts(scenes, texts, show=[4, 5, 6])
    assert [d["index"] for d in data] == [4, 5, 6]
    assert len(fig.axes) == 3
    for ax, i in zip(fig.axes, [4, 5, 6]):
        picture = np.asarray(ax.images[0].get_array())
        assert np.array_equal(picture, np.asarray(tw.render(scenes[i], 120))), f"panel {i}"
        written = drawn_text(ax)
        assert f"truth: {tw.scene_in_words(scenes[i])}" in written
        assert f"id: text of scene {i}." in written
        others = [j for j in range(len(scenes)) if j != i]
        assert not any(f"text of scene {j}." in written for j in others)


def test_scene_texts_refuses_texts_not_aligned_with_the_scenes():
    """The old call: three scenes, but the texts of all 50 (indexed from 0): a clear error."""
    scenes = tw.make_scenes("heldout", 8)
    texts = [tw.scene_in_words(s) for s in scenes]
    with pytest.raises(DataError, match=r"texts\['detailed'\] holds 8 texts for 3 scenes"):
        viz.scene_texts(scenes[4:7], {"detailed": texts})
    fig, data = viz.scene_texts(scenes[4:7], {"detailed": texts[4:7]})  # aligned: fine
    assert [d["texts"]["detailed"] for d in data] == texts[4:7]


def test_loss_mask_marks_bos_prompt_image_and_answer(model):
    prompt = stage2_prompt("Describe this image in detail.")
    examples = {"stage 1": example(model, None, "a red circle", end_sym="\n", max_txt_len=32),
                "stage 2": example(model, prompt, "a red circle", end_sym="###", max_txt_len=160)}
    fig, data = viz.loss_mask(model.tokenizer, examples)
    assert list(data) == ["stage 1", "stage 2"] and len(fig.axes) == 2
    Q = model.cfg.num_visual_tokens
    for (title, ex), ax in zip(examples.items(), fig.axes):
        kinds = [c["kind"] for c in data[title]]
        assert len(kinds) == len(ex.ids) and kinds[0] == "BOS"
        assert [k == "image" for k in kinds] == [t == -1 for t in ex.ids]
        assert kinds.count("image") == Q
        assert [k == "answer" for k in kinds] == [label != -100 for label in ex.labels]
        drawn = [t.get_text() for t in ax.texts]  # per position: the token, then its label
        assert drawn[1::2] == [str(label) for label in ex.labels]
        answer = [c["text"] for c in data[title] if c["kind"] == "answer"]
        assert "".join(answer).startswith("aredcircle")
    assert "prompt" not in [c["kind"] for c in data["stage 1"]]  # stage 1 has no prompt
    assert "prompt" in [c["kind"] for c in data["stage 2"]]


def test_live_loss_records_every_step_and_draws_the_last():
    live = viz.LiveLoss(total=25, every=10)
    for step in range(1, 26):
        live({"step": step, "loss": 1.0 / step})
    x, y = live.line.get_data()
    assert list(x) == list(range(1, 26))  # 25 is not a multiple of 10: drawn all the same
    assert list(y) == pytest.approx([1.0 / s for s in range(1, 26)])
    assert live.ax.get_title() == "stage 1, step 25: loss 0.040"
    assert live.handle is None  # outside a notebook nothing is displayed


def test_metrics_table_rows_and_columns():
    results = {"untrained": {"caption": {"object_recall": 0.03, "mean_words": 11.26}},
               "trained": {"caption": {"object_recall": 0.952, "mean_words": 12.0}}}
    lines = viz.metrics_table(results, "caption", ("object_recall", "mean_words"),
                              title="caption (50 held-out scenes)").splitlines()
    assert lines[0].split() == ["caption", "(50", "held-out", "scenes)", "object_recall",
                                "mean_words"]
    assert lines[1].split() == ["untrained", "0.030", "11.260"]
    assert lines[2].split() == ["trained", "0.952", "12.000"]


def _drawn_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_architecture_diagram_of_the_loaded_model_matches_its_forward_pass(model):
    """Fig. 1 from the tiny model: every arrow carries the shape the model really computes."""
    fig, data = viz.architecture_diagram(model)
    x = pixels(model)
    with torch.no_grad():
        patches = model.vit(x)
        features = model.visual_features(x)
        tokens = model.encode_image(x)
    assert data["shapes"] == [list(x.shape[1:]), list(patches.shape[1:]),
                              list(features.shape[1:]), list(tokens.shape[1:])]
    assert [p["trained"] for p in data["parts"]] == [False, False, True, False]
    assert data["trainable_params"] == sum(p.numel() for p in model.trainable_parameters())
    texts = _drawn_texts(fig)
    for part in data["parts"]:  # one box per part: its name and its parameter count
        assert part["name"] in texts
        assert any(f"{part['params']:,}" in t for t in texts), part
    for shape in data["shapes"]:
        assert str(shape) in texts


def test_architecture_diagram_of_the_7b_preset_without_weights():
    """The real 7B: shapes and counts from the config alone (built on the meta device)."""
    fig, data = viz.architecture_diagram(preset("minigpt4-7b"))
    assert data["shapes"] == [[3, 224, 224], [257, 1408], [32, 768], [32, 4096]]
    assert (data["n_visual_tokens"], data["feature_dim"], data["d_llm"]) == (32, 768, 4096)
    assert data["trainable_params"] == 3_149_824 == 768 * 4096 + 4096
    parts = {p["name"]: p for p in data["parts"]}
    assert parts["LLM"]["params"] == 6_738_423_808 and not parts["LLM"]["trained"]
    assert parts["linear projection"]["trained"]
    assert "frozen: 6,738,423,808" in _drawn_texts(fig)
    assert "trained: 3,149,824" in _drawn_texts(fig)


def test_architecture_diagram_shows_what_an_ablation_trains():
    """Table 5's finetuned Q-Former: the Q-Former box turns trained, the count includes it."""
    _, data = viz.architecture_diagram(preset("minigpt4-7b", freeze_qformer=False))
    parts = {p["name"]: p for p in data["parts"]}
    assert parts["Q-Former"]["trained"] and parts["linear projection"]["trained"]
    assert data["trainable_params"] == 3_149_824 + parts["Q-Former"]["params"]
