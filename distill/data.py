"""Distillation data: teacher samples of upsampler windows, written to disk in checksummed shards.

A window of the distilled level ``L`` (``n_ctx`` codes) is cut from real audio; the VQ-VAE encodes
it at levels ``L`` (the real codes) and ``L + 1`` (the upper codes the upsampler is conditioned
on; with ``GenerationConfig.upper == "sampled"`` the upper codes are instead sampled by the
level-``L + 1`` teacher from the real codes two levels up, the conditioning users' level-``L``
windows get). The teacher (the level-``L`` prior) samples the whole window autoregressively with the fast
sampler (``fastjukebox.sampling.ARWindowSampler``), and one teacher-forced pass over its own sample
gives, per position, the probability of the sampled token and the top-k of its predictive
distribution (temperature 1, i.e. the model's distribution; the sampling temperature is recorded
in the metadata).

Shard ``i`` (``shard-{i:05d}.safetensors``) holds, for ``S`` windows:

=============  ====================  ===============================================
``codes``      (S, n_ctx) int64      teacher sample
``real``       (S, n_ctx) int64      real codes of the same window
``upper``      (S, n_ctx // cd) int64 level-(L+1) codes of the window (real or sampled)
``labels``     (S, label_len) int64  window label rows (only for priors with labels)
``token_prob`` (S, n_ctx) float32    teacher probability of each sampled token
``topk_ids``   (S, n_ctx, k) int64   teacher top-k ids per position
``topk_probs`` (S, n_ctx, k) float32 their probabilities (not renormalised)
=============  ====================  ===============================================

Its safetensors metadata carries a SHA-256 over every tensor (name, dtype, shape, bytes). Shards
are written atomically, so a shard that exists was written whole; one whose checksum does not
match (or that cannot be parsed) raises ``CorruptShardError`` naming the file. Shard ``i``'s
content depends only on ``(seed, i)`` (and the settings in ``meta.json``), so generation can be spread over processes (shard ``i``
belongs to rank ``i % world_size``) and resumed (complete shards are skipped).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fastjukebox.atomic import atomic_path
from fastjukebox.labels import Labeller
from fastjukebox.prior import Prior
from fastjukebox.sampling import ARWindowSampler
from fastjukebox.vqvae import VQVAE

SHARD_FORMAT = "fastjukebox-distill-shard/1"
META_NAME = "meta.json"
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")
HELDOUT_FRACTION = 0.2   # of each file's duration, for --data DIR sources
UPPER_SOURCES = ("real", "sampled")   # where a window's upper codes come from (GenerationConfig.upper)


class CorruptShardError(ValueError):
    """A shard that is truncated, unparsable or fails its checksum."""


# --------------------------------------------------------------------------------------------
# sources: pieces of real audio
# --------------------------------------------------------------------------------------------

@dataclass
class SourcePiece:
    """Mono audio (T,) at the model's rate, float32 in [-1, 1] or int16 (kept as int16 so that a
    large corpus stays small in memory; converted per window), with label ids."""

    name: str
    audio: np.ndarray
    artist: int = 0
    genre: int = 0


def _audio_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise ValueError(f"--data {directory}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")
    return files


def load_pieces(data: str | os.PathLike | None, split: str, sr: int, limit: int | None = None) -> list[SourcePiece]:
    """Pieces for ``split`` ("train" or "heldout").

    data None: the demo corpus (``fastjukebox.demo.corpus.build_corpus(split=...)``).
    data DIR: every audio file under DIR (artist 0, genre 0); "train" is the first
    ``1 - HELDOUT_FRACTION`` of each file and "heldout" the rest, so both splits exist for any
    number of files and never overlap.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if data is None:
        from fastjukebox.demo.corpus import SR, build_corpus
        if SR != sr:
            raise ValueError(f"the demo corpus is at {SR} Hz but the model at {sr} Hz")
        out = [SourcePiece(p.name, np.asarray(p.audio), int(p.artist), int(p.genre))
               for p in build_corpus(split=split, limit=limit)]
        if not out:
            raise ValueError(f"the demo corpus has no {split} pieces")
        return out
    from fastjukebox.audio import load_audio
    directory = Path(data)
    if not directory.is_dir():
        raise ValueError(f"--data {directory}: not a directory")
    out = []
    for path in _audio_files(directory)[:limit]:
        audio = load_audio(path, sr=sr).numpy()
        cut = int(len(audio) * (1.0 - HELDOUT_FRACTION))
        part = audio[:cut] if split == "train" else audio[cut:]
        out.append(SourcePiece(f"{path.relative_to(directory)}[{split}]", np.ascontiguousarray(part)))
    return out


