"""The two-stage training loop (paper Sec. 3.1 and 3.2, with the official training recipe).

Only the projection is trained (the frozen parts never change), so a checkpoint is small: the
trained tensors, the AdamW state, the RNG states and the step, in one safetensors file written
atomically. Resuming continues the exact trajectory. Since the ViT and Q-Former are frozen, their
output for an image never changes: with no random augmentation it is computed once and reused
(the frozen-feature cache), which leaves only the LLM forward/backward in the loop.
Distributed runs (torchrun or `accelerate launch`) go through Accelerate; each process draws its own
batches and DDP averages the projection's gradients. What a checkpoint holds and how a run resumes
exactly (each process's random streams included) is `resume.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .checkpoints import atomic_save_file, save_pretrained
from .data import Sample, draws_itself, image_tensor
from .errors import ConfigError, TrainingError
from .model import MiniGPT4
from .prompts import END_SYM, MAX_TXT_LEN, build_example, collate, stage_end_sym
from .resume import CHECKPOINT, RNGState, load_checkpoint, save_checkpoint, save_rank_rng
from .speed import bucketed, compile_llm, should_compile

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """One stage of training. `RECIPES` holds the paper's numbers and the tiny presets' ones.

    The defaults are the paper's stage 1 (Sec. 3.1: 20,000 steps, 5,000 of them warmup). A config
    is checked when it is made (and again by `train`): an invalid one raises a `ConfigError`.
    """

    stage: int = 1
    steps: int = 20000
    batch_size: int = 64  # per process
    grad_accum: int = 1
    lr: float = 1e-4  # peak, reached after the linear warmup
    min_lr: float = 8e-5  # end of the cosine decay
    warmup_lr: float = 1e-6
    warmup_steps: int = 5000
    weight_decay: float = 0.05  # on weight matrices only
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 42
    precision: str = "auto"  # auto = bf16 on a GPU that has it (else fp16), fp32 on CPU
    augment: bool | None = None  # random crops; None = on for real images, off for ToyWorld
    feature_cache: bool = True  # reuse frozen features where exact (no augmentation)
    out_dir: str | None = None
    save_every: int = 0  # steps between checkpoints (0: only at the end or on interrupt)
    # torch.compile the frozen LLM's forward for the run; None = auto: for runs long enough that
    # the one-time compile pays for itself (`should_compile`)
    compile: bool | None = None
    # Batches drawn in pools of `bucket`, sorted by length (`speed.bucketed`, the idea of
    # transformers' `group_by_length`): less padding, 1.3-1.4x faster steps on ToyWorld
    # (BENCHMARKS.md "Length-bucketed batches"). 1 = independent random batches, as the official
    # runner draws them; the tiny recipes use pools of 8 and spend the time saved on stage 2.
    bucket: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a `ConfigError` (one sentence) for a config that cannot train as meant."""
        def bad(why: str) -> ConfigError:
            return ConfigError(f"Invalid TrainConfig: {why}.")

        if self.stage not in (1, 2):
            raise bad(f"stage must be 1 or 2, got {self.stage!r}")
        for name in ("steps", "batch_size", "grad_accum", "bucket"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise bad(f"warmup_steps ({self.warmup_steps}) must be at least 0 and below steps "
                      f"({self.steps}), or the run would never leave warmup and never reach the "
                      f"peak rate; lower warmup_steps or raise steps")
        if not 0 < self.min_lr <= self.lr:
            raise bad(f"the rates must satisfy 0 < min_lr <= lr, got min_lr={self.min_lr:g}, "
                      f"lr={self.lr:g}")
        if not 0 <= self.warmup_lr <= self.lr:
            raise bad(f"the rates must satisfy 0 <= warmup_lr <= lr, got "
                      f"warmup_lr={self.warmup_lr:g}, lr={self.lr:g}")
        if self.weight_decay < 0 or not all(0 <= b < 1 for b in self.betas):
            raise bad(f"weight_decay must be >= 0 and betas in [0, 1), got "
                      f"{self.weight_decay!r} and {self.betas!r}")
        if self.save_every < 0:
            raise bad(f"save_every must be >= 0 (0: only at the end), got {self.save_every!r}")
        if self.precision not in PRECISIONS:
            raise bad(f"precision must be one of {', '.join(PRECISIONS)}, got "
                      f"{self.precision!r}")
        if self.compile not in (None, True, False):
            raise bad(f"compile must be True, False or None (auto), got {self.compile!r}")

    @property
    def end_sym(self) -> str:
        """What ends each answer in this stage for Vicuna (`prompts.END_SYM`); `make_batch` asks
        `prompts.stage_end_sym` with the model's template (Llama-2 ends stage 2 with `</s>`)."""
        return END_SYM[self.stage]

    @property
    def max_txt_len(self) -> int:
        """How many answer tokens (end symbol included) are kept in this stage."""
        return MAX_TXT_LEN[self.stage]


RECIPES = {
    # The paper: 20k steps x 256 (4 GPUs x 64), then 400 x 12 (the official config says 1,000).
    "paper-stage1": TrainConfig(),  # the defaults are this recipe
    "paper-stage2": TrainConfig(stage=2, steps=400, batch_size=12, lr=3e-5, min_lr=1e-5,
                                warmup_steps=200),
    # The embedded ToyWorld default: minutes on a laptop CPU. Both stages draw length-sorted pools
    # of 8 batches (`bucket`), and the time that saves buys stage 2 twice the steps.
    "tiny-stage1": TrainConfig(stage=1, steps=800, batch_size=32, lr=3e-3, min_lr=3e-4,
                               warmup_steps=50, bucket=8),
    # Stage 2 is where the projection learns each object's cell (captions never say it): a peak
    # of 4e-3 instead of 2e-3 answered "Where is the red star?" right 83% of the time instead of
    # 74% on seed 42 (benchmarks/stage2_lr.py, BENCHMARKS.md "Stage 2's learning rate"), and 800
    # steps instead of 400 87.5-92% instead of 74.5-88% over the demo's seeds, in less time than
    # 400 random batches took (docs/asset_history.md, "Stage 2 twice as long").
    "tiny-stage2": TrainConfig(stage=2, steps=800, batch_size=16, lr=4e-3, min_lr=1e-4,
                               warmup_steps=30, bucket=8),
}


def recipe(name: str, **overrides) -> TrainConfig:
    """The named recipe with fields overridden by keyword.

    Overriding `steps` alone keeps the recipe's share of warmup (800 steps with 50 of warmup asked
    for 80 steps warm up for 5), so a shortened run still leaves warmup; pass `warmup_steps` too
    to choose it.
    """
    if name not in RECIPES:
        raise ConfigError(f"Unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}.")
    base = RECIPES[name]
    if isinstance(overrides.get("steps"), int) and "warmup_steps" not in overrides:
        overrides["warmup_steps"] = base.warmup_steps * overrides["steps"] // base.steps
    return dataclasses.replace(base, **overrides)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The official `LinearWarmupCosineLRScheduler` (paper Sec. 3.1 and 3.2 recipes).

    Linear warmup `warmup_lr -> lr` over `warmup_steps`; after it, a cosine from `lr` to `min_lr`
    over the *whole* run, warmup included (`cos(pi * step / steps)`), exactly as the official
    scheduler: so the rate right after warmup is already a little below the peak. (The official
    warmup counts the step within the epoch; both stages warm up inside their first epoch, so it is
    the same step.)
    """
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr, cfg.warmup_lr)


def warmup_cosine(step: int, total: int, warmup: int, peak: float, floor: float,
                  start: float = 0.0) -> float:
    """The one learning-rate schedule of the project (`learning_rate` gives it a `TrainConfig`).

    Linear from `start` to `peak` over the first `warmup` steps, then `floor + (peak - floor) *
    (1 + cos(pi * step / total)) / 2`. The ToyWorld backbones' pretraining uses it too.
    """
    if step < warmup:
        return min(peak, start + (peak - start) * step / max(1, warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * step / total))


def make_optimizer(model: MiniGPT4, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only (not on biases)."""
    params = model.trainable_parameters()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.warmup_lr, betas=cfg.betas)


