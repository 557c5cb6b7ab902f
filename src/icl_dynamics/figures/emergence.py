"""Figures for emergence and formation: the paper-style panel, RI heatmaps, the formation-vs-emergence
scatter and the heads x ICL-metrics correlation map.

Every curve is drawn at the checkpoints that exist -- markers on each, straight segments between,
error bars instead of interpolated bands -- so a coarse stretch of the grid (Pythia has no checkpoint
between steps 512 and 1000) looks coarse. The token axis is symlog with its linear part one step
wide, so step 0 is drawn, or linear where the checkpoints are evenly spaced (a toy zoo's). Several
models are faceted in columns, smallest model first. What is shaded and called a transition is exactly
the series the summary times (:data:`icl_dynamics.emergence.LEVEL_METRIC`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import FixedLocator, NullLocator

from icl_dynamics.checkpoints import model_slug
from icl_dynamics.emergence import LEVEL_METRIC, LEVELS, RI_PREFIX, tokens_per_step
from icl_dynamics.figures import (
    COLUMN_WIDTH_IN,
    PAGE_WIDTH_IN,
    axis_scale,
    new_figure,
    root_figure,
    save_figure,
    styled,
)
from icl_dynamics.figures.relation_index import ri_panel, select_rows

LEVEL_COLORS = {"loss_reduction": "C0", "format_compliance": "C1", "pattern_discovery": "C2"}
LEVEL_MARKERS = {"loss_reduction": "o", "format_compliance": "s", "pattern_discovery": "^"}
PANEL_METRICS = {"loss_reduction": ("icl_score",), "format_compliance": ("format_compliance",),
                 "pattern_discovery": ("accuracy", "accuracy_constrained")}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([mMbB])\b")
DODGE = 0.03  # decades between the scores' points in the formation-vs-emergence scatter


def model_order(models: Sequence[str]) -> list[str]:
    """Models sorted by the parameter count in their name (``pythia-160m`` < ``pythia-1.4b``), then by name."""
    def size(name: str) -> float:
        match = _SIZE.search(name.split("/")[-1].replace("-", " "))
        if not match:
            return np.inf
        return float(match.group(1)) * (1e9 if match.group(2).lower() == "b" else 1e6)

    return sorted(set(models), key=lambda m: (size(m), m))


def tokens_axis(ax: Axes, tokens_per_step: int, *, label: str | None = "training tokens",
                tokens: Sequence[float] | None = None) -> None:
    """Symlog token axis whose linear part spans one optimiser step, so step 0 shows at the left; linear
    when the checkpoints drawn (``tokens``) are evenly spaced (:func:`icl_dynamics.figures.axis_scale`),
    where a log axis would crowd a toy zoo's transition into its right end."""
    if tokens is not None and axis_scale(list(tokens)) == "linear":
        ax.set_xscale("linear")
        if label:
            ax.set_xlabel(label)
        return
    ax.set_xscale("symlog", linthresh=tokens_per_step, linscale=0.5)
    first = int(np.ceil(np.log10(tokens_per_step))) + 1  # leave a decade between the 0 tick and the next
    ax.xaxis.set_major_locator(FixedLocator([0.0, *(10.0**e for e in range(first, 16))]))
    ax.xaxis.set_minor_locator(NullLocator())
    if label:
        ax.set_xlabel(label)


def _in_top(table: pd.DataFrame, top_k: int) -> pd.Series:
    """Rows whose head ranks among the first ``top_k`` at the final checkpoint (unranked heads never do)."""
    return (table["final_rank"] <= top_k).fillna(False).astype(bool)


def _widths(n_models: int) -> float:
    return COLUMN_WIDTH_IN if n_models == 1 else PAGE_WIDTH_IN


def _label(level: str, task: str, shots, metric: str) -> str:
    parts = [metric.replace("_", " ")]
    if task not in ("mean", "") and level != "loss_reduction":
        parts.append(task)
    if not pd.isna(shots):
        parts.append(f"{int(shots)}-shot")
    return ", ".join(parts)