# --------------------------------------------------------------------------------------------
# real windows
# --------------------------------------------------------------------------------------------

@dataclass
class Windows:
    """Real windows of one level: ``real`` (S, n_ctx), ``upper`` (S, n_ctx // cd), ``labels``
    (S, label_len) or None."""

    real: torch.Tensor
    upper: torch.Tensor
    labels: torch.Tensor | None


def _check_upsampler(prior: Prior) -> None:
    if prior.config.is_top:
        raise ValueError("distillation targets an upsampler; the top-level prior has no upper codes")


def _draw_segments(prior: Prior, pieces: Sequence[SourcePiece], n: int, hop: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, list[tuple[SourcePiece, int]]]:
    """``n`` random audio segments of one ``prior`` window (``sample_length`` samples), float32
    (n, sample_length), and the (piece, start) of each. Pieces are drawn in proportion to their
    usable length; starts are multiples of ``hop``."""
    c = prior.config
    span = c.sample_length
    usable = [p for p in pieces if len(p.audio) >= span]
    if not usable:
        longest = max((len(p.audio) for p in pieces), default=0)
        raise ValueError(f"no piece is long enough for one level-{c.level} window ({span} samples, "
                         f"{span / c.sr:.3f} s); the longest has {longest} samples")
    weights = torch.tensor([len(p.audio) - span + 1 for p in usable], dtype=torch.float64)
    picks = torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
    segments, where = [], []
    for i in picks:
        p = usable[i]
        slots = (len(p.audio) - span) // hop + 1
        a = int(torch.randint(slots, (1,), generator=generator)) * hop
        seg = p.audio[a:a + span]
        seg = seg.astype(np.float32) / 32768.0 if seg.dtype == np.int16 else seg.astype(np.float32)
        segments.append(torch.from_numpy(seg))
        where.append((p, a))
    return torch.stack(segments), where


def _window_labels(prior: Prior, where: Sequence[tuple[SourcePiece, int]]) -> torch.Tensor | None:
    """The label rows (n, label_len) of ``prior``'s windows starting at each (piece, start); None
    for a prior without labels."""
    c = prior.config
    if not c.labels:
        return None
    labeller = Labeller(c.max_bow_genre_size, c.n_tokens, c.sample_length)
    return torch.cat([labeller.label(p.artist, p.genre, None, total_length=len(p.audio), offset=a).y
                      for p, a in where]).long()


def real_windows(vqvae: VQVAE, prior: Prior, pieces: Sequence[SourcePiece], n: int,
                 generator: torch.Generator) -> Windows:
    """``n`` random windows of the prior's level, encoded by ``vqvae`` at the level and the one
    above (the real upper codes).

    Pieces are drawn in proportion to their usable length, and window starts are aligned to the
    upper level's hop so that the upper codes of the segment line up with the window."""
    _check_upsampler(prior)
    L = prior.config.level
    segments, where = _draw_segments(prior, pieces, n, vqvae.hop_lengths[L + 1], generator)
    codes = vqvae.encode(segments, levels=(L, L + 1))
    return Windows(codes[L].long().cpu(), codes[L + 1].long().cpu(), _window_labels(prior, where))


def windows_per_upper(prior: Prior, upper_prior: Prior) -> int:
    """Level-``L`` windows of ``prior`` in one window of the level-``L + 1`` ``upper_prior``."""
    return upper_prior.config.sample_length // prior.config.sample_length


