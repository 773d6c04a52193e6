"""The labels of a sampling command's run, from its label options (``--artist``, ``--genre``,
``--lyrics`` / ``--lyrics-file``, the id files, ``--total-seconds``, ``--offset-seconds``): the
command line first, then those stored by a parent run (its codes file's settings, or a demo
excerpt's manifest), then the defaults.
"""
from __future__ import annotations

from pathlib import Path

_LABEL_KEYS = ("artist", "genre", "lyrics", "artist_ids", "genre_ids", "ids_dir", "total_seconds",
               "offset_seconds")


def label_settings(args, stored: dict | None = None) -> dict:
    """Label options: the command line first, then ``stored`` (a parent run's), then defaults."""
    stored = stored or {}
    out = {}
    for key in _LABEL_KEYS:
        value = getattr(args, key, None)
        out[key] = stored.get(key) if value is None else value
    if args.lyrics_file is not None:
        try:
            out["lyrics"] = Path(args.lyrics_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read lyrics file '{args.lyrics_file}': {exc}") from None
    if (out["artist_ids"] is None) != (out["genre_ids"] is None):
        raise ValueError("--artist-ids and --genre-ids go together")
    return out


def _ids(labels: dict):
    """{"v2": LabelIds, "v3": LabelIds} from the id files (each read in both versions), or None."""
    from .labels import LabelIds
    if labels["artist_ids"] is not None and labels["ids_dir"] is not None:
        raise ValueError("give either --ids-dir or --artist-ids/--genre-ids, not both")
    try:
        if labels["artist_ids"] is not None:
            return {v: LabelIds.from_files(labels["artist_ids"], labels["genre_ids"], v) for v in ("v2", "v3")}
        if labels["ids_dir"] is not None:
            d = Path(labels["ids_dir"])
            found = {v: LabelIds.from_dir(d, v) for v in ("v2", "v3") if (d / f"{v}_artist_ids.txt").exists()
                     and (d / f"{v}_genre_ids.txt").exists()}
            if not found:
                raise ValueError(f"--ids-dir {d}: no v2_/v3_artist_ids.txt and genre_ids.txt files")
            return found
    except OSError as exc:
        raise ValueError(f"cannot read id file: {exc}") from None
    return None


def label_kwargs(labels: dict) -> dict:
    return dict(artist=0 if labels["artist"] is None else labels["artist"],
                genre=0 if labels["genre"] is None else labels["genre"],
                lyrics=labels["lyrics"] or "", total_seconds=labels["total_seconds"],
                offset_seconds=labels["offset_seconds"] or 0.0, ids=_ids(labels))
