"""Model configuration: one dataclass and named presets.

A checkpoint's config.json is `MaMMUTConfig.to_dict()`; loading goes through `MaMMUTConfig.from_dict`,
which rejects unknown keys and unknown presets with a message that says what to do.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


class ConfigError(ValueError):
    """A model configuration that cannot be built."""


@dataclass(frozen=True)
class MaMMUTConfig:
    preset: str = "custom"
    # image tower (ViT)
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 384
    vision_layers: int = 6
    vision_heads: int = 6
    patch_stem: str = "linear"       # "linear": one patch conv; "conv": stack of 3x3 stride-2 convs
    # text decoder (one decoder, two passes)
    vocab_size: int = 8192
    context_length: int = 64
    text_width: int = 384
    text_layers: int = 6
    text_heads: int = 6
    cross_attn_every: int = 2        # generative pass: cross-attention in every k-th decoder layer
    # joint space
    embed_dim: int = 256
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    init_logit_scale: float = 2.6592  # log(1 / 0.07), as in CLIP
    max_logit_scale: float = 4.6052   # log(100): the temperature is clamped to this
    # loss weights
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    # image normalisation the model was trained with (per RGB channel, on 0..1 input)
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # special token ids (set from the tokenizer when a model is built for one)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        # types first: the arithmetic below needs whole numbers, and heads of 0 would divide by zero
        problems = [f"{f.name} must be a whole number, got {getattr(self, f.name)!r}" for f in fields(self)
                    if f.type == "int" and (isinstance(getattr(self, f.name), bool)
                                            or not isinstance(getattr(self, f.name), int))]
        problems += [f"{name} must be 3 numbers (one per RGB channel), got {getattr(self, name)!r}"
                     for name in ("image_mean", "image_std") if len(getattr(self, name)) != 3]
        if not problems and min(self.vision_heads, self.text_heads, self.patch_size) < 1:
            problems.append("vision_heads, text_heads and patch_size must be >= 1")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        if self.image_size < self.patch_size or self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a positive multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_heads:
            problems.append(f"vision_width {self.vision_width} is not divisible by vision_heads {self.vision_heads}")
        if self.text_width % self.text_heads:
            problems.append(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")
        if self.patch_stem not in ("linear", "conv"):
            problems.append(f"patch_stem must be 'linear' or 'conv', got {self.patch_stem!r}")
        elif self.patch_stem == "conv" and self.patch_size & (self.patch_size - 1):
            problems.append(f"a conv stem needs a power-of-two patch_size, got {self.patch_size}")
        if self.cross_attn_every < 1:
            problems.append("cross_attn_every must be >= 1")
        if min(self.vocab_size, self.context_length, self.embed_dim, self.vision_layers, self.text_layers) < 1:
            problems.append("sizes must be positive")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MaMMUTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config has unknown keys {unknown}; was it written by a newer SkyPrompt?")
        d = dict(d)
        for key in ("image_mean", "image_std"):
            if key in d:
                d[key] = tuple(float(x) for x in d[key])
        return cls(**d)

    def with_overrides(self, **kw) -> "MaMMUTConfig":
        return replace(self, **kw)


PRESETS: dict[str, MaMMUTConfig] = {
    # unit tests: well under 3M parameters, 64 px
    "tiny": MaMMUTConfig(
        preset="tiny", image_size=64, patch_size=8, vision_width=128, vision_layers=2, vision_heads=4,
        vocab_size=1024, context_length=32, text_width=128, text_layers=2, text_heads=4,
        cross_attn_every=1, embed_dim=64,
    ),
    # the CPU default: 224 px, ~30M parameters
    "small": MaMMUTConfig(
        preset="small", image_size=224, patch_size=16, vision_width=384, vision_layers=8, vision_heads=6,
        vocab_size=8192, context_length=64, text_width=384, text_layers=6, text_heads=6,
        cross_attn_every=2, embed_dim=256,
    ),
    # ViT-B/16 image tower, 12-layer decoder
    "base": MaMMUTConfig(
        preset="base", image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
        vocab_size=16384, context_length=77, text_width=768, text_layers=12, text_heads=12,
        cross_attn_every=2, embed_dim=512,
    ),
    # ViT-L/14 image tower, for GPU users
    "large": MaMMUTConfig(
        preset="large", image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
        vocab_size=32768, context_length=77, text_width=1024, text_layers=24, text_heads=16,
        cross_attn_every=2, embed_dim=768,
    ),
}


def get_preset(name: str, **overrides) -> MaMMUTConfig:
    """The named preset, optionally with fields overridden (e.g. vocab_size from a tokenizer)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].with_overrides(**overrides) if overrides else PRESETS[name]
