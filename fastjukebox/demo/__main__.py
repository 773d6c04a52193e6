"""``python -m fastjukebox.demo build|report|excerpts``: build the bundled demo family, its quality
report, or its held-out excerpts.

Examples::

    python -m fastjukebox.demo build                      # full build into fastjukebox/assets/demo/
    python -m fastjukebox.demo build --resume             # continue an interrupted build
    python -m fastjukebox.demo build --scale 0.01 --out /tmp/demo --work /tmp/demo-work
    python -m fastjukebox.demo report                     # docs/demo_quality.md + PNGs
    python -m fastjukebox.demo excerpts                   # fastjukebox/assets/demo/excerpts/
"""
from __future__ import annotations

import argparse
import shlex
import sys


def cmd_build(a) -> int:
    from dataclasses import replace

    from .build import build, plan_for_scale
    plan = plan_for_scale(a.scale)
    if a.upsampler_processes is not None:
        plan = replace(plan, upsampler_processes=a.upsampler_processes)
    info = build(a.out, plan=plan, work=a.work, resume=a.resume, cache_dir=a.cache_dir,
                 progress=not a.no_progress,
                 command="python -m fastjukebox.demo " + " ".join(shlex.quote(x) for x in sys.argv[1:]))
    print(f"{a.out}: built in {info['total_seconds']:.0f} s "
          + ", ".join(f"{k} {v:.0f} s" for k, v in info["stage_seconds"].items()))
    return 0


def cmd_report(a) -> int:
    from .report import write_report
    path = write_report(model=a.model, out=a.out, cache_dir=a.cache_dir, progress=not a.no_progress)
    print(path)
    return 0


def cmd_excerpts(a) -> int:
    from .excerpts import build_excerpts
    for e in build_excerpts(a.out, a.seconds, cache_dir=a.cache_dir, progress=not a.no_progress):
        print(f"{e.path(a.out)}: {e.piece}, {e.seconds:g} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .build import DEFAULT_OUT
    ap = argparse.ArgumentParser(prog="python -m fastjukebox.demo", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the demo family (about 20-40 min on 2 CPU cores)")
    b.add_argument("--out", default=str(DEFAULT_OUT), help="where the family goes (default: %(default)s)")
    b.add_argument("--work", default=None, help="checkpoints and codes (default: $FASTJUKEBOX_CACHE/demo-build)")
    b.add_argument("--resume", action="store_true", help="continue each unfinished stage; skip finished ones")
    b.add_argument("--scale", type=float, default=1.0, help="multiply steps and data (tests: 0.01)")
    b.add_argument("--cache-dir", default=None, help="demo corpus cache (default: the corpus default)")
    b.add_argument("--upsampler-processes", type=int, choices=(1, 2), default=None,
                   help="2 (default): train the two upsamplers at the same time, one process and thread "
                        "each; 1: in turn (part of the build plan)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=cmd_build)
    r = sub.add_parser("report", help="write docs/demo_quality.md and its figures")
    r.add_argument("--model", default="demo", help="model family to evaluate (default: the bundled demo)")
    r.add_argument("--out", default="docs/demo_quality.md")
    r.add_argument("--cache-dir", default=None, help="demo corpus cache (default: the corpus default)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=cmd_report)
    from .excerpts import EXCERPT_SECONDS, EXCERPTS_DIR
    e = sub.add_parser("excerpts", help="write the held-out excerpts (one per instrument set)")
    e.add_argument("--out", default=str(EXCERPTS_DIR), help="directory (default: %(default)s)")
    e.add_argument("--seconds", type=float, default=EXCERPT_SECONDS, help="length (default: %(default)s)")
    e.add_argument("--cache-dir", default=None, help="demo corpus cache (default: the corpus default)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=cmd_excerpts)
    args = ap.parse_args(argv)
    from fastjukebox.cli_options import run_command
    return run_command(args.fn, args, "python -m fastjukebox.demo", errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
