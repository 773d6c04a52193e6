"""Train the feature drafter of an upsampler (``distill.drafter``), the proposal model of ``"speculative"``.

    python -m distill.train_drafter --teacher bottom [--model PATH|demo] [--data DIR] [--out DIR] [--resume] ...
    accelerate launch --num_processes N -m distill.train_drafter --teacher middle ...

1. Teacher samples: the same shards as ``distill.train`` (``distill.data.generate_shards``, into
   ``OUT/shards`` or ``--shards-dir``: a ``distill.train`` run's shards are reused as they are).
   The last shard is held out for the final measurement.
2. One teacher-forced pass per window gives the teacher's final activations ``h`` (the features
   the verify chunk hands the drafter) and its conditioning, kept in memory.
3. Training (``fastjukebox.train.loop``, task ``DrafterTask``; AdamW, warmup then cosine;
   checkpoint ``OUT/checkpoint.pt`` every ``--ckpt-every`` steps, ``--resume`` continues it): each
   step draws ``--starts`` positions ``s`` per window and unrolls the drafter ``--unroll``
   positions from the teacher's ``h[s]``, each later position from the drafter's own feature
   (as when it drafts). Loss per unrolled position ``s + j``: KL(teacher || drafter) of the code
   distributions, plus ``--feature-weight`` x the squared distance of the drafted feature to the
   teacher's ``h[s + j]`` (relative to the features' variance), which keeps the drafter's
   features readable by its next step.
4. ``OUT/drafter`` (component directory; put it beside the priors as ``drafter_level_{L}/``),
   ``OUT/metrics.jsonl``, ``OUT/metrics.png`` and ``OUT/train_summary.json`` with the held-out
   acceptance per unrolled depth (``sum(min(p, q))`` on the held-out shard, teacher-forced).
"""
# The default runs on the demo family, 2 CPU cores: level 0 about 6 minutes (teacher samples 1.5,
# features 0.4, 1500 steps 3.6); a distill.train run of the same teacher lends its shards through
# --shards-dir.
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fastjukebox.atomic import atomic_path
from fastjukebox.cli_options import HelpFormatter
from fastjukebox.process_group import end_at_exit
from fastjukebox.train.loop import CHECKPOINT_NAME, METRICS_NAME, TrainConfig
from fastjukebox.train.loop import train as train_loop

from .data import UPPER_SOURCES, GenerationConfig, generate_shards, load_pieces, load_shards, read_meta
from .drafter import FeatureDrafter
from .student import TEACHERS
from .train import InputError, plot_metrics, run_training, step_generator, weights_digest, _mixed_precision

__all__ = ["DrafterTrainConfig", "DrafterTask", "teacher_features", "unrolled_losses", "train", "main"]

DEFAULTS = {"middle": dict(upper="real"), "bottom": dict(upper="sampled")}


@dataclass
class DrafterTrainConfig:
    teacher: str = "bottom"
    model: str = "demo"
    data: str | None = None
    pieces: int | None = 24
    out: str = "drafter-run"
    shards_dir: str | None = None
    shards: int = 16
    shard_size: int = 32
    gen_batch_size: int = 16
    upper: str | None = None           # None: DEFAULTS
    steps: int = 1500
    batch_size: int = 16               # windows per step
    starts: int = 64                   # unrolled chains per window and step
    unroll: int = 6                    # drafted positions per chain
    hidden: int = 512
    depth: int = 1
    block_norm: bool = False           # each MLP block normalises its input (``DrafterConfig.block_norm``)
    feature_weight: float = 0.1
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    temperature: float = 1.0           # teacher sampling temperature of the shards
    seed: int = 0
    ckpt_every: int = 250
    log_every: int = 10
    mixed_precision: str = "auto"
    resume: bool = False
    progress: bool = True
    cpu: bool = False

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"--teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.upper is None:
            self.upper = DEFAULTS[self.teacher]["upper"]
        if self.upper not in UPPER_SOURCES:
            raise ValueError(f"--upper must be one of {', '.join(UPPER_SOURCES)}, got {self.upper!r}")
        if self.upper == "sampled" and self.teacher != "bottom":
            raise ValueError("--upper sampled needs an upsampler above the teacher: only --teacher bottom has one")
        for name in ("shard_size", "gen_batch_size", "steps", "batch_size", "starts", "unroll", "hidden", "depth",
                     "ckpt_every", "log_every"):
            v, least = getattr(self, name), 0 if name == "depth" else 1
            if isinstance(v, bool) or int(v) < least:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {v}")
        if int(self.shards) < 2:
            raise ValueError(f"--shards must be >= 2 (the last one is held out), got {self.shards}")
        if self.feature_weight < 0 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("--feature-weight must be >= 0, --lr and --temperature > 0")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"--mixed-precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")

    @property
    def level(self) -> int:
        return TEACHERS[self.teacher]

    @property
    def shard_dir(self) -> Path:
        return Path(self.shards_dir) if self.shards_dir else Path(self.out) / "shards"

    def identity(self) -> dict:
        """Settings a resumed run must share with the checkpoint it continues."""
        skip = ("out", "shards_dir", "gen_batch_size", "ckpt_every", "log_every", "resume", "progress", "cpu",
                "mixed_precision")
        return {k: v for k, v in asdict(self).items() if k not in skip}


