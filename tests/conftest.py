"""Shared fixtures: tiny real models saved in HF layout by the tests themselves (no hub access)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)


def tiny_blip2(seed: int = 0, image_size: int = 30, patch: int = 10, width: int = 32,
               qhidden: int = 24, n_query: int = 5, text_hidden: int = 40):
    """A randomly initialised `Blip2ForConditionalGeneration` with a tiny LLaMA text model."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig

    torch.manual_seed(seed)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=patch,
                           initializer_range=0.02),
        qformer_config=dict(hidden_size=qhidden, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=3 * qhidden, encoder_hidden_size=width,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        text_config=LlamaConfig(vocab_size=64, hidden_size=text_hidden, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=4).to_dict(),
        num_query_tokens=n_query,
    )
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # query tokens are zero-initialised in HF: make the test meaningful
        model.query_tokens.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if "bias" in name or "position_embedding" in name or "class_embedding" in name:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def blip2_dir(tmp_path_factory):
    """An HF BLIP-2 checkpoint folder written with `save_pretrained`."""
    folder = tmp_path_factory.mktemp("blip2")
    model = tiny_blip2()
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny `LlamaForCausalLM` + a real fast tokenizer, saved in HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["a red circle and a blue star", "###Human: <Img></Img> Describe this image in "
              "detail. ###Assistant: a small green square###"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=48, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       initializer_range=0.3,
                                       bos_token_id=fast.bos_token_id,
                                       eos_token_id=fast.eos_token_id,
                                       pad_token_id=fast.pad_token_id))
    llm.save_pretrained(folder)
    return folder


@pytest.fixture()
def scripted_answer(monkeypatch):
    """`scripted_answer(model, text)`: the real model's `generate` runs, but picks `text`'s tokens.

    A logits processor leaves only the next token of `text` allowed at each step (as a teacher
    forcing a reply), so the chat's own generation, stop and decoding code runs on an answer of
    our choosing: e.g. one with newlines, which the tiny model never writes by itself.
    """
    from transformers import LogitsProcessor

    class Script(LogitsProcessor):
        def __init__(self, ids: list[int]):
            self.ids, self.start = ids, None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.start is None:
                self.start = input_ids.shape[1]
            step = min(input_ids.shape[1] - self.start, len(self.ids) - 1)
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.ids[step]] = 0.0
            return forced

    def script(model, text: str) -> None:
        ids = model.tokenizer(text, add_special_tokens=False).input_ids
        real = type(model.llm).generate.__get__(model.llm)  # the class's, even if re-scripted
        monkeypatch.setattr(model.llm, "generate", lambda *args, **kwargs: real(
            *args, logits_processor=[Script(ids)], **kwargs))

    return script
