"""Distil an upsampler prior into a parallel (masked-token) student.

    python -m distill.train --teacher middle [--model PATH|demo] [--data DIR] [--steps N]
        [--batch-size B] [--out DIR] [--resume] ...
    accelerate launch --multi_gpu --num_processes N -m distill.train --teacher middle ...
        # several processes; on the CPU (no GPU, or --cpu) they form a gloo group. (accelerate's
        # own --cpu flag starts a single process unless MPI is set up.)

1. Teacher samples: ``distill.data.generate_shards`` writes ``OUT/shards`` (shard ``i`` made by
   rank ``i % world_size``; finished shards are kept, so it resumes; corrupt ones are named and
   made again). ``--upper sampled`` (bottom): the windows' upper codes are sampled by the middle
   teacher (``distill.data.sampled_upper_windows``), as in a user's upsample, instead of encoded.
2. Training of ``ParallelStudent.from_teacher(prior)`` (or of ``--init-student``): masked-token
   cross-entropy on the masked positions (mask ratio from ``distill.schedules``), plus
   ``--soft-weight`` x the KL from the teacher's renormalised top-k to the student at masked positions of teacher samples. A
   fraction ``--real-ratio`` of the examples uses the real codes of the window instead of the
   teacher's sample. With probability ``--prefix-prob`` the first half of the window is left
   visible and only the second half is masked, as when the sampler continues a hopped window;
   these examples run under the prefix-cached layout (``distill.prefix_layout``) unless
   ``--no-prefix-layout``.
   AdamW (betas 0.9, 0.95), linear warmup then cosine decay; gradients synchronised by accelerate. Then
   ``--on-policy-steps`` steps of on-policy distillation (``distill.on_policy``: the student
   samples windows, the teacher scores them, ``--on-policy-divergence`` at the positions each
   pass made final), from ``--on-policy-lr`` with their own cosine decay.
3. The steps run in the project's training loop (``fastjukebox.train.loop``, the task
   ``DistillTask``): checkpoint ``OUT/checkpoint.pt`` (atomic; weights, optimiser and scheduler
   state, step) every ``--ckpt-every`` steps; ``--resume`` continues from it. The randomness of
   step ``s`` (batch, real/teacher choice, masks) is drawn from a generator seeded by
   (seed, s, rank), so a resumed run ends with the same weights as an uninterrupted one.
4. ``OUT/metrics.jsonl`` and ``OUT/metrics.png``, the student in ``OUT/student`` (component
   directory), ``OUT/train_summary.json``, then the evaluation (``distill.evaluate``) in
   ``OUT/eval``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fastjukebox.atomic import atomic_path
from fastjukebox.cli_options import HelpFormatter
from fastjukebox.process_group import end_at_exit
from fastjukebox.train.loop import CHECKPOINT_NAME, METRICS_NAME, TrainConfig, lr_factor
from fastjukebox.train.loop import train as train_loop

from .data import UPPER_SOURCES, GenerationConfig, generate_shards, load_pieces, load_shards, read_meta
from .metrics import BITS
from .on_policy import DIVERGENCES, on_policy_batch, token_divergence
from .schedules import sample_training_mask
from .student import DEFAULT_PASSES, TEACHERS

# The default runs. On the demo family on 2 CPU cores, teacher data generation, the sampler
# choice and the evaluation included: middle 25.5 minutes, bottom 21.5 (measured alone). Level 0
# takes the shifted input layout (its codes depend most on their left neighbour) and trains on
# windows whose level-1 codes the middle teacher sampled, the conditioning it meets in an
# upsample (``benchmarks/results/level0-levers.md``, sections 3, 9 and 10).
DEFAULTS = {"middle": dict(steps=800, shards=16, shard_size=32, input_layout="tokens", upper="real"),
            "bottom": dict(steps=2000, shards=16, shard_size=32, input_layout="shifted", upper="sampled")}


@dataclass
class DistillConfig:
    teacher: str = "middle"
    model: str = "demo"
    data: str | None = None            # audio directory; None: the demo corpus
    pieces: int | None = 24            # source pieces (demo: chorales, each with its variant); None: all
    out: str = "distill-run"
    shards_dir: str | None = None      # default OUT/shards
    steps: int | None = None           # None: DEFAULTS[teacher]
    shards: int | None = None
    shard_size: int | None = None
    batch_size: int = 16
    gen_batch_size: int = 16
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    k: int = 8
    temperature: float = 1.0
    real_ratio: float | None = None    # None: 0.25 on real upper codes, 0 on sampled ones
    soft_weight: float = 0.25
    prefix_prob: float = 0.25
    prefix_layout: bool = True         # prefix examples train the prefix-cached layout (distill.prefix_layout)
    input_layout: str | None = None     # student input: own codes, or left neighbours' ("shifted"); None: DEFAULTS
    init_student: str | None = None    # start from this student directory instead of the teacher's weights
    upper: str | None = None           # the shard windows' upper codes: real (encoded) or sampled (distill.data); None: DEFAULTS
    on_policy_steps: int = 0           # on-policy steps after the masked-token steps (distill.on_policy)
    on_policy_divergence: str = "reverse"
    on_policy_lr: float = 1e-4
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    mixed_precision: str = "auto"
    resume: bool = False
    evaluate: bool = True
    eval_windows: int = 64
    passes: int = DEFAULT_PASSES             # decoding passes per window, saved with the student
    confidence_noise: float | None = None   # the student's unmasking noise; None: chosen (distill.tune)
    tune_windows: int = 16                   # shard windows the choice is measured on
    progress: bool = True
    cpu: bool = False

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"--teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        for name, value in DEFAULTS[self.teacher].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if isinstance(self.on_policy_steps, bool) or int(self.on_policy_steps) < 0:
            raise ValueError(f"--on-policy-steps must be >= 0, got {self.on_policy_steps}")
        if self.on_policy_divergence not in DIVERGENCES:
            raise ValueError(f"--on-policy-divergence must be one of {', '.join(DIVERGENCES)}, "
                             f"got {self.on_policy_divergence!r}")
        if not self.on_policy_lr > 0:
            raise ValueError(f"--on-policy-lr must be > 0, got {self.on_policy_lr}")
        if isinstance(self.steps, bool) or int(self.steps) < 0 or int(self.steps) + int(self.on_policy_steps) < 1:
            raise ValueError(f"--steps must be >= 0 and --steps + --on-policy-steps >= 1, got {self.steps} "
                             f"and {self.on_policy_steps}")
        for name in ("shards", "shard_size", "batch_size", "gen_batch_size", "k", "ckpt_every",
                     "log_every", "eval_windows", "passes", "tune_windows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.real_ratio is None:
            self.real_ratio = 0.25 if self.upper == "real" else 0.0
        if self.upper == "sampled" and self.real_ratio > 0:
            raise ValueError("--real-ratio must be 0 with --upper sampled: a window's real codes belong to its real "
                             "upper codes, not to sampled ones")
        for name in ("real_ratio", "prefix_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.soft_weight < 0 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("--soft-weight must be >= 0, --lr and --temperature > 0")
        if self.confidence_noise is not None and self.confidence_noise < 0:
            raise ValueError(f"--confidence-noise must be >= 0, got {self.confidence_noise}")
        if self.upper not in UPPER_SOURCES:
            raise ValueError(f"--upper must be one of {', '.join(UPPER_SOURCES)}, got {self.upper!r}")
        if self.upper == "sampled" and self.teacher != "bottom":
            raise ValueError("--upper sampled needs an upsampler above the teacher: only --teacher bottom has one")
        if self.input_layout not in ("tokens", "shifted"):
            raise ValueError(f"--input-layout must be tokens or shifted, got {self.input_layout!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"--mixed-precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")

    @property
    def level(self) -> int:
        return TEACHERS[self.teacher]

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def shard_dir(self) -> Path:
        return Path(self.shards_dir) if self.shards_dir else self.out_dir / "shards"

    def identity(self) -> dict:
        """Settings a resumed run must share with the checkpoint it continues."""
        keep = ("teacher", "model", "data", "steps", "shards", "shard_size", "batch_size", "lr", "min_lr_ratio",
                "warmup", "weight_decay", "grad_clip", "k", "temperature", "real_ratio", "soft_weight",
                "prefix_prob", "prefix_layout", "input_layout", "init_student", "upper", "on_policy_steps",
                "on_policy_divergence", "on_policy_lr", "seed")
        return {k: getattr(self, k) for k in keep}


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Learning rate of (0-based) ``step``: linear warmup, then cosine to ``min_lr_ratio * lr``
    (the schedule of ``fastjukebox.train.loop``); the on-policy steps after ``cfg.steps`` decay
    from ``on_policy_lr`` by the same cosine, without warmup."""
    if step >= cfg.steps:
        return cfg.on_policy_lr * lr_factor(step - cfg.steps, cfg.on_policy_steps, 0, cfg.min_lr_ratio)
    return cfg.lr * lr_factor(step, cfg.steps, min(cfg.warmup, cfg.steps), cfg.min_lr_ratio)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"distill-step:{seed}:{step}:{rank}".encode()))