@torch.no_grad()
def teacher_features(prior, data: dict[str, torch.Tensor], batch_size: int = 16,
                     on_windows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-forced final activations ``h`` and the conditioning ``x_cond`` of every shard
    window, each (S, n_ctx, W) float32 on the teacher's device."""
    tm, dev = prior.prior, prior.device
    hs, cs = [], []
    for i in range(0, data["codes"].shape[0], batch_size):
        sl = slice(i, i + batch_size)
        labels = data["labels"][sl].to(dev) if "labels" in data else None
        cond = prior.condition(data["upper"][sl].to(dev), labels)
        codes = data["codes"][sl].to(dev)
        hs.append(tm.transformer(tm.inputs(codes, cond.start, cond.x_cond)).float())
        cs.append(cond.x_cond.float())
        if on_windows is not None:
            on_windows(codes.shape[0])
    return torch.cat(hs), torch.cat(cs)


def unrolled_losses(drafter: FeatureDrafter, head, h: torch.Tensor, x_cond: torch.Tensor, codes: torch.Tensor,
                    starts: torch.Tensor, unroll: int) -> dict[str, torch.Tensor]:
    """The drafter unrolled ``unroll`` positions from the teacher's features at ``starts``.

    h, x_cond: (B, n_ctx, W) the teacher's features and conditioning; codes: (B, n_ctx) the
    teacher's sample; starts: (B, S) positions with ``starts + unroll < n_ctx``; ``head(h, x_cond)``
    the teacher's output head. Returns per-depth tensors (unroll,): ``kl`` (teacher || drafter,
    nats per position), ``feature`` (squared distance to the teacher's feature over its variance)
    and ``accept`` (``sum(min(p, q))``, the chance a draft at that depth is kept given the
    teacher's tokens before it)."""
    B, S = starts.shape
    rows = torch.arange(B, device=h.device)[:, None]
    scale = h.var().clamp_min(1e-6)
    feature = h[rows, starts]                                                   # (B, S, W)
    kl, dist, acc = [], [], []
    for j in range(1, unroll + 1):
        at = starts + j
        feature = drafter(feature, drafter.inputs(codes[rows, at - 1], at, x_cond[rows, at]))
        logq = torch.log_softmax(drafter.logits(feature).float(), dim=-1)
        with torch.no_grad():
            logp = torch.log_softmax(head(h[rows, at], x_cond[rows, at]).float(), dim=-1)
        p = logp.exp()
        kl.append((p * (logp - logq)).sum(-1).mean())
        dist.append((feature - h[rows, at]).pow(2).mean() / scale)
        acc.append(torch.minimum(p, logq.exp()).sum(-1).mean().detach())
    return dict(kl=torch.stack(kl), feature=torch.stack(dist), accept=torch.stack(acc))


class _DrafterLoss(nn.Module):
    """The drafter with its loss as ``forward``, so accelerate's prepared module synchronises it."""

    def __init__(self, drafter: FeatureDrafter, head, feature_weight: float, unroll: int):
        super().__init__()
        self.drafter, self.feature_weight, self.unroll = drafter, feature_weight, unroll
        self._head = head

    def forward(self, h, x_cond, codes, starts):
        out = unrolled_losses(self.drafter, self._head, h, x_cond, codes, starts, self.unroll)
        loss = out["kl"].mean() + self.feature_weight * out["feature"].mean()
        return dict(loss=loss, kl=out["kl"].mean().detach(), accept_first=out["accept"][0],
                    accept_last=out["accept"][-1])


class DrafterTask:
    """The drafter's training as a task of ``fastjukebox.train.loop``; the windows and chains of
    step ``s`` are drawn from a generator seeded by ``(seed, s, rank)``."""

    name = "drafter"

    def __init__(self, cfg: DrafterTrainConfig, drafter: FeatureDrafter, head, h, x_cond, codes):
        self.cfg, self.h, self.x_cond, self.codes = cfg, h, x_cond, codes
        self.model = _DrafterLoss(drafter, head, cfg.feature_weight, cfg.unroll)
        self._forward, self._rank = self.model, 0

    def bind(self, model: nn.Module, accelerator) -> None:
        self._forward, self._rank = model, accelerator.process_index

    def loss(self, step: int, batch_size: int, device: torch.device):
        cfg, g = self.cfg, step_generator(self.cfg.seed, step, self._rank)
        n, T = self.codes.shape
        windows = torch.randint(0, n, (batch_size,), generator=g)
        starts = torch.randint(0, T - cfg.unroll, (batch_size, cfg.starts), generator=g)
        dev = self.h.device
        out = self._forward(self.h[windows.to(dev)], self.x_cond[windows.to(dev)], self.codes[windows].to(dev),
                            starts.to(dev))
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass

    def fingerprint(self) -> dict:
        return self.cfg.identity()


# ``OUT/metrics.png``: the loss and its KL part, then the acceptance at the first and last unrolled
# position (``DrafterTask``'s log keys)
PLOT_PANELS = ([("loss", "loss (nats)"), ("kl", "KL(teacher || drafter) (nats)")],
               [("accept_first", "acceptance, first drafted position"), ("accept_last", "acceptance, last")])


@torch.no_grad()
def heldout_acceptance(drafter: FeatureDrafter, head, h, x_cond, codes, depth: int, seed: int) -> list[float]:
    """``sum(min(p, q))`` per drafted depth 1..``depth`` on held-out windows, teacher-forced, from
    every position with room (subsampled to 256 per window)."""
    drafter.eval()
    g = torch.Generator().manual_seed(seed)
    n, T = codes.shape
    starts = torch.stack([torch.randperm(T - depth, generator=g)[:256] for _ in range(n)]).to(h.device)
    out = unrolled_losses(drafter, head, h, x_cond, codes.to(h.device), starts, depth)
    return [round(float(a), 4) for a in out["accept"]]


def train(cfg: DrafterTrainConfig) -> dict:
    """Generate (or reuse) teacher samples, train the drafter, save it; returns the summary."""
    from accelerate import Accelerator

    import fastjukebox as fj

    mixed_precision, cpu = _mixed_precision(cfg.mixed_precision), cfg.cpu or not torch.cuda.is_available()
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    end_at_exit()
    out = Path(cfg.out)
    ckpt, log = out / CHECKPOINT_NAME, out / METRICS_NAME
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: a file, not a directory")
        jb = fj.load(cfg.model, device=acc.device)
        prior = jb.prior(cfg.level).eval()
        pieces = load_pieces(cfg.data, "train", jb.sr, limit=cfg.pieces)
        read_meta(cfg.shard_dir)
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from None
    if not cfg.resume and ckpt.exists():
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    for p in jb.parameters():
        p.requires_grad_(False)

    gen = GenerationConfig(level=cfg.level, n_ctx=prior.config.n_ctx, shards=cfg.shards, shard_size=cfg.shard_size,
                           k=8, temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.gen_batch_size,
                           model=str(cfg.model), data=str(cfg.data) if cfg.data else "demo-corpus", upper=cfg.upper)
    generate_shards(prior, jb.vqvae, pieces, cfg.shard_dir, gen, rank=acc.process_index,
                    world_size=acc.num_processes, progress=cfg.progress,
                    upper_prior=jb.prior(cfg.level + 1).eval() if cfg.upper == "sampled" else None)
    acc.wait_for_everyone()
    data = load_shards(cfg.shard_dir, expect=cfg.shards)
    held = cfg.shard_size                                   # the last shard's windows are held out
    from fastjukebox.progress import progress_bar
    bar = progress_bar(total=data["codes"].shape[0], desc="teacher features", unit="window",
                       enabled=cfg.progress and acc.is_main_process)
    h, x_cond = teacher_features(prior, data, on_windows=bar.update)
    bar.close()
    codes = data["codes"]

    torch.manual_seed(cfg.seed)
    drafter = FeatureDrafter.from_teacher(prior, cfg.hidden, cfg.depth, cfg.block_norm).float().train()
    head = prior.prior.head
    t0 = time.time()
    run = train_loop(DrafterTask(cfg, drafter, head, h[:-held], x_cond[:-held], codes[:-held]), TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, out_dir=str(out), run_dir=str(out), save_component=False,
        lr=cfg.lr, warmup_steps=min(cfg.warmup, cfg.steps), min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay, betas=(0.9, 0.95), clip=cfg.grad_clip, mixed_precision=mixed_precision,
        device="cpu" if cpu else None, seed=cfg.seed, checkpoint_every=cfg.ckpt_every, log_every=cfg.log_every,
        resume=cfg.resume, progress=cfg.progress), accelerator=acc)
    drafter.eval()
    result = dict(config=asdict(cfg), steps=cfg.steps, resumed_from=run.resumed_from, world_size=acc.num_processes,
                  windows=int(codes.shape[0]) - held, heldout_windows=held, train_seconds=round(time.time() - t0, 3),
                  device=str(acc.device), weight_digest=weights_digest(drafter))
    if acc.is_main_process:
        with torch.no_grad():
            result["heldout_acceptance_by_depth"] = heldout_acceptance(
                drafter, head, h[-held:], x_cond[-held:], codes[-held:], depth=8, seed=cfg.seed + 1)
        drafter.save(out / "drafter")
        plot_metrics(log, out / "metrics.png", panels=PLOT_PANELS)
        with atomic_path(out / "train_summary.json") as tmp:
            tmp.write_text(json.dumps(result, indent=1, default=str))
    acc.wait_for_everyone()
    return result


