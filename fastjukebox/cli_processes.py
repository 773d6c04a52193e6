"""The sampling commands across processes: ``accelerate launch -m fastjukebox sample ...``.

Under a launcher (``WORLD_SIZE`` > 1) a run's samples (``--n-samples``, or the rows of
``--codes``) are split into contiguous shares, one per process, each process on its own device
(``accelerate.PartialState``: ``cuda:<local rank>``, or the CPU with gloo). The seed is the main
process's, and sample ``i`` draws from its own generator seeded ``sample_seed(seed, i)`` (as in a
plain run), so the codes do not depend on the number of processes. Every process writes the audio
of its samples (named by their index in the run); the main process gathers the codes and writes
the run's one codes file. A process that fails names itself (rank and samples) and then no
process writes the codes file.

Without a launcher everything here is the identity: one process, all samples.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Processes", "current", "share"]


def share(n: int, world: int, rank: int) -> range:
    """Indices of the samples that process ``rank`` of ``world`` takes (contiguous, sizes differ
    by at most one, lower ranks first)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass
class Processes:
    """This process's place in the run; ``device`` is None without a launcher (the command's
    own default then applies)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        return share(n, self.world, self.rank)

    def agree(self, value):
        """The main process's ``value``, in every process."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every process's ``value``, in rank order, in every process."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def describe(self, rows: range) -> str:
        what = "no samples" if not rows else (f"sample {rows[0]}" if len(rows) == 1
                                              else f"samples {rows[0]}-{rows[-1]}")
        return f"process {self.rank} of {self.world} ({what})"


def current() -> Processes:
    """The processes of this run: started by ``accelerate launch`` (or torchrun) when
    ``WORLD_SIZE`` > 1, else this one alone."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return Processes()
    from accelerate import PartialState

    from .process_group import end_at_exit
    state = PartialState(cpu=not torch.cuda.is_available())
    end_at_exit()
    return Processes(state.process_index, state.num_processes, torch.device(state.device))