def _panel_series(icl_traj: pd.DataFrame, model: str, shots: int | None) -> pd.DataFrame:
    """The model's rows for the panel: each level's panel metrics at ``shots`` (default: the most shots)."""
    rows = icl_traj[icl_traj["model"] == model]
    keep = []
    for level, metrics in PANEL_METRICS.items():
        part = rows[(rows["level"] == level) & rows["metric"].isin(metrics)]
        if part.empty:
            continue
        if part["shots"].notna().any():
            chosen = shots if shots is not None else int(part["shots"].max())
            part = part[part["shots"] == chosen]
        keep.append(part)
    return pd.concat(keep) if keep else rows.iloc[:0]


def _shade(axes: Sequence[Axes], emergence: pd.DataFrame) -> None:
    """Shade each level's transition interval and mark its onset checkpoint on every axis, for the series
    the summary times (:data:`LEVEL_METRIC`: constrained accuracy for pattern discovery) and only where
    its midpoint is located (``fit_status`` ok), as the summary compares them."""
    timed = emergence[(emergence["metric"] == emergence["level"].map(LEVEL_METRIC)) & (emergence["fit_status"] == "ok")]
    for row in timed.itertuples():
        color = LEVEL_COLORS.get(row.level, "0.5")
        for ax in axes:
            if np.isfinite(row.transition_tokens_low) and np.isfinite(row.transition_tokens_high):
                ax.axvspan(row.transition_tokens_low, row.transition_tokens_high, facecolor=color, alpha=0.25,
                           edgecolor=color, lw=0.6)
            if not pd.isna(row.onset_tokens):
                ax.axvline(row.onset_tokens, color=color, ls=":", lw=0.8)


@styled
def plot_emergence_panel(icl_traj: pd.DataFrame, emergence: pd.DataFrame, head_traj: pd.DataFrame,
                         formation: pd.DataFrame, *, score: str | None = None, top_k: int = 5,
                         shots: int | None = None, fig: Figure | SubFigure | None = None) -> Figure:
    """Three ICL levels against training tokens with the top heads' ``score`` beneath, per model.

    Rows: loss reduction (ICL score), format compliance and pattern-discovery accuracy (constrained,
    solid: the series the summary times; unconstrained, thin and dotted), then the ``top_k`` heads at the
    final checkpoint for ``score`` (default, :func:`default_score`: the relation-index score with heads
    that formed, else prefix matching) with their mean control dashed. Shading is each level's
    transition interval as the summary has it, dotted lines its onset checkpoint. Drawn into ``fig``
    (an empty Figure or SubFigure) when given.
    """
    models = model_order(icl_traj["model"])
    if not models:
        raise ValueError("emergence_panel: the ICL trajectory table is empty")
    tps = tokens_per_step(icl_traj)
    score = score if score is not None else default_score(formation)
    fig, axes = new_figure(ncols=len(models), nrows=3, width=_widths(len(models)), height=4.6, sharex="col", fig=fig)
    for col, model in enumerate(models):
        ax_loss, ax_acc, ax_heads = axes[:, col]
        series = _panel_series(icl_traj, model, shots)
        for key, g in series.groupby(["level", "task", "shots", "metric"], dropna=False, sort=True):
            level, task, shot, metric = key
            g = g.sort_values("step")
            ax = ax_loss if level == "loss_reduction" else ax_acc
            timed = metric == LEVEL_METRIC.get(level)  # the series the summary times; the other is context
            label = _label(level, task, shot, metric) + ("" if timed else " (not timed)")
            ax.errorbar(g["tokens"], g["value"], yerr=[g["value"] - g["ci_low"], g["ci_high"] - g["value"]],
                        color=LEVEL_COLORS.get(level, "0.3"), marker=LEVEL_MARKERS.get(level, "o") if timed else ".",
                        ls="-" if timed else ":", lw=0.9 if timed else 0.6, elinewidth=0.5, capsize=0,
                        alpha=1.0 if timed else 0.6, label=label)
            ax.plot(g["tokens"], g["reference"], color=LEVEL_COLORS.get(level, "0.3"), ls=(0, (2, 2)), lw=0.6)
        shown = emergence.merge(series[["model", "level", "task", "shots", "metric"]].drop_duplicates(),
                                on=["model", "level", "task", "shots", "metric"])
        _shade(axes[:, col], shown)
        _plot_heads(ax_heads, head_traj, formation, model, score, top_k)
        ax_loss.set_title(model.split("/")[-1])
        ax_loss.set_ylabel("ICL score (nats)\nlower = more ICL")
        ax_acc.set_ylabel("fraction")
        ax_acc.set_ylim(-0.02, 1.02)
        ax_heads.set_ylabel(score.replace(RI_PREFIX, "RI ").replace("_", " "))
        tokens_axis(ax_heads, tps[model], tokens=series["tokens"].unique())
        ax_heads.plot(np.unique(series["tokens"]), np.zeros(series["tokens"].nunique()), "|", color="0.4", ms=4,
                      transform=ax_heads.get_xaxis_transform(), clip_on=False)
        if col == 0:
            for ax in (ax_loss, ax_acc, ax_heads):
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(loc="best", frameon=False, fontsize=6, handlelength=1.5)
    return root_figure(fig)


