"""Speed report: seconds to render one minute of audio, per level and end to end, per sampler.

    python -m benchmarks.report                    # CPU, the demo model family, batches 1 and 16
    python -m benchmarks.report --quick            # tiny model, few tokens and rounds (CI; < 3 min)
    python -m benchmarks.report --device cuda      # + released sizes (random weights), bf16

Writes ``<out-dir>/<device>-<date>[-quick].{json,md,png}``. For every model family ("subject":
the bundle named by ``--model``, and on CUDA the released architectures with random weights) and
batch size it times, in one process:

* autoregressive sampling of a level's window in steady state (``known = n_ctx - hop`` codes
  primed, untimed), ``--ar-tokens`` new tokens with ``ours`` (static-cache ``WindowDecoder``; on
  CUDA its attention runs in the Triton kernels) and ``original_style`` (the original's loop);
  and the window set-up (conditioning + priming the known codes, timed apart with ``ours``);
* one whole window of the parallel student at ``--passes`` (8 and 16) for each upsampler level;
* VQ-VAE decoding of level-0 codes.

It then extrapolates: tokens per minute at a level are ``60 * sr / hop_length(level)``; an
autoregressive level takes ``tokens_per_minute / tokens_per_s + windows_per_minute * set-up``, a
student level ``windows_per_minute * seconds_per_window`` (windows hop ``hop_fraction * n_ctx``
codes), decoding ``seconds * 60 / seconds_decoded``. End to end is the sum over levels plus
decoding; the parallel samplers keep the autoregressive top level (``ours``).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from fastjukebox.progress import progress_bar  # noqa: E402

from fastjukebox.atomic import atomic_path  # noqa: E402
from fastjukebox.settings import DEFAULT_TEMPERATURE  # noqa: E402

from .report_cases import (ar_runner, decode_runner, geometry, hbm_bandwidth, measure,  # noqa: E402
                           roofline_tokens_per_s, setup_runner, student_runner)
from .report_render import markdown, plot  # noqa: E402
from .sampling_speed import machine, source_version  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "fastjukebox-speed-report/1"
RELEASED = {2: "prior_5b", 1: "upsampler_level_1", 0: "upsampler_level_0"}

@dataclass
class Subject:
    """A model family to time: VQ-VAE, a prior per level, a student per upsampler level."""

    name: str
    vqvae: torch.nn.Module
    priors: dict
    students: dict
    untrained_students: list = field(default_factory=list)
    random_weights: bool = False


def load_bundle(name: str, device: str, dtype: torch.dtype) -> Subject:
    """The bundle ``name`` (``fastjukebox.load``), with an untrained student built from the teacher
    for every upsampler level that has none (speed does not depend on the weights)."""
    import fastjukebox
    from fastjukebox.checkpoint import CheckpointError
    try:
        jb = fastjukebox.load(name, device=device, dtype=dtype)
    except CheckpointError as e:
        raise SystemExit(f"error: cannot load model {name!r} ({e}); pass --model tiny (bundled) or a model "
                         f"directory") from None
    jb.eval().requires_grad_(False)
    priors = {level: jb.prior(level) for level in jb.levels}
    students, untrained = {}, []
    top = jb.vqvae.config.levels - 1
    for level in priors:
        if level == top:
            continue
        if str(level) in jb.students:
            students[level] = jb.student(level)
        else:
            from distill.student import ParallelStudent
            students[level] = ParallelStudent.from_teacher(priors[level]).eval().requires_grad_(False)
            untrained.append(level)
    return Subject(name, jb.vqvae, priors, students, untrained)


def released_subject(device: str, dtype: torch.dtype) -> Subject:
    """The released architectures (``prior_5b``, both upsamplers, the VQ-VAE) with random weights."""
    from distill.student import ParallelStudent
    from fastjukebox.config import get_preset
    from fastjukebox.prior import Prior
    from fastjukebox.vqvae import VQVAE
    torch.manual_seed(0)
    with torch.device(device):
        vqvae = VQVAE.from_preset("vqvae").to(dtype)
        priors = {level: Prior(get_preset(name)).to(dtype) for level, name in RELEASED.items()}
        students = {level: ParallelStudent(priors[level].config).to(dtype) for level in (1, 0)}
    for m in (vqvae, *priors.values(), *students.values()):
        m.eval().requires_grad_(False)
    return Subject("released", vqvae, priors, students, [0, 1], random_weights=True)


@dataclass(frozen=True)
class Job:
    """One measurement: kind ``ar`` / ``setup`` / ``student`` / ``decode``."""

    subject: str
    batch: int
    kind: str
    sampler: str
    level: int | None = None
    passes: int | None = None

    @property
    def key(self) -> str:
        return "/".join(str(x) for x in (self.subject, self.batch, self.kind, self.sampler, self.level, self.passes))


def plan(subject: Subject, batches, passes, skip_original=False) -> list[Job]:
    jobs = []
    for b in batches:
        for level in sorted(subject.priors, reverse=True):
            jobs.append(Job(subject.name, b, "setup", "ours", level))
            methods = ["ours"]
            if not skip_original and subject.priors[level].config.lyrics is None:
                methods.insert(0, "original_style")
            jobs += [Job(subject.name, b, "ar", m, level) for m in methods]
            if level in subject.students:
                jobs += [Job(subject.name, b, "student", "parallel", level, k) for k in passes]
        jobs.append(Job(subject.name, b, "decode", "vqvae"))
    return jobs


def run_job(job: Job, subject: Subject, args, device: torch.device) -> dict:
    """Time one job and turn it into seconds per minute of audio (for all ``batch`` samples)."""
    b = job.batch
    if job.kind == "decode":
        hop0 = subject.vqvae.hop_lengths[0]
        n_codes = max(1, int(args.decode_seconds * subject.vqvae.config.sr / hop0))
        t = measure(decode_runner(subject.vqvae, b, n_codes), args.rounds, device=device)
        secs = n_codes * hop0 / subject.vqvae.config.sr
        return {"seconds_decoded": round(secs, 4), "samples_per_s": b * n_codes * hop0 / t.median,
                "s_per_minute": t.median * 60.0 / secs, "timing": t}
    prior = subject.priors[job.level]
    g = geometry(prior.config, subject.vqvae.hop_lengths[job.level])
    out = {"geometry": asdict(g)}
    if job.kind == "setup":
        t = measure(setup_runner(prior, b, g.known), args.rounds, device=device)
        return {**out, "known": g.known, "s_per_window": t.median, "timing": t}
    if job.kind == "student":
        t = measure(student_runner(subject.students[job.level], job.passes, b, g.known, g.hop_tokens),
                    args.rounds, device=device)
        return {**out, "known": g.known, "n_new": g.hop_tokens, "passes_per_window": min(job.passes, g.hop_tokens),
                "s_per_window": t.median, "tokens_per_s": b * g.hop_tokens / t.median,
                "s_per_minute": g.windows_per_minute * t.median, "timing": t}
    n_new = min(g.hop_tokens, args.ar_tokens)
    t = measure(ar_runner(job.sampler, prior, b, g.known, n_new), args.rounds, device=device)
    tps = b * n_new / t.median
    res = {**out, "known": g.known, "n_new": n_new, "passes_per_window": g.hop_tokens, "tokens_per_s": tps,
           "sampling_s_per_minute": g.tokens_per_minute * b / tps, "timing": t}
    if device.type == "cuda" and subject.random_weights:
        bw = hbm_bandwidth(torch.cuda.get_device_name(device))
        if bw is not None:
            roof = roofline_tokens_per_s(prior, b, bw)
            res["roofline"] = {**roof, "bandwidth_bytes_per_s": bw, "measured_fraction": tps / roof["tokens_per_s"]}
    return res


def finish_ar(results: list[dict]) -> None:
    """Add each level's window set-up to its autoregressive samplers' seconds per minute."""
    setup = {(r["subject"], r["batch"], r["level"]): r["s_per_window"] for r in results if r["kind"] == "setup"}
    for r in results:
        if r["kind"] == "ar":
            s = setup[r["subject"], r["batch"], r["level"]]
            r["setup_s_per_window"] = s
            r["s_per_minute"] = r["sampling_s_per_minute"] + r["geometry"]["windows_per_minute"] * s


def summarise(results: list[dict], passes) -> tuple[list[dict], list[dict]]:
    """Per (subject, batch, sampler): seconds per minute at each level, decoding, end to end; and
    the speedup ratios between samplers measured in this run."""
    summary, speedups = [], []
    keys = sorted({(r["subject"], r["batch"]) for r in results}, key=lambda k: (k[0], k[1]))
    for subj, b in keys:
        rows = [r for r in results if r["subject"] == subj and r["batch"] == b]
        decode = next(r["s_per_minute"] for r in rows if r["kind"] == "decode")
        levels = sorted({r["level"] for r in rows if r["kind"] == "ar"}, reverse=True)
        ar = {(r["sampler"], r["level"]): r["s_per_minute"] for r in rows if r["kind"] == "ar"}
        st = {(r["passes"], r["level"]): r["s_per_minute"] for r in rows if r["kind"] == "student"}
        samplers = {m: {l: ar.get((m, l)) for l in levels} for m in ("original_style", "ours")}
        for k in passes:
            samplers[f"parallel_k{k}"] = {l: st.get((k, l), ar.get(("ours", l))) for l in levels}
        for name, per in samplers.items():
            if any(v is None for v in per.values()):
                continue
            summary.append({"subject": subj, "batch": b, "sampler": name,
                            "levels": {str(l): v for l, v in per.items()}, "decode": decode,
                            "end_to_end": sum(per.values()) + decode})
        e2e = {s["sampler"]: s for s in summary if s["subject"] == subj and s["batch"] == b}
        pairs = [("ours", "original_style")] + [(f"parallel_k{k}", base) for k in passes for base in ("ours", "original_style")]
        for fast, slow in pairs:
            if fast in e2e and slow in e2e:
                ratios = {l: e2e[slow]["levels"][l] / e2e[fast]["levels"][l] for l in e2e[fast]["levels"]}
                ratios["end_to_end"] = e2e[slow]["end_to_end"] / e2e[fast]["end_to_end"]
                speedups.append({"subject": subj, "batch": b, "faster": fast, "baseline": slow, "ratios": ratios})
    return summary, speedups


def peer_status(args) -> list[dict]:
    """The optional Hugging Face transformers Jukebox port (extra ``peers``): measured against
    ours on the report's model family (``benchmarks.transformers_peer``)."""
    from .transformers_peer import peer_rows
    return peer_rows(args.model or ("tiny" if args.quick else "demo"), args.batches, args.ar_tokens, args.rounds)


