"""The two-stage training loop (paper Sec. 3.1 and 3.2; REFERENCE.md "Training recipe").

Only the projection is trained (the frozen parts never change), so a checkpoint is small: the
trained tensors, the AdamW state, the RNG states and the step, in one safetensors file written
atomically. Resuming continues the exact trajectory. Since the ViT and Q-Former are frozen, their
output for an image never changes: with no random augmentation it is computed once and reused
(the frozen-feature cache), which leaves only the LLM forward/backward in the loop.
Distributed runs (torchrun or `accelerate launch`) go through Accelerate; each process draws its own
batches and DDP averages the projection's gradients.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .checkpoints import atomic_save_file, save_pretrained
from .data import Sample, image_tensor
from .errors import CheckpointError, TrainingError
from .model import MiniGPT4

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    """One stage of training. `RECIPES` holds the paper's numbers and the tiny presets' ones."""

    stage: int = 1
    steps: int = 400
    batch_size: int = 32  # per process
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

    @property
    def end_sym(self) -> str:
        return "\n" if self.stage == 1 else "###"

    @property
    def max_txt_len(self) -> int:
        return 32 if self.stage == 1 else 160


RECIPES = {
    # The paper: 20k steps x 256 (4 GPUs x 64), then 400 x 12 (the official config says 1,000).
    "paper-stage1": TrainConfig(stage=1, steps=20000, batch_size=64, lr=1e-4, min_lr=8e-5,
                                warmup_steps=5000),
    "paper-stage2": TrainConfig(stage=2, steps=400, batch_size=12, lr=3e-5, min_lr=1e-5,
                                warmup_steps=200),
    # The embedded ToyWorld default: minutes on a laptop CPU.
    "tiny-stage1": TrainConfig(stage=1, steps=800, batch_size=32, lr=3e-3, min_lr=3e-4,
                               warmup_steps=50),
    "tiny-stage2": TrainConfig(stage=2, steps=400, batch_size=16, lr=2e-3, min_lr=1e-4,
                               warmup_steps=30),
}


def recipe(name: str, **overrides) -> TrainConfig:
    return dataclasses.replace(RECIPES[name], **overrides)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup `warmup_lr -> lr`, then cosine decay to `min_lr` (official scheduler)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(1, cfg.warmup_steps)
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


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
    from .toyworld import Scene
    return not isinstance(dataset[0].image, Scene)  # crops would move ToyWorld's grid cells


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
    batch = model.collate([model.build_example(s.prompt, s.answer, cfg.end_sym, cfg.max_txt_len)
                           for s in samples])
    if cache is not None:
        batch["features"] = torch.stack([cache[s.image_id] for s in samples])
    else:
        size = model.cfg.vision.image_size
        batch["pixels"] = torch.stack([image_tensor(s, size, train=augment, generator=generator)
                                       for s in samples])
    return batch


# --- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: MiniGPT4, opt, step: int, history: list,
                    generator: torch.Generator, cfg: TrainConfig) -> None:
    """What was trained + optimizer + RNG states + step, atomically (temp file + rename)."""
    tensors = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    osd = opt.state_dict()
    for idx, state in osd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = generator.get_state()
    meta = {"step": step, "history": history, "param_groups": osd["param_groups"],
            "python_random": random.getstate(), "train_config": asdict(cfg),
            "model_config": model.cfg.to_dict()}
    atomic_save_file(tensors, path, metadata={"state": json.dumps(meta)})


def load_checkpoint(path: Path, model: MiniGPT4, opt, generator: torch.Generator) -> dict:
    """Restore a checkpoint written by `save_checkpoint`; returns its metadata (step, history)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"Cannot resume from {path}: not a complete training checkpoint "
                              f"({e}).") from e
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.requires_grad:
            t = tensors.get(f"model.{name}")
            if t is None or t.shape != p.shape:
                got = None if t is None else list(t.shape)
                raise CheckpointError(f"{path}: trained tensor {name} has shape {got}, this model "
                                      f"expects {list(p.shape)}; was it saved by another model?")
            with torch.no_grad():
                p.copy_(t)
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.data"])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return meta


