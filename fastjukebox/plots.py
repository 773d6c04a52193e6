"""Spectrogram figures of audio (matplotlib, the ``plots`` extra), written atomically as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path

INSTALL_HINT = "pip install 'fastjukebox[plots]'"


def require_matplotlib(what: str = "plotting") -> None:
    """Raise a ValueError naming the missing extra before any long work starts."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"{what} needs matplotlib: {INSTALL_HINT}") from None


def spectrogram_figure(signals: list[tuple[str, np.ndarray]], path: str | Path, sr: int,
                       fmax_hz: float = 6000.0, dpi: int = 80) -> Path:
    """One spectrogram per ``(title, audio)`` row, 0 to ``fmax_hz``, on one shared colour scale."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not signals:
        raise ValueError("no signals to plot")
    fig, axes = plt.subplots(len(signals), 1, figsize=(9, 2.2 * len(signals)), squeeze=False)
    for ax, (title, x) in zip(axes[:, 0], signals):
        ax.specgram(np.asarray(x, dtype=np.float64).reshape(-1), NFFT=1024, Fs=sr, noverlap=768, cmap="magma",
                    vmin=-140, vmax=-20)
        ax.set_ylim(0, fmax_hz)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("Hz")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
