"""Choosing a student's sampler settings (``StudentSampling``) on validation windows.

A setting is an unmasking order, a choice noise and a temperature scale. How much choice noise
confidence-based unmasking needs depends on the teacher: with a flat teacher (high entropy per
token) ranking by probability alone gives samples far *more* likely than the teacher's own, and
noise brings them back; with a sharp teacher the same noise lets incoherent tokens in early and
samples become far *less* likely. A student whose per-position marginals are flatter than the
teacher's conditionals (tokens of one pass are drawn independently, so their joint is flatter
still) wants a temperature scale below 1; a teacher with strong local structure may prefer the
``"spread"`` order, which never decodes neighbours in one pass.
``choose_sampling`` lets the student sample windows with every setting of a grid and keeps the
one with the smallest sum of two distances to the teacher's own samples of the same windows: the
relative gap of their teacher NLL (bits/token) and the total variation between their code
histograms. Two criteria, so that the choice is not the evaluation's NLL ratio matched alone
(a sharper temperature lowers the NLL and moves the histogram towards the popular codes); with
``known`` > 0 the windows are hopped ones (their first ``known`` codes are the teacher's, the
rest is sampled and scored), the setting of every window of a level but the first.
``distill.train`` runs it after training on windows of the teacher-sample shards (train data, not
the held-out windows of ``distill.evaluate``), whose teacher samples are already there, and saves
the choice with the student.

``choose_passes`` picks the pass count the same way, by a rule fixed before any number is seen:
for each candidate K, smallest first, the setting is chosen as above; the first K whose chosen
setting keeps the teacher NLL within ``max_gap`` (relative) of the teacher's own samples and uses
at least ``min_usage`` of the codes the teacher's samples use is taken (none: the largest K).
Fewer passes are faster; the rule says how much fidelity may be given for it, on training windows.

    python -m distill.tune --teacher middle --student DIR --shards DIR [--passes 1 2 4] [--write]

re-chooses an existing student's pass count and setting on a shard directory (``distill.train``'s
``OUT/shards``), prints the table, writes ``DIR/tune.json`` and with ``--write`` the student's
``sampling.json``.
"""
from __future__ import annotations

import torch

from .data import sample_windows
from .metrics import code_histogram, codebook_usage, histogram_tv, teacher_scores
from .sampler import ParallelWindowSampler
from .student import DEFAULT_PASSES, TEACHERS, StudentSampling

__all__ = ["choose_sampling", "choose_passes", "teacher_reference", "shard_windows", "sampling_grid",
           "NOISE_GRID", "TEMPERATURE_GRID", "PASSES_GRID", "TRAIN_GRID"]

NOISE_GRID = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
TEMPERATURE_GRID = (1.0, 0.85, 0.7)
PASSES_GRID = (1, 2, 4)
MAX_GAP = 0.05           # choose_passes: relative teacher-NLL gap allowed
MIN_USAGE = 0.95         # choose_passes: share of the teacher's used codes the student must use
BATCH_SIZE = 16          # windows scored / sampled together
SETTING_KEYS = ("order", "confidence_noise", "temperature_scale")


def sampling_grid(noise=NOISE_GRID, temperature_scale=TEMPERATURE_GRID, orders=("confidence", "spread")) -> list[dict]:
    """The settings ``choose_sampling`` tries: confidence order with every noise and temperature
    scale, each fixed order (spread; random if asked: no ranking, so no noise) with every
    temperature scale."""
    grid = []
    for order in orders:
        for t in temperature_scale:
            for n in (noise if order == "confidence" else (0.0,)):
                grid.append({"order": order, "confidence_noise": float(n), "temperature_scale": float(t)})
    return grid


# what ``distill.train`` chooses among after training: every setting of the grid (confidence order
# with every noise and temperature scale, spread order with every temperature scale)
TRAIN_GRID = tuple(sampling_grid())


def describe(setting: dict) -> str:
    """A setting in a few words, for tables and logs."""
    noise = f", noise {setting['confidence_noise']:g}" if setting["order"] == "confidence" else ""
    return f"{setting['order']}{noise}, temperature x{setting['temperature_scale']:g}"


@torch.no_grad()
def teacher_reference(prior, teacher_codes: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor | None,
                      batch_size: int, known: int) -> tuple[float, list[int], int]:
    """What the student's samples are compared with: the teacher NLL (bits/token) of its own samples
    after ``known`` codes, their code histogram and the number of codes they use."""
    target, _ = teacher_scores(prior, teacher_codes, upper, labels, min(batch_size, upper.shape[0]), start=known)
    new = teacher_codes[:, known:]
    return target, code_histogram(new, prior.config.l_bins), codebook_usage(new)


