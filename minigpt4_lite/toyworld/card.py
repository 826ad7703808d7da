"""The model card of `assets/` (its README.md): how each backbone was built, what it measured.

MiniGPT-4 (Sec. 3) starts from backbones trained elsewhere, documented by their own papers; ours
are built by `build`, and this card is their documentation. It is rendered, never written by
hand: every figure it states is read from `build_report.json` (what the build measured), from the
shipped files themselves (parameter counts, sizes, hashes, `projections/metrics.json`) or from the
configs next to the weights. Sentences that are not measured by the build are printed under a
label that says so. `write_model_card(folder)` re-renders the card from the files in `folder`
without rebuilding anything (`build-assets --card-only`); a test checks that the shipped card is
up to date.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from pathlib import Path

from .questions import LATER_WORDINGS
from .recipe import FORM_WEIGHTS, FORMS, PLAIN

CARD_EXCLUDED = ("README.md",)  # the card does not list itself

# Figures of builds shipped before the current recipe, measured when they were current
# (2026-11-27) and recorded here by hand: a rebuild does not re-measure them.
EARLIER_WORDS_FIGURES = (
    "Without the words objective (the assets shipped before 2026-11-27) the same least-squares "
    "fit reached R^2 0.93; with the LLM shipped then, the demo's stage 2 failed 11.5% of "
    "detailed descriptions without the objective and 8.0% with it, and answered 24% and 72% of "
    "position questions, scored leniently as then (docs/asset_history.md).")
PROTOTYPE_NOTE = (
    "a prototype found that an LLM this small, pretrained on words only, could not be taught to "
    "read arbitrary soft tokens through one linear layer (object recall 0.02-0.07, although the "
    "visual features held the scene). Vicuna-13B can read such tokens, and BLIP-2's Q-Former had "
    "already been trained to talk to a frozen LLM; our tiny LLM gets the equivalent skill from "
    "the slot vectors. It never saw a pixel: the projection must still learn to map what the "
    "Q-Former sees onto what the LLM can read.")



def _precision(report: dict, part: str) -> str:
    """How `part` ("llm" or "vision") was pretrained; a build of one part records its own, and
    reports before 2026-11-29 lack the key (bf16 autocast)."""
    precision = report.get(f"{part}_precision", report.get("precision"))
    return "float32" if precision == "fp32" else "bf16 autocast"

def sha256(path: Path) -> str:
    """The file's sha256, as the card and `build_report.json` list it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def safetensors_params(path: Path) -> int:
    """The number of values stored in a safetensors file (read from its header, no tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def shipped_files(folder: Path) -> list[Path]:
    """Every file of the assets folder that the card lists, in a stable order."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name not in CARD_EXCLUDED and "__pycache__" not in p.parts)


def _seconds(report: dict) -> str:
    parts = {k: v for k, v in report.get("seconds", {}).items() if k != "total"}
    return ", ".join(f"{k}: {v:.0f} s" for k, v in parts.items()) or "one run"


def _build_time(report: dict) -> str:
    """The whole command's time where one run built everything, else the sum of the parts."""
    wall = report.get("seconds_wall")
    if wall:
        return (f"{wall:,.0f} s for the whole command, quality checks included "
                f"({report['seconds_total']:,.0f} s of training)")
    return f"{report['seconds_total']:,.0f} s"


def _recorded(text: str | None, label: str) -> str:
    return f"\n- *{label}:* {text}" if text else ""


def _fast_note(b: dict) -> str:
    pool = b.get("llm_bucket_pool", 1)
    return ((f", length-bucketed batches (pools of {pool})" if pool > 1 else "")
            + (", torch.compile" if b.get("compile") else "")
            + (f", {b['llm_attention']} attention" if b.get("llm_attention", "sdpa") != "sdpa"
               else ""))


def _pinned_note(b: dict) -> str:
    """The slot words' embeddings, where the build held them fixed (`slot_word_norm`)."""
    if not b.get("slot_word_norm"):
        return ""
    return (f" The input embeddings of the slot words were held fixed at orthogonal vectors of "
            f"length {b['slot_word_norm']} (`slots.pin_slot_words`).")


