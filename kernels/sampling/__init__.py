"""Fused categorical sampling from logits: temperature, top-k, top-p and the exponential race.

``reference.py`` is the plain-PyTorch semantics (those of ``fastjukebox.sampling``); ``ops.py``
(import ``kernels.sampling.ops``; needs Triton) launches the one-program-per-row kernel of
``kernel.py``.
"""
from .reference import (categorical_draw, exponential_noise, exponential_noise_, filter_logits, race_winner,
                        sample_logits_reference)

__all__ = ["categorical_draw", "exponential_noise", "exponential_noise_", "filter_logits", "race_winner",
           "sample_logits_reference"]
