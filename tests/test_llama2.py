"""The Llama-2 variant (`minigpt4-llama2`) end to end, on tiny random checkpoints in real layouts.

The files are laid out as a user downloads them: an HF BLIP-2 folder (sharded, with its index, like
`Salesforce/blip2-flan-t5-xxl`; only its ViT is read), an HF Llama folder with a Llama tokenizer,
and an official-format projection `.pth` (`llama_proj` maps 4 concatenated patch tokens to the
LLM). The terminal chat must give the same greedy answer as the official Llama-2 flow written out
below with transformers' own modules: the ViT blocks, a *fresh* LayerNorm as `ln_vision` (the
official no-Q-Former model never loads BLIP-2's), CLS dropped, 4 consecutive patch tokens
reshaped into one, `llama_proj`, and the `<s>[INST] ... [/INST] ` conversation.
"""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_real_flow import IMAGE, MEAN, STD, SYSTEM, _llama_folder

from minigpt4_lite import cli
from minigpt4_lite.chat import GREEDY, Chat
from minigpt4_lite.checkpoints import load_model
from minigpt4_lite.config import preset
from minigpt4_lite.errors import CheckpointError
from minigpt4_lite.prompts import (
    IGNORE_INDEX,
    MAX_TXT_LEN,
    build_example,
    collate,
    stage2_prompt,
    stage_end_sym,
)

QUESTION = "What is in this picture?"
# The official Llama-2 chat prompt (`CONV_VISION_LLama2`), written out literally.
OFFICIAL_PROMPT = SYSTEM + "<s>[INST] <Img><ImageHere></Img> " + QUESTION + " [/INST] "
WIDTH, D_LLM = 32, 48  # the tiny ViT's width and the tiny LLM's