def build_parser() -> argparse.ArgumentParser:
    d = DrafterTrainConfig
    p = argparse.ArgumentParser(prog="python -m distill.train_drafter", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, choices=sorted(TEACHERS),
                   help="upsampler whose drafter to train: middle (level 1) or bottom (level 0)")
    p.add_argument("--model", default=d.model, help="model directory or bundled name")
    p.add_argument("--data", default=None, help="directory of audio files (default: the demo corpus)")
    p.add_argument("--pieces", type=int, default=d.pieces, help="source pieces to encode (0: all)")
    p.add_argument("--out", default=d.out, help="run directory")
    p.add_argument("--shards-dir", default=None, help="teacher-sample shards (default: OUT/shards; a distill.train "
                                                      "run's OUT/shards of the same teacher is reused)")
    p.add_argument("--shards", type=int, default=d.shards, help="teacher-sample shards (the last is held out)")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="windows per shard")
    p.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size, help="windows sampled together")
    p.add_argument("--upper", choices=UPPER_SOURCES, default=None,
                   help="the windows' upper codes: real (encoded) or sampled by the upper teacher (bottom only; "
                        "default: sampled for bottom, real for middle, as distill.train)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per step")
    p.add_argument("--starts", type=int, default=d.starts, help="unrolled chains per window and step")
    p.add_argument("--unroll", type=int, default=d.unroll, help="drafted positions per chain")
    p.add_argument("--hidden", type=int, default=d.hidden, help="inner width of the drafter's MLP blocks")
    p.add_argument("--depth", type=int, default=d.depth, help="the drafter's MLP blocks (0: none)")
    p.add_argument("--block-norm", action="store_true",
                   help="a layer norm on each MLP block's input (default: none, two tensor operations fewer per "
                        "drafted position in sampling, for held-out acceptance within 0.004 on the demo)")
    p.add_argument("--feature-weight", type=float, default=d.feature_weight,
                   help="weight of the feature distance to the teacher's")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final learning rate / --lr")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clipping threshold")
    p.add_argument("--temperature", type=float, default=d.temperature, help="teacher sampling temperature")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the teacher samples and batches")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between lines of OUT/metrics.jsonl")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="accelerate's mixed precision (auto: bf16/fp16 on a GPU, none on a CPU)")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    return p


def main(argv: list[str] | None = None) -> int:
    code, result = run_training(build_parser().parse_args(argv), DrafterTrainConfig, train)
    if result is not None:
        print(json.dumps({k: result[k] for k in ("train_seconds", "heldout_acceptance_by_depth") if k in result}))
    return code


if __name__ == "__main__":
    sys.exit(main())