def emergence_panel(icl_traj: pd.DataFrame, emergence: pd.DataFrame, head_traj: pd.DataFrame,
                    formation: pd.DataFrame, path: str | os.PathLike[str], *, score: str | None = None,
                    top_k: int = 5, shots: int | None = None) -> list[Path]:
    """:func:`plot_emergence_panel`, saved as ``path`` (PNG and PDF)."""
    return save_figure(plot_emergence_panel(icl_traj, emergence, head_traj, formation, score=score, top_k=top_k,
                                            shots=shots), path)


def default_score(formation: pd.DataFrame) -> str:
    """The heads the panel shows by default: the relation-index score whose heads formed (a located
    midpoint: the relations the run actually has heads for), the one with the largest final excess of
    those; else prefix matching (the induction heads), so a run whose relations formed nothing (a toy's
    decoys, AGENDA's on a small model) shows no relation at random."""
    ri = formation[formation["score"].str.startswith(RI_PREFIX) & (formation["fit_status"] == "ok")]
    excess = ri["final_value"] - ri["final_control"]
    if excess.notna().any():
        return str(ri.loc[excess.idxmax(), "score"])
    return "prefix_matching" if (formation["score"] == "prefix_matching").any() else str(formation["score"].iloc[0])


def _plot_heads(ax: Axes, head_traj: pd.DataFrame, formation: pd.DataFrame, model: str, score: str, top_k: int) -> None:
    top = formation[(formation["model"] == model) & (formation["score"] == score) & _in_top(formation, top_k)]
    top = top.sort_values("final_rank")
    traj = head_traj[(head_traj["model"] == model) & (head_traj["score"] == score)]
    for i, row in enumerate(top.itertuples()):
        g = traj[(traj["layer"] == row.layer) & (traj["head"] == row.head)].sort_values("step")
        ax.plot(g["tokens"], g["value"], marker=".", lw=0.9, color=f"C{(i + 3) % 10}", label=f"L{row.layer}H{row.head}")
    control = traj.merge(top[["layer", "head"]], on=["layer", "head"]).groupby("tokens")["control"].mean()
    if len(control):
        ax.plot(control.index, control.to_numpy(), color="0.3", ls=(0, (2, 2)), lw=0.7, label="control")


