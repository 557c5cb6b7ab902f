"""Figures of the relation index: per relation, a layer x head heatmap at the final checkpoint, and
the top heads' RI against training step (input: the merged relation-index table of one model)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator

from icl_dynamics.checkpoints import model_slug
from icl_dynamics.figures import (
    COLUMN_WIDTH_IN,
    PAGE_WIDTH_IN,
    grid,
    new_figure,
    root_figure,
    save_figure,
    step_axis,
    styled,
)

NEVER_QUALIFIED = "0.85"  # colour of heads whose RI is undefined (no qualifying event)
# the relation index's controls (the SIH test clears all three) and their line styles
CONTROLS = {"control_matched": "-", "control_tenth": (0, (1, 1)), "control_random": (0, (3, 2))}


def select_rows(ri: pd.DataFrame, *, model: str | None, gate: str, variant: str, direction: str) -> pd.DataFrame:
    """Rows of one model (the only one when ``model`` is None) for one gate, variant and direction."""
    models = sorted(ri["model"].unique())
    if model is None:
        if len(models) != 1:
            raise ValueError(f"the relation-index table holds models {models}; name one")
        model = models[0]
    rows = ri[(ri["model"] == model) & (ri["gate"] == gate) & (ri["variant"] == variant)
              & (ri["direction"] == direction)]
    if rows.empty:
        raise ValueError(f"no relation-index rows for model={model!r} gate={gate!r} variant={variant!r} "
                         f"direction={direction!r}")
    return rows


def top_heads(rows: pd.DataFrame, k: int) -> pd.DataFrame:
    """The ``k`` heads of one relation with the largest effect over the controls (RI minus the control it
    clears least, as formation reads it: :func:`icl_dynamics.emergence.ri_formation_value`) at the last
    step, among cells with enough documents for the SIH test; chosen without looking at the trajectory."""
    from icl_dynamics.emergence import ri_formation_value

    last = rows[(rows["step"] == rows["step"].max()) & (rows["sih_status"] != "insufficient")]
    return last.assign(_least=ri_formation_value(last)[0]).nlargest(k, "_least")[["layer", "head"]]


@styled
def ri_panel(ax: Axes, cell: pd.DataFrame, vmax: float, shape: tuple[int, int] | None = None) -> AxesImage:
    """Draw one layer x head RI map (layer 0 at the bottom): grey where the head never qualified,
    a white dot where it is flagged as a semantic induction head. Returns the image for a colour bar."""
    cmap = colormaps["viridis"].with_extremes(bad=NEVER_QUALIFIED)
    image = ax.imshow(np.ma.masked_invalid(grid(cell, "ri", shape)), cmap=cmap, vmin=0, vmax=vmax, aspect="auto",
                      origin="lower", interpolation="nearest")
    if "sih" in cell:
        sih = cell[cell["sih"].astype(bool)]
        ax.scatter(sih["head"], sih["layer"], s=6, color="white", edgecolors="black", linewidths=0.3)
    return image


@styled
def final_heatmaps(rows: pd.DataFrame, family: str, *, fig: Figure | SubFigure | None = None) -> Figure:
    """One layer x head heatmap of RI per relation of ``family`` at the last step of ``rows`` (one
    model, gate, variant, direction). Grey: never qualified; white dot: flagged SIH. Drawn into ``fig``
    (an empty Figure or SubFigure) when given."""
    step = int(rows["step"].max())
    last = rows[(rows["step"] == step) & (rows["family"] == family)]
    if last.empty:
        raise ValueError(f"no {family!r} relation rows at step {step}")
    relations = sorted(last["relation"].unique())
    ncols = min(4, len(relations))
    nrows = math.ceil(len(relations) / ncols)
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=min(PAGE_WIDTH_IN, 1.7 * ncols + 0.8),
                           height=1.7 * nrows + 0.4, fig=fig)
    vmax = float(np.nanmax(last["ri"].to_numpy(float), initial=0.0)) or 1.0
    image = None
    for ax, relation in zip(axes.flat, relations):
        cell = last[last["relation"] == relation]
        image = ri_panel(ax, cell, vmax)
        ax.set_title(f"{relation} ({int(cell['triplets'].max()):,} triplets)")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(relations):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label="relation index")
    first = rows.iloc[0]
    fig.suptitle(f"{first['model']} step {step:,}: {family} ({first['direction']}, {first['gate']} gate, "
                 f"{first['variant']}); grey = never qualified, dot = SIH")
    return root_figure(fig)


@styled
def top_heads_over_training(rows: pd.DataFrame, family: str, *, k: int = 3,
                            fig: Figure | SubFigure | None = None) -> Figure:
    """RI (+- standard error) of each relation's top ``k`` final-step heads against training step,
    with the mean matched, tenth-token and random controls of those heads as grey lines (the SIH test
    compares with all three; the matched one, a token of the tail's kind, is the hardest). Drawn into
    ``fig`` (an empty Figure or SubFigure) when given."""
    fam = rows[rows["family"] == family]
    if fam.empty:
        raise ValueError(f"no {family!r} relation rows")
    relations = sorted(fam["relation"].unique())
    ncols = min(4, len(relations))
    nrows = math.ceil(len(relations) / ncols)
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=min(PAGE_WIDTH_IN, 1.8 * ncols + 0.4),
                           height=1.8 * nrows + 0.3, sharey=True, fig=fig)
    steps = sorted(int(s) for s in fam["step"].unique())
    for ax, relation in zip(axes.flat, relations):
        rel = fam[fam["relation"] == relation]
        chosen = top_heads(rel, k)
        traj = rel.merge(chosen, on=["layer", "head"])
        for i, (layer, head) in enumerate(chosen.itertuples(index=False)):
            line = traj[(traj["layer"] == layer) & (traj["head"] == head)].sort_values("step")
            se = line["ri_se"].fillna(0.0)
            ax.fill_between(line["step"], line["ri"] - se, line["ri"] + se, color=f"C{i}", alpha=0.2, linewidth=0)
            ax.plot(line["step"], line["ri"], marker="o", color=f"C{i}", label=f"L{layer}H{head}")
        controls = traj.groupby("step")[list(CONTROLS)].mean()
        for column, style in CONTROLS.items():
            ax.plot(controls.index, controls[column], color="0.4", linestyle=style, linewidth=0.8,
                    label=column.replace("control_", "") + " ctrl")
        step_axis(ax, steps)
        ax.set_title(relation)
        ax.legend(loc="upper left", frameon=False, fontsize=5)
    for ax in list(axes.flat)[len(relations):]:
        ax.set_axis_off()
    axes[0][0].set_ylabel("relation index")
    first = fam.iloc[0]
    fig.suptitle(f"{first['model']}: top-{k} heads per {family} relation at the last step "
                 f"({first['direction']}, {first['gate']} gate, {first['variant']})")
    return root_figure(fig)


def write_relation_index_figures(ri: pd.DataFrame, out_dir: str | os.PathLike[str], *, model: str | None = None,
                                 gate: str = "argmax", variant: str = "source", direction: str = "forward",
                                 k: int = 3) -> list[Path]:
    """Both figures for every family, saved under ``out_dir`` as
    ``<model slug>_ri_<family>_{final,top}_<gate>_<variant>_<direction>`` (PNG and PDF)."""
    rows = select_rows(ri, model=model, gate=gate, variant=variant, direction=direction)
    base = Path(out_dir) / model_slug(rows["model"].iloc[0])
    written: list[Path] = []
    for family in sorted(rows["family"].unique()):
        tag = f"{family}_{{}}_{gate}_{variant}_{direction}"
        written += save_figure(final_heatmaps(rows, family), f"{base}_ri_{tag.format('final')}.png")
        written += save_figure(top_heads_over_training(rows, family, k=k), f"{base}_ri_{tag.format('top')}.png")
    return written


@styled
def planted_control(rows: pd.DataFrame, training: pd.DataFrame, phase_step: float, *,
                    fig: Figure | SubFigure | None = None) -> Figure:
    """The positive control of the relations toy zoo: top, the training loss on the planted tails
    with the phase change; bottom, per planted and decoy relation, the effect (RI over the matched
    control, +- 2 SE) of the head with the largest final effect, filled where it is flagged as an SIH.
    Drawn into ``fig`` (an empty Figure or SubFigure) when given."""
    fig, axes = new_figure(nrows=2, width=COLUMN_WIDTH_IN, height=4.2, sharex=True, fig=fig)
    top, bottom = axes[0][0], axes[1][0]
    curve = training.dropna(subset=["relation_loss"]).sort_values("step")
    top.plot(curve["step"], curve["relation_loss"], color="0.3", linewidth=0.8, label="planted tails")
    if "decoy_loss" in curve:
        top.plot(curve["step"], curve["decoy_loss"], color="0.7", linewidth=0.8, label="after a decoy marker")
    top.set_yscale("log")
    top.set_ylabel("training loss")
    top.legend(loc="lower left", frameon=False)
    steps = sorted(int(s) for s in rows["step"].unique())
    styles = {"planted": "-", "decoy": ":"}
    for i, ((family, relation), rel) in enumerate(rows.groupby(["family", "relation"], sort=True)):
        last = rel[rel["step"] == rel["step"].max()]
        best = last.loc[last["effect"].idxmax()] if last["effect"].notna().any() else last.iloc[0]
        line = rel[(rel["layer"] == best["layer"]) & (rel["head"] == best["head"])].sort_values("step")
        colour = f"C{i}"
        bottom.fill_between(line["step"], line["effect"] - 2 * line["effect_se"], line["effect"] + 2 * line["effect_se"],
                            color=colour, alpha=0.15, linewidth=0)
        bottom.plot(line["step"], line["effect"], linestyle=styles.get(family, "--"), color=colour,
                    label=f"{relation} (L{int(best['layer'])}H{int(best['head'])})")
        flagged = line[line["sih"].astype(bool)]
        bottom.scatter(flagged["step"], flagged["effect"], color=colour, s=9, zorder=3)
        bottom.scatter(line["step"], line["effect"], facecolors="none", edgecolors=colour, s=9, linewidths=0.6)
    bottom.axhline(0, color="0.5", linewidth=0.6)
    for ax in (top, bottom):
        ax.axvline(phase_step, color="firebrick", linewidth=0.8, linestyle="--")
    top.text(phase_step, top.get_ylim()[1], " phase change", color="firebrick", va="top", fontsize=6)
    bottom.set_xlabel("training step")
    bottom.set_xlim(min(steps), max(steps))
    bottom.set_ylabel("effect (RI - matched control)")
    bottom.legend(loc="upper left", frameon=False, fontsize=5)
    first = rows.iloc[0]
    fig.suptitle(f"{first['model']}: planted relations\n({first['direction']}, {first['gate']} gate, "
                 f"{first['variant']}; filled = SIH)")
    return root_figure(fig)