# --- the frozen-feature cache --------------------------------------------------------------------
def uses_augmentation(dataset, cfg: TrainConfig) -> bool:
    if cfg.augment is not None:
        return cfg.augment
    return not draws_itself(dataset[0].image)  # crops would move ToyWorld's grid cells


@torch.no_grad()
def build_feature_cache(model: MiniGPT4, dataset, batch_size: int = 256,
                        cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Frozen features (ViT + Q-Former outputs) of every image of `dataset`, by image id.

    With `cache_dir`, they are also stored as / read from `features.safetensors` there.
    """
    path = Path(cache_dir) / "features.safetensors" if cache_dir else None
    if path is not None and path.exists():
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    first = {}
    for i in range(len(dataset)):
        s = dataset[i]
        first.setdefault(s.image_id, s)
    samples, size = list(first.values()), model.cfg.vision.image_size
    cache = {}
    for i in tqdm(range(0, len(samples), batch_size), desc="frozen-feature cache", leave=False):
        chunk = samples[i:i + batch_size]
        pixels = torch.stack([image_tensor(s, size) for s in chunk])
        for s, f in zip(chunk, model.visual_features(pixels).cpu()):
            cache[s.image_id] = f.clone()
    if path is not None:
        atomic_save_file(cache, path)
    return cache


def make_batch(model: MiniGPT4, samples: list[Sample], cfg: TrainConfig, cache: dict | None,
               augment: bool, generator: torch.Generator) -> dict:
    """Token layout (one prompt per sample) + either cached features or image pixels."""
    n_img = model.cfg.num_visual_tokens
    batch = collate([build_example(model.tokenizer, s.prompt, s.answer, n_image_tokens=n_img,
                                   end_sym=stage_end_sym(cfg.stage, model.cfg.template),
                                   max_txt_len=cfg.max_txt_len)
                     for s in samples], model.tokenizer.pad_token_id)
    if cache is not None:
        batch["features"] = torch.stack([cache[s.image_id] for s in samples])
    else:
        size = model.cfg.vision.image_size
        batch["pixels"] = torch.stack([image_tensor(s, size, train=augment, generator=generator)
                                       for s in samples])
    return batch


def bucket_pool(model: MiniGPT4, dataset, cfg: TrainConfig, rank: int, pool: int) -> list[list]:
    """The indices of pool number `pool`: `cfg.bucket` random batches sorted by length, in random
    order. Each pool has its own seed (seed, rank, pool), so a resumed run draws the same ones."""
    rng = random.Random(f"{cfg.seed}:{rank}:{pool}")
    idx = [rng.randrange(len(dataset)) for _ in range(cfg.batch_size * cfg.bucket)]
    examples = [build_example(model.tokenizer, dataset[i].prompt, dataset[i].answer,
                              n_image_tokens=model.cfg.num_visual_tokens,
                              end_sym=stage_end_sym(cfg.stage, model.cfg.template),
                              max_txt_len=cfg.max_txt_len) for i in idx]
    return [[i for _, i in chunk] for chunk in bucketed(list(zip(examples, idx)),
                                                         cfg.batch_size, rng)]


# --- the loop -------------------------------------------------------------------------------------
def _precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def train(model: MiniGPT4, dataset, cfg: TrainConfig, callback=None,
          resume: bool = True) -> list[dict]:
    """Train the projection for one stage; returns the history `[{step, loss, lr, ...}]`.

    `callback(record)` is called after every step (a notebook can draw a live loss curve). With
    `cfg.out_dir`, a checkpoint there is resumed (if `resume`), written every `save_every` steps,
    on Ctrl-C, and at the end, and the projection is exported with `save_pretrained`.
    A NaN/inf loss stops training with a `TrainingError` naming the step; the last checkpoint stays.
    `dataset` is indexable (batches drawn at random), or a stream with `batches(model, cfg, rank,
    world, start_step)` (`stream.ShardStream`) whose batches are used in order; a resumed stream
    starts at the checkpoint's step (it seeds the stream) and reads fresh samples.
    """
    from accelerate import Accelerator

    cfg.validate()  # fields may have been changed since the config was made
    device = model.device
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=_precision(cfg, device))
    streamed = callable(getattr(dataset, "batches", None))  # endless, in order, never cached
    if not streamed and len(dataset) == 0:
        raise TrainingError("The dataset is empty: refusing to train on nothing.")
    opt = make_optimizer(model, cfg)
    rank, world = acc.process_index, acc.num_processes
    generator = torch.Generator().manual_seed(cfg.seed + rank)  # each process its own batches
    torch.manual_seed(cfg.seed + rank)
    ckpt = Path(cfg.out_dir) / CHECKPOINT if cfg.out_dir else None
    step, history = 0, []
    if ckpt is not None and resume and ckpt.exists():
        meta = load_checkpoint(ckpt, model, opt, generator, rank=rank, world_size=world)
        step, history = meta["step"], meta["history"]
        log.info("resumed from %s at step %d", ckpt, step)
    rng = RNGState.capture(generator)  # the streams after `step` steps
    if streamed:  # unbounded data with random crops: no frozen-feature cache
        batches, cache = dataset.batches(model, cfg, rank, world, start_step=step), None
    else:
        augment = uses_augmentation(dataset, cfg)
        cache = (build_feature_cache(model, dataset) if cfg.feature_cache and not augment
                 and model.cfg.freeze_qformer else None)
    ddp_model, opt = acc.prepare(model, opt)
    model.train()
    uncompile = compile_llm(model.llm) if should_compile(cfg, device) else None
    pools = {}

    def draw(n: int) -> list[int]:
        """The dataset indices of the n-th (micro-)batch of the run."""
        if cfg.bucket == 1:  # independent random batches, as the official runner
            return torch.randint(len(dataset), (cfg.batch_size,), generator=generator).tolist()
        if n // cfg.bucket not in pools:
            pools.clear()
            pools[n // cfg.bucket] = bucket_pool(model, dataset, cfg, rank, n // cfg.bucket)
        return pools[n // cfg.bucket][n % cfg.bucket]

    def checkpoint():
        if ckpt is None:
            return
        if rank == 0:
            save_checkpoint(ckpt, model, opt, step, history, rng, cfg, world_size=world)
        else:
            save_rank_rng(ckpt, rank, step, rng)

    bar = tqdm(total=cfg.steps, initial=step, desc=f"stage {cfg.stage}",
               disable=not acc.is_main_process)
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = learning_rate(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro in range(cfg.grad_accum):
                if streamed:
                    batch = next(batches)
                else:
                    idx = draw(step * cfg.grad_accum + micro)
                    batch = make_batch(model, [dataset[i] for i in idx], cfg, cache, augment,
                                       generator)
                sync = micro == cfg.grad_accum - 1
                with acc.no_sync(ddp_model) if not sync else nullcontext(), acc.autocast():
                    loss = ddp_model(batch).loss / cfg.grad_accum
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"The loss became {loss.item()} at step {step + 1}; training stopped. "
                            + (f"The last good checkpoint {ckpt} is kept." if ckpt else
                               "Lower the learning rate or check the data."))
                    acc.backward(loss)
                total += loss.item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            rng = RNGState.capture(generator)
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": round(total, 5), "lr": lr,
                      "samples_per_s": round(cfg.batch_size * cfg.grad_accum
                                             * acc.num_processes / dt, 1)}
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.1e}",
                            sps=record["samples_per_s"])
            if callback is not None:
                callback(record)
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()  # the state after the last finished step: resuming continues exactly
        log.warning("Interrupted at step %d; %s", step,
                    f"resume from {ckpt}" if ckpt else "no out_dir, nothing saved")
        raise
    finally:
        bar.close()
        if streamed:
            batches.close()  # stops the stream's worker processes
        if uncompile is not None:
            uncompile()  # generation after training runs eagerly (it has its own fast paths)
    checkpoint()
    if cfg.out_dir and acc.is_main_process:
        save_pretrained(model, cfg.out_dir)
    acc.wait_for_everyone()  # no rank returns (or exits) while rank 0 is still writing
    model.eval()
    return history
