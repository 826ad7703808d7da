"""Configuration dataclasses and the presets (`tiny`, `minigpt4-7b`, `minigpt4-13b`,
`minigpt4-llama2`).

A config is a plain dataclass: no YAML, no registry. It is saved as JSON next to the weights with a
`version` field; loading ignores unknown keys with a warning so that old folders keep loading.
The real presets store the architecture numbers of EVA-CLIP ViT-g, the BLIP-2 Q-Former, Vicuna
and Llama-2-chat (docs/official.md, "Architecture", "The Llama-2 variant"), so that `info` can
build them on the meta device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError
from .hub import OFFICIAL_LLMS, OFFICIAL_PROJECTIONS
from .prompts import TEMPLATES

log = logging.getLogger(__name__)

CONFIG_VERSION = 1
DTYPES = ("auto", "float32", "float16", "bfloat16")  # the LLM's; "auto" depends on the device
ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class VisionConfig:
    """The ViT (EVA style, as in BLIP-2's `Blip2VisionModel`) and its final `ln_vision`."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    layers: int = 39  # ViT-g has 40 blocks; BLIP-2 drops the last one
    heads: int = 16
    mlp: int = 6144
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class QFormerConfig:
    """The BLIP-2 Q-Former: BERT layers over learned queries, cross-attending to the image."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    cross_attention_every: int = 2  # cross-attention in layers 0, 2, 4, ...
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12


@dataclass
class MiniGPT4Config:
    """Everything needed to build a `MiniGPT4` model (paper Sec. 3, Fig. 1).

    `llm` names any transformers causal LM (hub id or local folder); `llm_arch` holds its
    `LlamaConfig` numbers so that the model can be built on the meta device without a download.
    `vision_qformer` names an HF BLIP-2 checkpoint (or our own folder) for the frozen visual path.
    """

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: str = ""
    llm_arch: dict = field(default_factory=dict)
    vision_qformer: str = ""
    projection_checkpoint: str = ""
    # Variants used by the paper's ablations (Table 5); plain fields, no registry.
    projection: str = "linear"  # "linear" (MiniGPT-4) or "mlp" (3 layers)
    use_qformer: bool = True  # False: project ViT tokens directly, 4 adjacent tokens concatenated
    freeze_qformer: bool = True
    # How to load the LLM: "none" (bf16/fp16/fp32 as `dtype`), "8bit" or "4bit" (bitsandbytes).
    quantization: str = "none"
    # The LLM's dtype: float32, float16, bfloat16, or "auto" (float16 on CUDA, as the official
    # code; float32 on a CPU, where float16 is slow and drifts from float32 within a few tokens).
    dtype: str = "float32"
    # The frozen ViT and Q-Former's dtype, the same choices ("auto", the real presets': float16
    # on CUDA, as the official `vit_precision: fp16`; float32 on a CPU). The tiny model keeps
    # float32 everywhere: its reference figures were measured so, and fp16 saves it nothing.
    vision_dtype: str = "float32"
    # The LLM family's prompts (`prompts.TEMPLATES`): "vicuna" (`###Human: ... ###Assistant: `) or
    # "llama2" (`[INST] ... [/INST] `), for the stage-2 template, its end symbol and the chat.
    template: str = "vicuna"
    # `ln_vision`: "blip2" (BLIP-2's trained LayerNorm) or "fresh" (weight 1, bias 0, never
    # trained: the official Llama-2 model never loads BLIP-2's; docs/official.md).
    ln_vision: str = "blip2"
    version: int = CONFIG_VERSION

    # Keys that older saved configs hold and this version reads elsewhere: `end_sym` and
    # `max_txt_len` depend on the training stage (`model.END_SYM`, `model.MAX_TXT_LEN`).
    LEGACY_KEYS = ("end_sym", "max_txt_len")

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = _from_dict(VisionConfig, self.vision)
        if isinstance(self.qformer, dict):
            self.qformer = _from_dict(QFormerConfig, self.qformer)
        for key, allowed in (("projection", ("linear", "mlp")), ("dtype", DTYPES),
                             ("quantization", ("none", "8bit", "4bit")), ("vision_dtype", DTYPES),
                             ("template", tuple(TEMPLATES)), ("ln_vision", ("blip2", "fresh"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, key)!r}.")

    @property
    def num_visual_tokens(self) -> int:
        """How many LLM input embeddings one image becomes (32 for MiniGPT-4)."""
        if self.use_qformer:
            return self.qformer.num_query_tokens
        return -(-self.vision.num_patches // 4)  # 4 adjacent patch tokens per LLM token

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON; files inside `assets/` are named relative to it, so that a
        saved config means the same in any clone (`{assets}/llm`, not this machine's path)."""
        data = self.to_dict()
        for key in PATH_FIELDS:
            if data[key].startswith(str(ASSETS)):
                data[key] = ASSETS_MARK + data[key][len(str(ASSETS)):]
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MiniGPT4Config":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"Cannot read the config {path}: {e}.") from e
        for key in PATH_FIELDS:
            if isinstance(data.get(key), str) and data[key].startswith(ASSETS_MARK):
                data[key] = str(ASSETS) + data[key][len(ASSETS_MARK):]
        return _from_dict(cls, data)


PATH_FIELDS = ("llm", "vision_qformer", "projection_checkpoint")
ASSETS_MARK = "{assets}"  # stands for this package's assets/ folder in saved configs


def _from_dict(cls, data: dict):
    """Build a dataclass from a dict, ignoring (with a warning) keys this version does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - set(getattr(cls, "LEGACY_KEYS", ())))
    if unknown:
        log.warning("Ignoring unknown %s keys: %s", cls.__name__, ", ".join(unknown))
    return cls(**{k: v for k, v in data.items() if k in known})


# --- The LLaMA architectures of Vicuna v0 -------------------------------------------------------
# Vicuna v0 (the LLM of the first MiniGPT-4 release) has 32,001 embedding rows: FastChat added one
# pad token to LLaMA's 32,000. So the 7B LLM has 6,738,415,616 + 2 x 4096 = 6,738,423,808
# parameters (embedding and output rows); LLaMA-7B at 32,000 tokens has 6,738,415,616.
VICUNA_7B = dict(
    vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
VICUNA_13B = dict(VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40)
# Llama-2-7B-chat: LLaMA-7B's shapes with LLaMA's 32,000 tokens (no pad token: 6,738,415,616
# parameters), a 4,096-token context and RMSNorm eps 1e-5 (Llama 2's reference code).
LLAMA2_7B = dict(VICUNA_7B, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 pad_token_id=None)
LLM_ARCHS = {"minigpt4-7b": VICUNA_7B, "minigpt4-13b": VICUNA_13B, "minigpt4-llama2": LLAMA2_7B}

# The tiny "ToyWorld" backbones shipped in assets/ (built by `toyworld/build.py`).
TINY_VISION = VisionConfig(image_size=60, patch_size=10, width=128, layers=4, heads=4, mlp=512)
TINY_QFORMER = QFormerConfig(hidden=128, layers=4, heads=4, mlp=512, num_query_tokens=10,
                             layer_norm_eps=1e-12)


def preset(name: str, **overrides) -> MiniGPT4Config:
    """The named configuration, with any field overridden by keyword.

    - `tiny`: the embedded ToyWorld default in `assets/` (works offline on a CPU).
    - `minigpt4-7b` / `minigpt4-13b`: BLIP-2 (FlanT5-XXL) ViT-g + Q-Former, merged Vicuna v0
      7B/13B (`hub.OFFICIAL_LLMS`) in `dtype="auto"`, and the official projection checkpoint
      (`hub.OFFICIAL_PROJECTIONS`, looked up in the working directory unless given); any hub id
      can be replaced by a local path.
    - `minigpt4-llama2`: the same ViT-g without Q-Former (4 patch tokens per LLM token, a fresh
      `ln_vision`), Llama-2-7B-chat and its `[INST]` template.
    """
    if name == "tiny":
        cfg = MiniGPT4Config(
            name="tiny", vision=dataclasses.replace(TINY_VISION),
            qformer=dataclasses.replace(TINY_QFORMER),
            llm=str(ASSETS / "llm"), vision_qformer=str(ASSETS / "vision_qformer"),
            projection_checkpoint=str(ASSETS / "projections" / "stage2"),
        )
    elif name in LLM_ARCHS:
        cfg = MiniGPT4Config(
            name=name,
            llm=OFFICIAL_LLMS[name],
            llm_arch=dict(LLM_ARCHS[name]),
            vision_qformer="Salesforce/blip2-flan-t5-xxl",  # only its ViT for minigpt4-llama2
            projection_checkpoint=OFFICIAL_PROJECTIONS[name][0],
            dtype="auto", vision_dtype="auto",
        )
        if name == "minigpt4-llama2":  # the official `has_qformer: False` model
            cfg.use_qformer, cfg.template, cfg.ln_vision = False, "llama2", "fresh"
    else:
        raise ConfigError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ConfigError(f"MiniGPT4Config has no field {key!r}.")
        setattr(cfg, key, value)
    cfg.__post_init__()
    return cfg


PRESETS = ("tiny", "minigpt4-7b", "minigpt4-13b", "minigpt4-llama2")
