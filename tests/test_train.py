"""The training loop: configs, schedule, resume, checkpoints, faults, data formats, caches."""

import dataclasses
import io
import json
import logging
import math
import os
import random
import shutil
import tarfile

import pytest
import torch
from helpers import example
from PIL import Image
from stream_worker import Recorded, write_shards
from transformers import AutoTokenizer, LlamaForCausalLM

from minigpt4_lite import toyworld as tw
from minigpt4_lite.checkpoints import load_projection
from minigpt4_lite.config import ASSETS, MiniGPT4Config, QFormerConfig, VisionConfig
from minigpt4_lite.data import CCSBUAlignDataset, JsonlDataset, WebDatasetCaptions, image_tensor
from minigpt4_lite.errors import CheckpointError, ConfigError, DataError, TrainingError
from minigpt4_lite.model import MiniGPT4
from minigpt4_lite.prompts import END_SYM, IMAGE_PLACEHOLDER, MAX_TXT_LEN
from minigpt4_lite.resume import CHECKPOINT
from minigpt4_lite.stream import ShardStream, StreamConfig
from minigpt4_lite.toyworld import ToyWorldDataset
from minigpt4_lite.train import (
    RECIPES,
    TrainConfig,
    build_feature_cache,
    learning_rate,
    make_batch,
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
    base = dict(stage=1, steps=6, batch_size=4, lr=1e-2, min_lr=1e-3,
                out_dir=str(tmp_path) if tmp_path else None)
    base.update(kw)
    base.setdefault("warmup_steps", min(2, base["steps"] - 1))  # short runs leave warmup too
    return TrainConfig(**base)


# --- configs --------------------------------------------------------------------------------------
def test_bare_config_is_the_paper_stage1_and_leaves_warmup():
    cfg = TrainConfig()
    assert cfg == RECIPES["paper-stage1"]
    assert (cfg.steps, cfg.batch_size, cfg.warmup_steps) == (20000, 64, 5000)
    rates = [learning_rate(s, cfg) for s in range(cfg.steps)]
    assert max(rates) == pytest.approx(cfg.lr, rel=1e-3)  # the peak is reached...
    assert rates[-1] == pytest.approx(cfg.min_lr, rel=1e-3)  # ...and the decay runs to its end


@pytest.mark.parametrize("fields,message", [
    (dict(steps=400), r"warmup_steps \(5000\) must be .* below steps \(400\), or the run would "
                      r"never leave warmup"),
    (dict(steps=0, warmup_steps=0), "steps must be a whole number >= 1, got 0"),
    (dict(batch_size=0), "batch_size must be a whole number >= 1"),
    (dict(grad_accum=0), "grad_accum must be a whole number >= 1"),
    (dict(warmup_steps=-1), "warmup_steps .* at least 0"),
    (dict(min_lr=0.0), "0 < min_lr <= lr"),
    (dict(min_lr=2e-4), "0 < min_lr <= lr, got min_lr=0.0002, lr=0.0001"),
    (dict(warmup_lr=2e-4), "warmup_lr <= lr"),
    (dict(stage=3), "stage must be 1 or 2, got 3"),
    (dict(precision="fp8"), "precision must be one of auto, no, bf16, fp16, got 'fp8'"),
    (dict(compile="yes"), "compile must be True, False or None"),
    (dict(save_every=-5), "save_every must be >= 0"),
])
def test_invalid_config_is_one_clear_sentence(fields, message):
    with pytest.raises(ConfigError, match=message) as err:
        TrainConfig(**fields)
    text = str(err.value)
    assert text.startswith("Invalid TrainConfig: ") and text.endswith(".") and "\n" not in text


def test_changed_config_is_checked_again_by_train(model):
    cfg = _cfg(steps=4)
    cfg.warmup_steps = 10  # changed after it was made: `train` refuses it before any step
    with pytest.raises(ConfigError, match="never leave warmup"):
        train(model, ToyWorldDataset(1, 8), cfg)
    with pytest.raises(ConfigError, match="never leave warmup"):
        dataclasses.replace(_cfg(), steps=2, warmup_steps=2)


def test_recipe_with_fewer_steps_keeps_its_share_of_warmup():
    tiny = RECIPES["tiny-stage1"]
    assert (tiny.steps, tiny.warmup_steps) == (800, 50)
    # the demo's stage 2: twice the steps, paid for by length-sorted pools in both tiny stages;
    # the paper's recipes draw independent random batches, as the official runner
    assert (RECIPES["tiny-stage2"].steps, RECIPES["tiny-stage2"].warmup_steps) == (800, 30)
    assert tiny.bucket == RECIPES["tiny-stage2"].bucket == 8
    assert RECIPES["paper-stage1"].bucket == RECIPES["paper-stage2"].bucket == 1
    assert recipe("tiny-stage1", steps=80).warmup_steps == 5
    assert recipe("tiny-stage1", steps=4).warmup_steps == 0  # a 4-step smoke run: no warmup
    assert recipe("tiny-stage1", steps=800).warmup_steps == 50  # the recipe itself: unchanged
    assert recipe("tiny-stage1", steps=80, warmup_steps=20).warmup_steps == 20  # when asked
    with pytest.raises(ConfigError, match="never leave warmup"):
        recipe("tiny-stage1", steps=10, warmup_steps=20)
    with pytest.raises(ConfigError, match="Unknown recipe 'tiny-stage3'"):
        recipe("tiny-stage3")


def test_each_stage_has_one_answer_format(model):
    """`end_sym` / `max_txt_len`: the official values, defined once, used by `train`."""
    assert END_SYM == {1: "\n", 2: "###"} and MAX_TXT_LEN == {1: 32, 2: 160}
    for stage in (1, 2):
        cfg = _cfg(stage=stage)
        assert (cfg.end_sym, cfg.max_txt_len) == (END_SYM[stage], MAX_TXT_LEN[stage])
    assert not hasattr(model.cfg, "end_sym") and not hasattr(model.cfg, "max_txt_len")
    # the batches `train` builds: stage 1 ends captions with "\n", stage 2 answers with "###"
    long = " ".join(["a red circle and a blue star"] * 40)
    for stage, ds in ((1, ToyWorldDataset(1, 4)), (2, ToyWorldDataset(2, 4))):
        sample = dataclasses.replace(ds[0], answer=long)
        batch = make_batch(model, [sample], _cfg(stage=stage), None, False, torch.Generator())
        answer = batch["labels"][0][batch["labels"][0] != -100].tolist()
        assert len(answer) == MAX_TXT_LEN[stage]  # truncated at the stage's length
        short = dataclasses.replace(ds[0], answer="a red circle")
        batch = make_batch(model, [short], _cfg(stage=stage), None, False, torch.Generator())
        answer = batch["labels"][0][batch["labels"][0] != -100].tolist()
        assert model.tokenizer.decode(answer).endswith(END_SYM[stage])
    # without a stage, `build_example` lays out stage 1 (the chat passes no answer at all)
    assert example(model, None, "a red circle") == example(
        model, None, "a red circle", end_sym=END_SYM[1], max_txt_len=MAX_TXT_LEN[1])


@pytest.mark.skipif(not (ASSETS / "projections" / "stage1" / "config.json").exists(),
                    reason="assets not built")
def test_saved_configs_with_the_old_sequence_keys_load_quietly(caplog, tmp_path):
    for stage in ("stage1", "stage2"):
        path = ASSETS / "projections" / stage / "config.json"
        with caplog.at_level(logging.WARNING, logger="minigpt4_lite.config"):
            cfg = MiniGPT4Config.load(path)
        assert cfg.name == "tiny" and not caplog.records, caplog.text
    data = json.loads(path.read_text())
    data.update(end_sym="\n", max_txt_len=32, some_future_key=1)  # as older versions saved it
    (tmp_path / "config.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="minigpt4_lite.config"):
        MiniGPT4Config.load(tmp_path / "config.json")
    assert "some_future_key" in caplog.text and "end_sym" not in caplog.text


# --- the schedule ---------------------------------------------------------------------------------
def _official_lr(epoch, step, *, max_epoch, iters_per_epoch, warmup_steps, init_lr, min_lr,
                 warmup_lr):
    """The official LinearWarmupCosineLRScheduler, epoch-based, written out from its definition."""
    total = epoch * iters_per_epoch + step
    if total < warmup_steps:
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * step / max(warmup_steps, 1))
    return (init_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * total / (max_epoch * iters_per_epoch))
                                       ) + min_lr