# --------------------------------------------------------------------------------------------
# batches and losses
# --------------------------------------------------------------------------------------------

def make_batch(data: dict[str, torch.Tensor], batch_size: int, mask_id: int, g: torch.Generator, *,
               real_ratio: float, prefix_prob: float) -> dict[str, torch.Tensor]:
    """Draw ``batch_size`` windows and their masks.

    Returns ``inputs`` (B, n_ctx) with ``mask_id`` at masked positions, ``targets`` (B, n_ctx),
    ``mask`` (B, n_ctx) bool, ``teacher`` (B,) bool (True: teacher sample), ``prefix`` (B,) bool
    (True: the first half is visible and only the second half masked), ``upper``, ``labels``
    (or absent), ``topk_ids``/``topk_probs`` (B, n_ctx, k)."""
    S, n = data["codes"].shape
    idx = torch.randint(S, (batch_size,), generator=g)
    teacher = torch.rand(batch_size, generator=g) >= real_ratio
    targets = torch.where(teacher[:, None], data["codes"][idx], data["real"][idx])
    mask = sample_training_mask(batch_size, n, g)
    keep = n // 2
    suffix = torch.cat([torch.zeros(batch_size, keep, dtype=torch.bool),
                        sample_training_mask(batch_size, n - keep, g)], dim=1)
    prefix = torch.rand(batch_size, generator=g) < prefix_prob
    mask = torch.where(prefix[:, None], suffix, mask)
    out = dict(inputs=targets.masked_fill(mask, mask_id), targets=targets, mask=mask, teacher=teacher,
               prefix=prefix, upper=data["upper"][idx], topk_ids=data["topk_ids"][idx], topk_probs=data["topk_probs"][idx])
    if "labels" in data:
        out["labels"] = data["labels"][idx]
    return out


