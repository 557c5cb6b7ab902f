"""Figures: one module per stage, sharing the style and the save helper defined here."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from icl_dynamics.io import atomic_path  # noqa: E402

STYLE = {
    "figure.dpi": 150,
    "savefig.dpi": 200,
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.2,
    "lines.markersize": 3,
}
COLUMN_WIDTH_IN = 3.4  # one column of a two-column paper
PAGE_WIDTH_IN = 7.0


def new_figure(ncols: int = 1, nrows: int = 1, *, width: float = COLUMN_WIDTH_IN, height: float | None = None,
               **kwargs) -> tuple[Figure, object]:
    """A figure in the project's style (call instead of ``plt.subplots``)."""
    plt.rcParams.update(STYLE)
    height = height if height is not None else 2.4 * nrows
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, constrained_layout=True, **kwargs)


def grid(frame: pd.DataFrame, value: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """[layers, heads] array of ``value`` (NaN where a head has no row or no value)."""
    if shape is None:
        shape = (int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1)
    out = np.full(shape, np.nan)
    out[frame["layer"].to_numpy(int), frame["head"].to_numpy(int)] = frame[value].to_numpy(dtype=float)
    return out


def step_axis(ax: Axes, steps: Sequence[int], *, label: str = "training step") -> None:
    """A log-like step axis that still shows step 0 (symlog, linear below 1), ticks at the data."""
    ax.set_xscale("symlog", linthresh=1, linscale=0.5)
    ax.set_xlim(-0.2 if min(steps, default=1) == 0 else None, 1.5 * max(steps, default=1))
    ax.set_xlabel(label)


def save_figure(fig: Figure, path: str | os.PathLike[str], formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix in ``formats``, atomically; return the paths."""
    base = Path(path)
    if base.suffix.lstrip(".") in formats:  # a stem given with one of the suffixes
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = base.with_name(f"{base.name}.{fmt}")  # not with_suffix: 'pythia-1.4b' has a dot
        with atomic_path(target) as tmp:
            # no creation date in the PDF: a rerun writes the same bytes
            fig.savefig(tmp, format=fmt, bbox_inches="tight", metadata={"CreationDate": None} if fmt == "pdf" else None)
        written.append(target)
    plt.close(fig)
    return written
