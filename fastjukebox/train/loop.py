"""The project's one training loop: the VQ-VAE, the priors and any other ``TrainTask``.

A *task* (``VQVAETask``, ``PriorTask``, or any object with the ``TrainTask`` attributes) owns the
model, its data and any state outside the module (the codebook EMA); the loop owns optimisation
and bookkeeping:

* ``accelerate.Accelerator`` for device placement, mixed precision (``"no"``, ``"bf16"``,
  ``"fp16"``), gradient clipping and several processes (``accelerate launch``: gradients are
  synchronised, metrics averaged over the processes, only the main process writes);
* AdamW with linear warm-up and cosine decay to ``min_lr_ratio * lr`` (or the task's own
  ``lr_factor(step)``), a function of the optimiser step whatever the number of processes;
* progress with the ETA and current loss (``fastjukebox.progress``: tqdm on a terminal, lines in a
  log), metrics appended to ``metrics.jsonl``;
* periodic checkpoints ``checkpoint.pt`` (model, optimizer, scheduler, task state, RNG states,
  step), written atomically and read back with ``torch.load(weights_only=True)``, plus the
  component directory (``config.json`` + ``model.safetensors``) after each checkpoint.

Batches are functions of ``(seed, step)``, so ``resume=True`` after an interruption ends, on the
CPU, with the same weights bit for bit as an uninterrupted run of the same configuration.

Run directory layout (``out_dir``)::

    <task.name>/              component directory (fastjukebox.load_vqvae / load_prior, fastjukebox.load)
    train_<task.name>/checkpoint.pt
    train_<task.name>/metrics.jsonl

(``TrainConfig.run_dir`` puts the checkpoint and the log elsewhere; ``save_component=False``
leaves the component directory to the caller.)

Optional task hooks: ``bind(model, accelerator)`` is called once with the prepared module (the
one whose forward synchronises gradients across processes) before the first step;
``lr_factor(step)`` replaces the warm-up + cosine multiplier of the base ``lr``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from ..atomic import atomic_path
from ..checkpoint import CheckpointError, save_component
from ..process_group import end_at_exit
from ..progress import progress_bar

__all__ = ["TrainConfig", "TrainTask", "TrainResult", "train", "lr_factor", "read_checkpoint", "trim_log",
           "json_safe", "CHECKPOINT_NAME", "METRICS_NAME"]

CHECKPOINT_NAME, METRICS_NAME = "checkpoint.pt", "metrics.jsonl"
_FORMAT = "fastjukebox-train-1"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    out_dir: str
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1          # cosine decays to this fraction of lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0                  # max gradient norm; 0 disables clipping
    mixed_precision: str = "no"        # "no" | "bf16" | "fp16"
    device: str | None = None          # None: accelerate's choice; "cpu" forces the CPU
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    resume: bool = False
    stop_at: int | None = None         # stop (after a checkpoint) at this step; resume continues
    progress: bool = True
    progress_position: int | None = None  # tqdm line (several trainings sharing one terminal)
    run_dir: str | None = None         # checkpoint and metrics log; None: out_dir/train_<task.name>
    save_component: bool = True        # write the component directory out_dir/<task.name> at checkpoints

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ValueError(f"stop_at must be in [1, steps={self.steps}], got {self.stop_at}")

    def fingerprint(self) -> dict[str, Any]:
        """Fields a resumed run must share with the checkpoint to continue the same run."""
        keep = ("steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "betas", "clip",
                "mixed_precision", "seed")
        d = dataclasses.asdict(self)
        return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in keep}


class TrainTask(Protocol):
    """What the loop trains. ``loss(step)`` draws the batch of ``step`` itself (a function of
    the seed and the step) and runs the forward pass, including any non-gradient updates."""

    name: str
    model: nn.Module

    def loss(self, step: int, batch_size: int, device: torch.device
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> None: ...

    def fingerprint(self) -> dict[str, Any]: ...


@dataclass
class TrainResult:
    step: int
    resumed_from: int                  # the checkpoint's step the run continued from; 0: a fresh run
    loss: float
    component_dir: Path
    checkpoint: Path
    metrics_log: Path
    steps_per_second: float
    finished: bool


def json_safe(d):
    """Tuples -> lists, recursively (fingerprints are compared after a JSON round trip)."""
    if isinstance(d, dict):
        return {k: json_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [json_safe(v) for v in d]
    return d


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(max((step - warmup) / max(steps - warmup, 1), 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", cfg.mixed_precision)) != cfg.mixed_precision:
        # accelerate keeps one process-wide state; a second run in the same process (the demo
        # builder trains four models) may ask for another precision.
        AcceleratorState._reset_state(True)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
    end_at_exit()
    return acc


def _rng_state() -> dict[str, Any]:
    """Global torch RNG states. The tasks draw their own randomness from generators seeded by
    ``(seed, step)``; these are kept for any module that uses the global generator."""
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint, read with ``weights_only=True``; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training checkpoint there")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable training checkpoint (truncated or corrupt: "
                              f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); delete it "
                              f"to start over, or run without resume") from None
    if not isinstance(ck, dict) or ck.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a fastjukebox training checkpoint (format "
                              f"{ck.get('format') if isinstance(ck, dict) else type(ck).__name__!r})")
    missing = [k for k in ("step", "model", "optimizer", "scheduler", "task", "rng", "config") if k not in ck]
    if missing:
        raise CheckpointError(f"{path}: training checkpoint lacks {', '.join(missing)}")
    return ck


def _check_compatible(ck: dict[str, Any], task: TrainTask, cfg: TrainConfig, path: Path) -> None:
    want = {"train": cfg.fingerprint(), "task": task.fingerprint()}
    have = json.loads(ck["config"])
    diffs = []
    for part in ("train", "task"):
        a, b = have.get(part, {}), want[part]
        diffs += [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if a.get(k) != b.get(k)]
    if diffs:
        raise CheckpointError(f"{path} belongs to a different run ({'; '.join(diffs[:4])}); resume with the "
                              f"same settings or use another out_dir")


def _save_checkpoint(path: Path, step: int, model, opt, sched, task, cfg: TrainConfig) -> None:
    rng = _rng_state()
    ck = {"format": _FORMAT, "step": step,
          "config": json.dumps({"train": cfg.fingerprint(), "task": task.fingerprint()}),
          "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
          "task": task.state_dict(), "rng": rng}
    with atomic_path(path) as tmp:
        torch.save(ck, tmp)


def trim_log(log: Path, step: int) -> None:
    """Keep only the log lines of steps <= ``step`` (those after the checkpoint are redone)."""
    if not log.exists():
        return
    keep = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
    with atomic_path(log) as tmp:
        tmp.write_text("".join(l + "\n" for l in keep), encoding="utf-8")


def _scalar(v) -> float:
    return float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)


def _averaged(acc, values: dict[str, Any]) -> dict[str, float]:
    """Scalars of this step, averaged over the processes (one collective call)."""
    names = list(values)
    t = torch.tensor([_scalar(values[k]) for k in names], dtype=torch.float32, device=acc.device)
    if acc.num_processes > 1:
        t = acc.reduce(t, reduction="mean")
    return dict(zip(names, t.tolist()))


def train(task: TrainTask, cfg: TrainConfig, accelerator=None) -> TrainResult:
    """Train ``task.model`` for ``cfg.steps`` optimiser steps (see the module docstring);
    ``accelerator``: an ``accelerate.Accelerator`` the caller already made (else one from ``cfg``)."""
    out = Path(cfg.out_dir)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else out / f"train_{task.name}"
    ck_path, log_path, comp_dir = run_dir / CHECKPOINT_NAME, run_dir / METRICS_NAME, out / task.name

    acc = accelerator if accelerator is not None else _accelerator(cfg)
    main = acc.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
    factor = getattr(task, "lr_factor", None) or (lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    # the scheduler stays unprepared: accelerate's wrapper steps it once per process at each step
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    if hasattr(task, "bind"):
        task.bind(model, acc)

    start = 0
    if cfg.resume and ck_path.exists():
        ck = read_checkpoint(ck_path)
        _check_compatible(ck, task, cfg, ck_path)
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        task.load_state_dict(ck["task"])
        _set_rng_state(ck["rng"])
        start = int(ck["step"])
        if main:
            trim_log(log_path, start)
            print(f"resuming {ck_path} at step {start}/{cfg.steps}", file=sys.stderr)
    elif not cfg.resume and main:
        for p in (ck_path, log_path):
            if p.exists():
                p.unlink()
    acc.wait_for_everyone()

    end = cfg.steps if cfg.stop_at is None else cfg.stop_at
    model.train()
    loss_val, t0, done = float("nan"), time.perf_counter(), 0
    bar = progress_bar(cfg.steps, f"train {task.name}", "step", enabled=cfg.progress and main, initial=start,
                       position=cfg.progress_position)
    with open(log_path, "a", encoding="utf-8") if main else contextlib.nullcontext() as log:
        for step in range(start, end):
            with acc.autocast():
                loss, metrics = task.loss(step, cfg.batch_size, acc.device)
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(params, cfg.clip) if cfg.clip > 0 else None
            lr = sched.get_last_lr()[0]                      # this step's
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            loss_val = _scalar(loss)
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"{task.name}: loss is {loss_val} at step {step + 1}; lower lr "
                                         f"(now {cfg.lr}) or check the data")
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4g}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == end:
                rec = _averaged(acc, {"loss": loss, **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                                      **metrics})
                rec = {"step": step + 1, **rec, "lr": lr, "time": round(time.perf_counter() - t0, 3)}
                if main:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                if main:
                    _save_checkpoint(ck_path, step + 1, raw, opt, sched, task, cfg)
                    if cfg.save_component:
                        save_component(raw, comp_dir)
                acc.wait_for_everyone()
    bar.close()
    if main and cfg.save_component and start >= end and not comp_dir.exists():
        save_component(raw, comp_dir)
    elapsed = time.perf_counter() - t0
    model.eval()
    return TrainResult(step=max(end, start), resumed_from=start, loss=loss_val, component_dir=comp_dir,
                       checkpoint=ck_path, metrics_log=log_path, steps_per_second=done / elapsed if elapsed > 0 else 0.0,
                       finished=max(end, start) >= cfg.steps)
