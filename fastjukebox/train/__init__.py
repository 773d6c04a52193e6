"""Training of the VQ-VAE and the priors on your own audio (``python -m fastjukebox.train``).

* :mod:`.data`: random audio / code windows, deterministic in ``(seed, step)``;
* :mod:`.vqvae`: VQ-VAE losses, EMA codebooks, reconstruction and usage metrics;
* :mod:`.prior`: prior windows with upper-level codes and label rows;
* :mod:`.loop`: the shared accelerate loop with checkpoints and resume.
"""
from .data import AudioWindows, CodeWindows, PieceLabels, encode_pieces, load_code_piece, save_code_piece
from .loop import TrainConfig, TrainResult, read_checkpoint, train
from .prior import PriorTask, prior_code_windows, train_prior
from .vqvae import VQVAELossConfig, VQVAETask, codebook_usage, reconstruction_metrics, train_vqvae

__all__ = ["AudioWindows", "CodeWindows", "PieceLabels", "PriorTask", "TrainConfig", "TrainResult",
           "VQVAELossConfig", "VQVAETask", "codebook_usage", "encode_pieces", "load_code_piece",
           "prior_code_windows", "read_checkpoint", "reconstruction_metrics", "save_code_piece", "train",
           "train_prior", "train_vqvae"]
