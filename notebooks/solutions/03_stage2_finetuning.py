# ruff: noqa: E402
# Solutions of chapter 3's exercises: one block per exercise cell of the notebook.
# tests/test_solutions.py puts each block into its cell and runs the chapter's checks.

# %% EXERCISE: stage2_template
def my_stage2_prompt(instruction: str) -> str:
    """The stage-2 template around one instruction (the image placeholder inside <Img> tags)."""
    return f"###Human: <Img><ImageHere></Img> {instruction} ###Assistant: "

# %% EXERCISE: stage2_loss_mask
from minigpt4_lite.prompts import text_ids


def my_stage2_example(tokenizer, instruction: str, answer: str, n_image_tokens: int):
    """Token ids (-1 per image slot) and labels (-100 except on the answer + '###')."""
    before, after = my_stage2_prompt(instruction).split("<ImageHere>")
    ids = [tokenizer.bos_token_id] + text_ids(tokenizer, before) + [-1] * n_image_tokens
    ids += text_ids(tokenizer, after)
    target = text_ids(tokenizer, answer + "###")[:160]
    return ids + target, [-100] * len(ids) + target

# %% EXERCISE: rule_fixer
import re


def my_rule_fixer(text: str) -> str:
    """Curation step 3 by rule: clean characters, keep whole, new sentences of >= 2 words."""
    text = re.sub(r"[^A-Za-z0-9 ,.'!?-]+", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    kept, seen = [], set()
    for sentence in re.findall(r"[^.!?]+[.!?]", text):
        sentence = sentence.strip()
        if sentence.lower() not in seen and len(sentence.split()) >= 2:
            seen.add(sentence.lower())
            kept.append(sentence)
    return " ".join(kept)

# %% EXERCISE: count_positions
def my_count_positions(batch: dict) -> dict:
    """Real, image, supervised and padding positions of a collated batch."""
    real = batch["attention_mask"] == 1
    return {"real": int(real.sum()), "image": int(batch["image_mask"].sum()),
            "supervised": int((batch["labels"] != -100).sum()), "padding": int((~real).sum())}
