"""Figures for the three ICL levels against training step, and loss-by-token curves per checkpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure

from icl_dynamics.checkpoints import model_slug
from icl_dynamics.figures import PAGE_WIDTH_IN, new_figure, root_figure, save_figure, step_axis, styled
from icl_dynamics.icl_tasks import BASELINES, LOOKUP_BASELINE, TASKS

FRACTION_LEVELS = ("format_compliance", "pattern_discovery")


def _one_model(table: pd.DataFrame, model: str | None, what: str) -> pd.DataFrame:
    """Rows of ``model``, or of the only model in ``table`` when none is named."""
    models = sorted(table["model"].unique())
    if model is None:
        if len(models) != 1:
            raise ValueError(f"{what}: the table holds models {models}; name one")
        model = models[0]
    rows = table[table["model"] == model]
    if rows.empty:
        raise ValueError(f"{what}: no rows for model {model!r} (models: {models})")
    return rows


def _task_order(names: Sequence[str]) -> list[str]:
    known = [t.name for t in TASKS if t.name in names]
    return known + sorted(set(names) - set(known))


@styled
def plot_level(table: pd.DataFrame, level: str, metric: str, *, model: str | None = None,
               fig: Figure | SubFigure | None = None) -> Figure:
    """``metric`` of ``level`` against training step: one panel per task, one line per shot count
    (markers at the checkpoints, Wilson/CI band), chance as a dashed line where the table has one and,
    for accuracies, the lookup baseline at the most shots as a dotted grey line. Drawn into ``fig`` (an
    empty Figure or SubFigure) when given."""
    everything = _one_model(table, model, f"plot_level({level!r}, {metric!r})")
    rows = everything[(everything["level"] == level) & (everything["metric"] == metric)]
    lookup = everything[(everything["level"] == level) & (everything["metric"] == LOOKUP_BASELINE)]
    if rows.empty:
        raise ValueError(f"plot_level: no rows with level {level!r} and metric {metric!r}")
    tasks = _task_order(list(rows["task"].unique()))
    fig, axes = new_figure(ncols=len(tasks), width=min(PAGE_WIDTH_IN, 1.9 * len(tasks) + 0.4), height=2.2,
                           sharey=level in FRACTION_LEVELS, fig=fig)
    shot_values = sorted(int(s) for s in rows["shots"].dropna().unique())
    cmap = colormaps["viridis"]
    for ax, task in zip(axes[0], tasks):
        panel = rows[rows["task"] == task]
        groups = [(None, panel)] if panel["shots"].isna().all() else list(panel.groupby("shots"))
        for shots, line in groups:
            line = line.sort_values("step")
            if shots is None:
                color, label = "C0", metric
            else:
                frac = shot_values.index(int(shots)) / max(1, len(shot_values) - 1)
                color, label = cmap(0.9 * frac), f"{int(shots)}-shot"
            ax.fill_between(line["step"], line["ci_low"], line["ci_high"], color=color, alpha=0.15, linewidth=0)
            ax.plot(line["step"], line["value"], marker="o", color=color, label=label)
        baseline = lookup[lookup["task"] == task]
        if len(baseline) and metric != LOOKUP_BASELINE:
            baseline = baseline[baseline["shots"] == baseline["shots"].max()].sort_values("step")
            ax.plot(baseline["step"], baseline["value"], color="0.4", linestyle=":", linewidth=0.9,
                    label=f"lookup baseline, {int(baseline['shots'].iloc[0])}-shot")
        chance = panel["chance"].dropna().unique()
        if len(chance) == 1:
            ax.axhline(chance[0], color="0.5", linestyle="--", linewidth=0.8, label="chance")
        step_axis(ax, panel["step"].tolist())
        ax.set_title(task.replace("_", " "))
        if level in FRACTION_LEVELS:
            ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel(metric.replace("_", " "))
    axes[0][-1].legend(loc="best", frameon=False)
    return root_figure(fig)


@styled
def plot_loss_by_token(curves: pd.DataFrame, *, model: str | None = None, steps: Sequence[int] | None = None,
                       n_curves: int = 5, ax: Axes | None = None) -> Figure:
    """Mean loss against token position for a few checkpoints (``steps``, or ``n_curves`` spread
    over the available ones), with CI bands; columns model, step, position, loss, ci_low, ci_high.
    Draws into ``ax`` (default: a new figure's) and returns the Figure it lies in."""
    rows = _one_model(curves, model, "plot_loss_by_token")
    available = sorted(int(s) for s in rows["step"].unique())
    if steps is None:
        steps = [available[i] for i in sorted(set(np.linspace(0, len(available) - 1, n_curves).round().astype(int)))]
    missing = sorted(set(steps) - set(available))
    if missing:
        raise ValueError(f"plot_loss_by_token: no loss curve for steps {missing} (have {available})")
    if ax is None:
        _, axes = new_figure()
        ax = axes[0][0]
    cmap = colormaps["viridis"]
    for n, step in enumerate(steps):
        line = rows[rows["step"] == step].sort_values("position")
        color = cmap(0.9 * n / max(1, len(steps) - 1))
        ax.fill_between(line["position"], line["ci_low"], line["ci_high"], color=color, alpha=0.15, linewidth=0)
        ax.plot(line["position"], line["loss"], color=color, label=f"step {step}")
    ax.set_xscale("symlog", linthresh=1, linscale=0.5)
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats)")
    ax.legend(loc="best", frameon=False)
    return root_figure(ax.figure)


def write_icl_figures(table: pd.DataFrame, curves: pd.DataFrame | None, out_dir: str | os.PathLike[str],
                      *, model: str) -> list[Path]:
    """Every (level, metric) figure of ``model`` and its loss-by-token curves, saved under ``out_dir``
    as ``<model slug>_<level>_<metric>`` and ``<model slug>_loss_by_token`` (PNG and PDF).

    Names are passed with a ``.png`` suffix because ``save_figure`` swaps the suffix, which would
    otherwise eat part of a slug with a dot in it (``pythia-1.4b``)."""
    base = Path(out_dir) / model_slug(model)
    rows = _one_model(table, model, "write_icl_figures")
    written: list[Path] = []
    for level, metric in rows[["level", "metric"]].drop_duplicates().itertuples(index=False):
        if metric in BASELINES:  # model-free: the lookup is drawn on the accuracy figures
            continue
        fig = plot_level(rows, level, metric, model=model)
        written += save_figure(fig, f"{base}_{level}_{metric}.png")
    if curves is not None:
        written += save_figure(plot_loss_by_token(curves, model=model), f"{base}_loss_by_token.png")
    return written
