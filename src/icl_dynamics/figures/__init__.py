"""Figures: one module per stage, sharing the style and the save helper defined here.

Every figure function draws into what the caller gives it and returns the
:class:`~matplotlib.figure.Figure` it drew on, saving nothing: a one-panel figure takes ``ax=`` (an
Axes of the caller's), a figure of several panels ``fig=`` (an empty Figure or SubFigure of the
caller's, e.g. one of ``fig.subfigures(1, 2)``); without either it makes its own. The ``write_*`` and
path-taking functions the CLI calls save them with :func:`save_figure`. All of them draw under
:data:`STYLE` in a ``matplotlib.rc_context`` (:func:`styled`), so a notebook's own rcParams and backend
stay as they were.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure

from icl_dynamics.io import atomic_path

_P = ParamSpec("_P")
_R = TypeVar("_R")

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


def styled(draw: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``draw`` under :data:`STYLE` (a ``matplotlib.rc_context``): what it draws gets the project's
    style, and the caller's global rcParams are the same afterwards."""

    @functools.wraps(draw)
    def in_style(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return in_style


def new_figure(ncols: int = 1, nrows: int = 1, *, width: float = COLUMN_WIDTH_IN, height: float | None = None,
               fig: Figure | SubFigure | None = None, **kwargs) -> tuple[Figure | SubFigure, np.ndarray]:
    """A figure of ``nrows`` x ``ncols`` axes (call instead of ``plt.subplots``, inside a :func:`styled`
    function, which gives it the style); with ``fig`` (a caller's empty Figure or SubFigure) the axes
    are made in it instead, and its size is the caller's."""
    if fig is not None:
        if fig.axes:
            raise ValueError("fig= must be an empty Figure or SubFigure (e.g. one of fig.subfigures(...)); "
                             "for one panel of your own, pass ax= where the function takes it")
        return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    height = height if height is not None else 2.4 * nrows
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, constrained_layout=True, **kwargs)


def root_figure(fig: Figure | SubFigure) -> Figure:
    """The top-level Figure of ``fig`` (itself, or the Figure a SubFigure lies in): what figure functions return."""
    return fig.figure if isinstance(fig, SubFigure) else fig


def axis_scale(values: Sequence[float]) -> str:
    """``linear`` for values (steps or tokens) spanning less than two decades above their smallest nonzero
    one, as a toy zoo's evenly spaced checkpoints do (a log axis would crowd them into its right end);
    ``symlog`` otherwise (Pythia's log-spaced checkpoints)."""
    positive = np.asarray([v for v in values if v > 0], float)
    return "linear" if len(positive) and positive.max() / positive.min() < 100 else "symlog"


def grid(frame: pd.DataFrame, value: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """[layers, heads] array of ``value`` (NaN where a head has no row or no value)."""
    if shape is None:
        shape = (int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1)
    out = np.full(shape, np.nan)
    out[frame["layer"].to_numpy(int), frame["head"].to_numpy(int)] = frame[value].to_numpy(dtype=float)
    return out


def step_axis(ax: Axes, steps: Sequence[int], *, label: str = "training step") -> None:
    """A step axis that shows step 0 and where the checkpoints are: linear for evenly spaced ones
    (:func:`axis_scale`), else log-like (symlog, linear below 1)."""
    steps = list(steps)
    if axis_scale(steps) == "linear":
        ax.set_xscale("linear")
        ax.set_xlim(-0.02 * max(steps, default=1), 1.02 * max(steps, default=1))
    else:
        ax.set_xscale("symlog", linthresh=1, linscale=0.5)
        ax.set_xlim(-0.2 if min(steps, default=1) == 0 else None, 1.5 * max(steps, default=1))
    ax.set_xlabel(label)


@styled  # savefig reads the style too (dpi, ticks created while drawing)
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