class DistillLoss(nn.Module):
    """Wraps the student so one forward (through DDP) computes conditioning, logits and losses.

    ``prefix_len`` > 0: examples whose first ``prefix_len`` positions are all visible (``prefix``
    rows of the batch) run under the prefix-cached layout with that prefix
    (``distill.prefix_layout``), the others with full bidirectional attention."""

    def __init__(self, student: nn.Module, soft_weight: float, prefix_len: int = 0, divergence: str = "reverse"):
        super().__init__()
        self.student, self.soft_weight, self.prefix_len = student, soft_weight, prefix_len
        self.divergence = divergence

    def _logits(self, inputs, cond, prefix):
        if not self.prefix_len:
            return self.student(inputs, cond)
        logits = None
        for rows, P in ((~prefix, 0), (prefix, self.prefix_len)):
            if not bool(rows.any()):
                continue
            sub = type(cond)(**{k: (v[rows] if torch.is_tensor(v) else v) for k, v in vars(cond).items()})
            part = self.student(inputs[rows], sub, prefix_len=P)
            if logits is None:
                logits = part.new_empty(inputs.shape[0], *part.shape[1:])
            logits[rows] = part
        return logits

    def forward(self, **batch):
        """Losses of a masked-token batch (``make_batch``), or of an on-policy batch
        (``on_policy.on_policy_batch``, which has ``teacher_logp``)."""
        return self._on_policy(**batch) if "teacher_logp" in batch else self._masked(**batch)

    def _on_policy(self, inputs, decided, teacher_logp, codes, prefix, upper, teacher_nll, labels=None):
        cond = self.student.condition(upper, labels)
        logits = self._logits(inputs, cond, prefix)                          # (B, n_ctx, V) fp32
        m = decided.float()
        div = (token_divergence(logits, teacher_logp, self.divergence) * m).sum() / m.sum().clamp(min=1.0)
        return dict(loss=div, div_bits=div.detach() * BITS, teacher_nll_bits=teacher_nll.mean().float())

    def _masked(self, inputs, targets, mask, teacher, upper, topk_ids, topk_probs, prefix, labels=None):
        cond = self.student.condition(upper, labels)
        logits = self._logits(inputs, cond, prefix)                          # (B, n_ctx, V) fp32
        logp = torch.log_softmax(logits, dim=-1)
        m = mask.float()
        nll = -logp.gather(-1, targets[..., None])[..., 0]                    # (B, n_ctx)
        ce = (nll * m).sum() / m.sum().clamp(min=1.0)
        acc = ((logits.argmax(-1) == targets).float() * m).sum() / m.sum().clamp(min=1.0)
        p = topk_probs / topk_probs.sum(-1, keepdim=True).clamp(min=1e-12)   # renormalised top-k
        soft_ce = -(p * logp.gather(-1, topk_ids)).sum(-1)                    # (B, n_ctx)
        kl_pos = soft_ce + (p * p.clamp(min=1e-12).log()).sum(-1)
        ms = m * teacher[:, None].float()
        denom = ms.sum().clamp(min=1.0)
        soft = (soft_ce * ms).sum() / denom
        loss = ce + self.soft_weight * soft if self.soft_weight else ce
        return dict(loss=loss, ce_bits=ce.detach() * BITS, soft_kl_bits=(kl_pos * ms).sum().detach() / denom * BITS,
                    acc=acc.detach())