def _jsonable(r: dict) -> dict:
    out = dict(r)
    t = out.pop("timing", None)
    if t is not None:
        out["seconds"] = [round(x, 6) for x in t.seconds]
        out["median_s"] = t.median
    return out


def _partial_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f".{stem}.partial.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model, few tokens and rounds (CI)")
    ap.add_argument("--model", help="bundle name or directory (default: demo; tiny with --quick)")
    ap.add_argument("--released", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the released sizes with random weights (default: on for cuda, off for cpu)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--passes", type=int, nargs="+", default=[8, 16], help="parallel decoding passes per window")
    ap.add_argument("--rounds", type=int, help="timed rounds per measurement (default 3, quick 2)")
    ap.add_argument("--ar-tokens", type=int, help="tokens timed per autoregressive window (default 64, quick 8)")
    ap.add_argument("--decode-seconds", type=float, help="audio decoded per measurement (default 2, quick 0.25)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="weights and activations (default float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--fresh", action="store_true", help="ignore measurements saved by an interrupted run")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    for name in ("batches", "passes"):
        if any(v < 1 for v in getattr(args, name)):
            ap.error(f"--{name} values must be >= 1")
    defaults = {"rounds": (2, 3), "ar_tokens": (8, 64), "decode_seconds": (0.25, 2.0)}
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.rounds < 1 or args.ar_tokens < 1 or args.decode_seconds <= 0:
        ap.error("--rounds, --ar-tokens and --decode-seconds must be positive")
    model = args.model or ("tiny" if args.quick else "demo")
    released = args.released if args.released is not None else (args.device == "cuda" and not args.quick)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(args.device)

    t0 = time.perf_counter()
    m = machine()
    subjects = [load_bundle(model, args.device, dtype)]
    if released:
        subjects.append(released_subject(args.device, dtype))
    settings = {"device": args.device, "dtype": str(dtype).removeprefix("torch."), "model": model,
                "released": released, "quick": args.quick, "batches": args.batches, "passes": args.passes,
                "rounds": args.rounds, "warmup_rounds": 1, "ar_tokens": args.ar_tokens,
                "decode_seconds": args.decode_seconds, "statistic": "median",
                "sampling": f"temperature {DEFAULT_TEMPERATURE}"}
    date = datetime.now(timezone.utc)
    stem = f"{args.device}-{date:%Y-%m-%d}" + ("-quick" if args.quick else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(args.out_dir, stem)
    done = {}
    if partial.exists() and not args.fresh:
        saved = json.loads(partial.read_text(encoding="utf-8"))
        if saved.get("settings") == settings:
            done = saved["results"]
            print(f"resuming: {len(done)} measurement(s) from {partial}")

    jobs = [j for s in subjects for j in plan(s, args.batches, args.passes)]
    by_name = {s.name: s for s in subjects}
    results = []
    bar = progress_bar(len(jobs), "speed report", "meas")
    for job in jobs:
        bar.update(1)
        bar.set_postfix_str(f"{job.subject} b{job.batch} {job.kind} {job.sampler} L{job.level}"
                            + (f" K={job.passes}" if job.passes else ""))
        if job.key in done:
            results.append(done[job.key])
            continue
        r = {**asdict(job), **_jsonable(run_job(job, by_name[job.subject], args, device))}
        results.append(r)
        done[job.key] = r
        with atomic_path(partial) as tmp:
            tmp.write_text(json.dumps({"settings": settings, "results": done}) + "\n", encoding="utf-8")
    bar.close()
    finish_ar(results)
    summary, speedups = summarise(results, args.passes)
    m["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.device == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
    out = {
        "schema": SCHEMA, "date_utc": date.strftime("%Y-%m-%d %H:%M UTC"), "command": " ".join(
            ["python -m benchmarks.report"] + list(sys.argv[1:] if argv is None else argv)),
        "machine": m, "source": source_version(), "settings": settings,
        "subjects": [{"name": s.name, "random_weights": s.random_weights,
                      "untrained_students": sorted(s.untrained_students),
                      "levels": {str(l): {"config": {k: v for k, v in p.config.to_dict().items()
                                                     if k in ("n_ctx", "width", "depth", "heads", "blocks",
                                                              "attn_order", "l_bins", "lyrics")},
                                          "parameters": sum(x.numel() for x in p.parameters()),
                                          "geometry": asdict(geometry(p.config, s.vqvae.hop_lengths[l]))}
                                 for l, p in sorted(s.priors.items(), reverse=True)}} for s in subjects],
        "results": results, "summary": summary, "speedups": speedups, "peers": peer_status(args),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    paths = {ext: args.out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    with atomic_path(paths["png"]) as tmp:
        plot(out, tmp)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown(out, paths["png"].name), encoding="utf-8")
    partial.unlink(missing_ok=True)
    print(f"wrote {paths['md']}, .json and .png ({out['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
