"""What the ``fastjukebox`` command line's modules share: dtype names and how a command runs.

``cli`` (``convert``, ``info``) and ``cli_sample`` (the sampling commands) both import this
module; neither imports the other's internals.
"""
from __future__ import annotations

import argparse
import sys
import warnings

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default, ``(default: X)``,
    unless the help already says it (options without a value, and those whose default is None,
    say in words what happens when they are left out)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default in (None, argparse.SUPPRESS)
                or isinstance(action.default, bool)):
            return text
        return f"{text} (default: %(default)s)"


def run_command(fn, args, prog: str, errors=(ValueError, FileNotFoundError)) -> int:
    """Run a sub-command; bad input (``errors``) is one line on stderr and exit status 2.
    Warnings are one line each: ``PROG: warning: ...``."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return fn(args)
        except errors as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
