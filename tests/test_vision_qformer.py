"""Our ViT and Q-Former compute exactly what transformers' BLIP-2 computes on the same weights."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt4_lite.checkpoints import load_blip2_visual, visual_configs_from_hf
from minigpt4_lite.config import MiniGPT4Config
from minigpt4_lite.errors import CheckpointError
from minigpt4_lite.model import MiniGPT4


def _ours(blip2_folder, llm_hidden=40):
    from transformers import LlamaConfig, LlamaForCausalLM

    vision, qformer = visual_configs_from_hf(str(blip2_folder))
    cfg = MiniGPT4Config(vision=vision, qformer=qformer)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=llm_hidden, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4))
    return MiniGPT4(cfg, llm)


def test_vit_and_qformer_match_transformers(blip2_dir):
    folder, hf = blip2_dir
    model = _ours(folder)
    load_blip2_visual(model, str(folder))
    pixels = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_vis = hf.vision_model(pixel_values=pixels).last_hidden_state
        hf_q = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1),
                          encoder_hidden_states=hf_vis).last_hidden_state
        our_vis = model.vit(pixels)
        our_q = model.qformer(our_vis)
        # the attention-returning (explicit softmax) path computes the same numbers
        our_q2, atts = model.qformer(model.vit(pixels, return_attentions=True)[0],
                                     return_attentions=True)
    assert our_vis.shape == (3, 10, 32) and our_q.shape == (3, 5, 24)
    assert (our_vis - hf_vis).abs().max() <= 1e-5
    assert (our_q - hf_q).abs().max() <= 1e-5
    assert (our_q2 - hf_q).abs().max() <= 1e-5
    assert len(atts["cross"]) == 2  # layers 0 and 2 of 3 cross-attend


def test_qformer_cross_attentions_match_transformers(blip2_dir):
    folder, hf = blip2_dir
    model = _ours(folder)
    load_blip2_visual(model, str(folder))
    hf.qformer.set_attn_implementation("eager")
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        vis = hf.vision_model(pixel_values=pixels).last_hidden_state
        out = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1),
                         encoder_hidden_states=vis, output_attentions=True)
        _, atts = model.qformer(model.vit(pixels), return_attentions=True)
    for ours, theirs in zip(atts["cross"], out.cross_attentions):
        assert (ours - theirs).abs().max() <= 1e-5
        assert torch.allclose(ours.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("tamper", ["drop", "reshape", "extra"])
def test_tampered_checkpoint_fails_with_named_key(blip2_dir, tmp_path, tamper):
    folder, _ = blip2_dir
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "qformer.encoder.layer.2.crossattention.attention.key.weight"
    if tamper == "drop":
        del state[key]
    elif tamper == "reshape":
        state[key] = state[key][:, :-1].contiguous()
    else:
        key = "vision_model.encoder.layers.9.mlp.fc1.weight"
        state[key] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "model.safetensors"))
    model = _ours(tmp_path)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_blip2_visual(model, str(tmp_path))


def test_truncated_safetensors_is_a_clear_error(blip2_dir, tmp_path):
    folder, _ = blip2_dir
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a complete safetensors file"):
        load_blip2_visual(_ours(tmp_path), str(tmp_path))
