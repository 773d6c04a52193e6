"""Build the bundled ``demo`` model family from the demo corpus (``python -m fastjukebox.demo build``).

Stages, each with fixed seeds and fixed step counts (so a build is a function of its plan, not
of the machine's speed)::

    corpus    render (or load from the cache) the train subset and a few held-out chorales
    vqvae     train a small three-level VQ-VAE (hops 8 / 32 / 128, 256 codes per level)
    encode    encode the train and held-out pieces to codes (``work/codes/*.npz``)
    prior_1   upsampler level 1 (n_ctx 1024, block length 64)   } with upsampler_processes=2: at the
    prior_0   upsampler level 0 (n_ctx 1024, block length 64)   } same time, one process/thread each
    prior_2   top prior (labels: genre = key mode, artist = instrument set, timing signal)
    ship      copy the components to ``out`` with ``eval_codes.npz`` and ``build_info.json``

Training checkpoints live in a work directory (``$FASTJUKEBOX_CACHE/demo-build`` by default);
``resume=True`` continues each unfinished stage from its checkpoint and skips finished ones
(``work/state.json`` records them with their wall time).

``eval_codes.npz`` (shipped beside the models) holds the first seconds of a few held-out pieces'
codes with their labels and the per-level code counts of the train set, so the unigram baseline
and held-out NLL can be checked without the corpus.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..config import PriorConfig, VQVAEConfig

__all__ = ["BuildPlan", "plan_for_scale", "vqvae_config", "prior_config", "build", "default_work_dir",
           "DEFAULT_OUT", "STAGES"]

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "demo"
STAGES = ("corpus", "vqvae", "encode", "prior_1", "prior_0", "prior_2", "ship")
EVAL_SECONDS = 8.0          # seconds of each held-out piece kept in eval_codes.npz
# The family's recommended sampling settings, shipped as sampling.json: the top prior's samples
# hold more pitched sound and less noise at a lower temperature (docs/demo_quality.md measures it).
SAMPLING = {"temperature": {"2": 0.8}}


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build depends on. Step counts are fixed; ``scale`` shrinks them for tests."""

    train_chorales: int = 30          # chorales of the train split (each with its augmented variant)
    heldout_chorales: int = 6         # held-out chorales encoded for evaluation
    crop_seconds: float | None = None  # cut every piece to this length (tiny test builds)
    seed: int = 0
    vqvae_steps: int = 1000
    vqvae_batch: int = 4
    vqvae_window_seconds: float = 0.25
    vqvae_lr: float = 7e-4
    top_steps: int = 16000
    top_batch: int = 16
    up_steps: tuple[int, int] = (2500, 2500)      # level 0, level 1
    up_batch: int = 8
    up_train_pieces: int | None = None            # train subset for the upsamplers (None: all)
    upsampler_processes: int = 2                  # 2: both at once, one process and thread each; 1: in turn
    prior_lr: float = 1e-3
    warmup_steps: int = 100
    checkpoint_every: int = 100
    vqvae_width: int = 32
    prior_width: int = 128
    prior_depth: int = 4

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def plan_for_scale(scale: float = 1.0) -> BuildPlan:
    """The full plan (``scale=1``) or one with steps and data shrunk by ``scale``; below 0.05 the
    plan also crops pieces to 6 s, uses batch 2 and one held-out chorale (a build in seconds)."""
    if not 0 < scale <= 4:
        raise ValueError(f"scale must be in (0, 4], got {scale}")
    p = BuildPlan()
    n = lambda x, lo=2: max(lo, int(round(x * scale)))  # noqa: E731
    p = replace(p, train_chorales=n(p.train_chorales, 1), vqvae_steps=n(p.vqvae_steps),
                top_steps=n(p.top_steps), up_steps=(n(p.up_steps[0]), n(p.up_steps[1])),
                warmup_steps=min(p.warmup_steps, n(p.vqvae_steps) // 4),
                checkpoint_every=max(1, min(p.checkpoint_every, n(p.up_steps[0]) // 2)))
    if scale < 0.05:
        p = replace(p, crop_seconds=6.0, vqvae_batch=2, top_batch=2, up_batch=2, heldout_chorales=1)
    return p


def default_work_dir() -> Path:
    root = os.environ.get("FASTJUKEBOX_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fastjukebox") / "demo-build"


def vqvae_config(plan: BuildPlan) -> VQVAEConfig:
    """Released geometry (3 levels, hops 8/32/128) at demo width, 256 codes per level."""
    return VQVAEConfig(levels=3, downs_t=(3, 2, 2), strides_t=(2, 2, 2), emb_width=64, l_bins=256,
                       width=plan.vqvae_width, depth=2, multipliers=(1, 1, 1))


def prior_config(plan: BuildPlan, level: int, min_duration: float, max_duration: float) -> PriorConfig:
    """Top prior (level 2, n_ctx 256) or upsampler (n_ctx 1024, 16 blocks of 64 tokens)."""
    from .corpus import ARTISTS, GENRES
    common = dict(level=level, width=plan.prior_width, depth=plan.prior_depth, heads=2, attn_order=2,
                  m_attn=0.5, l_bins=256, levels=3, downs_t=(3, 2, 2), strides_t=(2, 2, 2),
                  y_bins=(len(GENRES), len(ARTISTS)), t_bins=64, max_bow_genre_size=1)
    if level == 2:
        return PriorConfig(n_ctx=256, blocks=16, init_scale=0.2, merged_decoder=True,
                           min_duration=min_duration, max_duration=max_duration,
                           cond_width=128, cond_depth=3, cond_dilation_growth_rate=1,
                           cond_dilation_cycle=None, cond_c_res=False, **common)
    return PriorConfig(n_ctx=1024, blocks=16, init_scale=0.4, cond_width=128, cond_depth=4,
                       cond_dilation_growth_rate=3, cond_dilation_cycle=8, cond_res_scale=level == 1,
                       cond_c_res=True, **common)


# --- state ---------------------------------------------------------------------------------------

class _State:
    """``work/state.json``: finished stages and accumulated wall seconds per stage."""

    def __init__(self, work: Path, plan: BuildPlan, resume: bool):
        self.path = work / "state.json"
        self.data = {"plan": plan.to_dict(), "done": {}, "seconds": {}, "overlap_seconds": 0.0}
        if resume and self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("plan") != self.data["plan"]:
                raise ValueError(f"{work} holds a build with another plan; run without --resume "
                                 f"(or with the same --scale) or pass another --work")
            self.data = old

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(json.dumps(self.data, indent=1))

    def done(self, stage: str) -> bool:
        return bool(self.data["done"].get(stage))

    def add_overlap(self, seconds: float) -> None:
        """Seconds during which two stages ran at once (counted once in the build's wall time)."""
        self.data["overlap_seconds"] = self.data.get("overlap_seconds", 0.0) + max(seconds, 0.0)
        self.save()

    def wall_seconds(self) -> float:
        return sum(self.data["seconds"].values()) - self.data.get("overlap_seconds", 0.0)

    def add_time(self, stage: str, seconds: float, finished: bool, info: dict | None = None) -> None:
        self.data["seconds"][stage] = self.data["seconds"].get(stage, 0.0) + seconds
        if finished:
            self.data["done"][stage] = info or True
        self.save()


# --- stages --------------------------------------------------------------------------------------

def _pieces(plan: BuildPlan, cache_dir, progress: bool):
    from .corpus import build_corpus
    train = build_corpus("train", augment=True, limit=plan.train_chorales, cache_dir=cache_dir,
                         progress=progress, mmap=True)
    held = build_corpus("heldout", augment=False, limit=plan.heldout_chorales, cache_dir=cache_dir,
                        progress=progress, mmap=True)
    if plan.crop_seconds is not None:
        from .score_text import crop_text
        n = int(plan.crop_seconds * 44100)
        for p in train + held:
            p.audio = p.audio[:n]
            p.score_text = crop_text(p.score_text, len(p.audio))
    if not train or not held:
        raise ValueError(f"the demo corpus gave {len(train)} train and {len(held)} held-out pieces; "
                         f"need at least one of each")
    return train, held


def _durations(pieces) -> tuple[float, float]:
    """Top prior timing range covering all pieces with a margin (whole seconds)."""
    secs = [len(p.audio) / 44100 for p in pieces]
    return float(max(1, math.floor(0.5 * min(secs)))), float(math.ceil(1.25 * max(secs)))


def _train_cfg(plan: BuildPlan, work: Path, steps: int, batch: int, lr: float, resume: bool, progress: bool):
    from ..train import TrainConfig
    return TrainConfig(steps=steps, batch_size=batch, out_dir=str(work), lr=lr,
                       warmup_steps=min(plan.warmup_steps, max(steps // 4, 0)), device="cpu",
                       seed=plan.seed, checkpoint_every=min(plan.checkpoint_every, steps),
                       log_every=max(1, min(10, steps)), resume=resume, progress=progress)


def _code_path(work: Path, split: str, i: int) -> Path:
    return work / "codes" / f"{split}_{i:04d}.npz"


def _load_codes(work: Path, split: str, n: int):
    from ..train import load_code_piece
    out = [load_code_piece(_code_path(work, split, i)) for i in range(n)]
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def _unigram_counts(codes, bins: int) -> np.ndarray:
    counts = np.zeros((len(codes[0]), bins), dtype=np.int64)
    for piece in codes:
        for l, z in enumerate(piece):
            counts[l] += np.bincount(np.asarray(z).reshape(-1), minlength=bins)
    return counts


def _write_eval_codes(path: Path, held_codes, held_lengths, held_labels, train_codes, hops, bins: int) -> None:
    arrays = {"unigram_counts": _unigram_counts(train_codes, bins), "hop_lengths": np.array(hops)}
    for i, (codes, n, lab) in enumerate(zip(held_codes, held_lengths, held_labels)):
        keep = int(EVAL_SECONDS * 44100) // hops[-1]
        for l, z in enumerate(codes):
            arrays[f"piece{i}_level{l}"] = np.asarray(z)[: keep * hops[-1] // hops[l]].astype(np.int16)
        arrays[f"piece{i}_length"] = np.array(n)
        arrays[f"piece{i}_artist"] = np.array(lab.artist)
        arrays[f"piece{i}_genre"] = np.array(lab.genre if isinstance(lab.genre, int) else lab.genre[0])
    arrays["n_pieces"] = np.array(len(held_codes))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__}


def _train_prior_stage(plan: BuildPlan, level: int, work, n_train: int, lo: float, hi: float, resume: bool,
                       progress: bool, threads: int | None = None, position: int | None = None) -> dict:
    """Train one prior of the family on the encoded train pieces (also run in a worker process)."""
    from ..train import train_prior
    t0 = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    work = Path(work)
    codes, lengths, labels = _load_codes(work, "train", n_train)
    cfg = prior_config(plan, level, lo, hi)
    if level == 2:
        steps, batch, n = plan.top_steps, plan.top_batch, n_train
    else:
        steps, batch = plan.up_steps[level], plan.up_batch
        n = n_train if plan.up_train_pieces is None else min(plan.up_train_pieces, n_train)
    tcfg = replace(_train_cfg(plan, work, steps, batch, plan.prior_lr, resume, progress), progress_position=position)
    _, res = train_prior(cfg, codes[:n], tcfg, labels=labels[:n], lengths=lengths[:n])
    return {"steps": res.step, "loss_bits_per_token": res.loss, "steps_per_second": res.steps_per_second,
            "pieces": n, "_finished": res.finished, "_seconds": time.perf_counter() - t0}


def build(out: str | os.PathLike = DEFAULT_OUT, *, plan: BuildPlan | None = None, work: str | os.PathLike | None = None,
          resume: bool = False, cache_dir: str | os.PathLike | None = None, progress: bool = True,
          command: str | None = None, log=print) -> dict:
    """Run (or resume) every stage and ship the family to ``out``. Returns the build info dict
    (also written to ``out/build_info.json``)."""
    from ..bundle import Jukebox
    from ..checkpoint import load_component
    from ..train import PieceLabels, encode_pieces, save_code_piece, train_vqvae

    plan = plan or BuildPlan()
    if plan.upsampler_processes not in (1, 2):
        raise ValueError(f"upsampler_processes must be 1 (in turn) or 2 (at the same time), got {plan.upsampler_processes}")
    out, work = Path(out), Path(work) if work is not None else default_work_dir()
    if not resume and work.exists() and any(work.iterdir()):
        if not (work / "state.json").is_file():
            raise ValueError(f"work directory {work} is not empty and holds no demo build (state.json); "
                             f"pass an empty or new --work")
        shutil.rmtree(work)  # a previous demo build: start over
    work.mkdir(parents=True, exist_ok=True)
    (work / "codes").mkdir(exist_ok=True)
    state = _State(work, plan, resume)
    state.save()
    torch.manual_seed(plan.seed)

    def run_stage(name: str, fn):
        if state.done(name):
            log(f"[{name}] already done, skipped")
            return state.data["done"][name]
        log(f"[{name}] ...")
        t0 = time.perf_counter()
        info = fn()
        info.pop("_seconds", None)
        state.add_time(name, time.perf_counter() - t0, finished=info.pop("_finished", True), info=info)
        log(f"[{name}] {state.data['seconds'][name]:.1f} s {json.dumps(info)[:300]}")
        return info

    t_start = time.perf_counter()
    t0 = time.perf_counter()
    train, held = _pieces(plan, cache_dir, progress)
    corpus_secs = time.perf_counter() - t0
    if not state.done("corpus"):
        state.add_time("corpus", corpus_secs, True, {
            "train_pieces": len(train), "heldout_pieces": len(held),
            "train_hours": round(sum(len(p.audio) for p in train) / 44100 / 3600, 3),
            "heldout_seconds": round(sum(len(p.audio) for p in held) / 44100, 1)})
    lo, hi = _durations(train + held)
    vq_cfg = vqvae_config(plan)
    hops = vq_cfg.hop_lengths
    labels = [PieceLabels(artist=p.artist, genre=p.genre, total_length=len(p.audio)) for p in train]
    held_labels = [PieceLabels(artist=p.artist, genre=p.genre, total_length=len(p.audio)) for p in held]

    def stage_vqvae():
        window = int(plan.vqvae_window_seconds * vq_cfg.sr) // hops[-1] * hops[-1]
        cfg = _train_cfg(plan, work, plan.vqvae_steps, plan.vqvae_batch, plan.vqvae_lr, resume, progress)
        _, res = train_vqvae(vq_cfg, [p.audio for p in train], cfg, window=window)
        return {"steps": res.step, "loss": res.loss, "steps_per_second": res.steps_per_second,
                "_finished": res.finished}

    run_stage("vqvae", stage_vqvae)

    def stage_encode():
        vq = load_component(work / "vqvae", "vqvae").eval()
        for split, pieces, labs in (("train", train, labels), ("heldout", held, held_labels)):
            codes = encode_pieces(vq, [p.audio for p in pieces], progress=progress)
            for i, (z, p, lab) in enumerate(zip(codes, pieces, labs)):
                save_code_piece(_code_path(work, split, i), z, len(p.audio), lab)
        return {"train": len(train), "heldout": len(held)}

    run_stage("encode", stage_encode)

    def prior_args(level: int) -> tuple:
        return (plan, level, str(work), len(train), lo, hi, resume, progress)

    group = [1, 0] if plan.upsampler_processes == 2 else []
    if any(not state.done(f"prior_{l}") for l in group):
        # The two upsamplers only need the codes: they train at the same time, one process and
        # one thread each (deterministic per plan), while the top prior waits for both cores.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {}
            for l in group:
                if not state.done(f"prior_{l}"):
                    log(f"[prior_{l}] ... (worker process, one thread)")
                    futures[l] = pool.submit(_train_prior_stage, *prior_args(l), threads=1, position=l)
            results = {l: f.result() for l, f in futures.items()}
        wall = time.perf_counter() - t0
        secs = {l: info.pop("_seconds") for l, info in results.items()}
        for l, info in results.items():
            state.add_time(f"prior_{l}", secs[l], finished=info.pop("_finished", True), info=info)
            log(f"[prior_{l}] {state.data['seconds'][f'prior_{l}']:.1f} s {json.dumps(info)[:300]}")
        state.add_overlap(sum(secs.values()) - wall)
    for level in (1, 0, 2):
        run_stage(f"prior_{level}", lambda level=level: _train_prior_stage(*prior_args(level)))

    def stage_ship():
        vq = load_component(work / "vqvae", "vqvae")
        priors = {l: load_component(work / f"prior_level_{l}", "prior") for l in (0, 1, 2)}
        tmp = out.with_name(out.name + ".building")
        if tmp.exists():
            shutil.rmtree(tmp)
        Jukebox(vq, priors, sampling=SAMPLING).save(tmp)
        held_codes, held_lengths, held_labs = _load_codes(work, "heldout", len(held))
        train_codes = _load_codes(work, "train", len(train))[0]
        _write_eval_codes(tmp / "eval_codes.npz", held_codes, held_lengths, held_labs, train_codes, hops,
                          vq_cfg.l_bins)
        (tmp / "README.md").write_text(_readme(plan, lo, hi))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        return {"bytes": size}

    run_stage("ship", stage_ship)
    seconds = dict(state.data["seconds"])
    info = {
        "command": command or "python -m fastjukebox.demo build",
        "plan": plan.to_dict(),
        "seeds": {"train": plan.seed, "data": plan.seed},
        "steps": {"vqvae": plan.vqvae_steps, "prior_level_2": plan.top_steps,
                  "prior_level_1": plan.up_steps[1], "prior_level_0": plan.up_steps[0]},
        "stages": state.data["done"],
        "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(state.wall_seconds(), 1),
        "concurrent_seconds": round(state.data.get("overlap_seconds", 0.0), 1),
        "this_run_seconds": round(time.perf_counter() - t_start, 1),
        "top_prior_duration_range": [lo, hi],
        "machine": _machine(),
        "torch_version": torch.__version__,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_path(out / "build_info.json") as tmp:
        Path(tmp).write_text(json.dumps(info, indent=1))
    return info


def _readme(plan: BuildPlan, lo: float, hi: float) -> str:
    from .corpus import ARTISTS, GENRES
    return (
        "# demo\n\nA small three-level model family trained on Bach chorales rendered by "
        "`fastjukebox.demo` (built by `python -m fastjukebox.demo build`; see `build_info.json`).\n\n"
        "* VQ-VAE: hops 8 / 32 / 128 samples at 44.1 kHz, 256 codes per level.\n"
        "* Top prior (level 2): n_ctx 256; upsamplers (levels 1, 0): n_ctx 1024 in blocks of 64.\n"
        f"* Labels: genre (key mode) {', '.join(f'{i}={g}' for i, g in enumerate(GENRES))}; "
        f"artist (instrument set) {', '.join(f'{i}={a}' for i, a in enumerate(ARTISTS))}; "
        f"total length {lo:g}-{hi:g} s.\n"
        "* `eval_codes.npz`: codes of the first seconds of a few held-out chorales and the train "
        "set's code counts per level (the unigram baseline).\n"
        f"* `sampling.json`: the recommended sampling settings ({json.dumps(SAMPLING)}), used for "
        "every knob a sampling call does not set.\n\n"
        "Quality figures: `docs/demo_quality.md`.\n")