# what the card says about a pretraining form, where the build used it (weight > 0)
FORM_NOTES = {
    "slot_caption": "The sixth form is stage 1's own layout (`[BOS] [slots] caption\\n`, no"
                    " prompt), like BLIP-2's second stage, which trained its Q-Former's"
                    " outputs to be captioned by a frozen LLM.",
    "drill": "The seventh form is a terse lookup in one fixed layout (`<Img>[slots]</Img> star:"
             " red`, `language.lookup_drill`): where the question always sits in the same place,"
             " a fresh LLM learns to find an object among the slots within a few hundred steps.",
    "colour_chat": "The eighth form is a chat of colour questions alone, each naming an object"
                   " by its shape (`build_llm.qa_dialogue`).",
}


def _lookup_note(b: dict) -> str:
    """The lookup phase (`BuildConfig.lookup_steps`), where the build had one."""
    if not b.get("lookup_steps"):
        return ""
    weights = ", ".join(map(str, b["lookup_form_weights"]))
    return (f"\n  The first {b['lookup_steps']} steps drew their forms with the shares {weights}"
            " instead (terse lookups and colour chats): a fresh LLM learns to find an object by"
            " its shape alone in a few hundred such steps, which the whole mix never taught it.")


def _final_note(b: dict) -> str:
    """The final phase (`BuildConfig.final_steps`), where the build had one."""
    if not b.get("final_steps"):
        return ""
    weights = b["final_form_weights"]
    facts = _share(weights, "facts") > 0
    lookups = any(_share(weights, f) for f in ("cell_drill", "shape_chat"))
    examples = ", ".join(f'"{w.format(n="shape", s="star", t="a red star")}"'
                         for w in sorted(LATER_WORDINGS))
    return (f"\n  Then a final phase: {b['final_steps']} more steps with a fresh AdamW (peak lr"
            f" {b['final_lr']}, warmup + cosine) on the shares {', '.join(map(str, weights))}:"
            " the whole mix, its questions now also in four later wordings that the first phase"
            f" and the tokenizer never read (`questions.LATER_WORDINGS`: {examples}), so"
            " that it learns the words \"number\", \"size\", \"would\" and \"find\" in a"
            " question, as Vicuna learned them on the web"
            + (", and detailed descriptions that end with two facts in everyday words"
               " (`language.fact_sentences`: \"The color of the star is red.\")." if facts
               else ".")
            + (" It also read what is in a cell, asked alone (terse lookups of a cell,"
               " `<Img>[slots]</Img> middle right: small green circle`, `language.cell_drill`;"
               " chats of \"What is in the middle right?\" and \"Which object is small?\"):"
               " from exact slots the LLM most often answered with the object of another cell in"
               " the same row."
               if lookups else "")
            + _final_noise_note(b))


def _final_noise_note(b: dict) -> str:
    """The final phase's own slot noise (`BuildConfig.final_slot_noise`), where it differs."""
    noise = b.get("final_slot_noise", b["slot_noise"])
    if noise == b["slot_noise"]:
        return ""
    return (f" Its slot vectors carried more noise ({noise} x the embedding std instead of"
            f" {b['slot_noise']}): through a trained projection the visual tokens lie near the"
            " slot vectors, never on them, and an LLM that finished on noisier ones kept its place"
            " in a description more often.")


def _share(weights, form: str) -> int:
    """A form's weight in `weights` (0 where an older report lists fewer forms)."""
    i = FORMS.index(form)
    return weights[i] if i < len(weights) else 0


def _existence_note(report: dict) -> str:
    """The look-first existence answers, where the LLM's language had them."""
    if report.get("existence_answers") != "look first":
        return ""
    return ("\n  Existence questions are answered by looking first (`language.existence_answer`:"
            " \"Is there a red star?\" -> \"The star is blue, so no.\"): the colour question's own"
            " lookup, then a yes or no that compares two words already written.")


def _seed_note(b: dict) -> str:
    """Which seed built what: the LLM may have its own (`BuildConfig.llm_seed`)."""
    llm_seed = b.get("llm_seed")
    if llm_seed is None or llm_seed == b["seed"]:
        return f"seed {b['seed']}"
    return f"seed {b['seed']} (the LLM: `llm_seed` {llm_seed})"


def _form_notes(b: dict) -> str:
    weights = b.get("form_weights", FORM_WEIGHTS)  # reports older than a form have fewer weights
    return "".join(f"\n  {note}" for form, note in FORM_NOTES.items() if _share(weights, form))


