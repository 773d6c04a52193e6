"""Factored (block / transpose / previous-block / prime / cross / dense) attention.

``reference.py`` holds the plain-PyTorch definition every faster implementation is tested against.
"""
from .reference import PATTERNS, factored_attention_reference

__all__ = ["PATTERNS", "factored_attention_reference"]
