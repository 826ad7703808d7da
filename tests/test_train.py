"""The training loop: schedule, resume, checkpoints, faults, data formats, feature cache."""

import io
import json
import os
import random
import tarfile

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlamaForCausalLM

from minigpt4_lite import toyworld as tw
from minigpt4_lite.checkpoints import load_projection
from minigpt4_lite.config import MiniGPT4Config, QFormerConfig, VisionConfig
from minigpt4_lite.data import CCSBUAlignDataset, JsonlDataset, ToyWorldDataset, WebDatasetCaptions
from minigpt4_lite.errors import CheckpointError, DataError, TrainingError
from minigpt4_lite.model import IMAGE_PLACEHOLDER, MiniGPT4
from minigpt4_lite.train import (
    CHECKPOINT,
    TrainConfig,
    build_feature_cache,
    learning_rate,
    make_optimizer,
    recipe,
    train,
)


@pytest.fixture()
def model(llama_dir):
    torch.manual_seed(0)
    cfg = MiniGPT4Config(
        vision=VisionConfig(image_size=20, patch_size=10, width=16, layers=1, heads=2, mlp=32),
        qformer=QFormerConfig(hidden=16, layers=2, heads=2, mlp=32, num_query_tokens=4))
    return MiniGPT4(cfg, LlamaForCausalLM.from_pretrained(llama_dir),
                    AutoTokenizer.from_pretrained(llama_dir))


def _cfg(tmp_path=None, **kw):
    base = dict(stage=1, steps=6, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                out_dir=str(tmp_path) if tmp_path else None)
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_warmup_then_cosine():
    cfg = recipe("paper-stage1")
    assert learning_rate(0, cfg) == pytest.approx(1e-6)
    assert learning_rate(5000, cfg) == pytest.approx(1e-4)
    assert learning_rate(20000, cfg) == pytest.approx(8e-5)
    assert learning_rate(2500, cfg) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)


def test_weight_decay_on_weight_matrix_only(model):
    opt = make_optimizer(model, recipe("paper-stage1"))
    decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert [p.shape for p in decayed] == [model.llama_proj.weight.shape]


def test_resume_reproduces_uninterrupted_run(model, tmp_path):
    ds = ToyWorldDataset(1, 40)
    start = {k: v.clone() for k, v in model.llama_proj.state_dict().items()}
    full = _run(model, ds, _cfg(tmp_path / "full"))
    model.llama_proj.load_state_dict(start)
    first = _run(model, ds, _cfg(tmp_path / "part", steps=6), callback=_stop_after(3))
    assert len(first) == 3  # interrupted after step 3, checkpoint written on KeyboardInterrupt
    model.llama_proj.load_state_dict(start)  # a fresh process would start from anywhere
    resumed = _run(model, ds, _cfg(tmp_path / "part"))
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]


def _stop_after(n):
    def callback(record):
        if record["step"] == n:
            raise KeyboardInterrupt
    return callback


def _run(model, ds, cfg, callback=None, resume=True):
    """`train`; an interrupt (re-raised by `train` after saving) returns the saved history."""
    try:
        return train(model, ds, cfg, callback=callback, resume=resume)
    except KeyboardInterrupt:
        from safetensors import safe_open
        with safe_open(os.path.join(cfg.out_dir, CHECKPOINT), framework="pt") as f:
            return json.loads(f.metadata()["state"])["history"]


