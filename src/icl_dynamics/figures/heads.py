"""Figures of the induction-head scores: layer x head heatmaps, and top heads against the ICL score."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure, SubFigure

from icl_dynamics.figures import PAGE_WIDTH_IN, grid, new_figure, root_figure, save_figure, step_axis, styled


def default_steps(steps: Sequence[int]) -> list[int]:
    """First, middle and last of the measured steps (the heatmaps' default)."""
    steps = sorted(set(steps))
    return sorted({steps[0], steps[len(steps) // 2], steps[-1]})


@styled
def plot_prefix_matching_heatmaps(heads: pd.DataFrame, *, steps: Sequence[int] | None = None,
                                  score: str = "prefix_matching", fig: Figure | SubFigure | None = None) -> Figure:
    """One layer x head heatmap of ``score`` per chosen step (default: first, middle and last), on a
    shared 0..1 colour scale; drawn into ``fig`` (an empty Figure or SubFigure) when given."""
    steps = list(steps) if steps else default_steps(heads["step"])
    missing = sorted(set(steps) - set(heads["step"]))
    if missing:
        raise ValueError(f"no {score} scores at steps {missing}")
    fig, axes = new_figure(ncols=len(steps), width=min(PAGE_WIDTH_IN, 1.9 * len(steps) + 0.6), height=2.0, fig=fig)
    image = None
    for ax, step in zip(axes[0], steps):
        frame = heads[heads["step"] == step]
        image = ax.imshow(grid(frame, score), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_title(f"step {step:,}")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(int(frame["head"].max()) + 1))
        ax.set_yticks(range(int(frame["layer"].max()) + 1))
    fig.colorbar(image, ax=axes[0].tolist(), label=score.replace("_", " "), shrink=0.9)
    fig.suptitle(f"{heads['model'].iloc[0]}: {score.replace('_', ' ')} per head")
    return root_figure(fig)


def prefix_matching_heatmaps(heads: pd.DataFrame, out: str | Path, *, steps: Sequence[int] | None = None,
                             score: str = "prefix_matching") -> list[Path]:
    """:func:`plot_prefix_matching_heatmaps`, saved as ``out`` (PNG and PDF)."""
    return save_figure(plot_prefix_matching_heatmaps(heads, steps=steps, score=score), out)


def top_heads(heads: pd.DataFrame, k: int, score: str = "prefix_matching") -> list[tuple[int, int]]:
    """The ``k`` heads with the highest ``score`` at the last step (chosen without the trajectory)."""
    last = heads[heads["step"] == heads["step"].max()].nlargest(k, score)
    return list(zip(last["layer"].astype(int), last["head"].astype(int)))


@styled
def plot_top_heads_vs_icl(heads: pd.DataFrame, icl: pd.DataFrame, *, top_k: int = 3, score: str = "prefix_matching",
                          provenance: pd.DataFrame | None = None, fig: Figure | SubFigure | None = None) -> Figure:
    """Top heads' ``score`` (with standard errors and the control) above the ICL score, against step
    (two panels: into ``fig``, an empty Figure or SubFigure, when given).

    Markers sit at the measured checkpoints; hollow markers flag checkpoints whose weights duplicate
    the step before them or are suspect (equal to a non-consecutive step's; from the merged provenance).
    """
    fig, axes = new_figure(nrows=2, height=4.2, sharex=True, fig=fig)
    ax_heads, ax_icl = axes[0][0], axes[1][0]
    duplicates = set()
    if provenance is not None:
        flagged = provenance["duplicate_of_step"].notna() | provenance["suspect"].astype(bool)
        duplicates = set(provenance.loc[flagged, "step"].astype(int))
    for layer, head in top_heads(heads, top_k, score):
        rows = heads[(heads["layer"] == layer) & (heads["head"] == head)].sort_values("step")
        line, = ax_heads.plot(rows["step"], rows[score], marker="o", label=f"L{layer}H{head}")
        ax_heads.fill_between(rows["step"], rows[score] - 1.96 * rows[f"{score}_se"],
                              rows[score] + 1.96 * rows[f"{score}_se"], color=line.get_color(), alpha=0.2, lw=0)
        dup = rows[rows["step"].isin(duplicates)]
        ax_heads.plot(dup["step"], dup[score], "o", mfc="white", color=line.get_color())
    control = heads.groupby("step")[f"{score}_control"].mean()
    ax_heads.plot(control.index, control.to_numpy(), ls="--", color="grey", label="control")
    ax_heads.set_ylabel(score.replace("_", " "))
    ax_heads.legend(loc="upper left", frameon=False)
    loss = icl[(icl["level"] == "loss_reduction") & (icl["metric"] == "icl_score")].sort_values("step")
    ax_icl.plot(loss["step"], loss["value"], marker="o", color="black")
    ax_icl.fill_between(loss["step"], loss["ci_low"], loss["ci_high"], color="black", alpha=0.15, lw=0)
    ax_icl.axhline(0, color="grey", lw=0.6)
    ax_icl.set_ylabel("ICL score (late - early loss)")
    step_axis(ax_icl, heads["step"].unique())
    fig.suptitle(f"{heads['model'].iloc[0]}: top-{top_k} heads by final {score.replace('_', ' ')}")
    return root_figure(fig)


def top_heads_vs_icl(heads: pd.DataFrame, icl: pd.DataFrame, out: str | Path, *, top_k: int = 3,
                     score: str = "prefix_matching", provenance: pd.DataFrame | None = None) -> list[Path]:
    """:func:`plot_top_heads_vs_icl`, saved as ``out`` (PNG and PDF)."""
    return save_figure(plot_top_heads_vs_icl(heads, icl, top_k=top_k, score=score, provenance=provenance), out)
