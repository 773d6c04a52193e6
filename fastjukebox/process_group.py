"""Ending a multi-process run's process group in step.

Left to interpreter exit, every process tears its gloo connections down in its own time; a
process whose peer has already closed them can abort there (SIGABRT) after its work is done
and written. ``end_at_exit()`` registers, once per process, an exit step that waits for every
process and then destroys the group, so no process closes a connection another still reads.
"""
from __future__ import annotations

import atexit

import torch

__all__ = ["end_at_exit"]

_registered = False


def end_at_exit() -> None:
    """At interpreter exit: a barrier over the default group, then its destruction (nothing
    when no group, or a group of one, was formed)."""
    global _registered
    if not _registered:
        atexit.register(_end)
        _registered = True


def _end() -> None:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_world_size() > 1:
            dist.barrier()      # a peer that died is an error here; the run's outcome is already decided
    except RuntimeError:
        pass
    finally:
        dist.destroy_process_group()