def _blip2(folder) -> None:
    """A tiny random HF BLIP-2 checkpoint, sharded with its index. Image 40 / patch 10: 16 patch
    tokens, i.e. 4 LLM tokens of width 4 x 32. Its `post_layernorm` (BLIP-2's trained ln_vision)
    is far from (1, 0), so using it instead of a fresh LayerNorm changes the answer."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig

    torch.manual_seed(0)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                           num_attention_heads=4, image_size=40, patch_size=10,
                           initializer_range=0.02),
        qformer_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, encoder_hidden_size=WIDTH),
        text_config=LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=4).to_dict(),
        num_query_tokens=4)
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.vision_model.named_parameters():
            if "bias" in name or "embedding" in name:
                p.normal_(0, 0.1)
        model.vision_model.post_layernorm.weight.normal_(1, 0.5)
        model.vision_model.post_layernorm.bias.normal_(0, 1.0)
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    """(BLIP-2 folder, Llama folder, official llama2 projection .pth), as a user downloads them."""
    root = tmp_path_factory.mktemp("llama2")
    _blip2(root / "blip2")
    _llama_folder(root / "llama2", seed=1, prompt=OFFICIAL_PROMPT)
    g = torch.Generator().manual_seed(2)
    torch.save({"model": {"llama_proj.weight": torch.randn(D_LLM, 4 * WIDTH, generator=g) * 0.3,
                          "llama_proj.bias": torch.randn(D_LLM, generator=g) * 0.1},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 4},
               root / "pretrained_minigpt4_llama2_7b.pth")
    return root / "blip2", root / "llama2", root / "pretrained_minigpt4_llama2_7b.pth"


@pytest.fixture(scope="module")
def model(real_layout):
    blip2, llama, pth = real_layout
    cfg = preset("minigpt4-llama2", vision_qformer=str(blip2), llm=str(llama))
    return load_model(cfg, projection=str(pth))


@torch.no_grad()
def official_answer(blip2_folder, llama_folder, pth, max_new_tokens: int,
                    ln_vision: str = "fresh"):
    """The official MiniGPT-4 (Llama-2) chat, step by step, with transformers' modules.

    Eval image processing; the ViT blocks (`visual_encoder`), then `ln_vision`: a fresh
    `nn.LayerNorm` (the official model never loads one; `ln_vision="trained"` uses BLIP-2's
    instead, to show the test can tell them apart); CLS dropped and `view(bs, pn / 4, hs * 4)`;
    `llama_proj`; the prompt split at `<ImageHere>`, BOS on the first segment only; greedy
    decoding until EOS (or `###`, the demo's stop words); decoded without special tokens, cut at
    `###` and after `Assistant:`, stripped. Returns (answer, generated token ids).
    """
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, LlamaForCausalLM

    vit = Blip2ForConditionalGeneration.from_pretrained(blip2_folder,
                                                        dtype=torch.float32).vision_model.eval()
    tok = AutoTokenizer.from_pretrained(llama_folder)
    llm = LlamaForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()
    proj = torch.load(pth, map_location="cpu", weights_only=True)["model"]

    size = vit.config.image_size
    img = Image.open(IMAGE).convert("RGB").resize((size, size), Image.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
    pixels = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
    tokens = vit.encoder(inputs_embeds=vit.embeddings(pixels)).last_hidden_state
    ln = torch.nn.LayerNorm(vit.config.hidden_size) if ln_vision == "fresh" else vit.post_layernorm
    image_embeds = ln(tokens)[:, 1:, :]
    bs, pn, hs = image_embeds.shape
    image_embeds = image_embeds.view(bs, int(pn / 4), int(hs * 4))
    img_emb = F.linear(image_embeds, proj["llama_proj.weight"], proj["llama_proj.bias"])

    embed = llm.get_input_embeddings()
    before, after = OFFICIAL_PROMPT.split("<ImageHere>")
    ids_before = tok(before, return_tensors="pt", add_special_tokens=True).input_ids
    ids_after = tok(after, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids_before[0, 0].item() == tok.bos_token_id
    assert (ids_before[0] == tok.bos_token_id).sum() == 2  # and the template's own "<s>[INST]"
    context = torch.cat([embed(ids_before), img_emb, embed(ids_after)], dim=1)

    new: list[int] = []
    for _ in range(max_new_tokens):  # greedy, the whole sequence recomputed at every step
        inputs = torch.cat([context, embed(torch.tensor([new], dtype=torch.long))], dim=1)
        new.append(int(llm(inputs_embeds=inputs).logits[0, -1].argmax()))
        if new[-1] == tok.eos_token_id or "###" in tok.decode(new):
            break
    text = tok.decode(new, skip_special_tokens=True).split("###")[0]
    return text.split("Assistant:")[-1].strip(), new


def test_terminal_chat_equals_the_official_llama2_flow_in_float32(real_layout, capsys):
    blip2, llama, pth = real_layout
    expected, new = official_answer(blip2, llama, pth, max_new_tokens=24)
    assert len(new) == 24 and len(expected.split()) >= 5  # a long answer: many chances to drift
    _, with_blip2_ln = official_answer(blip2, llama, pth, 24, ln_vision="trained")
    assert with_blip2_ln != new  # BLIP-2's trained ln_vision would give another answer
    code = cli.main(["chat", "--preset", "minigpt4-llama2", "--device", "cpu", "--image",
                     str(IMAGE), "--prompt", QUESTION, "--greedy", "--vision-qformer", str(blip2),
                     "--llm", str(llama), "--projection", str(pth), "--max-new-tokens", "24"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.split() == expected.split()  # word for word


def test_the_preset_builds_the_official_no_qformer_model(model, real_layout):
    cfg = model.cfg
    assert (cfg.use_qformer, cfg.template, cfg.ln_vision) == (False, "llama2", "fresh")
    assert preset("minigpt4-llama2").llm == "meta-llama/Llama-2-7b-chat-hf"
    assert model.qformer is None and cfg.num_visual_tokens == 4  # 16 patches / 4
    assert model.llama_proj.weight.shape == (D_LLM, 4 * WIDTH)
    # ln_vision is a fresh LayerNorm (weight 1, bias 0, torch's eps 1e-5), not BLIP-2's
    ln = model.vit.ln_vision
    assert torch.equal(ln.weight, torch.ones(WIDTH)) and torch.equal(ln.bias, torch.zeros(WIDTH))
    assert ln.eps == 1e-5 and not ln.weight.requires_grad
    # every other ViT tensor is the checkpoint's
    from transformers import Blip2ForConditionalGeneration

    hf = Blip2ForConditionalGeneration.from_pretrained(real_layout[0]).vision_model
    assert not torch.equal(hf.post_layernorm.weight, ln.weight)
    assert torch.equal(hf.encoder.layers[1].mlp.fc2.weight, model.vit.blocks[1].fc2.weight)
    assert model.param_counts()["projection_params"] == D_LLM * 4 * WIDTH + D_LLM


def test_stage2_example_masks_labels_as_the_official_llama2_code(model):
    """`[BOS] [INST] <Img> [image] </Img> instruction [/INST] ` is masked, `answer</s>` trained."""
    tok, n = model.tokenizer, model.cfg.num_visual_tokens
    instruction, answer = "Describe this image in detail.", "a red circle and a blue star"
    prompt = stage2_prompt(instruction, template="llama2")
    assert prompt == "[INST] <Img><ImageHere></Img> Describe this image in detail. [/INST] "
    assert stage_end_sym(2, "llama2") == "</s>" and stage_end_sym(1, "llama2") == "\n"
    ex = build_example(tok, prompt, answer, n_image_tokens=n, end_sym=stage_end_sym(2, "llama2"),
                       max_txt_len=MAX_TXT_LEN[2])
    # the official layout: BOS, prompt_wrap's segments, then `answer + end_sym` tokenised alone
    before, after = prompt.split("<ImageHere>")
    context = ([tok.bos_token_id] + tok(before, add_special_tokens=False).input_ids + [-1] * n
               + tok(after, add_special_tokens=False).input_ids)
    target = tok(answer + "</s>", add_special_tokens=False).input_ids[:MAX_TXT_LEN[2]]
    assert ex.ids == context + target
    assert ex.labels == [IGNORE_INDEX] * len(context) + target
    assert target[-1] == tok.eos_token_id  # "</s>" is the EOS token, and it is trained
    batch = collate([ex], tok.pad_token_id)
    assert torch.isfinite(model({"pixels": torch.zeros(1, 3, 40, 40), **batch}).loss)


def test_chat_prompt_multi_turn_and_eos_stop(model, scripted_answer):
    chat = Chat(model, dataclasses.replace(GREEDY, max_new_tokens=8))
    chat.upload(IMAGE)
    chat.ask(QUESTION)
    assert chat.conv.prompt() == SYSTEM + "<s>[INST] <Img><ImageHere></Img> " + QUESTION
    scripted_answer(model, "a red circle</s> blue star")  # EOS ends a Llama-2 answer
    assert chat.answer() == "a red circle"
    chat.ask("and the [/INST] star?")  # Llama-2's turn markers cannot come from the user
    chat.conv.append(chat.conv.roles[1], None)
    assert chat.conv.prompt() == (SYSTEM + "<s>[INST] <Img><ImageHere></Img> " + QUESTION
                                  + " [/INST] a red circle<s>[INST] and the star? [/INST] ")
    chat.conv.messages.pop()
    scripted_answer(model, "a blue star</s> more")
    assert "".join(chat.stream()) == "a blue star" == chat.conv.messages[-1][1]  # streams too


def test_a_missing_projection_names_the_official_llama2_file(real_layout, monkeypatch, tmp_path):
    blip2, llama, _ = real_layout
    monkeypatch.chdir(tmp_path)  # the preset's bare file name is looked up here: not present
    with pytest.raises(CheckpointError, match="pretrained_minigpt4_llama2_7b.pth") as e:
        load_model(preset("minigpt4-llama2", vision_qformer=str(blip2), llm=str(llama)))
    assert "drive.google.com/file/d/11nAPjEok8eAGGEG1N2vXo3kBLCg0WgUk" in str(e.value)


def test_info_counts_the_llama2_preset_exactly():
    out = subprocess.run([sys.executable, "-m", "minigpt4_lite", "info", "--preset",
                          "minigpt4-llama2", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {
        "vision_params": 985952256,  # ViT-g + ln_vision (its 2 x 1408 are frozen at 1 and 0)
        "qformer_params": 0, "query_tokens": 0,
        "llm_params": 6738415616,  # Llama-2-7B: 32,000 tokens
        "projection_params": 23072768, "trainable_params": 23072768}  # Linear(5632, 4096)


def test_training_a_llama2_model_wraps_stage2_in_inst_and_ends_with_eos(model, tmp_path):
    """The loop's batches follow the model's template: a `cc_sbu_align` folder read for a Llama-2
    model gives `[INST] ... [/INST] ` prompts, and `make_batch` ends each answer with `</s>`."""
    from PIL import Image

    from minigpt4_lite.data import CCSBUAlignDataset
    from minigpt4_lite.train import TrainConfig, make_batch

    (tmp_path / "image").mkdir()
    Image.new("RGB", (40, 40), "red").save(tmp_path / "image" / "7.jpg")
    (tmp_path / "filter_cap.json").write_text(json.dumps(
        {"annotations": [{"image_id": "7", "caption": "a red square"}]}))
    sample = CCSBUAlignDataset(tmp_path, template=model.cfg.template)[0]
    assert sample.prompt.startswith("[INST] <Img><ImageHere></Img> ")
    assert sample.prompt.endswith(" [/INST] ")
    cfg = TrainConfig(stage=2, steps=1, batch_size=1, warmup_steps=0)
    batch = make_batch(model, [sample], cfg, None, False, torch.Generator())
    trained = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    tok = model.tokenizer
    assert trained == tok("a red square</s>", add_special_tokens=False).input_ids
    assert trained[-1] == tok.eos_token_id