def _scoring_note(llm: dict) -> str:
    """Q&A figures of builds before strict scoring counted the key anywhere in the answer."""
    if llm.get("qa_scoring") == "strict":
        return ""
    return ("- *The Q&A figures below were scored leniently when this LLM was built (the answer "
            "key anywhere in the answer as whole words, so \"bottom center\" counted for "
            "\"center\"); the strict figures of the same LLM (`evaluate.slot_ceiling`) are in "
            "BENCHMARKS.md, section \"The demo over N seeds\".*\n")


def _by_kind(acc: dict) -> str:
    return ", ".join(f"{kind} {value:.0%}" for kind, value in acc.items()) or "not measured"


def _words_note(b: dict, report: dict) -> str:
    if not b.get("vision_words_weight", 0):
        return ""
    r2 = report.get("linear_readout_r2")
    fit = (f" The least-squares linear map from the query outputs to the LLM's exact slot vectors "
           f"reaches R^2 **{r2:.4f}** on held-out scenes (`linear_readout_r2`).") if r2 else ""
    return f"""
- A second objective (weight {b['vision_words_weight']}): through one shared linear layer, each
  query's output must give, by least squares, the bag of *words* of its slot (the cell's position
  words and size, colour, shape or "empty"; the background's words for the last query). The
  Q-Former never sees the LLM; the objective makes its outputs linearly *readable* as words, as
  BLIP-2's second stage made its Q-Former readable by a frozen LLM through one fully-connected
  layer.{fit}{_recorded(EARLIER_WORDS_FIGURES, "Recorded from earlier builds, not re-measured")}"""


def _vision_architecture(cfg: dict) -> str:
    v, q = cfg["vision_config"], cfg["qformer_config"]
    side = v["image_size"] // v["patch_size"]
    cross = [str(i) for i in range(0, q["num_hidden_layers"], q["cross_attention_frequency"])]
    return (f"ViT: {v['image_size']}x{v['image_size']} images, patch {v['patch_size']} "
            f"({side * side} patches + CLS), width {v['hidden_size']},\n  "
            f"{v['num_hidden_layers']} layers, {v['num_attention_heads']} heads; then "
            f"`ln_vision`. Q-Former: width {q['hidden_size']}, {q['num_hidden_layers']} layers, "
            f"cross-attention in layers\n  {' and '.join(cross)}, "
            f"{cfg['num_query_tokens']} learned queries")


def _samples_section(folder: Path) -> str:
    truth_file = folder / "samples" / "ground_truth.json"
    if not truth_file.exists():
        return "Not built."
    from PIL import Image

    names = list(json.loads(truth_file.read_text()))
    sizes = set()
    for name in names:
        with Image.open(folder / "samples" / name) as im:
            sizes.add(f"{im.width}x{im.height}")
    return (f"{len(names)} held-out ToyWorld scenes rendered at {', '.join(sorted(sizes))} px "
            "(the model reads them resized to its own image size), with their ground truth in\n"
            "`ground_truth.json`.")


def _projections_section(folder: Path) -> str:
    proj = folder / "projections"
    metrics_file = proj / "metrics.json"
    if not metrics_file.exists():
        return "Not trained yet: `python -m minigpt4_lite demo --out assets/projections`."
    m = json.loads(metrics_file.read_text())
    params = {stage: safetensors_params(proj / stage / "projection.safetensors")
              for stage in ("stage1", "stage2") if (proj / stage / "projection.safetensors")
              .exists()}
    s = m["seconds"]

    def figures(r: dict) -> str:
        d = r["detailed"]
        qa = f", Q&A accuracy {r['qa']['accuracy']:.1%}" if "qa" in r else ""
        return (f"detailed descriptions fail {d['failure_rate']:.1%} (object recall "
                f"{d['object_recall']:.3f}, hallucination {d['hallucination_rate']:.3f}), "
                f"caption recall {r['caption']['object_recall']:.3f}{qa}")

    counts = ", ".join(f"{stage}: {n:,}" for stage, n in params.items())
    return f"""The reference projections trained by `python -m minigpt4_lite demo --out
assets/projections`, so that any notebook can start from any chapter. Each `stageN/` holds
`projection.safetensors` (the trained `llama_proj`, values per stage: {counts}),
`checkpoint.safetensors` (the same tensors with the AdamW state, the random states and the
training history, for resuming) and `config.json`. From `metrics.json` ({m['n_eval']}
held-out scenes, seed {m['seed']}, {m.get('device', 'cpu')}; trained in {s['stage1']:.0f} s +
{s['stage2']:.0f} s, {s['total']:.0f} s with the evaluation):
- stage 1 only: {figures(m['stage1'])};
- stage 1 + stage 2: {figures(m['stage2'])}."""