def test_export_is_loadable_projection(model, tmp_path):
    _run(model, ToyWorldDataset(1, 20), _cfg(tmp_path, steps=2))
    before = model.llama_proj.weight.detach().clone()
    with torch.no_grad():
        model.llama_proj.weight.zero_()
    load_projection(model, tmp_path)
    assert torch.equal(model.llama_proj.weight, before)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(model, tmp_path):
    ds = ToyWorldDataset(1, 20)
    _run(model, ds, _cfg(tmp_path, steps=2, save_every=1))
    saved = (tmp_path / CHECKPOINT).read_bytes()
    with torch.no_grad():
        model.llama_proj.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="step 1"):
        _run(model, ds, _cfg(tmp_path, steps=4, save_every=1), resume=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == saved


def test_failed_checkpoint_write_keeps_previous(model, tmp_path, monkeypatch):
    ds = ToyWorldDataset(1, 20)
    _run(model, ds, _cfg(tmp_path, steps=2))
    saved = (tmp_path / CHECKPOINT).read_bytes()
    import minigpt4_lite.checkpoints as ck

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        _run(model, ds, _cfg(tmp_path, steps=3), resume=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == saved
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_mismatched_checkpoint_is_named(model, tmp_path, llama_dir):
    _run(model, ToyWorldDataset(1, 20), _cfg(tmp_path, steps=1))
    cfg = MiniGPT4Config(
        vision=VisionConfig(image_size=20, patch_size=10, width=16, layers=1, heads=2, mlp=32),
        qformer=QFormerConfig(hidden=16, layers=2, heads=2, mlp=32, num_query_tokens=4),
        projection="mlp")
    other = MiniGPT4(cfg, LlamaForCausalLM.from_pretrained(llama_dir),
                     AutoTokenizer.from_pretrained(llama_dir))
    with pytest.raises(CheckpointError, match="llama_proj"):
        _run(other, ToyWorldDataset(1, 20), _cfg(tmp_path, steps=2))


def test_feature_cache_is_exact(model):
    ds = ToyWorldDataset(1, 10)
    cache = build_feature_cache(model, ds)
    from minigpt4_lite.data import image_tensor
    pixels = torch.stack([image_tensor(ds[i], 20) for i in range(3)])
    direct = model.visual_features(pixels)
    assert torch.equal(torch.stack([cache[ds[i].image_id] for i in range(3)]), direct)


def test_empty_dataset_is_refused(model):
    with pytest.raises(TrainingError, match="empty"):
        _run(model, [], _cfg())


# --- real data formats ----------------------------------------------------------------------------
def _jpeg(seed):
    img = tw.render(tw.make_scene(seed), 20)
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _write_ccsbu(root, n=4, bad=None):
    (root / "image").mkdir(parents=True)
    anns = []
    for i in range(n):
        (root / "image" / f"{i}.jpg").write_bytes(_jpeg(i))
        text = tw.detailed_description(tw.make_scene(i), random.Random(i))
        anns.append({"image_id": str(i), "caption": text})
    if bad:
        anns.append(bad)
    (root / "filter_cap.json").write_text(json.dumps({"annotations": anns}))


def test_ccsbu_align_trains(model, tmp_path):
    _write_ccsbu(tmp_path / "cc")
    ds = CCSBUAlignDataset(tmp_path / "cc")
    s = ds[0]
    assert IMAGE_PLACEHOLDER in s.prompt and s.prompt.startswith("###Human: <Img>")
    hist = _run(model, ds, _cfg(stage=2, steps=2, batch_size=2))
    assert len(hist) == 2


def test_ccsbu_align_bad_entries(tmp_path):
    _write_ccsbu(tmp_path / "a", bad={"image_id": "99", "caption": "missing image"})
    with pytest.raises(DataError, match=r"entry 4: image/99\.jpg is missing"):
        CCSBUAlignDataset(tmp_path / "a")
    assert CCSBUAlignDataset(tmp_path / "a", skip_bad=True).skipped == 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "filter_cap.json").write_text("{not json")
    with pytest.raises(DataError, match="filter_cap.json is not valid"):
        CCSBUAlignDataset(tmp_path / "b")
    (tmp_path / "c" / "image").mkdir(parents=True)
    (tmp_path / "c" / "filter_cap.json").write_text('{"annotations": []}')
    with pytest.raises(DataError, match="no usable samples"):
        CCSBUAlignDataset(tmp_path / "c")


def test_jsonl_trains_and_reports_bad_lines(model, tmp_path):
    lines = []
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(i))
        lines.append(json.dumps({"image": f"{i}.jpg", "caption": "A red circle!"}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    ds = JsonlDataset(tmp_path / "d.jsonl")
    assert ds[0].answer == "a red circle"  # stage-1 caption cleaning
    assert len(_run(model, ds, _cfg(steps=2, batch_size=2))) == 2
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{\"image\": \"0.jpg\"}\n")
    with pytest.raises(DataError, match="line 2"):
        JsonlDataset(tmp_path / "bad.jsonl")


def _write_shard(path, n, drop_caption_at=None):
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            files = {"jpg": _jpeg(i), "json": json.dumps({"caption": f"a shape number {i}"})}
            if i == drop_caption_at:
                files["json"] = json.dumps({"url": "x"})
            for ext, data in files.items():
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_run(model, tmp_path):
    _write_shard(tmp_path / "s0.tar", 4)
    ds = WebDatasetCaptions(str(tmp_path / "s0.tar"))
    assert len(ds) == 4 and ds[0].prompt is None
    assert len(_run(model, ds, _cfg(steps=2, batch_size=2))) == 2


def test_webdataset_sample_without_caption(tmp_path):
    _write_shard(tmp_path / "s1.tar", 3, drop_caption_at=1)
    with pytest.raises(DataError, match="sample 00001"):
        WebDatasetCaptions(str(tmp_path / "s1.tar"))
    assert len(WebDatasetCaptions(str(tmp_path / "s1.tar"), skip_bad=True)) == 2


def test_corrupt_image_in_data_names_sample(model, tmp_path):
    (tmp_path / "0.jpg").write_bytes(b"not an image")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "0.jpg", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match="0.jpg"):
        _run(model, JsonlDataset(tmp_path / "d.jsonl"), _cfg(steps=1, batch_size=1))


def test_image_files_are_real_jpegs():
    assert Image.open(io.BytesIO(_jpeg(0))).format == "JPEG"


def test_compile_is_auto_for_long_runs_only(model):
    from minigpt4_lite.train import COMPILE_MIN_STEPS, should_compile

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    on_gpu, on_cpu = COMPILE_MIN_STEPS["cuda"], COMPILE_MIN_STEPS["cpu"]
    assert should_compile(_cfg(steps=on_gpu), gpu)
    assert not should_compile(_cfg(steps=on_gpu - 1), gpu)  # would not pay for itself
    assert not should_compile(_cfg(steps=800), cpu)  # the demo's stage 1: measured faster eager
    assert should_compile(_cfg(steps=on_cpu), cpu)
    assert should_compile(_cfg(steps=5, compile=True), cpu)
    assert not should_compile(_cfg(steps=10 * on_cpu, compile=False), gpu)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_is_undone(model, llama_dir):
    ds = ToyWorldDataset(1, 12)
    init = {k: v.clone() for k, v in model.llama_proj.state_dict().items()}
    eager = train(model, ds, _cfg(steps=3, compile=False))
    model.llama_proj.load_state_dict(init)
    compiled = train(model, ds, _cfg(steps=3, compile=True))
    # same batches, same math: equal up to float rounding (or exactly, if it fell back to eager)
    assert [h["loss"] for h in compiled] == pytest.approx([h["loss"] for h in eager], rel=1e-4)
    assert "forward" not in vars(model.llm), "after training the LLM runs eagerly again"
