"""The real presets, end to end, on tiny random checkpoints in the real file layouts.

The files are laid out as a user downloads them for `minigpt4-7b`: an HF BLIP-2 folder (sharded,
with its index, like `Salesforce/blip2-flan-t5-xxl`), an HF LLaMA folder with a LLaMA tokenizer
(BOS added by the tokenizer, like the merged Vicuna v0 folders), and an official-format projection
`.pth`. The terminal chat (`python -m minigpt4_lite chat`, run in-process) must give the same
greedy answer as the official MiniGPT-4 flow written out below with transformers' own BLIP-2 and
LLaMA modules: float32 on a CPU leaves no room for rounding differences.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minigpt4_lite import cli
from minigpt4_lite.checkpoints import load_model, resolve_dtype
from minigpt4_lite.config import ASSETS, OFFICIAL_PROJECTIONS, preset
from minigpt4_lite.errors import CheckpointError, ConfigError

IMAGE = sorted((ASSETS / "samples").glob("*.png"))[0]
QUESTION = "What is in this picture?"
# The official demo's conversation (system prompt, `###` separator), written out literally.
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
          "once I provide it to you. Please answer my questions.")
OFFICIAL_PROMPT = SYSTEM + "###Human: <Img><ImageHere></Img> " + QUESTION + "###Assistant:"
WORDS = ("a red circle and a blue star on a green square near the big yellow triangle left of "
         "two small purple shapes").split()
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _llama_folder(folder, seed: int = 0, prompt: str = OFFICIAL_PROMPT):
    """A tiny `LlamaForCausalLM` and a `LlamaTokenizer` (SentencePiece-style BPE, BOS added),
    its vocabulary learnt from `prompt` and a few words.

    The LM head cannot write `#`, `<`, `>`, `:` or special tokens (their rows are zero, the others
    positive-biased): the CLI prints the answer after `chat.sanitize`, which would rewrite those,
    and this test is about the numbers, not about sanitising.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    corpus = [prompt + " " + " ".join(WORDS)] * 4
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(bpe.to_str())["model"]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                         add_bos_token=True)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False))
    with torch.no_grad():
        for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
            if i < 3 or any(c in piece for c in "#<>:"):
                llm.lm_head.weight[i] = 0
    llm.save_pretrained(folder)
    return tok


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory, blip2_dir):
    """(BLIP-2 folder, LLaMA folder, official projection .pth), as a user downloads them."""
    root = tmp_path_factory.mktemp("real")
    _, blip2 = blip2_dir
    blip2.save_pretrained(root / "blip2", max_shard_size="200KB")  # sharded, with the index
    assert (root / "blip2" / "model.safetensors.index.json").exists()
    _llama_folder(root / "vicuna")
    g = torch.Generator().manual_seed(1)
    d_llm, width = 48, blip2.config.qformer_config.hidden_size
    torch.save({"model": {"llama_proj.weight": torch.randn(d_llm, width, generator=g) * 0.5,
                          "llama_proj.bias": torch.randn(d_llm, generator=g) * 0.1},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 4},
               root / "prerained_minigpt4_7b.pth")
    return root / "blip2", root / "vicuna", root / "prerained_minigpt4_7b.pth"


