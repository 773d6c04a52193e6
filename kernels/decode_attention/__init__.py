"""Attention of a few new queries against a prior's static key/value cache.

``reference.py`` defines the cache layouts and the plain-PyTorch computation.
"""
from .reference import decode_attention_reference

__all__ = ["decode_attention_reference"]
