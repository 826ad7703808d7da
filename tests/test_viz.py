"""The figures of `viz.py`: shapes, normalisation, eager attention restored, and the lens number.

The model is the tiny preset when `assets/` holds it, else a random tiny BLIP-2 + LLaMA built by
the shared fixtures (every code path runs; the pictures mean nothing then).
"""

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from minigpt4_lite import toyworld as tw
from minigpt4_lite import viz
from minigpt4_lite.checkpoints import load_model, load_projection
from minigpt4_lite.config import MiniGPT4Config, preset
from minigpt4_lite.data import Sample, image_tensor, stage2_prompt

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


@pytest.mark.parametrize("layer,heads", [("mean", "mean"), (0, 1), (-1, "mean")])
def test_cross_attention_rows_are_distributions(model, layer, heads):
    fig, d = viz.qformer_cross_attention(model, pixels(model)[0], layer=layer, heads=heads)
    Q, g = model.cfg.num_visual_tokens, grid(model)
    assert isinstance(fig, Figure)
    assert d["attention"].shape == (Q, 1 + g * g)
    torch.testing.assert_close(d["attention"].sum(-1), torch.ones(Q))
    torch.testing.assert_close(d["cls_mass"], d["attention"][:, 0])
    assert d["patch_attention"].shape == (Q, g, g)
    torch.testing.assert_close(d["patch_attention"].sum((1, 2)), torch.ones(Q))


def test_llm_attention_to_image(model):
    before = model.llm.config._attn_implementation
    fig, d = viz.llm_attention_to_image(model, pixels(model)[0], max_new_tokens=12)
    assert isinstance(fig, Figure)
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
    spans = viz._word_spans(tok, ids)
    assert [tok.decode([ids[i] for i in s]).strip() for s in spans] == ["a", "red", "circle"]


def test_projected_token_lens(model):
    n_layers = model.llm.config.num_hidden_layers
    fig, d = viz.projected_token_lens(model, pixels(model)[0], k=3, layers=(1, n_layers))
    Q = model.cfg.num_visual_tokens
    assert isinstance(fig, Figure)
    assert d["nearest_ids"].shape == d["cos"].shape == (Q, 3)
    assert (d["cos"][:, :-1] >= d["cos"][:, 1:]).all()  # sorted, nearest first
    assert set(d["logit_lens"]) == {1, n_layers}
    assert all(len(row) == 3 for row in d["logit_lens"][n_layers])
    assert len(d["logit_lens"][1]) == Q
    # the lens also runs inside the stage-2 prompt
    viz.projected_token_lens(model, pixels(model)[0], k=2, prompt=stage2_prompt("Hi."))


def test_alignment_pca_accepts_models_modules_and_state_dicts(model):
    untrained = {k: torch.randn_like(v) for k, v in model.llama_proj.state_dict().items()}
    batch, scenes = pixels(model, 4), tw.make_scenes("heldout", 4)
    fig, d = viz.alignment_pca({"untrained": untrained, "module": model.llama_proj,
                                "model": model}, batch, model=model, scenes=scenes)
    assert isinstance(fig, Figure)
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
    assert isinstance(fig, Figure)
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

    monkeypatch.setattr(viz, "scene_features",
                        lambda m, s: torch.arange(len(s)).float().view(-1, 1, 1))
    monkeypatch.setattr(model, "project", project)
    hits = viz.lens_hits(model, scenes, k=1)
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
    untrained = viz.lens_hit_rate(model, scenes, k=5)
    load_projection(model, STAGE2)
    stage2 = viz.lens_hit_rate(model, scenes, k=5)
    assert stage2 >= untrained + 0.3, (untrained, stage2)
