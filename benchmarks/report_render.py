"""Markdown tables and the log-scale plot of a speed report (the dict ``benchmarks.report`` writes)."""
from __future__ import annotations

from pathlib import Path

from fastjukebox.settings import DEFAULT_TEMPERATURE

from .transformers_peer import describe

__all__ = ["markdown", "plot", "sampler_label"]

LABELS = {"original_style": "(b) original-style loop", "ours": "ours (static cache)"}


def sampler_label(name: str) -> str:
    if name.startswith("parallel_k"):
        return f"parallel student K={name.removeprefix('parallel_k')}"
    return LABELS.get(name, name)


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def _summary_table(report: dict, subject: str) -> str:
    rows = [s for s in report["summary"] if s["subject"] == subject]
    if not rows:
        return "(no complete sampler)\n"
    levels = list(rows[0]["levels"])
    head = ("| batch | sampler | " + " | ".join(f"level {l}" for l in levels)
            + " | VQ-VAE decode | end to end | per sample |")
    lines = [head, "|---:|---|" + "---:|" * (len(levels) + 3)]
    for s in rows:
        lines.append(f"| {s['batch']} | {sampler_label(s['sampler'])} | "
                     + " | ".join(_s(s["levels"][l]) for l in levels)
                     + f" | {_s(s['decode'])} | **{_s(s['end_to_end'])}** | {_s(s['end_to_end'] / s['batch'])} |")
    return "\n".join(lines) + "\n"


def _speedup_table(report: dict, subject: str) -> str:
    rows = [s for s in report["speedups"] if s["subject"] == subject]
    if not rows:
        return ""
    levels = [k for k in rows[0]["ratios"] if k != "end_to_end"]
    lines = ["| batch | faster | than | " + " | ".join(f"level {l}" for l in levels) + " | end to end |",
             "|---:|---|---|" + "---:|" * (len(levels) + 1)]
    for s in rows:
        r = s["ratios"]
        lines.append(f"| {s['batch']} | {sampler_label(s['faster'])} | {sampler_label(s['baseline'])} | "
                     + " | ".join(f"{r[l]:.2f}x" for l in levels) + f" | **{r['end_to_end']:.2f}x** |")
    return "\n".join(lines) + "\n"


