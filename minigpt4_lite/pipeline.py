"""The whole two-stage story on the embedded default: the `demo` main job (paper Sec. 3 and 4).

Stage 1 aligns the projection on short captions; stage 2 finetunes it on detailed answers in the
conversation template; both models are evaluated on the same held-out scenes with the detailed
description prompt, a poem prompt, captions and Q&A, and reported like the paper's Table 3.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from . import toyworld as tw
from .checkpoints import load_model
from .config import preset
from .data import ToyWorldDataset
from .evaluate import evaluate, scene_features, table3
from .train import recipe, train

log = logging.getLogger(__name__)


def run_demo(out: str | Path = "runs/demo", n_eval: int = 200, seed: int = 42,
             n_train: int = 5000, device: str = "cpu") -> dict:
    """Train stage 1 then stage 2 on ToyWorld, evaluate both, write `out/metrics.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(seed)  # the untrained projection's initialisation
    model = load_model(preset("tiny"), device=device, projection="")
    train(model, ToyWorldDataset(1, n_train, seed=seed),
          recipe("tiny-stage1", seed=seed, out_dir=str(out / "stage1")), resume=False)
    t1 = time.time()
    scenes = tw.make_scenes("heldout", n_eval)
    features = scene_features(model, scenes)
    stage1 = evaluate(model, scenes, features=features)
    t2 = time.time()
    train(model, ToyWorldDataset(2, n_train, seed=seed),
          recipe("tiny-stage2", seed=seed, out_dir=str(out / "stage2")), resume=False)
    t3 = time.time()
    stage2 = evaluate(model, scenes, features=features)
    t4 = time.time()
    metrics = {
        "seconds": {"stage1": round(t1 - t0, 1), "stage2": round(t3 - t2, 1),
                    "eval": round((t2 - t1) + (t4 - t3), 1), "total": round(t4 - t0, 1)},
        "stage1": stage1, "stage2": stage2, "n_eval": n_eval, "seed": seed,
        "device": device, "torch_threads": torch.get_num_threads(),
    }
    metrics["table"] = table3({"stage 1 only": stage1, "stage 1 + stage 2": stage2})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