def _schedule_note(report: dict) -> str:
    """Builds before 2026-11-29 ran their own learning-rate schedule, not `train.warmup_cosine`."""
    if report.get("lr_schedule"):
        return ""
    return _recorded(
        "These files were built with the build's earlier learning-rate schedule (its warmup "
        "reached the peak one step earlier, its cosine ran over the steps after warmup only). "
        "`build-assets` now uses the project's one schedule (`train.warmup_cosine`), so a rebuild "
        "gives slightly different weights and figures (docs/asset_history.md).",
        "Reproducing these files")


def render_model_card(folder: str | Path, report: dict | None = None) -> str:
    """The text of `folder/README.md`: how each asset was built, its measured figures, and every
    shipped file with its size and sha256. Reads `folder/build_report.json` unless `report` is
    given, and the shipped files themselves; nothing is rebuilt or re-measured."""
    folder = Path(folder)
    if report is None:
        report = json.loads((folder / "build_report.json").read_text())
    b, llm, vq = report["build_config"], report["llm"], report["vision_qformer"]
    llm_cfg = json.loads((folder / "llm" / "config.json").read_text())
    vq_cfg = json.loads((folder / "vision_qformer" / "config.json").read_text())
    llm_params = safetensors_params(folder / "llm" / "model.safetensors")
    vq_params = safetensors_params(folder / "vision_qformer" / "model.safetensors")
    llm_prec, vision_prec = _precision(report, "llm"), _precision(report, "vision")
    n_queries = vq_cfg["num_query_tokens"]
    form_notes = _form_notes(b) + _lookup_note(b) + _final_note(b) + _existence_note(report)
    time_note = (_recorded(report.get("time_note"), "Note recorded with this build")
                 + _schedule_note(report))
    plain_note = _recorded(report.get("plain_note"), "Recorded by hand when this LLM replaced "
                           "the previous one, not re-measured by a rebuild")
    files = "\n".join(f"| `{p.relative_to(folder).as_posix()}` | {p.stat().st_size:,} | "
                      f"`{sha256(p)}` |" for p in shipped_files(folder))
    return _reflow(f"""# assets/: the tiny pretrained, frozen backbones of ToyWorld

Built by `python -m minigpt4_lite build-assets --out assets` (`minigpt4_lite/toyworld/build.py`),
deterministic for {_seed_note(b)} on one kind of CPU (the LLM trains on one thread; on another CPU
the rounding differs and the LLM is another draw, docs/asset_history.md); measured build time
{_build_time(report)} on {report.get('machine', 'this machine')} ({_seconds(report)}).{time_note}

Everything here is loaded by `preset("tiny")` offline. This card is rendered from
`build_report.json`, the configs and the files themselves (`toyworld.card.write_model_card`).

## `llm/`: the tiny "Vicuna" (a `LlamaForCausalLM` + a byte-level BPE fast tokenizer)
- {llm_params:,} parameters (counted in `llm/model.safetensors`): {llm_cfg['num_hidden_layers']}
  layers x {llm_cfg['hidden_size']} wide, {llm_cfg['num_attention_heads']} heads, MLP
  {llm_cfg['intermediate_size']}, vocabulary {llm_cfg['vocab_size']}, context
  {llm_cfg['max_position_embeddings']} (`llm/config.json`).
- Pretrained on text only, {b['llm_steps']} steps x {b['llm_batch']} sequences, AdamW
  (peak lr {b['llm_lr']}, warmup + cosine), {llm_prec}{_fast_note(b)}: ToyWorld captions, and
  `###Human: ... ###Assistant: ...` dialogues (stage-2 template and the chat template) in every
  register (detailed descriptions, Q&A, poems, stories, captions), with the scene given in words,
  or as *slot vectors*: one input vector per grid cell, the sum of that cell's word embeddings
  (position, size, colour, shape or "empty") plus one for the background, plus Gaussian noise
  ({b['slot_noise']} x the embedding std).{_pinned_note(b)} Shares of the forms (caption text,
  scene in words, slot vectors in the stage-2 template, in the chat template, multi-turn Q&A
  chats with every answer supervised, slot vectors followed directly by a caption, terse
  lookups):
  {', '.join(map(str, b.get('form_weights', FORM_WEIGHTS)))}. Shares of the registers (detailed
  description, Q&A, poem, story, caption) where a form draws one:
  {', '.join(map(str, b.get('kind_weights', PLAIN['kind_weights'])))}.{form_notes}
- *Why the slot vectors (commentary; the prototype's figure is recorded, not re-measured):*
  {PROTOTYPE_NOTE} Scale buys this skill for free; at {llm_params / 1e6:.1f} M parameters it
  must be taught.
- Held-out perplexity (ToyWorld text, the single-turn forms): **{llm['heldout_perplexity']:.3f}**.
{_scoring_note(llm)}- Colour questions on held-out scenes, greedy:
  **{llm['colour_qa_accuracy_words']:.1%}** correct
  with the scene in words, **{llm['colour_qa_accuracy_slots']:.1%}** with exact slot vectors.
- The demo's questions (one per held-out scene, cycling colour / count / position / existence),
  greedy, with exact slot vectors: {_by_kind(llm.get('qa_accuracy_slots', {}))}; with the scene
  in words: {_by_kind(llm.get('qa_accuracy_words', {}))}.{plain_note}

## `vision_qformer/`: the tiny "BLIP-2" ViT + Q-Former (HF BLIP-2 layout)
- {vq_params:,} parameters (counted in `vision_qformer/model.safetensors`).
  {_vision_architecture(vq_cfg)} (`vision_qformer/config.json`).
- Pretrained for {b['vision_steps']} steps x {b['vision_batch']} rendered scenes ({vision_prec},
  {b.get('vision_attention', 'sdpa')} attention) with a grounded
  representation objective in the spirit of BLIP-2's first stage: query i (i < {n_queries - 1})
  must predict grid cell i's shape, colour and size (or "empty") and query {n_queries - 1} the
  background, through linear heads shared by the queries and then discarded.{_words_note(b, report)}
- Linear probes on the frozen query outputs, held-out scenes: shape accuracy
  **{vq['shape_accuracy']:.4f}**, colour accuracy **{vq['colour_accuracy']:.4f}**, position
  (object present exactly where it is) **{vq['position_accuracy']:.4f}**{_cell_probe(vq)}.

## `samples/`
{_samples_section(folder)}

## `projections/`
{_projections_section(folder)}

## Files
Every shipped file (this card aside) with its size in bytes and its sha256, computed from the
files when the card was rendered.

| file | bytes | sha256 |
|---|---|---|
{files}
""")