@styled
def plot_ri_heatmaps(ri: pd.DataFrame, family: str, *, model: str | None = None, steps: Sequence[int] | None = None,
                     direction: str = "forward", gate: str = "argmax", variant: str = "source",
                     n_steps: int = 4, fig: Figure | SubFigure | None = None) -> Figure:
    """Relation index per head (layer x head) of each ``family`` relation (rows) at chosen steps (columns),
    of ``model`` (default: the only one in ``ri``). Grey cells: the head never qualified (RI undefined);
    white dots: flagged semantic induction heads. A family without triplets (none survived
    tokenisation) gets a figure that says so.

    ``steps`` default: ``n_steps`` checkpoints evenly spaced in log(step + 1), first and last included.
    Drawn into ``fig`` (an empty Figure or SubFigure) when given.
    """
    rows = select_rows(ri, model=model, gate=gate, variant=variant, direction=direction)
    model = str(rows["model"].iloc[0])
    available = np.sort(rows["step"].unique())
    chosen = list(steps) if steps is not None else _log_spaced(available, n_steps)
    missing = sorted(set(chosen) - set(available.tolist()))
    if missing:
        raise ValueError(f"plot_ri_heatmaps: model {model!r} has no RI rows at steps {missing}")
    fam = rows[rows["family"] == family]
    if fam.empty:
        fig, axes = new_figure(width=COLUMN_WIDTH_IN, height=1.0, fig=fig)
        axes[0, 0].axis("off")
        axes[0, 0].text(0.5, 0.5, f"{model.split('/')[-1]}: no {family} triplets survived tokenisation",
                        ha="center", va="center")
        return root_figure(fig)
    n_layers, n_heads = int(rows["layer"].max()) + 1, int(rows["head"].max()) + 1
    relations = sorted(fam["relation"].unique())
    cell = (PAGE_WIDTH_IN - 1.2) / len(chosen) * float(np.clip(n_layers / n_heads, 0.35, 1.2))
    fig, axes = new_figure(ncols=len(chosen), nrows=len(relations), width=PAGE_WIDTH_IN,
                           height=0.6 + len(relations) * (cell + 0.25), fig=fig)
    vmax = float(np.nanmax(fam[fam["step"].isin(chosen)]["ri"].to_numpy(float), initial=0.0)) or 1.0
    image = None
    for i, relation in enumerate(relations):
        for j, step in enumerate(chosen):
            ax = axes[i, j]
            cell = fam[(fam["relation"] == relation) & (fam["step"] == step)]
            image = ri_panel(ax, cell, vmax, (n_layers, n_heads))
            ax.set_xticks([0, n_heads - 1])
            ax.set_yticks([0, n_layers - 1])
            if i == 0:
                ax.set_title(f"step {step}")
            if j == 0:
                ax.set_ylabel(f"{relation}\nlayer")
            else:
                ax.set_yticklabels([])
            if i == len(relations) - 1:
                ax.set_xlabel("head")
    fig.colorbar(image, ax=axes, shrink=0.8, label="relation index")
    fig.suptitle(f"{model.split('/')[-1]}: {family} relations ({direction}, {gate} gate, {variant})", fontsize=8)
    return root_figure(fig)


def ri_heatmaps(ri: pd.DataFrame, path: str | os.PathLike[str], *, steps: Sequence[int] | None = None,
                direction: str = "forward", gate: str = "argmax", variant: str = "source",
                n_steps: int = 4, families: Sequence[str] = ("kg", "syntax")) -> list[Path]:
    """:func:`plot_ri_heatmaps` of every model and family (``families`` and any other with rows), saved as
    ``<path>-<model slug>-<family>`` (PNG and PDF)."""
    sel = ri[(ri["direction"] == direction) & (ri["gate"] == gate) & (ri["variant"] == variant)]
    if sel.empty:
        raise ValueError(f"ri_heatmaps: no rows with direction={direction!r} gate={gate!r} variant={variant!r}")
    written: list[Path] = []
    base = Path(path)
    for model in model_order(sel["model"]):
        for family in sorted(set(families) | set(sel.loc[sel["model"] == model, "family"])):
            fig = plot_ri_heatmaps(sel, family, model=model, steps=steps, direction=direction, gate=gate,
                                   variant=variant, n_steps=n_steps)
            written += save_figure(fig, base.with_name(f"{base.name}-{model_slug(model)}-{family}"))
    return written