def sampled_upper_windows(vqvae: VQVAE, prior: Prior, upper_prior: Prior, pieces: Sequence[SourcePiece], n: int,
                          generator: torch.Generator, *, temperature: float = 1.0, batch_size: int = 16,
                          sample_generator: torch.Generator | None = None, decoders: dict | None = None,
                          on_window: Callable[[int], None] | None = None) -> Windows:
    """``n`` random windows of the prior's level whose upper codes are *sampled*, as a user's are:
    segments of one ``upper_prior`` window are encoded at the levels ``L``, ``L + 1`` and
    ``L + 2``; the level-``L + 1`` teacher (``upper_prior``, an upsampler) samples its window from
    the real level-``L + 2`` codes, and the segment is cut into the level-``L`` windows it holds
    (``real``: the real level-``L`` codes of each; ``upper``: the sampled codes above it).
    ``on_window(m)`` is told about every ``m`` upper windows sampled."""
    _check_upsampler(prior)
    c, cu = prior.config, upper_prior.config
    L = c.level
    if cu.level != L + 1 or cu.is_top:
        raise ValueError(f"sampled upper codes for level {L} need the level-{L + 1} upsampler, got the "
                         f"level-{cu.level} {'top prior' if cu.is_top else 'upsampler'}")
    per = windows_per_upper(prior, upper_prior)
    n_up = c.n_ctx // c.cond_downsample                       # upper codes under one level-L window
    if per * c.sample_length != cu.sample_length or per * n_up != cu.n_ctx:
        raise ValueError(f"a level-{L + 1} window ({cu.sample_length} samples, {cu.n_ctx} codes) is not a whole "
                         f"number of level-{L} windows ({c.sample_length} samples, {n_up} upper codes each)")
    m = -(-n // per)
    segments, where = _draw_segments(upper_prior, pieces, m, vqvae.hop_lengths[L + 2], generator)
    codes = vqvae.encode(segments, levels=(L, L + 1, L + 2))
    upper = sample_teacher(upper_prior, codes[L + 2].long().cpu(), _window_labels(upper_prior, where),
                           temperature=temperature, batch_size=batch_size, generator=sample_generator,
                           decoders=decoders, on_window=on_window)
    sub = [(p, a + j * c.sample_length) for p, a in where for j in range(per)]
    return Windows(codes[L].long().cpu().reshape(m * per, c.n_ctx)[:n], upper.reshape(m * per, n_up)[:n],
                   _window_labels(prior, sub[:n]))


# --------------------------------------------------------------------------------------------
# teacher samples
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def teacher_targets(prior: Prior, codes: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor | None,
                    k: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One teacher-forced pass: probability of each token in ``codes`` (S, n_ctx) and the top-k of
    the teacher's predictive distribution per position. Returns (token_prob (S, n_ctx),
    topk_ids (S, n_ctx, k), topk_probs (S, n_ctx, k)), on the CPU."""
    dev = prior.device
    probs, ids, tops = [], [], []
    for i in range(0, codes.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        y = None if labels is None else labels[sl].to(dev)
        logp = torch.log_softmax(prior.logits(codes[sl].to(dev), upper[sl].to(dev), y).float(), dim=-1)
        probs.append(logp.gather(-1, codes[sl].to(dev)[..., None])[..., 0].exp().cpu())
        v, j = logp.topk(k, dim=-1)
        ids.append(j.cpu())
        tops.append(v.exp().cpu())
    return torch.cat(probs), torch.cat(ids), torch.cat(tops)


@torch.no_grad()
def sample_windows(fill: Callable[..., torch.Tensor], n_ctx: int, upper: torch.Tensor, labels: torch.Tensor | None,
                   *, temperature: float, batch_size: int, generator: torch.Generator | None,
                   device: torch.device, on_window: Callable[[int], None] | None = None,
                   known: torch.Tensor | None = None) -> torch.Tensor:
    """Whole windows (S, n_ctx), ``batch_size`` at a time, by a window sampler with the
    ``fastjukebox.sampling.ARWindowSampler`` call signature (the teacher's, or the student's
    ``ParallelWindowSampler``), conditioned on ``upper`` (S, n_ctx // cd) and ``labels``; from
    nothing, or continuing ``known`` (S, K) codes (a hopped window: the rest is sampled);
    ``on_window(m)`` is told about every ``m`` finished windows."""
    out = []
    for i in range(0, upper.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        u = upper[sl].to(device)
        z = (torch.zeros(u.shape[0], 0, dtype=torch.long) if known is None else known[sl]).to(device)
        y = None if labels is None else labels[sl].to(device)
        out.append(fill(z, n_ctx - z.shape[1], u, y, temperature=temperature, generator=generator).cpu())
        if on_window is not None:
            on_window(u.shape[0])
    return torch.cat(out)


def sample_teacher(prior: Prior, upper: torch.Tensor, labels: torch.Tensor | None, *, temperature: float = 1.0,
                   batch_size: int = 16, generator: torch.Generator | None = None,
                   decoders: dict | None = None, on_window: Callable[[int], None] | None = None,
                   known: torch.Tensor | None = None) -> torch.Tensor:
    """``sample_windows`` with the teacher's exact AR sampler; ``decoders`` caches one
    ``ARWindowSampler`` (static cache) per batch size across calls."""
    dev = prior.device
    decoders = {} if decoders is None else decoders
    bs = min(batch_size, upper.shape[0])
    if bs not in decoders:
        decoders[bs] = ARWindowSampler(prior, bs, device=dev)
    return sample_windows(decoders[bs], prior.config.n_ctx, upper, labels, temperature=temperature, batch_size=bs,
                          generator=generator, device=dev, on_window=on_window, known=known)


# --------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------

def shard_path(directory: str | os.PathLike, index: int) -> Path:
    return Path(directory) / f"shard-{index:05d}.safetensors"


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` atomically with their checksum in the safetensors metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": SHARD_FORMAT, "checksum": tensors_checksum(tensors), **(meta or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_shard(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a shard; ``CorruptShardError`` (naming the file) if it cannot be
    parsed or its checksum does not match."""
    from safetensors import safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises several types for damaged files
        raise CorruptShardError(f"corrupt shard {path}: cannot be read ({type(e).__name__}: {str(e)[:160]})") from None
    if meta.get("format") != SHARD_FORMAT:
        raise CorruptShardError(f"corrupt shard {path}: format {meta.get('format')!r}, expected {SHARD_FORMAT!r}")
    if meta.get("checksum") != tensors_checksum(tensors):
        raise CorruptShardError(f"corrupt shard {path}: checksum mismatch (the file was modified or damaged)")
    return tensors, meta


@dataclass
class GenerationConfig:
    """What a shard directory was made with; resuming with different values is refused."""

    level: int
    n_ctx: int
    shards: int
    shard_size: int
    k: int = 8
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16    # windows sampled together (the random draws depend on it)
    model: str = ""
    data: str = "demo-corpus"
    upper: str = "real"     # the windows' upper codes: "real" (encoded) or "sampled" (by the upper teacher)

    def __post_init__(self):
        if self.upper not in UPPER_SOURCES:
            raise ValueError(f"upper must be one of {', '.join(UPPER_SOURCES)}, got {self.upper!r}")


def read_meta(directory: str | os.PathLike) -> dict | None:
    """The generation settings a shard directory was made with (None: no shards yet); a
    ``ValueError`` names an unreadable file."""
    path = Path(directory) / META_NAME
    if not path.exists():
        return None
    try:
        have = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e}); delete it (the shards beside it are "
                         f"checked on their own) or use another directory") from None
    if not isinstance(have, dict):
        raise ValueError(f"{path}: expected a JSON object of generation settings, got {type(have).__name__}")
    return have


