"""What the ``fastjukebox`` command line's modules share: dtype names and how a command runs.

``cli`` (``convert``, ``info``) and ``cli_sample`` (the sampling commands) both import this
module; neither imports the other's internals.
"""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``--dtype`` value -> torch dtype (None stays None: keep the stored dtype)."""
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; one of {', '.join(DTYPES)}") from None


def run_command(fn, args, prog: str, errors=(ValueError, FileNotFoundError)) -> int:
    """Run a sub-command; bad input (``errors``) is one line on stderr and exit status 2."""
    try:
        return fn(args)
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