def _measurement_table(report: dict, subject: str) -> str:
    lines = ["| batch | level | what | known + new | passes / window | median s | tokens/s | s / min audio | roofline tokens/s | fraction |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        if r["subject"] != subject:
            continue
        what = {"ar": sampler_label(r["sampler"]), "setup": "window set-up (condition + prime)",
                "student": f"parallel student K={r['passes']} (whole window)", "decode": "VQ-VAE decode level 0"}[r["kind"]]
        window = (f"{r['seconds_decoded']} s audio" if "known" not in r else
                  f"{r['known']} + {r['n_new']}" if "n_new" in r else f"{r['known']} known")
        roof = r.get("roofline") or {}
        lines.append(f"| {r['batch']} | {'' if r['level'] is None else r['level']} | {what} | {window} | "
                     f"{r.get('passes_per_window', '')} | {r['median_s']:.4g} | "
                     f"{_s(r.get('tokens_per_s'))} | {_s(r.get('s_per_minute'))} | "
                     f"{_s(roof.get('tokens_per_s'))} | "
                     f"{'' if not roof else format(roof['measured_fraction'], '.1%')} |")
    return "\n".join(lines) + "\n"


def _subject_section(report: dict, subj: dict) -> str:
    name = subj["name"]
    geo = "\n".join(
        f"- level {l}: n_ctx {v['config']['n_ctx']}, width {v['config']['width']}, depth {v['config']['depth']}, "
        f"heads {v['config']['heads']}, {v['parameters']:,} parameters; {v['geometry']['tokens_per_minute']:,.0f} "
        f"tokens per minute, windows hop {v['geometry']['hop_tokens']} tokens "
        f"({v['geometry']['windows_per_minute']:.1f} windows per minute, {v['geometry']['known']} known each)"
        for l, v in subj["levels"].items())
    notes = []
    if subj["random_weights"]:
        notes.append("Released architectures with random weights (timing does not depend on the values).")
    if subj["untrained_students"]:
        notes.append(f"The students of level(s) {', '.join(map(str, subj['untrained_students']))} are untrained "
                     f"(built from the teacher with `ParallelStudent.from_teacher` or fresh): a student's speed "
                     f"does not depend on its weights.")
    return f"""## `{name}`

{geo}

{' '.join(notes)}

Wall seconds to render **one minute of audio for each of the batch's samples** (extrapolated,
see below); "per sample" divides the end-to-end time by the batch.

{_summary_table(report, name)}
Speedups measured in this run (ratio of seconds per minute):

{_speedup_table(report, name)}
<details><summary>Measurements</summary>

{_measurement_table(report, name)}
</details>
"""


def markdown(report: dict, png_name: str) -> str:
    m, st = report["machine"], report["settings"]
    src = report.get("source") or {}
    source = f", library at commit `{src['git_commit'][:10]}`" if src else ""
    if src.get("library_modified"):
        source += " with uncommitted changes"
    hw = m.get("gpu") or m["cpu"]
    peers = "\n".join(f"- {describe(p)}" for p in report["peers"])
    sections = "\n".join(_subject_section(report, s) for s in report["subjects"])
    return f"""# Speed report: {st['device']}{' (quick run)' if st['quick'] else ''}

`{report['command']}`, {report['date_utc']}{source}; {report['wall_seconds']} s.
{hw}; torch {m['torch']}, {m['torch_threads']} thread(s); {st['dtype']}; load average at start
{m['load_average_at_start']}, at end {m['load_average_at_end']}.

![seconds per minute of audio]({png_name})

## How the numbers are made

- Each level is timed on a window in steady state: `n_ctx - hop` known codes (primed, untimed),
  then new codes. Windows hop `hop_fraction * n_ctx` codes (0.5, 0.5, 0.125 for levels 0, 1, 2).
- Autoregressive samplers: {st['ar_tokens']} new tokens per window are timed (fewer where the
  hop is shorter) and **extrapolated** to the level's tokens per minute (`60 * sr / hop_length`).
  The window set-up (conditioning and priming the known codes, measured with ours) is added per
  window to both autoregressive samplers, so (b)'s ratio is conservative.
- Parallel students: one whole window (`passes` full-window evaluations) is timed and
  multiplied by windows per minute. The top level has no student: the parallel rows reuse ours there.
- VQ-VAE: decoding {st['decode_seconds']} s of level-0 codes, scaled to a minute.
- End to end: the sum over levels plus decoding. Median of {st['rounds']} rounds after
  {st['warmup_rounds']} warm-up round; temperature {DEFAULT_TEMPERATURE}, no top-k / top-p.
- Tokens/s count every sample of the batch. The first window of a level (nothing known) is not
  modelled separately.
- On CUDA, released sizes also get an HBM roofline: tokens/s if a decode step only read every
  transformer and head weight once plus the keys and values it attends to, at the GPU's peak bandwidth.

{sections}
## Peers

{peers}
"""


def plot(report: dict, path: str | Path) -> None:
    """Grouped bars (log scale) of seconds per minute of audio by level and sampler: one panel per
    (subject, batch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(s["subject"], s["batch"]) for s in report["summary"]})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, (subj, b) in zip(axes[0], panels):
        rows = [s for s in report["summary"] if s["subject"] == subj and s["batch"] == b]
        groups = [f"level {l}" for l in rows[0]["levels"]] + ["decode", "end to end"]
        width = 0.8 / len(rows)
        for i, s in enumerate(rows):
            vals = list(s["levels"].values()) + [s["decode"], s["end_to_end"]]
            xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, vals, width, label=sampler_label(s["sampler"]))
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel("seconds per minute of audio")
        ax.set_title(f"{subj}, batch {b}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    st = report["settings"]
    fig.suptitle(f"{st['device']} ({report['machine'].get('gpu') or report['machine']['cpu']}), {st['dtype']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
