"""Benchmarks run on one CPU thread (set before torch is imported)."""
from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
