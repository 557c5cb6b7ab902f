"""The causal check over training (icl_dynamics.causal): per model, the rank correlations of the
correlational scores with the ablation effects they claim, and each group's ablation against its
layer-matched random controls, against training tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure, SubFigure

from icl_dynamics.checkpoints import model_slug
from icl_dynamics.emergence import tokens_per_step
from icl_dynamics.figures import COLUMN_WIDTH_IN, new_figure, root_figure, save_figure, styled
from icl_dynamics.figures.emergence import tokens_axis

# the groups and what each is claimed to carry: the panels right of the correlations
CLAIMS = (("sih", "relation_recall"), ("induction", "loss_reduction"))
LOSS_LABEL = {"tail_logprob": "tail log p lost (nats)", "icl_score": "ICL score gained (nats)"}


@styled
def plot_causal(correlation: pd.DataFrame, series: pd.DataFrame, model: str, *,
                fig: Figure | SubFigure | None = None) -> Figure:
    """Left: Spearman rho across heads (95% bootstrap interval) of RI over control with relation recall
    lost (per family) and of prefix matching with ICL score gained, per checkpoint. Then one panel per
    claim (flagged SIHs on relation recall, top-k induction heads on the ICL score): the group's loss
    (solid) against its layer-matched controls' mean (dashed; band: min to max over draws). Drawn into
    ``fig`` (an empty Figure or SubFigure) when given."""
    corr = correlation[correlation["model"] == model]
    mine = series[series["model"] == model]
    if corr.empty and mine.empty:
        raise ValueError(f"plot_causal: no ablation rows of {model!r}")
    tps = tokens_per_step(pd.concat([corr[["model", "step", "tokens"]], mine[["model", "step", "tokens"]]]))[model]
    fig, axes = new_figure(ncols=1 + len(CLAIMS), width=COLUMN_WIDTH_IN * (1 + len(CLAIMS)) * 0.75, height=2.4,
                           fig=fig)
    ax = axes[0, 0]
    for i, ((comparison, task), g) in enumerate(corr.groupby(["comparison", "task"], sort=True)):
        g = g.sort_values("step")
        ax.errorbar(g["tokens"], g["rho"], yerr=[g["rho"] - g["ci_low"], g["ci_high"] - g["rho"]], marker="o",
                    color=f"C{i}", lw=0.9, elinewidth=0.5, capsize=0,
                    label=f"{comparison.replace('_vs_', ' vs ').replace('_', ' ')} ({task})")
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Spearman rho across heads")
    ax.set_title(f"{model.split('/')[-1]}: scores vs ablation")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", frameon=False, fontsize=6)
    right = 1.6 * max(float(corr["tokens"].max()) if len(corr) else 0.0,
                      float(mine["tokens"].max()) if len(mine) else 0.0, tps)  # the last checkpoint inside
    tokens_axis(ax, tps)
    ax.set_xlim(-0.3 * tps, right)
    for ax, (group, level) in zip(axes[0, 1:], CLAIMS):
        rows = mine[(mine["group"] == group) & (mine["level"] == level)]
        for i, (task, g) in enumerate(rows.groupby("task", sort=True)):
            g = g.sort_values("step")
            ax.plot(g["tokens"], g["group_loss"], marker="o", color=f"C{i}", label=f"{group} ({task})")
            ax.plot(g["tokens"], g["control_loss"], ls="--", color=f"C{i}", lw=0.8, label="random, layer-matched")
            ax.fill_between(g["tokens"], g["control_min"], g["control_max"], color=f"C{i}", alpha=0.15, lw=0)
        ax.axhline(0, color="0.5", lw=0.5)
        metric = rows["metric"].iloc[0] if len(rows) else ""
        ax.set_ylabel(LOSS_LABEL.get(metric, metric))
        ax.set_title(f"ablating {group} heads")
        if rows.empty:
            ax.text(0.5, 0.5, f"no {group} heads at any checkpoint", ha="center", va="center", fontsize=7,
                    transform=ax.transAxes)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", frameon=False, fontsize=6)
        tokens_axis(ax, tps)
        ax.set_xlim(-0.3 * tps, right)
    return root_figure(fig)


def causal_figures(correlation: pd.DataFrame, series: pd.DataFrame, out_dir: str | os.PathLike[str],
                   models: list[str]) -> list[Path]:
    """:func:`plot_causal` of each model, saved as ``causal-<model slug>`` (PNG and PDF) in ``out_dir``;
    a model without ablation rows (skipped as too large, or ablation disabled) gets a figure that says so."""
    written = []
    for model in models:
        path = Path(out_dir) / f"causal-{model_slug(model)}"
        if (correlation["model"] == model).any() or (series["model"] == model).any():
            written += save_figure(plot_causal(correlation, series, model), path)
        else:
            written += save_figure(_no_rows(model), path)
    return written


@styled
def _no_rows(model: str) -> Figure:
    fig, axes = new_figure(width=2 * COLUMN_WIDTH_IN, height=1.5)
    axes[0, 0].text(0.5, 0.5, f"{model}: no ablation rows (ablation.enabled false, or above ablation.max_parameters)",
                    ha="center", va="center", fontsize=7, transform=axes[0, 0].transAxes)
    axes[0, 0].set_axis_off()
    return fig