@pytest.mark.parametrize("name,max_epoch,iters", [("paper-stage1", 4, 5000),
                                                  ("paper-stage2", 2, 200)])
def test_schedule_equals_the_official_scheduler(name, max_epoch, iters):
    cfg = recipe(name)
    assert cfg.steps == max_epoch * iters
    official = dict(max_epoch=max_epoch, iters_per_epoch=iters, warmup_steps=cfg.warmup_steps,
                    init_lr=cfg.lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr)
    for total in sorted({0, 1, cfg.warmup_steps // 2, cfg.warmup_steps - 1, cfg.warmup_steps,
                         cfg.warmup_steps + 1, cfg.steps // 2, cfg.steps - 1, iters + 7}):
        epoch, step = divmod(total, iters)
        assert learning_rate(total, cfg) == pytest.approx(_official_lr(epoch, step, **official),
                                                          rel=1e-12), f"step {total}"


def test_schedule_cosine_runs_over_the_whole_run():
    cfg = recipe("paper-stage1")
    # right after warmup the cosine has already run a quarter of its course: below the peak
    after_warmup = 8e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi / 4))
    assert learning_rate(5000, cfg) == pytest.approx(after_warmup)
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


class _CtrlCWhileLoading:
    """A dataset that raises KeyboardInterrupt (Ctrl-C) while the batch after step `n` is read,
    that is in the middle of a step, after the step's random indices were drawn."""

    def __init__(self, dataset, n):
        self.dataset, self.n, self.armed = dataset, n, False

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if self.armed:
            raise KeyboardInterrupt
        return self.dataset[i]

    def callback(self, record):
        self.armed = record["step"] == self.n