@torch.no_grad()
def official_answer(blip2_folder, llama_folder, pth, image_path, max_new_tokens: int):
    """The official MiniGPT-4 chat, step by step, with transformers' BLIP-2 and LLaMA modules.

    Eval image processing (bicubic resize, CLIP normalisation); ViT with `ln_vision` (HF:
    `post_layernorm`); Q-Former over the learned query tokens; `llama_proj`; the prompt split at
    `<ImageHere>`, BOS on the first segment only (the tokenizer adds it); greedy decoding until the
    text holds `###`; the answer cut at `###` and after `Assistant:`, stripped.
    Returns (answer, generated token ids).
    """
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, LlamaForCausalLM

    blip2 = Blip2ForConditionalGeneration.from_pretrained(blip2_folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(llama_folder)
    llm = LlamaForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()
    proj = torch.load(pth, map_location="cpu", weights_only=True)["model"]

    size = blip2.config.vision_config.image_size
    img = Image.open(image_path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
    pixels = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
    image_embeds = blip2.vision_model(pixel_values=pixels).last_hidden_state
    queries = blip2.query_tokens.expand(1, -1, -1)
    q_out = blip2.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                          encoder_attention_mask=torch.ones(image_embeds.shape[:2],
                                                            dtype=torch.long)).last_hidden_state
    img_emb = F.linear(q_out, proj["llama_proj.weight"], proj["llama_proj.bias"])

    embed = llm.get_input_embeddings()
    before, after = OFFICIAL_PROMPT.split("<ImageHere>")
    ids_before = tok(before, return_tensors="pt", add_special_tokens=True).input_ids
    ids_after = tok(after, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids_before[0, 0].item() == tok.bos_token_id  # the LLaMA tokenizer adds BOS itself
    context = torch.cat([embed(ids_before), img_emb, embed(ids_after)], dim=1)

    new: list[int] = []
    for _ in range(max_new_tokens):  # greedy, the whole sequence recomputed at every step
        inputs = torch.cat([context, embed(torch.tensor([new], dtype=torch.long))], dim=1)
        new.append(int(llm(inputs_embeds=inputs).logits[0, -1].argmax()))
        if new[-1] == tok.eos_token_id or "###" in tok.decode(new):
            break
    out = new[1:] if new and new[0] in (0, 1) else new  # as official: drop a leading <unk>/<s>
    text = tok.decode(out).split("###")[0].split("Assistant:")[-1].strip()
    return text, new


def _chat_cli(capsys, *args):
    code = cli.main(["chat", "--preset", "minigpt4-7b", "--device", "cpu", "--image", str(IMAGE),
                     "--prompt", QUESTION, "--greedy", *args])
    out = capsys.readouterr()
    return code, out.out.strip(), out.err.strip()


def test_terminal_chat_equals_the_official_flow_in_float32(real_layout, capsys):
    blip2, vicuna, pth = real_layout
    expected, new = official_answer(blip2, vicuna, pth, IMAGE, max_new_tokens=24)
    assert len(new) == 24 and len(expected.split()) >= 5  # a long answer: many chances to drift
    code, got, err = _chat_cli(capsys, "--vision-qformer", str(blip2), "--llm", str(vicuna),
                               "--projection", str(pth), "--max-new-tokens", "24")
    assert code == 0, err
    assert got.split() == expected.split()  # word for word (how spaces are shown is chat's)


def test_dtype_follows_the_device_unless_given(real_layout):
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == "float16"  # as the official code on a GPU
    assert resolve_dtype("auto", "cuda:1") == "float16"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ConfigError, match="dtype must be"):
        preset("minigpt4-7b", dtype="half")
    blip2, vicuna, pth = real_layout
    cfg = preset("minigpt4-7b", vision_qformer=str(blip2), llm=str(vicuna))
    assert cfg.dtype == "auto"
    assert load_model(cfg, projection=str(pth)).llm.dtype == torch.float32
    cfg16 = preset("minigpt4-7b", vision_qformer=str(blip2), llm=str(vicuna), dtype="bfloat16")
    assert load_model(cfg16, projection=str(pth)).llm.dtype == torch.bfloat16


def test_every_command_that_loads_a_model_takes_dtype(real_layout, capsys, caplog):
    parser = cli.build_parser()
    for command in ("train --stage 1 --out x", "eval", "chat --image x", "curate --out x"):
        args = parser.parse_args([*command.split(), "--dtype", "bfloat16"])
        assert args.dtype == "bfloat16"
    blip2, vicuna, pth = real_layout
    with caplog.at_level("INFO", logger="minigpt4_lite"):
        code, out, _ = _chat_cli(capsys, "--vision-qformer", str(blip2), "--llm", str(vicuna),
                                 "--projection", str(pth), "--max-new-tokens", "4",
                                 "--dtype", "float16")
    assert code == 0 and out
    assert f"Loading the LLM {vicuna} in float16 on cpu" in caplog.text
    assert "float16 on cpu is slow and its answers drift" in caplog.text  # what the presets did


def test_real_preset_without_projection_is_an_error_that_says_where_to_get_it(real_layout,
                                                                                monkeypatch,
                                                                                tmp_path, capsys):
    blip2, vicuna, _ = real_layout
    monkeypatch.chdir(tmp_path)  # the preset's bare file name is looked up here: not present
    cfg = preset("minigpt4-7b", vision_qformer=str(blip2), llm=str(vicuna))
    name, url = OFFICIAL_PROJECTIONS["minigpt4-7b"]
    with pytest.raises(CheckpointError) as e:
        load_model(cfg)
    assert name in str(e.value) and url in str(e.value) and "--projection" in str(e.value)
    code, out, err = _chat_cli(capsys, "--vision-qformer", str(blip2), "--llm", str(vicuna))
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("error:") and name in err and "--projection none" in err


def test_an_untrained_projection_is_opt_in(real_layout, monkeypatch, tmp_path, capsys):
    blip2, vicuna, _ = real_layout
    monkeypatch.chdir(tmp_path)
    cfg = preset("minigpt4-7b", vision_qformer=str(blip2), llm=str(vicuna))
    torch.manual_seed(0)
    model = load_model(cfg, projection="")  # the library's way to ask for it
    assert model.llama_proj.weight.shape == (48, 24)
    code, out, err = _chat_cli(capsys, "--vision-qformer", str(blip2), "--llm", str(vicuna),
                               "--projection", "none", "--max-new-tokens", "4")
    assert code == 0, err
