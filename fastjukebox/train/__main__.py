"""``python -m fastjukebox.train vqvae|prior|encode ...``: train on a directory of audio or codes.

Data directories hold audio files (any format ``fastjukebox.audio.load_audio`` reads; resampled
to the model's rate and down-mixed) or ``.npz`` code files (``encode`` writes them), and an
optional ``labels.json``: ``{"song.wav": {"artist": 3, "genre": [1, 4], "lyrics": "..."}}``.

Examples::

    python -m fastjukebox.train vqvae --config vq.json --data songs/ --steps 2000 --out run/
    python -m fastjukebox.train encode --vqvae run/vqvae --data songs/ --out codes/
    python -m fastjukebox.train prior --config top.json --data codes/ --steps 3000 --out run/
    python -m fastjukebox.train prior --config top.json --data codes/ --steps 3000 --out run/ --resume

The trained components land in ``<out>/vqvae`` and ``<out>/prior_level_<L>``, so a run directory
with all of them loads with ``fastjukebox.load(<out>)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data import AUDIO_EXTENSIONS, PieceLabels, load_code_piece, read_piece_labels, save_code_piece
from .loop import TrainConfig


def _files(data: str, suffixes) -> list[Path]:
    d = Path(data)
    if not d.is_dir():
        raise SystemExit(f"error: --data {data!r} is not a directory")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    return files


def _audio_pieces(data: str, sr: int) -> tuple[list, list[PieceLabels], list[str]]:
    from ..audio import load_audio
    files = _files(data, AUDIO_EXTENSIONS)
    if not files:
        raise SystemExit(f"error: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {data}")
    labels = read_piece_labels(data)
    return ([load_audio(f, sr=sr).numpy() for f in files],
            [labels.get(f.name, PieceLabels()) for f in files], [f.name for f in files])


def _code_pieces(data: str):
    files = _files(data, (".npz",))
    labels = read_piece_labels(data)
    pieces, lengths, labs = [], [], []
    for f in files:
        codes, length, stored = load_code_piece(f)
        pieces.append(codes)
        lengths.append(length)
        labs.append(labels.get(f.name, labels.get(f.stem, stored)))
    return pieces, lengths, labs


def _config(a, kind: str):
    from ..checkpoint import load_component
    from ..config import resolve_config
    if a.init:
        a.init = load_component(a.init, kind)
        return a.init.config
    if not a.config:
        raise SystemExit("error: pass --config (a preset name or a JSON file) or --init")
    return resolve_config(a.config, kind)


def _train_cfg(a) -> TrainConfig:
    return TrainConfig(steps=a.steps, batch_size=a.batch_size, out_dir=a.out, lr=a.lr, warmup_steps=a.warmup,
                       weight_decay=a.weight_decay, clip=a.clip, mixed_precision=a.mixed_precision,
                       device=a.device, seed=a.seed, checkpoint_every=a.checkpoint_every, log_every=a.log_every,
                       resume=a.resume, stop_at=a.stop_at, progress=not a.no_progress)


def cmd_vqvae(a) -> int:
    from .vqvae import VQVAELossConfig, train_vqvae
    cfg = _config(a, "vqvae")
    pieces, _, _ = _audio_pieces(a.data, cfg.sr)
    hop = cfg.hop_lengths[-1]
    window = int(a.window_seconds * cfg.sr) // hop * hop
    if window <= 0:
        raise SystemExit(f"error: --window-seconds {a.window_seconds} is shorter than one top-level code")
    loss = VQVAELossConfig(l2=a.l2, l1=a.l1, spectral=a.spectral, multispectral=a.multispectral,
                           commit=a.commit, mu=a.mu, revival_threshold=a.revival_threshold)
    _, res = train_vqvae(cfg, pieces, _train_cfg(a), window=window, loss=loss, init=a.init)
    print(f"{res.component_dir}: step {res.step}, loss {res.loss:.4f}, {res.steps_per_second:.2f} steps/s")
    return 0


def cmd_prior(a) -> int:
    from .prior import train_prior
    cfg = _config(a, "prior")
    if _files(a.data, (".npz",)):
        pieces, lengths, labels = _code_pieces(a.data)
    else:
        if not a.vqvae:
            raise SystemExit(f"error: {a.data} holds no .npz codes; pass --vqvae to encode its audio")
        pieces, lengths, labels = _encode_dir(a.vqvae, a.data, None)
    _, res = train_prior(cfg, pieces, _train_cfg(a), labels=labels, lengths=lengths, init=a.init,
                         upper_noise=a.upper_noise)
    print(f"{res.component_dir}: step {res.step}, loss {res.loss:.4f} bits/token, "
          f"{res.steps_per_second:.2f} steps/s")
    return 0


def _encode_dir(vqvae_path: str, data: str, out: str | None):
    from ..checkpoint import load_vqvae
    from .data import encode_pieces
    vq = load_vqvae(vqvae_path)
    audio, labels, names = _audio_pieces(data, vq.config.sr)
    codes = encode_pieces(vq, audio, progress=True)
    lengths = [len(a) for a in audio]
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        for name, z, n, lab in zip(names, codes, lengths, labels):
            save_code_piece(Path(out) / f"{Path(name).stem}.npz", z, n, lab)
    return codes, lengths, labels


def cmd_encode(a) -> int:
    codes, _, _ = _encode_dir(a.vqvae, a.data, a.out)
    print(f"{a.out}: {len(codes)} pieces encoded")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="preset name or JSON config file (or give --init)")
    p.add_argument("--data", required=True, help="directory of audio files (or .npz codes for priors)")
    p.add_argument("--out", required=True, help="run directory (components + train_<name>/ checkpoints)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--device", choices=("cpu",), default=None, help="force the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--stop-at", type=int, default=None, help="stop at this step (resume later)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_<name>/checkpoint.pt")
    p.add_argument("--init", default=None, help="start from these weights (a component dir or .pth.tar)")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastjukebox.train", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vqvae", help="train a VQ-VAE on audio")
    _common(v)
    v.add_argument("--window-seconds", type=float, default=1.0)
    v.add_argument("--l2", type=float, default=1.0)
    v.add_argument("--l1", type=float, default=0.0)
    v.add_argument("--spectral", type=float, default=0.0)
    v.add_argument("--multispectral", type=float, default=1.0)
    v.add_argument("--commit", type=float, default=0.02)
    v.add_argument("--mu", type=float, default=0.99, help="codebook EMA decay")
    v.add_argument("--revival-threshold", type=float, default=1.0)
    v.set_defaults(fn=cmd_vqvae)
    p = sub.add_parser("prior", help="train a prior on codes")
    _common(p)
    p.add_argument("--vqvae", default=None, help="VQ-VAE to encode audio data with")
    p.add_argument("--upper-noise", type=float, default=0.0,
                   help="upsamplers: share of upper-level codes randomised per window (conditioning "
                        "augmentation; default 0)")
    p.set_defaults(fn=cmd_prior)
    e = sub.add_parser("encode", help="encode a directory of audio to .npz codes")
    e.add_argument("--vqvae", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True)
    e.set_defaults(fn=cmd_encode)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastjukebox.cli_options import run_command
    return run_command(args.fn, args, "python -m fastjukebox.train", errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
