"""``fastjukebox`` command line: ``convert``, ``info`` (and the sampling commands)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path

import torch

from .cli_options import DTYPES, HelpFormatter, parse_dtype, run_command


def _kind_of(path: Path, hps) -> str:
    """vqvae or prior, from the file name, our config, or the hyperparameters."""
    from .checkpoint import CONFIG_NAME
    if path.is_dir() and (path / CONFIG_NAME).exists():
        try:
            d = json.loads((path / CONFIG_NAME).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            d = None
        if isinstance(d, dict) and d.get("kind") in ("vqvae", "prior"):
            return d["kind"]
        return "prior"      # read_config names what is wrong with the file
    if isinstance(hps, str) and hps == "vqvae":
        return "vqvae"
    if path.is_file():
        # An original file says what it holds through its keys, whatever it is called.
        from .checkpoint import read_original
        sd, _ = read_original(path)
        return "vqvae" if any(k.startswith(("encoders.", "decoders.", "bottleneck.")) for k in sd) else "prior"
    return "vqvae" if path.name.startswith("vqvae") else "prior"


@contextlib.contextmanager
def _notes_printed():
    """``ConfigNote`` warnings (hyperparameters taken from elsewhere than a model's own config)
    as plain ``note:`` lines on stderr."""
    from .bundle import ConfigNote
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConfigNote)
            yield
    finally:   # after the recording: other warnings go where they would have gone
        for w in caught:
            if issubclass(w.category, ConfigNote):
                print(f"note: {w.message}", file=sys.stderr)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def cmd_convert(args) -> int:
    """SRC -> DST between the original ``.pth.tar`` layout, Hugging Face ``JukeboxModel``
    directories and our directories.

    * file -> directory: one component;  * release or Hugging Face directory -> bundle directory;
    * component directory -> ``.pth.tar``: back to the original layout;
    * any model directory with ``--to hf`` -> a directory transformers' ``JukeboxModel`` loads.
    """
    from .bundle import load
    from .checkpoint import load_component, save_component, save_original
    from .hf_checkpoint import is_hf_directory
    src, dst = Path(args.src), Path(args.dst)
    dtype = parse_dtype(args.dtype)
    if args.to == "hf":
        with _notes_printed():
            jb = load(src)
            if dtype is not None:
                jb.to(dtype)
            jb.save_hf(dst)
        print(f"wrote Hugging Face JukeboxModel directory {dst}")
        return 0
    if src.is_dir() and (is_hf_directory(src) or not (src / "config.json").exists()):
        with _notes_printed():
            jb = load(src)
        jb.save(dst, dtype)
        print(f"wrote bundle {dst}")
        return 0
    kind = _kind_of(src, args.hps)
    model = load_component(src, kind, args.hps)
    if dst.name.endswith((".pth.tar", ".pt", ".pth")):
        save_original(model, dst)
    else:
        save_component(model, dst, dtype)
    print(f"wrote {kind} {dst}")
    return 0


def _describe(model) -> list[str]:
    from .vqvae import VQVAE
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    if isinstance(model, VQVAE):
        return [f"VQ-VAE: {c.levels} levels, hop lengths {c.hop_lengths}, {c.l_bins} codes x {c.emb_width}",
                f"  parameters: {n:,}"]
    from .kv_cache import cache_bytes_per_sample
    lines = [f"prior level {c.level}: n_ctx {c.n_ctx}" + (f" (+{c.n_lyric_prefix} lyric)" if c.n_lyric_prefix else "")
             + f", width {c.width}, depth {c.depth}, heads {c.heads} (head dim {c.head_dim}), "
             f"blocks {c.blocks} (block len {c.block_len}), attn_order {c.attn_order}",
             f"  lyrics: {c.lyrics or 'none'}; labels: {'yes' if c.labels else 'no'}; parameters: {n:,}"]
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        b = cache_bytes_per_sample(c, dt)
        lines.append(f"  KV cache per sample ({name}): {b:,} bytes ({b / 2**30:.3f} GiB)")
    return lines


def cmd_info(args) -> int:
    from .bundle import load
    from .checkpoint import load_component
    from .config import PRESETS
    from .prior import Prior
    from .vqvae import VQVAE
    target = args.model
    notes = []
    if target in PRESETS:
        with torch.device("meta"):
            models = [VQVAE.from_preset(target) if target == "vqvae" else Prior.from_preset(target)]
    else:
        p = Path(target)
        from .hf_checkpoint import is_hf_directory
        if p.is_dir() and (not (p / "config.json").exists() or is_hf_directory(p)) or not p.exists():
            with _notes_printed():
                jb = load(target)
            models = [jb.vqvae] + [jb.prior(l) for l in reversed(jb.levels)]
            if jb.sampling_defaults.overrides:
                notes.append(f"recommended sampling settings (sampling.json): {json.dumps(jb.sampling_defaults.to_json())}")
        else:
            models = [load_component(p, _kind_of(p, None))]
    for m in models:
        print("\n".join(_describe(m)))
    for line in notes:
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastjukebox", description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert between original .pth.tar files, Hugging Face JukeboxModel "
                                       "directories and fastjukebox directories", formatter_class=HelpFormatter)
    c.add_argument("src", help="an original .pth.tar file, a release directory, a Hugging Face JukeboxModel "
                               "directory or one of our component directories")
    c.add_argument("dst", help="a directory, or a .pth.tar file to write the original layout")
    c.add_argument("--hps", help="preset name or hyperparameter JSON (default: the checkpoint's own, else the "
                                 "released architecture its weights match)")
    c.add_argument("--dtype", choices=sorted(DTYPES), help="store weights in this dtype (default: as stored)")
    c.add_argument("--to", choices=("fastjukebox", "hf"), default="fastjukebox",
                   help="hf: write a Hugging Face JukeboxModel directory (transformers 4.40) from a model directory")
    c.set_defaults(func=cmd_convert)
    i = sub.add_parser("info", help="architecture, parameters and KV-cache size of a model or preset",
                       formatter_class=HelpFormatter)
    i.add_argument("model", help="preset name (e.g. prior_5b), component, model directory or 'demo'")
    i.set_defaults(func=cmd_info)
    from . import cli_sample
    cli_sample.add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, f"fastjukebox {args.command}")


if __name__ == "__main__":
    sys.exit(main())