# --- compiling the frozen LLM ---------------------------------------------------------------------
COMPILE_MIN_STEPS = {"cuda": 200, "cpu": 4000}


def should_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """`cfg.compile`, or auto: runs of at least `COMPILE_MIN_STEPS[device]` steps.

    Measured on the tiny preset's stage 1 on a 2-core CPU (BENCHMARKS.md): compiling costs about
    50 s once and then saves 15-33 ms of a 110-125 ms step, so it pays after roughly 2,500-3,500
    steps; the demo's 800-step stage 1 is faster eager. On a GPU it pays much sooner.
    """
    if cfg.compile is not None:
        return cfg.compile
    return cfg.steps >= COMPILE_MIN_STEPS.get(device.type, COMPILE_MIN_STEPS["cuda"])


def compile_with_fallback(fn, dynamic: bool = True):
    """`torch.compile(fn)`, falling back to `fn` for good if compiling fails.

    Compiling needs a working C++ compiler (on a CPU) or Triton (on a GPU); where it fails, or
    meets an unsupported op, we warn once and go on eagerly: same math, just slower.
    """
    compiled = torch.compile(fn, dynamic=dynamic)

    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is not None:
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a real error re-raises from the eager call
                log.warning("torch.compile failed (%s: %s); continuing without it.",
                            type(e).__name__, str(e).splitlines()[0][:200])
                compiled = None
        return fn(*args, **kwargs)

    return call


def compile_llm(llm: torch.nn.Module):
    """Swap `llm.forward` for a `torch.compile`d one; returns a function that undoes it.

    The loop's time is almost all the frozen LLM's forward and backward (into its inputs only), and
    compiling fuses its small kernels: same math, results equal up to float rounding (measured in
    BENCHMARKS.md). `dynamic=True` because caption lengths vary from batch to batch.
    """
    llm.forward = compile_with_fallback(llm.forward)  # an instance attribute shadows the method...
    return lambda: delattr(llm, "forward")  # ...and deleting it restores the eager one


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
    """
    from accelerate import Accelerator

    device = model.device
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=_precision(cfg, device))
    if len(dataset) == 0:
        raise TrainingError("The dataset is empty: refusing to train on nothing.")
    opt = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed + acc.process_index)
    torch.manual_seed(cfg.seed + acc.process_index)
    ckpt = Path(cfg.out_dir) / CHECKPOINT if cfg.out_dir else None
    step, history = 0, []
    if ckpt is not None and resume and ckpt.exists():
        meta = load_checkpoint(ckpt, model, opt, generator)
        step, history = meta["step"], meta["history"]
        log.info("resumed from %s at step %d", ckpt, step)
    augment = uses_augmentation(dataset, cfg)
    cache = (build_feature_cache(model, dataset) if cfg.feature_cache and not augment
             and model.cfg.freeze_qformer else None)
    ddp_model, opt = acc.prepare(model, opt)
    model.train()
    uncompile = compile_llm(model.llm) if should_compile(cfg, device) else None

    def checkpoint():
        if ckpt is not None and acc.is_main_process:
            save_checkpoint(ckpt, model, opt, step, history, generator, cfg)

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
                idx = torch.randint(len(dataset), (cfg.batch_size,), generator=generator)
                batch = make_batch(model, [dataset[int(i)] for i in idx], cfg, cache, augment,
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
        if uncompile is not None:
            uncompile()  # generation after training runs eagerly (it has its own fast paths)
    checkpoint()
    if cfg.out_dir and acc.is_main_process:
        save_pretrained(model, cfg.out_dir)
    acc.wait_for_everyone()  # no rank returns (or exits) while rank 0 is still writing
    model.eval()
    return history