def shard_windows(data: dict, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``n`` windows of loaded shards (``distill.data.load_shards``) drawn with ``seed``: their
    teacher codes, upper codes and labels (None without labels)."""
    n = min(n, data["upper"].shape[0])
    idx = torch.randperm(data["upper"].shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return data["codes"][idx], data["upper"][idx], (data["labels"][idx] if "labels" in data else None)


@torch.no_grad()
def choose_sampling(prior, student, teacher_codes: torch.Tensor, upper: torch.Tensor,
                    labels: torch.Tensor | None, *, passes: int = DEFAULT_PASSES, grid=None,
                    temperature: float = 1.0, batch_size: int = BATCH_SIZE, seed: int = 0,
                    known: int = 0, reference: tuple | None = None) -> tuple[dict, dict]:
    """Returns ``(setting, report)``: ``setting`` holds ``order``, ``confidence_noise`` and
    ``temperature_scale`` (``StudentSampling`` fields); ``report``: ``teacher_nll_teacher``,
    ``known`` and per grid setting its fields and ``{"teacher_nll", "relative_gap",
    "histogram_tv", "score", "codes_used"}`` (rows in grid order; ``score`` = relative_gap +
    histogram_tv, the smallest is chosen).

    teacher_codes: the teacher's own samples of the windows (S, n_ctx), at ``temperature``;
    upper, labels: the windows' conditioning, (S, n_ctx // cond_downsample) and (S, label_len) or None;
    grid: settings (dicts with the three fields; default ``sampling_grid()``);
    reference: ``teacher_reference(...)`` of these windows when the caller already has it."""
    grid = sampling_grid() if grid is None else [dict(g) for g in grid]
    if not grid:
        raise ValueError("the settings grid is empty")
    for g in grid:
        if sorted(g) != sorted(SETTING_KEYS):
            raise ValueError(f"a grid setting must have exactly the fields {', '.join(SETTING_KEYS)}, got {g}")
        StudentSampling(**g)           # named errors for bad values
    if upper.shape[0] < 1:
        raise ValueError("no validation windows")
    if teacher_codes.shape[0] != upper.shape[0]:
        raise ValueError(f"{teacher_codes.shape[0]} teacher samples for {upper.shape[0]} windows")
    dev = prior.device
    n_ctx = prior.config.n_ctx
    bs = min(batch_size, upper.shape[0])
    if not 0 <= known < n_ctx:
        raise ValueError(f"known must be in [0, n_ctx={n_ctx}), got {known}")
    target, hist_teacher, used_teacher = reference or teacher_reference(prior, teacher_codes, upper, labels, bs, known)
    prefix = teacher_codes[:, :known] if known else None
    gen = torch.Generator(device=dev)
    rows = []
    for setting in grid:
        sampler = ParallelWindowSampler(student, passes=passes, temperature_anneal=False, **setting)
        gen.manual_seed(seed)
        z = sample_windows(sampler, n_ctx, upper, labels, temperature=temperature, batch_size=bs, generator=gen,
                           device=dev, known=prefix)
        nll, _ = teacher_scores(prior, z, upper, labels, bs, start=known)
        gap = abs(nll - target) / target
        tv = histogram_tv(code_histogram(z[:, known:], prior.config.l_bins), hist_teacher)
        used = codebook_usage(z[:, known:])
        rows.append({**setting, "teacher_nll": nll, "relative_gap": gap, "histogram_tv": tv,
                     "score": gap + tv, "codes_used": used})
    best = min(rows, key=lambda r: r["score"])
    return {k: best[k] for k in SETTING_KEYS}, {
        "teacher_nll_teacher": target, "passes": passes, "known": known, "windows": int(upper.shape[0]),
        "rows": rows, "codes_used_teacher": used_teacher,
        "criterion": "relative teacher-NLL gap + code-histogram TV"}


def choose_passes(prior, student, teacher_codes: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor | None,
                  *, candidates=PASSES_GRID, max_gap: float = MAX_GAP, min_usage: float = MIN_USAGE,
                  batch_size: int = BATCH_SIZE, known: int = 0, **kwargs) -> tuple[int, dict, dict]:
    """``(passes, setting, report)`` by the module's rule; ``batch_size``, ``known`` and ``kwargs`` go
    to ``choose_sampling`` (``passes`` excepted). ``report["by_passes"]`` holds each candidate's
    report."""
    cands = sorted({int(k) for k in candidates})
    if not cands or cands[0] < 1:
        raise ValueError(f"pass-count candidates must be integers >= 1, got {list(candidates)}")
    reference = teacher_reference(prior, teacher_codes, upper, labels, batch_size, known)
    reports, chosen = [], None
    for k in cands:
        setting, rep = choose_sampling(prior, student, teacher_codes, upper, labels, passes=k, batch_size=batch_size,
                                       known=known, reference=reference, **kwargs)
        best = next(r for r in rep["rows"] if all(r[f] == setting[f] for f in SETTING_KEYS))
        rep["meets"] = best["relative_gap"] <= max_gap and best["codes_used"] >= min_usage * rep["codes_used_teacher"]
        reports.append(rep)
        if rep["meets"]:
            chosen = (k, setting)
            break
    if chosen is None:                  # no candidate meets the rule: the most passes, its setting
        best = min(reports[-1]["rows"], key=lambda r: r["score"])
        chosen = (cands[-1], {f: best[f] for f in SETTING_KEYS})
    return chosen[0], chosen[1], {"by_passes": reports, "max_gap": max_gap, "min_usage": min_usage,
                                  "rule": "smallest K whose chosen setting keeps the relative teacher-NLL "
                                          f"gap <= {max_gap} and uses >= {min_usage:.0%} of the teacher's codes"}


def build_parser():
    import argparse
    from pathlib import Path

    from fastjukebox.cli_options import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m distill.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, choices=sorted(TEACHERS),
                   help="the student's teacher: middle (level 1) or bottom (level 0)")
    p.add_argument("--model", default="demo", help="family holding the teacher")
    p.add_argument("--student", required=True, type=Path, help="student directory")
    p.add_argument("--shards", required=True, type=Path, help="teacher-sample shards (training data)")
    p.add_argument("--passes", type=int, nargs="+", default=list(PASSES_GRID),
                   help="candidate decoding passes per window")
    p.add_argument("--windows", type=int, default=16, help="shard windows to choose on")
    p.add_argument("--seed", type=int, default=0, help="seed of the window choice and of the student's samples")
    p.add_argument("--temperature", type=float, default=1.0, help="the shards' sampling temperature")
    p.add_argument("--out", type=Path, default=Path("tune.json"), help="where the report goes (JSON)")
    p.add_argument("--write", action="store_true",
                   help="save the choice in the student's sampling.json (default: the report only)")
    return p


def _run(args) -> int:
    import json
    import sys
    from dataclasses import asdict, replace

    import fastjukebox as fj
    from fastjukebox.atomic import atomic_path, check_target
    from fastjukebox.settings import check_count
    from .data import load_shards
    from .student import SAMPLING_NAME, ParallelStudent

    for k in args.passes:
        check_count(k, "--passes")
    check_count(args.windows, "--windows")
    for name, path in (("--student", args.student), ("--shards", args.shards)):
        if not path.is_dir():
            raise ValueError(f"{name} {path}: no such directory; run python -m distill.train first (its --out "
                             f"holds student/ and shards/)")
    check_target(args.out, "--out")
    prior = fj.load(args.model).prior(TEACHERS[args.teacher])
    student = ParallelStudent.load(args.student)
    if student.config.level != prior.config.level:
        raise ValueError(f"{args.student} is a level-{student.config.level} student; --teacher {args.teacher} "
                         f"is level {prior.config.level}")
    codes, upper, labels = shard_windows(load_shards(args.shards), args.windows, args.seed + 2)
    n = upper.shape[0]
    known = prior.config.n_ctx // 2 if student.sampling.prefix_cache else 0
    passes, setting, report = choose_passes(prior, student, codes, upper, labels,
                                            candidates=args.passes, temperature=args.temperature,
                                            seed=args.seed + 3, known=known)
    for rep in report["by_passes"]:
        for r in rep["rows"]:
            print(f"K={rep['passes']} {describe(r)}: teacher NLL {r['teacher_nll']:.3f} "
                  f"(teacher {rep['teacher_nll_teacher']:.3f}), gap {r['relative_gap']:.3f}, "
                  f"histogram TV {r['histogram_tv']:.3f}, codes {r['codes_used']}/{rep['codes_used_teacher']}")
        print(f"K={rep['passes']}: {'meets' if rep['meets'] else 'does not meet'} the rule")
    print(f"chosen: {passes} passes, {describe(setting)} ({report['rule']}; {n} shard windows, {known} codes known)")
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps({"student": str(args.student), "shards": str(args.shards), "passes": passes,
                                   **setting, **report}, indent=1) + "\n")
    if args.write:                      # only the settings file: the weights stay as they are
        settings = replace(student.sampling, passes=passes, **setting)
        with atomic_path(args.student / SAMPLING_NAME) as tmp:
            tmp.write_text(json.dumps(asdict(settings), indent=1))
        print(f"wrote {args.student / SAMPLING_NAME}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Bad input is one line on stderr and exit status 2."""
    from fastjukebox.cli_options import run_command
    return run_command(_run, build_parser().parse_args(argv), "python -m distill.tune")


if __name__ == "__main__":
    raise SystemExit(main())