# --------------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------------

# curves per panel of ``plot_metrics``: (log key, label); the learning rate goes on the second
# panel's right axis
STUDENT_PANELS = ([("ce_bits", "masked CE (bits/token)"), ("soft_kl_bits", "KL to teacher top-k (bits)")],
                  [("acc", "masked accuracy")])
ON_POLICY_PANEL = [("div_bits", "on-policy divergence (bits/token)"),
                   ("teacher_nll_bits", "teacher NLL of the student's samples (bits/token)")]


def plot_metrics(log: Path, png: Path, panels=None) -> Path | None:
    """Training curves of the JSONL log as a PNG (matplotlib, imported only here): ``panels`` a list
    of panels, each a list of (log key, label); default: the student's (``STUDENT_PANELS``, and
    ``ON_POLICY_PANEL`` when the log has on-policy rows). Writes nothing, with a warning, when a
    panel has none of its keys in the log (a plot of empty axes)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fastjukebox[plots]'): no plot written", file=sys.stderr)
        return None
    rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.exists() else []
    if not rows:
        return None
    if panels is None:
        panels = list(STUDENT_PANELS) + ([ON_POLICY_PANEL] if any("div_bits" in r for r in rows) else [])
    logged = set().union(*rows)
    for panel in panels:
        if not logged.intersection(key for key, _ in panel):
            print(f"warning: the log has none of {[key for key, _ in panel]}: no plot written", file=sys.stderr)
            return None

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for i, (ax, panel) in enumerate(zip(axes[0], panels)):
        for key, label in panel:
            ax.plot(*series(key), label=label)
        ax.set_xlabel("step"), ax.legend(loc="center right" if i == 1 else "best"), ax.grid(alpha=0.3)
        if i == 1:
            lr_axis = ax.twinx()
            lr_axis.plot(*series("lr"), color="gray", ls="--", label="lr")
            lr_axis.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png


def weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _choose_sampling(cfg: DistillConfig, prior, student, data: dict, result: dict) -> dict:
    """The student's sampler setting (``StudentSampling`` fields ``order``, ``confidence_noise``,
    ``temperature_scale``): ``cfg.confidence_noise`` as given, or the noise ``distill.tune`` picks
    on ``cfg.tune_windows`` shard windows (recorded in ``result["sampling_tune"]``) among every
    setting of ``TRAIN_GRID`` (orders, noises, temperature scales); ``python -m distill.tune``
    re-chooses the pass count too."""
    if cfg.confidence_noise is not None:
        return {"confidence_noise": float(cfg.confidence_noise)}
    from .tune import TRAIN_GRID, choose_sampling, describe, shard_windows
    dev = prior.device
    codes, upper, labels = (None if t is None else t.to(dev) for t in shard_windows(data, cfg.tune_windows,
                                                                                      cfg.seed + 2))
    if cfg.progress:
        print(f"[tune] choosing the sampler setting on {upper.shape[0]} shard windows ({cfg.passes} passes)",
              file=sys.stderr)
    setting, report = choose_sampling(prior, student, codes, upper, labels, passes=cfg.passes, grid=TRAIN_GRID,
                                      temperature=cfg.temperature, batch_size=cfg.gen_batch_size,
                                      seed=cfg.seed + 3,
                                      known=prior.config.n_ctx // 2 if cfg.prefix_layout else 0)
    result["sampling_tune"] = report
    if cfg.progress:
        print(f"[tune] teacher NLL of its own samples {report['teacher_nll_teacher']:.3f} bits; student: "
              + ", ".join(f"{describe(r)} -> {r['teacher_nll']:.3f}" for r in report["rows"])
              + f"; chosen {describe(setting)}", file=sys.stderr)
    return setting


class DistillTask:
    """The distillation as a task of ``fastjukebox.train.loop``: masked-token steps on the shards,
    then on-policy steps. The batch of ``step`` is drawn from a generator seeded by
    ``(seed, step, rank)``; the loss goes through the prepared (synchronising) ``DistillLoss``."""

    name = "student"

    def __init__(self, cfg: DistillConfig, student: nn.Module, prior, data: dict[str, torch.Tensor]):
        self.cfg, self.student, self.prior, self.data = cfg, student, prior, data
        prefix_len = prior.config.n_ctx // 2 if cfg.prefix_layout else 0
        self.model = DistillLoss(student, cfg.soft_weight, prefix_len, cfg.on_policy_divergence)
        self._forward, self._rank = self.model, 0

    def bind(self, model: nn.Module, accelerator) -> None:
        self._forward, self._rank = model, accelerator.process_index

    def lr_factor(self, step: int) -> float:
        return lr_at(step, self.cfg) / self.cfg.lr

    def loss(self, step: int, batch_size: int, device: torch.device):
        cfg, g = self.cfg, step_generator(self.cfg.seed, step, self._rank)
        if step < cfg.steps:
            batch = make_batch(self.data, batch_size, self.student.mask_id, g, real_ratio=cfg.real_ratio,
                               prefix_prob=cfg.prefix_prob)
        else:
            batch = on_policy_batch(self.student, self.prior, self.data, batch_size, g, passes=cfg.passes,
                                    prefix_prob=cfg.prefix_prob, prefix_cache=cfg.prefix_layout,
                                    confidence_noise=cfg.confidence_noise or 0.0, temperature=cfg.temperature)
        out = self._forward(**{k: v.to(device) for k, v in batch.items()})
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}

    def state_dict(self) -> dict:
        return {}                   # everything else is a function of the step

    def load_state_dict(self, sd: dict) -> None:
        pass

    def fingerprint(self) -> dict:
        return self.cfg.identity()


class InputError(ValueError):
    """A bad ``--model``, ``--data``, ``--init-student`` or ``--out``, found before anything is written."""


def train(cfg: DistillConfig) -> dict:
    """Generate teacher data, train the student, save it and (unless ``cfg.evaluate`` is False)
    evaluate it. Returns the summary (with the evaluation under ``"eval"``)."""
    from accelerate import Accelerator

    import fastjukebox as fj
    from .student import ParallelStudent, StudentSampling

    # cpu=True also makes several launched CPU processes one gloo group (accelerate only forms a
    # CPU process group when asked for the CPU)
    mixed_precision, cpu = _mixed_precision(cfg.mixed_precision), cfg.cpu or not torch.cuda.is_available()
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    end_at_exit()
    main = acc.is_main_process
    out = cfg.out_dir
    ckpt, log = out / CHECKPOINT_NAME, out / METRICS_NAME
    # the inputs first: a bad --model, --data, --init-student or --out creates nothing
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: a file, not a directory")
        jb = fj.load(cfg.model, device=acc.device)
        prior = jb.prior(cfg.level).eval()
        pieces = load_pieces(cfg.data, "train", jb.sr, limit=cfg.pieces)
        init = None if not cfg.init_student else ParallelStudent.load(cfg.init_student, device=acc.device)
        read_meta(cfg.shard_dir)           # shards of an earlier run: their settings file must be readable
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from None
    if not cfg.resume and ckpt.exists():
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    for p in jb.parameters():
        p.requires_grad_(False)

    # 1. teacher samples (every rank its own shards)
    gen = GenerationConfig(level=cfg.level, n_ctx=prior.config.n_ctx, shards=cfg.shards, shard_size=cfg.shard_size,
                           k=cfg.k, temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.gen_batch_size,
                           model=str(cfg.model),
                           data=str(cfg.data) if cfg.data else "demo-corpus", upper=cfg.upper)
    generate_shards(prior, jb.vqvae, pieces, cfg.shard_dir, gen, rank=acc.process_index,
                    world_size=acc.num_processes, progress=cfg.progress,
                    upper_prior=jb.prior(cfg.level + 1).eval() if cfg.upper == "sampled" else None)
    acc.wait_for_everyone()
    data = load_shards(cfg.shard_dir, expect=cfg.shards)     # corrupt shards were made again above
    del pieces

    # 2. student; 3. training (fastjukebox.train.loop): masked-token steps, then on-policy steps
    torch.manual_seed(cfg.seed)
    if init is not None:
        student = init.float().train()
        if student.config.to_dict() != prior.config.to_dict():
            raise ValueError(f"--init-student {cfg.init_student}: a student for another teacher "
                             f"(level {student.config.level}, not the level-{cfg.level} teacher's architecture)")
    else:
        student = ParallelStudent.from_teacher(prior, cfg.input_layout).float().train()
    t0 = time.time()
    run = train_loop(DistillTask(cfg, student, prior, data), TrainConfig(
        steps=cfg.steps + cfg.on_policy_steps, batch_size=cfg.batch_size, out_dir=str(out), run_dir=str(out),
        save_component=False, lr=cfg.lr, warmup_steps=min(cfg.warmup, cfg.steps), min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay, betas=(0.9, 0.95), clip=cfg.grad_clip, mixed_precision=mixed_precision,
        device="cpu" if cpu else None, seed=cfg.seed, checkpoint_every=cfg.ckpt_every, log_every=cfg.log_every,
        resume=cfg.resume, progress=cfg.progress), accelerator=acc)
    student.eval()

    # 4. outputs
    digest = torch.tensor([int(weights_digest(student)[:15], 16)], dtype=torch.int64, device=acc.device)
    digests = [f"{int(d):015x}" for d in acc.gather(digest).tolist()]
    summary = dict(config=asdict(cfg), steps=cfg.steps, on_policy_steps=cfg.on_policy_steps,
                   resumed_from=run.resumed_from, world_size=acc.num_processes, rank_weight_digests=digests, windows=int(data["codes"].shape[0]),
                   train_seconds=round(time.time() - t0, 3), device=str(acc.device))
    result = summary
    if main:
        # the prefix layout has to be on while the noise is measured on hopped windows
        student.sampling = StudentSampling(passes=cfg.passes, prefix_cache=cfg.prefix_layout)
        student.sampling = StudentSampling(**_choose_sampling(cfg, prior, student, data, result),
                                            passes=cfg.passes, prefix_cache=cfg.prefix_layout)
        student.save(out / "student")
        plot_metrics(log, out / "metrics.png")
        if cfg.evaluate:
            from .evaluate import evaluate
            result["eval"] = evaluate(jb, student, data=cfg.data, windows=cfg.eval_windows,
                                      batch_size=cfg.gen_batch_size, seed=cfg.seed + 1, out=out / "eval",
                                      progress=cfg.progress, upper=cfg.upper)
        with atomic_path(out / "train_summary.json") as tmp:
            tmp.write_text(json.dumps(result, indent=1, default=str))
    acc.wait_for_everyone()
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, choices=sorted(TEACHERS),
                   help="upsampler to distil: middle (level 1) or bottom (level 0)")
    p.add_argument("--model", default="demo", help="model directory or bundled name")
    p.add_argument("--data", default=None, help="directory of audio files (default: the demo corpus)")
    p.add_argument("--pieces", type=int, default=24,
                   help="how many source pieces to encode (demo corpus: chorales; 0: all)")
    p.add_argument("--out", default="distill-run", help="run directory")
    p.add_argument("--shards-dir", default=None, help="teacher-sample shards (default: OUT/shards)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"masked-token training steps (default: {DEFAULTS['middle']['steps']} for middle, "
                        f"{DEFAULTS['bottom']['steps']} for bottom)")
    p.add_argument("--shards", type=int, default=None,
                   help=f"number of teacher-sample shards (default: {DEFAULTS['middle']['shards']})")
    p.add_argument("--shard-size", type=int, default=None,
                   help=f"windows per shard (default: {DEFAULTS['middle']['shard_size']})")
    p.add_argument("--batch-size", type=int, default=16, help="training windows per step")
    p.add_argument("--gen-batch-size", type=int, default=16, help="windows sampled together by the teacher")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="learning rate at the end of the cosine decay, as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warmup")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    p.add_argument("--k", type=int, default=8, help="top-k soft targets stored per position")
    p.add_argument("--temperature", type=float, default=1.0, help="teacher sampling temperature")
    p.add_argument("--real-ratio", type=float, default=None,
                   help="fraction of examples on real codes (default: 0.25; 0 with --upper sampled)")
    p.add_argument("--soft-weight", type=float, default=0.25, help="weight of the top-k KL (0: off)")
    p.add_argument("--prefix-prob", type=float, default=0.25, help="chance of keeping the first half visible")
    p.add_argument("--no-prefix-layout", dest="prefix_layout", action="store_false",
                   help="train full bidirectional attention only (default: prefix examples train the "
                        "prefix-cached layout)")
    p.add_argument("--input-layout", choices=("tokens", "shifted"), default=None,
                   help="what a position's input holds: its own code or mask (tokens), or its left neighbour's "
                        "(shifted, as the teacher's input) (default: shifted for bottom, tokens for middle; an "
                        "--init-student keeps its own)")
    p.add_argument("--init-student", default=None,
                   help="start from this student directory (e.g. a shipped one) instead of the teacher's weights "
                        "(default: the teacher's weights)")
    p.add_argument("--upper", choices=UPPER_SOURCES, default=None,
                   help="the training windows' upper codes: real (the encoding) or sampled by the upper teacher from "
                        "the real codes two levels up, the conditioning of a user's upsample (bottom only); the final "
                        "evaluation uses the same (default: sampled for bottom, real for middle)")
    p.add_argument("--on-policy-steps", type=int, default=0,
                   help="on-policy steps after the masked-token steps: the student samples windows, the teacher "
                        "scores them (distill.on_policy)")
    p.add_argument("--on-policy-divergence", choices=DIVERGENCES, default="reverse",
                   help="the on-policy loss at the positions a pass made final: reverse KL(student || teacher) "
                        "or forward KL(teacher || student)")
    p.add_argument("--on-policy-lr", type=float, default=1e-4,
                   help="peak learning rate of the on-policy steps (cosine decay, no warmup)")
    p.add_argument("--seed", type=int, default=0, help="seed of the teacher samples, batches and masks")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (OUT/checkpoint.pt)")
    p.add_argument("--log-every", type=int, default=10, help="steps between lines of OUT/metrics.jsonl")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="accelerate's mixed precision (auto: bf16 on a GPU that has it, else fp16 on a GPU, none on a CPU)")
    p.add_argument("--resume", action="store_true",
                   help="continue OUT/checkpoint.pt (default: refuse an --out that holds one). Shards are "
                        "always kept when complete and made again when corrupt")
    p.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="skip the final evaluation (default: evaluate into OUT/eval)")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of the final evaluation")
    p.add_argument("--passes", type=int, default=DEFAULT_PASSES,
                   help="decoding passes per window: saved with the student (sampling.json), used by the noise "
                        "choice, the evaluation and sampling")
    p.add_argument("--confidence-noise", type=float, default=None,
                   help="the student's unmasking noise (default: chosen on shard windows after training)")
    p.add_argument("--tune-windows", type=int, default=16, help="shard windows the noise is chosen on")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (default: shown)")
    p.add_argument("--cpu", action="store_true",
                   help="train on the CPU even when a GPU is present (default: the GPU when there is one)")
    return p


def run_training(args: argparse.Namespace, make_config, run) -> tuple[int, dict | None]:
    """A training command's body: ``make_config(**vars(args))`` (``--pieces 0``: every piece), then
    ``run(config)``. Returns ``(0, result)``, or ``(2, None)`` for bad input (named before the run
    directory is created) and ``(1, None)`` for bad data or a mismatched resume, the error printed."""
    try:
        if args.pieces == 0:
            args.pieces = None
        cfg = make_config(**vars(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    try:
        return 0, run(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1, None


def main(argv: list[str] | None = None) -> int:
    code, result = run_training(build_parser().parse_args(argv), DistillConfig, train)
    if result is not None and "eval" in result:
        from .evaluate import format_markdown
        print(format_markdown(result["eval"]))
    return code


if __name__ == "__main__":
    sys.exit(main())
