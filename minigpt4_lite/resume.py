"""Training checkpoints: what is saved so that an interrupted run continues exactly (Sec. 3).

Only the projection is trained, so a checkpoint is small: the trained tensors, the AdamW state, the
random states and the step, in one safetensors file written atomically (`checkpoint.safetensors`).
Each process of a distributed run keeps its own random streams (process 0's in the checkpoint, the
others' in `rng-rank{N}.safetensors` next to it), so a run resumed with the same number of
processes draws exactly the batches it would have drawn.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from .checkpoints import atomic_save_file
from .errors import CheckpointError

if TYPE_CHECKING:  # annotations only: train.py imports this module
    from .model import MiniGPT4
    from .train import TrainConfig

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class RNGState:
    """One process's random streams: torch's global one, the batch-drawing generator, Python's.

    The loop takes one after every step, so that a checkpoint (even one written on Ctrl-C in the
    middle of the next step) holds the streams exactly as they were after the step it saves.
    """

    torch_state: torch.Tensor
    data_state: torch.Tensor
    python_state: tuple

    @classmethod
    def capture(cls, generator: torch.Generator) -> "RNGState":
        return cls(torch.get_rng_state(), generator.get_state(), random.getstate())

    def restore(self, generator: torch.Generator) -> None:
        torch.set_rng_state(self.torch_state)
        generator.set_state(self.data_state)
        version, internal, gauss = self.python_state  # JSON made the inner tuple a list
        random.setstate((version, tuple(internal), gauss))


def rank_rng_path(path: Path, rank: int) -> Path:
    """Where process `rank` (>= 1) of a multi-process run keeps its random streams."""
    return path.with_name(f"rng-rank{rank}.safetensors")


def save_checkpoint(path: Path, model: MiniGPT4, opt, step: int, history: list, rng: RNGState,
                    cfg: TrainConfig, world_size: int = 1) -> None:
    """What was trained + optimizer + process 0's RNG states + step, atomically (temp + rename)."""
    tensors = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    osd = opt.state_dict()
    for idx, state in osd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
    tensors["rng.torch"], tensors["rng.data"] = rng.torch_state, rng.data_state
    meta = {"step": step, "history": history, "param_groups": osd["param_groups"],
            "python_random": rng.python_state, "world_size": world_size,
            "train_config": asdict(cfg), "model_config": model.cfg.to_dict()}
    atomic_save_file(tensors, path, metadata={"state": json.dumps(meta)})


def save_rank_rng(path: Path, rank: int, step: int, rng: RNGState) -> None:
    """The random streams of process `rank` >= 1 after `step`, next to the checkpoint `path`."""
    meta = {"step": step, "rank": rank, "python_random": rng.python_state}
    tensors = {"rng.torch": rng.torch_state, "rng.data": rng.data_state}
    atomic_save_file(tensors, rank_rng_path(path, rank),
                     metadata={"state": json.dumps(meta)})


def _read(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"Cannot resume from {path}: not a complete training checkpoint "
                              f"({e}).") from e
    return meta, tensors


def load_checkpoint(path: Path, model: MiniGPT4, opt, generator: torch.Generator,
                    rank: int = 0, world_size: int = 1) -> dict:
    """Restore a checkpoint written by `save_checkpoint`; returns its metadata (step, history).

    Every process restores the same trained tensors and optimizer state, and its *own* random
    streams (process 0's from the checkpoint, process N's from `rng-rank{N}.safetensors`). A run
    can therefore only be resumed with as many processes as it had: with another number, the
    processes would draw other batches than the interrupted run, so this is refused.
    """
    meta, tensors = _read(path)
    saved_world = meta.get("world_size", 1)  # checkpoints from before it was recorded: 1 process
    if saved_world != world_size:
        raise CheckpointError(
            f"{path} was written by a run of {saved_world} process(es) and this run has "
            f"{world_size}: resume it with {saved_world} (each process continues its own random "
            "stream), or start afresh in a new out_dir (or with resume=False).")
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
    if rank == 0:
        rng = RNGState(tensors["rng.torch"], tensors["rng.data"], meta["python_random"])
        rng.restore(generator)
        return meta
    own = rank_rng_path(path, rank)
    if not own.exists():
        raise CheckpointError(f"Cannot resume process {rank}: {own} (its random streams) is "
                              f"missing next to {path}; start afresh in a new out_dir.")
    rank_meta, rank_tensors = _read(own)
    if rank_meta["step"] != meta["step"]:
        raise CheckpointError(
            f"{own} holds process {rank}'s random streams at step {rank_meta['step']}, but "
            f"{path} is at step {meta['step']} (an interrupted write?); start afresh in a new "
            "out_dir.")
    RNGState(rank_tensors["rng.torch"], rank_tensors["rng.data"],
             rank_meta["python_random"]).restore(generator)
    return meta