def _log_spaced(steps: np.ndarray, n: int) -> list[int]:
    targets = np.geomspace(steps[0] + 1, steps[-1] + 1, n) - 1
    return sorted({int(steps[np.argmin(np.abs(np.log1p(steps) - np.log1p(t)))]) for t in targets})


def _whiskers(value: np.ndarray, low, high) -> np.ndarray:
    """Error-bar lengths below and above ``value`` for the interval [low, high], never negative."""
    return np.clip(np.stack([value - np.asarray(low, float), np.asarray(high, float) - value]), 0, None)


@styled
def plot_formation_emergence_scatter(formation: pd.DataFrame, emergence: pd.DataFrame, *,
                                     scores: Sequence[str] | None = None, top_k: int = 3,
                                     fig: Figure | SubFigure | None = None) -> Figure:
    """Formation transition of the top-k heads per score (y) against each ICL series' emergence
    transition (x), both with bootstrap intervals; above the diagonal the head formed later.

    One panel per model; colour = score, marker = ICL level. Each score's points are nudged sideways by
    a few hundredths of a decade (its own x offset, in the legend order) and drawn hollow over the others,
    so heads of different scores with one midpoint (prefix matching and previous token, formed together)
    stay visible. Heads or series whose transition was not located are left out and counted in the
    panel's corner. Drawn into ``fig`` (an empty Figure or SubFigure) when given.
    """
    models = model_order(emergence["model"])
    scores = list(scores) if scores is not None else sorted(formation["score"].unique())
    fig, axes = new_figure(ncols=len(models), width=_widths(len(models)), height=2.8 if len(models) == 1 else 3.0,
                           fig=fig)
    handles = {}
    for col, model in enumerate(models):
        ax = axes[0, col]
        em = emergence[(emergence["model"] == model) & (emergence["fit_status"] == "ok")]
        fo = formation[(formation["model"] == model) & formation["score"].isin(scores) & _in_top(formation, top_k)]
        located = fo[fo["fit_status"] == "ok"]
        for i, score in enumerate(scores):
            heads = located[located["score"] == score]
            for m in em.itertuples():
                if heads.empty:
                    continue
                x = np.full(len(heads), m.transition_tokens) * 10 ** (DODGE * (i - (len(scores) - 1) / 2))
                y = heads["transition_tokens"].to_numpy(float)
                # a bootstrap interval need not hold the fit's own midpoint (a head that rises and falls
                # again): the bar then ends at the estimate on that side
                handle = ax.errorbar(
                    x, y, xerr=_whiskers(x, m.transition_tokens_low, m.transition_tokens_high),
                    yerr=_whiskers(y, heads["transition_tokens_low"], heads["transition_tokens_high"]),
                    ls="none", marker=LEVEL_MARKERS.get(m.level, "o"), color=f"C{i % 10}", ms=4.5 - 0.4 * i,
                    mfc="none", mew=0.9, elinewidth=0.5, alpha=0.9, zorder=3 + i)
                handles.setdefault(score, handle)
        values = np.concatenate([em[["transition_tokens_low", "transition_tokens_high"]].to_numpy(float).ravel(),
                                 located[["transition_tokens_low", "transition_tokens_high"]].to_numpy(float).ravel()])
        values = values[np.isfinite(values) & (values > 0)]
        if len(values):
            lims = (values.min() / 2, values.max() * 2)
            ax.plot(lims, lims, color="0.5", lw=0.7, ls="--")
            ax.set_xlim(lims)
            ax.set_ylim(lims)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("ICL emergence (tokens)")
        if col == 0:
            ax.set_ylabel(f"head formation, top {top_k} per score (tokens)")
        ax.set_title(model.split("/")[-1])
        ax.text(0.02, 0.98, f"not located: {len(fo) - len(located)} of {len(fo)} heads, "
                f"{int((emergence['model'] == model).sum()) - len(em)} ICL series",
                transform=ax.transAxes, va="top", fontsize=6)
    level_handles = [axes[0, 0].plot([], [], ls="none", marker=LEVEL_MARKERS[lv], color="0.3")[0] for lv in LEVELS]
    fig.legend([*handles.values(), *level_handles],
               [*(s.replace("_", " ") for s in handles), *(lv.replace("_", " ") for lv in LEVELS)],
               loc="outside lower center", ncols=3, frameon=False, fontsize=6)
    return root_figure(fig)


