"""fastjukebox: Jukebox-class music models that sample fast."""
from .bundle import Jukebox, load
from .checkpoint import load_prior, load_vqvae
from .config import PRESETS, PriorConfig, VQVAEConfig
from .labels import LabelIds, Labeller, Labels
from .prior import Prior
from .sampling import sample_levels
from .vqvae import VQVAE

__all__ = ["PRESETS", "Jukebox", "LabelIds", "Labeller", "Labels", "Prior", "PriorConfig", "VQVAE",
           "VQVAEConfig", "load", "load_prior", "load_vqvae", "sample_levels"]
__version__ = "0.1.0"
