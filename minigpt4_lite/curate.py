"""The stage-2 data curation pipeline of the paper (Sec. 3.2); the official code never released it.

1. `describe`: the stage-1 model writes a long description with the paper's exact prompt;
2. `continue_if_short`: if it has at most 80 tokens, ask `Continue` and concatenate;
3. `rule_fixer` (default) or any callable / `LLMFixer` (a transformers chat model given the paper's
   fix-up prompt) post-processes each paragraph;
4. `keep`: filter (apologies, too short, unfixable) and `write_ccsbu` writes the `cc_sbu_align`
   format (`filter_cap.json` + `image/{id}.jpg`), which the stage-2 loader reads unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import toyworld as tw
from .chat import GenerationSettings, generate
from .evaluate import judge, scene_features, summarize
from .prompts import CONTINUE_PROMPT, CURATION_PROMPT, text_ids

FIX_PROMPT = ("Fix the error in the given paragraph. Remove any repeating sentences, meaningless "
              "characters, not English sentences, and so on. Remove unnecessary repetition. "
              "Rewrite any incomplete sentences. Return directly the results without explanation. "
              "Return directly the input paragraph if it is already correct without explanation.")
APOLOGIES = ("sorry", "i cannot", "i can't", "as an ai", "i apologize", "unable to")
SHORT_TOKENS = 80


@dataclass
class Draft:
    """One image's description as it goes through the pipeline."""

    scene: tw.Scene
    text: str
    n_tokens: int
    continued: bool = False
    fixed: str = ""
    kept: bool = False
    reason: str = ""


@torch.no_grad()
def describe(model, scenes: list[tw.Scene], max_new_tokens: int = 160,
             batch_size: int = 100) -> list[Draft]:
    """Step 1: long descriptions from the (stage-1) model with the paper's curation prompt."""
    embeds = model.project(scene_features(model, scenes))
    settings = GenerationSettings(do_sample=False, max_new_tokens=max_new_tokens)
    drafts = []
    for i in range(0, len(scenes), batch_size):
        outs = generate(model, [CURATION_PROMPT] * len(scenes[i:i + batch_size]),
                        embeds[i:i + batch_size], settings)
        drafts += [Draft(s, o.text, len(text_ids(model.tokenizer, o.text)))
                   for s, o in zip(scenes[i:i + batch_size], outs)]
    return drafts


@torch.no_grad()
def continue_if_short(model, drafts: list[Draft], max_new_tokens: int = 100) -> list[Draft]:
    """Step 2: for answers of at most 80 tokens, ask `Continue` and concatenate (Sec. 3.2)."""
    short = [d for d in drafts if d.n_tokens <= SHORT_TOKENS]
    if not short:
        return drafts
    embeds = model.project(scene_features(model, [d.scene for d in short]))
    prompts = [f"{CURATION_PROMPT} {d.text}{CONTINUE_PROMPT}" for d in short]
    outs = generate(model, prompts, embeds,
                    GenerationSettings(do_sample=False, max_new_tokens=max_new_tokens))
    for d, o in zip(short, outs):
        if o.text:
            d.text, d.continued = f"{d.text} {o.text}".strip(), True
    return drafts


def rule_fixer(text: str) -> str:
    """Step 3, rule-based: drop meaningless characters, repeated and incomplete sentences."""
    text = re.sub(r"[^A-Za-z0-9 ,.'!?-]+", " ", text)  # meaningless characters, stray '###'
    text = re.sub(r"\s+", " ", text).strip()
    sentences = re.findall(r"[^.!?]+[.!?]", text)  # a trailing fragment has no end mark: dropped
    seen, kept = set(), []
    for s in (s.strip() for s in sentences):
        key = s.lower()
        if key not in seen and len(s.split()) >= 2:
            seen.add(key)
            kept.append(s)
    return " ".join(kept)


class LLMFixer:
    """Step 3 with a transformers chat model given the paper's fix-up prompt (e.g. an instruct LLM).

    `LLMFixer("path/or/hub-id")(paragraph)` returns the model's rewrite (greedy, one turn).
    """

    def __init__(self, name_or_path: str, max_new_tokens: int = 300, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path).to(device).eval()
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, paragraph: str) -> str:
        messages = [{"role": "user", "content": f"{FIX_PROMPT}\n\n{paragraph}"}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 return_tensors="pt").to(self.model.device)
        out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def keep(draft: Draft, min_words: int = 8) -> tuple[bool, str]:
    """Step 4's rules: refuse apologies, texts too short, and texts the fixer emptied."""
    low = draft.fixed.lower()
    if not draft.fixed:
        return False, "unfixable"
    if any(a in low for a in APOLOGIES):
        return False, "apology"
    if len(draft.fixed.split()) < min_words:
        return False, "too short"
    return True, ""


def write_ccsbu(drafts: list[Draft], out: str | Path, image_size: int = 240) -> Path:
    """Write kept drafts in the official `cc_sbu_align` layout (read by `CCSBUAlignDataset`)."""
    out = Path(out)
    (out / "image").mkdir(parents=True, exist_ok=True)
    annotations = []
    for d in drafts:
        if d.kept:
            image_id = str(d.scene.seed)
            tw.render(d.scene, image_size).convert("RGB").save(out / "image" / f"{image_id}.jpg",
                                                                quality=95)
            annotations.append({"image_id": image_id, "caption": d.fixed})
    (out / "filter_cap.json").write_text(json.dumps({"annotations": annotations}, indent=1))
    return out


def curate(model, scenes: list[tw.Scene], out: str | Path,
           fixer: Callable[[str], str] = rule_fixer) -> dict:
    """The whole pipeline; returns generated/kept counts and the quality of the kept texts."""
    drafts = continue_if_short(model, describe(model, scenes))
    for d in drafts:
        d.fixed = fixer(d.text)
        d.kept, d.reason = keep(d)
    write_ccsbu(drafts, out)
    kept = [d for d in drafts if d.kept]
    reasons = {}
    for d in drafts:
        if not d.kept:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
    quality = lambda ds, attr: summarize([judge(getattr(d, attr), True, d.scene, "detailed")  # noqa: E731
                                          for d in ds]) if ds else {}
    return {"generated": len(drafts), "continued": sum(d.continued for d in drafts),
            "kept": len(kept), "dropped": reasons,
            "raw_quality": quality(drafts, "text"), "kept_quality": quality(kept, "fixed"),
            "examples": [{"raw": d.text, "fixed": d.fixed, "kept": d.kept} for d in drafts[:3]]}