def test_interrupt_in_the_middle_of_a_step_resumes_exactly(model, tmp_path):
    ds = ToyWorldDataset(1, 40)
    start = {k: v.clone() for k, v in model.llama_proj.state_dict().items()}
    full = _run(model, ds, _cfg(tmp_path / "full"))
    end = model.llama_proj.weight.detach().clone()
    model.llama_proj.load_state_dict(start)
    ctrl_c = _CtrlCWhileLoading(ds, 3)
    first = _run(model, ctrl_c, _cfg(tmp_path / "part"), callback=ctrl_c.callback)
    assert len(first) == 3  # the checkpoint holds 3 finished steps and the streams after them
    model.llama_proj.load_state_dict(start)
    resumed = _run(model, ds, _cfg(tmp_path / "part"))
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    assert torch.equal(model.llama_proj.weight, end)


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


def test_a_stream_is_read_in_order_without_the_cache_and_resumed_at_its_step(model, tmp_path):
    """A streamed source (`stream.ShardStream`) is never indexed nor cached (`len` would fail);
    `train` reads its batches in order, and a resumed run asks for the stream of the checkpoint's
    step: the batches `batches(..., start_step=2)` gives, not the first ones again."""
    stream = ShardStream(StreamConfig(write_shards(tmp_path / "shards", "s", 6, 4),
                                      shuffle_buffer=4, workers=0))
    cfg = _cfg(tmp_path / "run", steps=4, batch_size=3)
    start = model.llama_proj.weight.detach().clone()
    first = Recorded(stream, stop_at=2)
    assert len(_run(model, first, cfg, callback=first.callback)) == 2
    resumed = Recorded(stream)
    history = train(model, resumed, cfg)
    assert [h["step"] for h in history] == [1, 2, 3, 4] and resumed.starts == [[0, 1, 2]]

    def keys(start_step):
        it = stream.batches(model, cfg, start_step=start_step)
        try:
            return [next(it)["stream"]["keys"] for _ in range(2)]
        finally:
            it.close()

    assert [b["keys"] for b in first.batches_seen] == keys(0)
    assert [b["keys"] for b in resumed.batches_seen] == keys(2) != keys(0)
    assert not torch.equal(model.llama_proj.weight, start)


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


def test_every_data_format_feeds_the_same_pixels(tmp_path):
    """One JPEG as a JSONL entry, in a cc_sbu_align folder and in a webdataset shard: the model
    sees the same tensor, the file's own pixels (resized to the ViT's input)."""
    _write_ccsbu(tmp_path / "cc", n=1)
    jpeg = (tmp_path / "cc" / "image" / "0.jpg").read_bytes()
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "cc/image/0.jpg", "caption": "x"}))
    _write_shard(tmp_path / "s.tar", 1)
    samples = [CCSBUAlignDataset(tmp_path / "cc")[0], JsonlDataset(tmp_path / "d.jsonl")[0],
               WebDatasetCaptions(str(tmp_path / "s.tar"))[0]]
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    tensors = [image_tensor(s, 32) for s in samples]
    assert tensors[0].shape == (3, 32, 32)
    assert all(torch.equal(t, tensors[0]) for t in tensors[1:])
    other = image_tensor(dataclasses.replace(samples[2], image=_jpeg(1)), 32)
    assert not torch.equal(other, tensors[0])  # the tensor is that file's picture


