"""fastjukebox: Jukebox-class music models that sample fast."""
from .config import PRESETS, PriorConfig, VQVAEConfig
from .prior import Prior
from .vqvae import VQVAE

__all__ = ["PRESETS", "Prior", "PriorConfig", "VQVAE", "VQVAEConfig"]
__version__ = "0.1.0"
