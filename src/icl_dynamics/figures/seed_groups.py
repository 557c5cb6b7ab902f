"""The seed groups (icl_dynamics.seed_groups): a forest plot of each comparison's lag, run by run and
pooled, per group; and every subject's midpoint per run against training tokens."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from icl_dynamics.figures import COLUMN_WIDTH_IN, new_figure, save_figure, styled
from icl_dynamics.seed_groups import POOLED

# the comparisons the forest plot draws: each head class against the ICL levels, the levels among themselves
# would double the rows and are in the table
FOREST_KIND = "head_class"


def _label(row) -> str:
    subject = row["subject"] + (f" ({row['head_set']})" if row["head_set"] else "")
    return f"{subject} vs {row['level'].replace('_', ' ')}"


def _run_label(run: str) -> str:
    return run.split("/")[-1]


@styled
def plot_lag_forest(lags: pd.DataFrame, *, kind: str = FOREST_KIND, head_set: str | None = None) -> Figure:
    """One panel per group (ordered by model size): every comparison of ``kind`` subjects with an ICL
    level, each run's lag (grey) and the pooled lag (black diamond) with their 95 % intervals, in tokens
    (negative: the subject first); the group verdict on the right. ``head_set`` keeps one head set."""
    rows = lags[lags["subject_kind"] == kind]
    if head_set is not None:
        rows = rows[rows["head_set"].isin([head_set, ""])]
    groups = (rows[["group", "parameters"]].drop_duplicates().sort_values(["parameters", "group"])["group"].tolist())
    if not groups:
        raise ValueError(f"plot_lag_forest: no {kind} comparisons in the group table")
    heights = [max(1, len(rows[rows["group"] == g])) for g in groups]
    fig, axes = new_figure(nrows=len(groups), width=COLUMN_WIDTH_IN * 1.6,
                           height=0.6 + 0.14 * sum(heights), gridspec_kw={"height_ratios": heights})
    for ax, group in zip(axes[:, 0], groups):
        mine = rows[rows["group"] == group]
        comparisons = mine[mine["run"] == POOLED].sort_values(["subject", "head_set", "level"])
        y, ticks, labels = 0.0, [], []
        for _, pooled in comparisons.iterrows():
            same = mine[(mine["subject"] == pooled["subject"]) & (mine["head_set"] == pooled["head_set"])
                        & (mine["level"] == pooled["level"]) & (mine["task"] == pooled["task"])
                        & (mine["run"] != POOLED)]
            for _, run in same.iterrows():
                y += 1
                if np.isfinite(run["lag_tokens"]):
                    ax.errorbar(run["lag_tokens"], y, xerr=[[run["lag_tokens"] - run["lag_low_tokens"]],
                                                            [run["lag_high_tokens"] - run["lag_tokens"]]],
                                fmt="o", ms=2.5, color="0.55", elinewidth=0.7, capsize=0)
                else:
                    ax.text(0, y, run["order"], fontsize=5, color="0.55", va="center", ha="center")
                ticks.append(y)
                labels.append(_run_label(run["run"]))
            y += 1
            if np.isfinite(pooled["lag_tokens"]):
                ax.errorbar(pooled["lag_tokens"], y, xerr=[[pooled["lag_tokens"] - pooled["lag_low_tokens"]],
                                                           [pooled["lag_high_tokens"] - pooled["lag_tokens"]]],
                            fmt="D", ms=4, color="black", elinewidth=1.2, capsize=0)
            ax.annotate(pooled["verdict"], (1.01, y), xycoords=("axes fraction", "data"), fontsize=6, va="center")
            ticks.append(y)
            labels.append(f"pooled: {_label(pooled)}")
            y += 0.5
        ax.axvline(0, color="0.4", lw=0.6, ls="--")
        ax.set_yticks(ticks, labels, fontsize=5.5)
        ax.invert_yaxis()
        ax.set_title(f"{group} ({mine['n_runs'].iloc[0]} runs, {mine['varies'].iloc[0]})", fontsize=7)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    axes[-1, 0].set_xlabel("lag in tokens (subject minus ICL level; negative: subject first)")
    return fig


@styled
def plot_group_midpoints(midpoints: pd.DataFrame, group: str) -> Figure:
    """Each subject's midpoint per run of ``group`` (dots, 95 % intervals) and pooled (black diamond)
    against training tokens (log axis): does every run put the subjects in the same order?"""
    mine = midpoints[midpoints["group"] == group]
    if mine.empty:
        raise ValueError(f"plot_group_midpoints: no rows of group {group!r}")
    subjects = mine[["subject_kind", "subject", "head_set"]].drop_duplicates().sort_values(
        ["subject_kind", "subject", "head_set"]).reset_index(drop=True)
    runs = [r for r in dict.fromkeys(mine["run"]) if r != POOLED]
    fig, axes = new_figure(width=COLUMN_WIDTH_IN * 1.4, height=0.8 + 0.28 * len(subjects))
    ax = axes[0, 0]
    width = 0.6 / max(1, len(runs))
    for i, subject in subjects.iterrows():
        rows = mine[(mine["subject_kind"] == subject["subject_kind"]) & (mine["subject"] == subject["subject"])
                    & (mine["head_set"] == subject["head_set"])].set_index("run")
        for j, run in enumerate(runs + [POOLED]):
            if run not in rows.index or not np.isfinite(rows.loc[run, "midpoint_tokens"]):
                continue
            r = rows.loc[run]
            y = i - 0.3 + j * width if run != POOLED else i + 0.38
            ax.errorbar(r["midpoint_tokens"], y, xerr=[[r["midpoint_tokens"] - r["midpoint_low_tokens"]],
                                                       [r["midpoint_high_tokens"] - r["midpoint_tokens"]]],
                        fmt="D" if run == POOLED else "o", ms=4 if run == POOLED else 2.5,
                        color="black" if run == POOLED else f"C{j % 10}", elinewidth=0.7, capsize=0,
                        label=(_run_label(run) if run != POOLED else "pooled") if i == 0 else None)
    ax.set_xscale("log")
    ax.set_yticks(range(len(subjects)), [s["subject"] + (f" ({s['head_set']})" if s["head_set"] else "")
                                         for _, s in subjects.iterrows()], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("midpoint (training tokens)")
    ax.set_title(f"{group}: when each head class forms and each ICL level emerges, per run", fontsize=7)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=5.5)
    return fig


@styled
def plot_sizes(midpoints: pd.DataFrame) -> Figure:
    """Each subject's pooled midpoint against model size (one point per group, its 95 % interval; groups of
    one size side by side): do heads form, and ICL emerge, later or earlier in bigger models?"""
    pooled = midpoints[(midpoints["run"] == POOLED) & (midpoints["head_set"].isin(["all", ""]))]
    if pooled.empty:
        raise ValueError("plot_sizes: no pooled midpoints")
    fig, axes = new_figure(width=COLUMN_WIDTH_IN * 1.3, height=2.6)
    ax = axes[0, 0]
    subjects = pooled[["subject_kind", "subject"]].drop_duplicates().sort_values(["subject_kind", "subject"])
    for i, (_, subject) in enumerate(subjects.iterrows()):
        rows = pooled[(pooled["subject_kind"] == subject["subject_kind"]) & (pooled["subject"] == subject["subject"])
                      & np.isfinite(pooled["midpoint_tokens"])].sort_values("parameters")
        if rows.empty:
            continue
        ax.errorbar(rows["parameters"] * (1 + 0.04 * i), rows["midpoint_tokens"],
                    yerr=[rows["midpoint_tokens"] - rows["midpoint_low_tokens"],
                          rows["midpoint_high_tokens"] - rows["midpoint_tokens"]],
                    marker="o" if subject["subject_kind"] == "head_class" else "s", ms=3, lw=0.8, capsize=0,
                    color=f"C{i % 10}", label=subject["subject"].replace("_", " "))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (as the run ids state)")
    ax.set_ylabel("pooled midpoint (training tokens)")
    ax.set_title("midpoints against model size (circles: head classes, squares: ICL levels)", fontsize=7)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=5.5)
    return fig


def group_figures(tables: dict[str, pd.DataFrame], out_dir: str | os.PathLike[str]) -> list[Path]:
    """The forest plot (``lag_forest.png``), the pooled midpoints against size (``sizes.png``) and one
    midpoint figure per group (``midpoints-<group>.png``)."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written = []
    for name, fig in [("lag_forest", plot_lag_forest(tables["group_lags"])),
                      ("sizes", plot_sizes(tables["group_midpoints"])),
                      *((f"midpoints-{group}", plot_group_midpoints(tables["group_midpoints"], group))
                        for group in dict.fromkeys(tables["group_midpoints"]["group"]))]:
        written += save_figure(fig, out / f"{name}.png", formats=("png",))
        plt.close(fig)
    return written