def test_compile_is_auto_for_long_runs_only(model):
    from minigpt4_lite.speed import COMPILE_MIN_STEPS, should_compile

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    on_gpu, on_cpu = COMPILE_MIN_STEPS["cuda"], COMPILE_MIN_STEPS["cpu"]
    assert should_compile(_cfg(steps=on_gpu), gpu)
    assert not should_compile(_cfg(steps=on_gpu - 1), gpu)  # would not pay for itself
    assert not should_compile(_cfg(steps=800), cpu)  # the demo's stage 1: measured faster eager
    assert should_compile(_cfg(steps=on_cpu), cpu)
    assert should_compile(_cfg(steps=5, compile=True), cpu)
    assert not should_compile(_cfg(steps=10 * on_cpu, compile=False), gpu)


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="compiling on a CPU needs a C++ compiler")
def test_compiled_training_compiles_matches_eager_and_is_undone(model, caplog):
    import torch._dynamo

    ds = ToyWorldDataset(1, 12)
    init = {k: v.clone() for k, v in model.llama_proj.state_dict().items()}
    eager = train(model, ds, _cfg(steps=3, compile=False))
    model.llama_proj.load_state_dict(init)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with caplog.at_level(logging.WARNING, logger="minigpt4_lite.train"):
        compiled = train(model, ds, _cfg(steps=3, compile=True))
    # it really ran compiled: no fallback, and the LLM's forward became a compiled graph
    assert "torch.compile failed" not in caplog.text
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    # same batches, same math: equal up to float rounding
    assert [h["loss"] for h in compiled] == pytest.approx([h["loss"] for h in eager], rel=1e-4)
    assert "forward" not in vars(model.llm), "after training the LLM runs eagerly again"


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager_with_one_warning(model, caplog, monkeypatch):
    """Where compiling fails (here: no C++ compiler), training goes on eagerly, same numbers."""
    import torch._dynamo
    import torch._inductor.config as inductor

    ds = ToyWorldDataset(1, 12)
    init = {k: v.clone() for k, v in model.llama_proj.state_dict().items()}
    eager = train(model, ds, _cfg(steps=3, compile=False))
    eager_weight = model.llama_proj.weight.detach().clone()
    model.llama_proj.load_state_dict(init)
    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-compiler++",))
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="minigpt4_lite.train"):
        fallen_back = train(model, ds, _cfg(steps=3, compile=True))
    torch._dynamo.reset()
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1, caplog.text  # said once, not at every step
    assert [h["loss"] for h in fallen_back] == [h["loss"] for h in eager]  # eager: exactly
    assert torch.equal(model.llama_proj.weight, eager_weight)
    assert "forward" not in vars(model.llm)


def test_bucketed_batches_pad_less_and_resume_exactly_mid_pool(model, tmp_path):
    """`bucket=4`: each pool of 4 batches is sorted by length (less padding than random batches
    of the same draws), and a run interrupted in the middle of a pool resumes with the batches of
    the uninterrupted run (each pool has its own seed)."""
    from minigpt4_lite.prompts import build_example
    from minigpt4_lite.train import bucket_pool

    ds = ToyWorldDataset(2, 200)
    cfg = _cfg(tmp_path / "full", stage=2, bucket=4, steps=6)
    pool = bucket_pool(model, ds, cfg, rank=0, pool=0)
    assert [len(b) for b in pool] == [cfg.batch_size] * 4
    assert pool == bucket_pool(model, ds, cfg, rank=0, pool=0) != bucket_pool(model, ds, cfg, 1, 0)

    def padded(batches):  # positions computed: each batch padded to its longest member
        return sum(len(b) * max(len(build_example(
            model.tokenizer, ds[i].prompt, ds[i].answer, n_image_tokens=model.cfg.num_visual_tokens,
            end_sym=cfg.end_sym, max_txt_len=cfg.max_txt_len).ids) for i in b) for b in batches)

    draws = sorted(i for b in pool for i in b)
    random_order = [draws[k::4] for k in range(4)]  # the same samples, not sorted by length
    assert padded(pool) < padded(random_order)

    start = {k: v.clone() for k, v in model.llama_proj.state_dict().items()}
    full = _run(model, ds, cfg)
    model.llama_proj.load_state_dict(start)
    part = _cfg(tmp_path / "part", stage=2, bucket=4, steps=6)
    assert len(_run(model, ds, part, callback=_stop_after(3))) == 3  # step 4 is mid-pool
    model.llama_proj.load_state_dict(start)
    assert [h["loss"] for h in _run(model, ds, part)] == [h["loss"] for h in full]