def _write_meta(directory: Path, gen: GenerationConfig) -> None:
    path = directory / META_NAME
    want = asdict(gen)
    have = read_meta(directory)
    if have is not None:
        have = {**{f.name: f.default for f in fields(GenerationConfig) if f.default is not MISSING}, **have}
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v and k != "shards"}
        if diff:
            raise ValueError(f"{directory} holds shards made with other settings "
                             f"({', '.join(f'{k}: {a!r} != {b!r}' for k, (a, b) in diff.items())}); "
                             f"use another directory or delete it")
        if have.get("shards", 0) >= gen.shards:
            return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(want, indent=1))


def shard_seed(seed: int, index: int) -> int:
    return zlib.crc32(f"distill-shard:{seed}:{index}".encode())


def generate_shards(prior: Prior, vqvae: VQVAE, pieces: Sequence[SourcePiece], directory: str | os.PathLike,
                    gen: GenerationConfig, *, rank: int = 0, world_size: int = 1, progress: bool = True,
                    upper_prior: Prior | None = None) -> list[Path]:
    """Make this rank's missing shards (``i % world_size == rank``); complete shards are kept,
    corrupt ones are reported by name and made again. Returns this rank's shard paths.
    ``gen.upper == "sampled"`` needs ``upper_prior``, the level-``L + 1`` teacher that samples
    the windows' upper codes (``sampled_upper_windows``)."""
    from fastjukebox.progress import progress_bar
    _check_upsampler(prior)
    if prior.config.level != gen.level or prior.config.n_ctx != gen.n_ctx:
        raise ValueError(f"generation settings are for level {gen.level} (n_ctx {gen.n_ctx}), the teacher is "
                         f"level {prior.config.level} (n_ctx {prior.config.n_ctx})")
    if not 1 <= gen.k <= prior.config.l_bins:
        raise ValueError(f"k (top-k soft targets) must be in [1, {prior.config.l_bins}], got {gen.k}")
    if gen.upper == "sampled" and upper_prior is None:
        raise ValueError(f"sampled upper codes need the level-{gen.level + 1} teacher (upper_prior)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _write_meta(directory, gen)
    mine = [i for i in range(gen.shards) if i % world_size == rank]
    todo = []
    for i in mine:
        path = shard_path(directory, i)
        if path.exists():
            try:
                read_shard(path)
                continue
            except CorruptShardError as e:
                warnings.warn(f"{e}; generating it again")
        todo.append(i)
    per_shard = gen.shard_size
    if gen.upper == "sampled":       # and the upper windows they are cut from
        per_shard += -(-gen.shard_size // windows_per_upper(prior, upper_prior))
    bar = progress_bar(len(todo) * per_shard, f"teacher samples (rank {rank})", "win",
                       enabled=progress and bool(todo))
    decoders, upper_decoders = {}, {}
    dev = prior.device
    for i in todo:
        g = torch.Generator().manual_seed(shard_seed(gen.seed, i))
        g_dev = torch.Generator(device=dev).manual_seed(shard_seed(gen.seed, i) + 1)
        if gen.upper == "sampled":
            w = sampled_upper_windows(vqvae, prior, upper_prior, pieces, gen.shard_size, g,
                                      temperature=gen.temperature, batch_size=gen.batch_size, sample_generator=g_dev,
                                      decoders=upper_decoders, on_window=bar.update)
        else:
            w = real_windows(vqvae, prior, pieces, gen.shard_size, g)
        codes = sample_teacher(prior, w.upper, w.labels, temperature=gen.temperature, batch_size=gen.batch_size,
                               generator=g_dev, decoders=decoders, on_window=bar.update)
        token_prob, topk_ids, topk_probs = teacher_targets(prior, codes, w.upper, w.labels, gen.k, gen.batch_size)
        tensors = dict(codes=codes, real=w.real, upper=w.upper, token_prob=token_prob,
                       topk_ids=topk_ids, topk_probs=topk_probs)
        if w.labels is not None:
            tensors["labels"] = w.labels
        write_shard(shard_path(directory, i), tensors, {"index": str(i), "level": str(gen.level)})
    bar.close()
    return [shard_path(directory, i) for i in mine]


def load_shards(directory: str | os.PathLike, on_corrupt: str = "error",
                expect: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate every shard in ``directory``. A corrupt shard raises ``CorruptShardError``
    (``on_corrupt="error"``) or is left out with a warning naming it (``"skip"``); ``expect``
    shards missing is an error."""
    if on_corrupt not in ("error", "skip"):
        raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
    directory = Path(directory)
    paths = sorted(directory.glob("shard-*.safetensors"))
    if expect is not None:
        missing = [shard_path(directory, i).name for i in range(expect) if not shard_path(directory, i).exists()]
        if missing:
            raise ValueError(f"{directory}: {len(missing)} shard(s) missing, e.g. {missing[:3]}")
    parts = []
    for p in paths:
        try:
            parts.append(read_shard(p)[0])
        except CorruptShardError as e:
            if on_corrupt == "error":
                raise
            warnings.warn(f"{e}; skipping it")
    if not parts:
        raise ValueError(f"{directory}: no usable shards")
    keys = set(parts[0])
    if any(set(t) != keys for t in parts):
        raise ValueError(f"{directory}: shards hold different tensors")
    return {k: torch.cat([t[k] for t in parts]) for k in sorted(keys)}
