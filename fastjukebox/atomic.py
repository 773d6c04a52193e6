"""Atomic file writes: a temporary file beside the target, renamed over it only when complete
(``atomic_path``; ``atomic_paths`` for a set written all or none), and ``check_target``: whether a
file can be written at a path, checked before the work that produces it."""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on any
    error it is removed and ``target`` is left as it was."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class OutputPathError(ValueError):
    """An output path that cannot be written: a directory, under a file, or not writable."""


def check_target(target: str | os.PathLike, what: str = "output") -> Path:
    """``target`` if a file can be written there (its nearest existing ancestor is a writable
    directory and it is not itself a directory), else an ``OutputPathError`` naming the reason.
    Meant to run before any long work, so that none is lost to a bad path."""
    target = Path(target)
    if target.is_dir():
        raise OutputPathError(f"{what} '{target}' is a directory; give a file name")
    parent = target.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{what} '{target}': '{parent}' is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} '{target}': directory '{parent}' is not writable")
    return target


def _tmp_beside(target: Path) -> Path:
    # keeps the suffix, for writers that choose the format by it
    return target.with_name(f".{target.stem}.{os.getpid()}.{secrets.token_hex(4)}.partial{target.suffix}")


@contextmanager
def atomic_paths(targets):
    """``atomic_path`` for a set of files: yield one temporary path per target; when the block
    completes every target is replaced, else none is (files replaced before a failed rename are
    put back and new ones removed)."""
    targets = [Path(t) for t in targets]
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
    tmps = [_tmp_beside(t) for t in targets]
    try:
        yield tmps
        _commit(targets, tmps)
    except BaseException:
        for tmp in tmps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise


def _commit(targets: list[Path], tmps: list[Path]) -> None:
    for t in targets:                  # again: a directory may have appeared since the first check
        check_target(t)
    backups: list[Path | None] = []
    done: list[Path] = []
    try:
        for t in targets:
            if t.exists():
                b = Path(f"{_tmp_beside(t)}.old")
                os.replace(t, b)
                backups.append(b)
            else:
                backups.append(None)
        for t, tmp in zip(targets, tmps):
            os.replace(tmp, t)
            done.append(t)
    except BaseException:
        for t in done:
            try:
                os.unlink(t)
            except OSError:
                pass
        for t, b in zip(targets, backups):
            if b is not None:
                try:
                    os.replace(b, t)
                except OSError:
                    pass
        raise
    for b in backups:
        if b is not None:
            try:
                os.unlink(b)
            except OSError:
                pass
