"""The MaMMUT vision-language model: config, image encoder, text decoder, SAO, losses, tokenizer, checkpoints."""
from .config import PRESETS, ConfigError, MaMMUTConfig, get_preset
from .loss import MaMMUTLoss, caption_loss, contrastive_loss
from .mammut import MaMMUT

__all__ = ["PRESETS", "ConfigError", "MaMMUTConfig", "get_preset", "MaMMUT", "MaMMUTLoss",
           "caption_loss", "contrastive_loss"]
