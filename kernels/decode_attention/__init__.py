"""Attention of a few new queries against a prior's static key/value cache.

``reference.py`` defines the cache layouts and the plain-PyTorch computation; ``kernel.py`` and
``ops.py`` (import ``kernels.decode_attention.ops``; needs Triton) the split-K Triton version.
"""
from .reference import decode_attention_reference

__all__ = ["decode_attention_reference"]