def formation_emergence_scatter(formation: pd.DataFrame, emergence: pd.DataFrame, path: str | os.PathLike[str], *,
                                scores: Sequence[str] | None = None, top_k: int = 3) -> list[Path]:
    """:func:`plot_formation_emergence_scatter`, saved as ``path`` (PNG and PDF)."""
    return save_figure(plot_formation_emergence_scatter(formation, emergence, scores=scores, top_k=top_k), path)


@styled
def plot_correlation_map(relation: pd.DataFrame, *, scores: Sequence[str] | None = None, top_k: int = 5,
                         fig: Figure | SubFigure | None = None) -> Figure:
    """Heads (top-k per score at the final checkpoint) x ICL series: Spearman correlation of the first
    differences, with a dot where the block-permutation test is significant after BH (``related``).
    Drawn into ``fig`` (an empty Figure or SubFigure) when given."""
    models = model_order(relation["model"])
    scores = list(scores) if scores is not None else sorted(relation["score"].unique())
    rel = relation[relation["score"].isin(scores) & _in_top(relation, top_k)]
    n_rows = max((len(g[["score", "layer", "head"]].drop_duplicates()) for _, g in rel.groupby("model")), default=1)
    fig, axes = new_figure(ncols=len(models), width=_widths(len(models)), height=1.0 + 0.12 * n_rows, fig=fig)
    image = None
    for col, model in enumerate(models):
        ax = axes[0, col]
        part = rel[rel["model"] == model].copy()
        part["row"] = [f"{s.replace(RI_PREFIX, 'RI ').replace('_', ' ')} L{la}H{h}"
                       for s, la, h in zip(part["score"], part["layer"], part["head"])]
        part["col"] = [_label(*k) for k in zip(part["level"], part["task"], part["shots"], part["metric"])]
        part = part.sort_values(["score", "final_rank"])
        rows = list(dict.fromkeys(part["row"]))
        part["level_order"] = part["level"].map({lv: i for i, lv in enumerate(LEVELS)})
        cols = list(dict.fromkeys(part.sort_values(["level_order", "metric", "task", "shots"])["col"]))
        rho, related = (part.pivot_table(index="row", columns="col", values=v, aggfunc="first")
                        .reindex(index=rows, columns=cols) for v in ("rho_diff", "related"))
        image = ax.imshow(rho.to_numpy(float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        yy, xx = np.nonzero(related.fillna(False).to_numpy(bool))
        ax.plot(xx, yy, "k.", ms=3)
        ax.set_yticks(range(len(rows)), rows, fontsize=5)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=6)
        ax.set_title(model.split("/")[-1])
    fig.colorbar(image, ax=axes, shrink=0.8, label="Spearman ρ of first differences")
    return root_figure(fig)


def correlation_map(relation: pd.DataFrame, path: str | os.PathLike[str], *, scores: Sequence[str] | None = None,
                    top_k: int = 5) -> list[Path]:
    """:func:`plot_correlation_map`, saved as ``path`` (PNG and PDF)."""
    return save_figure(plot_correlation_map(relation, scores=scores, top_k=top_k), path)
