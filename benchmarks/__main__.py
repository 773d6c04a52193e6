"""The one way into the benchmarks: ``python -m benchmarks <command> [options]``.

==================  ==========================================================================
``sampling``        exact sampling on the CPU: ours against the original's loop re-created, a
                    growing-cache loop and full recompute (``benchmarks.sampling_speed``)
``upsample``        the main command end to end per sampler (the shipped excerpts, batch 1 and 16):
                    time per level and the teacher NLL of each level's codes (``benchmarks.upsample``)
``report``          seconds per minute of audio, per level and end to end, per sampler
                    (``benchmarks.report``; ``--device cuda`` on a GPU)
``speculative``     exact speculative sampling against ``ar`` on the demo upsamplers: tokens/s,
                    acceptance, gamma 4 / 8 / 16 (``benchmarks.speculative``)
``students``        the parallel students at each pass count against exact AR, first and hopped
                    windows, batch 1 and 16 (``benchmarks.student_speed``)
``student-diagnosis`` why a student falls short of its teacher: unmasking orders and pass counts
                    on held-out hopped windows (``benchmarks.student_diagnosis``)
``prefix-source``   whether a student's end-to-end gap comes from its own prefixes: per window,
                    its fill after the teacher's prefix and after its own (``benchmarks.prefix_source``)
``gpu``             all GPU work in one call: kernel correctness, the CUDA-graph decode check,
                    attention and decode timings, within ``--budget-s`` (``benchmarks.gpu``)
``compile-check``   every kernel variant compiled ahead of time for sm_90 / sm_80, no GPU needed:
                    shared memory, registers, spills (``kernels.compile_check``)
``suite``           the pytest-benchmark suite (``pytest benchmarks --benchmark-only``)
==================  ==========================================================================

``python -m benchmarks <command> --help`` lists a command's options.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

COMMANDS = {
    "sampling": "benchmarks.sampling_speed",
    "upsample": "benchmarks.upsample",
    "report": "benchmarks.report",
    "speculative": "benchmarks.speculative",
    "students": "benchmarks.student_speed",
    "student-diagnosis": "benchmarks.student_diagnosis",
    "prefix-source": "benchmarks.prefix_source",
    "gpu": "benchmarks.gpu.__main__",
    "compile-check": "kernels.compile_check",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "suite":
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.call([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", *rest], env=env)
    if command not in COMMANDS:
        print(f"unknown command {command!r}; expected one of {', '.join([*COMMANDS, 'suite'])}", file=sys.stderr)
        return 2
    sys.argv = [f"python -m benchmarks {command}", *rest]
    return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