def _cell_probe(vq: dict) -> str:
    return (f", the cell a query stands for (from that query alone) **{vq['cell_accuracy']:.4f}**"
            if "cell_accuracy" in vq else "")


def _reflow(text: str, width: int = 100) -> str:
    """Re-wrap the card's paragraphs and bullets to `width` columns (tables and headings kept)."""
    out, item, indent = [], [], ""

    def flush() -> None:
        if item:
            out.append(textwrap.fill(" ".join(item), width, initial_indent=indent[:-2] + (
                "- " if indent else ""), subsequent_indent=indent, break_long_words=False,
                break_on_hyphens=False))
            item.clear()

    for line in text.split("\n"):
        if not line.strip() or line.startswith(("|", "#")):
            flush()
            out.append(line)
        elif line.startswith("- "):
            flush()
            indent = "  "
            item.append(line[2:].strip())
        else:
            if not item:
                indent = ""
            item.append(line.strip())
    flush()
    return "\n".join(out)


def write_model_card(folder: str | Path, report: dict | None = None) -> Path:
    """(Re-)write `folder/README.md` from `folder/build_report.json` (or `report`) and the files.

    The build calls it at its end; after retraining `projections/` (or any change to the files),
    re-render the card without rebuilding: `python -m minigpt4_lite build-assets --out assets
    --card-only`.
    """
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(folder, report))
    return path
