"""Do the heads we flag carry what we say they carry? The ablation tables over training, read three ways.

* **Correlation across heads, per checkpoint** (:func:`head_correlations`): the Spearman correlation
  between a head's relation index over its matched control (``effect`` of the relation-index table,
  averaged over the family's relations at the analysis' direction, gate and variant; negative-control
  cells, the letter family under literal/source, claim nothing and are left out) and what
  ablating it costs relation recall (minus its ``tail_logprob`` effect), per relation family; and
  between its prefix-matching score and what ablating it costs the ICL score (its ``icl_score``
  effect: loss reduction lost). Each head's effect is its exact one where the ablation table has it
  (the screen's top heads, or every head with ``ablation.exact_heads: all``), else the gradient screen's
  estimate (:func:`best_head_effects`; ``n_estimated`` counts those). The interval is a percentile bootstrap
  over heads; ``p_value`` is scipy's (heads are not independent draws, so read it as descriptive).
* **Group importance over its control** (:func:`group_series`): per checkpoint, the sign-folded effect
  of ablating a group (the flagged SIHs, the top-k induction heads) minus the mean effect of its
  layer-matched random controls, positive where the group matters more than as many random heads of
  its layers. Sign: recall, format compliance and accuracy lost count positive, and so does ICL score
  gained. Its value and standard error come from the ablation table's ``importance`` rows: per
  evaluation unit the group's effect minus its controls' mean, bootstrapped over units, so the group and
  its controls are resampled together and their covariance counts (``se`` read from the interval as
  ``(ci_high - ci_low) / (2 z)``; the tasks' mean combines tasks as independent). A checkpoint where the group is
  empty (nothing flagged yet) has importance 0 with standard error 0: ablating no head changes
  nothing. The tasks' metrics are averaged over tasks, as the analysis does by default.
* **When each causal effect emerges** (:func:`causal_tables`): each group-importance series gets the
  onset and transition of :mod:`icl_dynamics.emergence` (same step-0 null, same rule, same logistic
  and bootstrap), and its midpoint is compared with every ICL level's emergence midpoint (the
  analysis's ``emergence`` table): ``before``, ``with`` or ``after``, from the lag's interval.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

from icl_dynamics.emergence import (
    _ESTIMATE_FIELDS,
    _LAG_FIELDS,
    DEFAULT_CI_LEVEL,
    DEFAULT_K,
    DEFAULT_N_BOOT,
    LEVEL_METRIC,
    _drop_excluded,
    _estimate_all,
    _frame,
    _midpoint,
    _require_columns,
    _rng,
    _transition_lag,
    _z,
    standardise,
)

# sign that turns an ablation effect into "what the model lost" (positive: the heads mattered)
LOSS_SIGN = {"tail_logprob": -1.0, "icl_score": 1.0, "format_compliance": -1.0, "accuracy_constrained": -1.0}
SERIES_KEYS = ("model", "group", "level", "task", "shots", "metric")
COMPARISONS = RI_VS_RECALL, PM_VS_ICL = ("ri_effect_vs_recall", "prefix_matching_vs_icl_score")
ABLATION_COLUMNS = ("model", "step", "tokens", "ablation", "layer", "head", "group", "draw", "heads", "level", "task",
                    "shots", "metric", "value", "ci_low", "ci_high")

CORRELATION_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
    pa.field("comparison", pa.string(), nullable=False),  # COMPARISONS
    pa.field("task", pa.string(), nullable=False),  # relation family, or the ICL score's text source
    pa.field("n_heads", pa.int32(), nullable=False),
    pa.field("n_estimated", pa.int32(), nullable=False),  # of them, heads whose effect is the screen's estimate
    pa.field("rho", pa.float64()),
    pa.field("ci_low", pa.float64()),
    pa.field("ci_high", pa.float64()),
    pa.field("p_value", pa.float64()),
])
"""One row per (model, checkpoint, comparison, family or text source): Spearman across heads."""

SERIES_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
    pa.field("group", pa.string(), nullable=False),
    pa.field("level", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("shots", pa.int32()),
    pa.field("metric", pa.string(), nullable=False),
    pa.field("n_heads", pa.int32(), nullable=False),
    pa.field("n_controls", pa.int32(), nullable=False),
    pa.field("group_loss", pa.float64(), nullable=False),
    pa.field("control_loss", pa.float64()),
    pa.field("control_min", pa.float64()),
    pa.field("control_max", pa.float64()),
    pa.field("value", pa.float64()),
    pa.field("se", pa.float64()),
])
"""One row per (model, checkpoint, group, level, task, shots, metric): the group's loss over its control."""

CAUSAL_EMERGENCE_SCHEMA = pa.schema([*(pa.field(k, t, nullable=n) for k, t, n in (
    ("model", pa.string(), False), ("group", pa.string(), False), ("level", pa.string(), False),
    ("task", pa.string(), False), ("shots", pa.int32(), True), ("metric", pa.string(), False))),
    *_ESTIMATE_FIELDS])
"""One row per group-importance series: onset and transition, as emergence.EMERGENCE_SCHEMA."""

ORDER_SCHEMA = pa.schema([
    *(CAUSAL_EMERGENCE_SCHEMA.field(k) for k in SERIES_KEYS),
    pa.field("subject_tokens", pa.float64()),
    pa.field("subject_low_tokens", pa.float64()),
    pa.field("subject_high_tokens", pa.float64()),
    pa.field("icl_level", pa.string(), nullable=False),
    pa.field("icl_task", pa.string(), nullable=False),
    pa.field("icl_shots", pa.int32()),
    pa.field("icl_metric", pa.string(), nullable=False),
    pa.field("level_tokens", pa.float64()),
    pa.field("level_low_tokens", pa.float64()),
    pa.field("level_high_tokens", pa.float64()),
    *_LAG_FIELDS,
])
"""One row per group-importance series x ICL level series of its model: causal midpoint minus emergence
midpoint (negative: the causal effect first), its interval and the verdict."""

TABLES = {"causal_correlation": CORRELATION_SCHEMA, "causal_series": SERIES_SCHEMA,
          "causal_emergence": CAUSAL_EMERGENCE_SCHEMA, "causal_order": ORDER_SCHEMA}


def _spearman_interval(x: np.ndarray, y: np.ndarray, *, n_boot: int, ci_level: float,
                       rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Spearman rho of paired values, its percentile bootstrap interval over pairs, and scipy's p."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan, np.nan, np.nan
    rho, p = stats.spearmanr(x, y)
    picks = rng.integers(len(x), size=(n_boot, len(x)))
    rx, ry = (stats.rankdata(v[picks], axis=1) for v in (x, y))  # Spearman = Pearson of the ranks, per resample
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample of tied values has no rho
        boots = (rx * ry).sum(1) / np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    tail = (1 - ci_level) / 2
    low, high = np.nanquantile(boots, [tail, 1 - tail]) if np.isfinite(boots).any() else (np.nan, np.nan)
    return float(rho), float(low), float(high), float(p)


def best_head_effects(heads: pd.DataFrame) -> pd.DataFrame:
    """Per head and cell, its exact effect where the table has one, else the screen's estimate (``method``
    says which; a table from before the screen has exact rows only)."""
    if "method" not in heads:
        return heads.assign(method="exact")
    keys = ["model", "step", "layer", "head", "level", "task", "shots", "metric"]
    ordered = heads.assign(_rank=(heads["method"] != "exact").astype(int)).sort_values("_rank", kind="stable")
    return ordered.drop_duplicates([k for k in keys if k in heads]).drop(columns="_rank").sort_index()


def head_correlations(ablation: pd.DataFrame, heads: pd.DataFrame, ri: pd.DataFrame | None = None, *,
                      direction: str = "forward", gate: str = "argmax", variant: str = "source",
                      n_boot: int = DEFAULT_N_BOOT, ci_level: float = DEFAULT_CI_LEVEL, seed: int = 0,
                      exclude: Iterable[tuple[str, int]] | None = None) -> pd.DataFrame:
    """Per checkpoint, the rank correlation across heads of each correlational score with the causal
    effect it claims (CORRELATION_SCHEMA columns; the module docstring)."""
    _require_columns(ablation, ABLATION_COLUMNS, "ablation")
    single = _drop_excluded(best_head_effects(ablation[ablation["ablation"] == "head"]), exclude)
    pairs = []  # (comparison, task, score rows [model, step, layer, head, x], effect rows [..., y])
    icl = single[single["metric"] == "icl_score"]
    pm = heads[["model", "step", "layer", "head", "prefix_matching"]].rename(columns={"prefix_matching": "x"})
    for task, rows in icl.groupby("task", sort=True):
        pairs.append((PM_VS_ICL, task, pm, rows.assign(y=rows["value"])))
    if ri is not None:
        sel = ri[(ri["direction"] == direction) & (ri["gate"] == gate) & (ri["variant"] == variant)]
        if "negative_control" in sel:  # a negative control's effect claims nothing to correlate with
            sel = sel[~sel["negative_control"].astype(bool)]
        recall = single[single["metric"] == "tail_logprob"]
        for family, rows in recall.groupby("task", sort=True):
            per_head = sel[sel["family"] == family].groupby(["model", "step", "layer", "head"], as_index=False)[
                "effect"].mean()  # NaN cells (no events) left out by the mean
            pairs.append((RI_VS_RECALL, family, per_head.rename(columns={"effect": "x"}),
                          rows.assign(y=-rows["value"])))
    out = []
    for comparison, task, scores, effects in pairs:
        both = effects[["model", "step", "tokens", "layer", "head", "method", "y"]].merge(
            scores, on=["model", "step", "layer", "head"], how="inner")
        for (model, step), g in both.groupby(["model", "step"], sort=True):
            g = g[np.isfinite(g["x"].to_numpy(float)) & np.isfinite(g["y"].to_numpy(float))]
            rho, low, high, p = _spearman_interval(g["x"].to_numpy(float), g["y"].to_numpy(float), n_boot=n_boot,
                                                   ci_level=ci_level, rng=_rng(seed, (model, step, comparison, task)))
            out.append({"model": model, "step": int(step), "tokens": int(g["tokens"].iloc[0]) if len(g) else 0,
                        "comparison": comparison, "task": task, "n_heads": len(g),
                        "n_estimated": int((g["method"] == "attribution").sum()), "rho": rho, "ci_low": low,
                        "ci_high": high, "p_value": p})
    return _frame(out, CORRELATION_SCHEMA)


def group_series(ablation: pd.DataFrame, *, ci_level: float = DEFAULT_CI_LEVEL,
                 exclude: Iterable[tuple[str, int]] | None = None) -> pd.DataFrame:
    """Per checkpoint, each group's loss over its layer-matched controls (SERIES_SCHEMA columns; the
    module docstring); the synthetic tasks' metrics as their mean over tasks (``task = "mean"``)."""
    _require_columns(ablation, ABLATION_COLUMNS, "ablation")
    z = _z(ci_level)
    frame = _drop_excluded(ablation, exclude)
    frame = frame[frame["metric"].isin(LOSS_SIGN)]
    if "method" in frame:  # groups and controls are always exact; the screen's head rows are not needed here
        frame = frame[frame["method"] == "exact"]
    sign = frame["metric"].map(LOSS_SIGN).to_numpy(float)
    frame = frame.assign(loss=sign * frame["value"].to_numpy(float),
                         se=(frame["ci_high"] - frame["ci_low"]).to_numpy(float) / (2 * z),
                         task=np.where(frame["shots"].notna(), "mean", frame["task"].astype(str)),
                         n_heads=frame["heads"].map(len))
    cells = ["level", "task", "shots", "metric"]
    # tasks averaged: the mean loss over tasks and its standard error sqrt(sum se^2) / T, per ablation
    frame = frame.assign(se2=frame["se"] ** 2).groupby(
        ["model", "step", "tokens", "ablation", "layer", "head", "group", "draw", *cells], dropna=False,
        as_index=False, sort=True).agg(loss=("loss", "mean"), se2=("se2", "sum"), units=("se2", "size"),
                                       n_heads=("n_heads", "max"))
    frame["se"] = np.sqrt(frame["se2"]) / frame["units"]
    groups = frame.loc[frame["ablation"] == "group"].groupby("model")["group"].unique()
    key = ["model", "step", "group", "level", "task", "metric"]
    by_ablation = {kind: {k: g for k, g in frame[frame["ablation"] == kind].groupby(key, sort=False)}
                   for kind in ("group", "control", "importance")}
    rows = []
    for (model, step, tokens, *cell), _ in frame[~frame["ablation"].isin(("control", "importance"))].groupby(
            ["model", "step", "tokens", *cells], dropna=False, sort=True):
        for name in sorted(groups.get(model, [])):
            where = (model, step, name, cell[0], cell[1], cell[3])
            mine, controls, importance = (by_ablation[kind].get(where, frame.iloc[:0])
                                          for kind in ("group", "control", "importance"))
            row = {"model": model, "step": step, "tokens": tokens, "group": name, **dict(zip(cells, cell)),
                   "n_controls": len(controls)}
            if mine.empty:  # nothing flagged at this checkpoint: ablating no head costs nothing
                rows.append({**row, "n_heads": 0, "group_loss": 0.0, "control_loss": 0.0, "control_min": 0.0,
                             "control_max": 0.0, "value": 0.0, "se": 0.0})
                continue
            row.update(n_heads=int(mine["n_heads"].iloc[0]), group_loss=float(mine["loss"].iloc[0]))
            if controls.empty:  # no layer-matched control (the group fills its layers): no importance
                rows.append({**row, "control_loss": np.nan, "control_min": np.nan, "control_max": np.nan,
                             "value": np.nan, "se": np.nan})
                continue
            if importance.empty:
                raise ValueError(f"ablation: {model}@step{step} has group {name!r} and its controls but no "
                                 "'importance' rows (a table from before they were added): rescore that checkpoint")
            c = controls["loss"].to_numpy(float)
            rows.append({**row, "control_loss": float(c.mean()), "control_min": float(c.min()),
                         "control_max": float(c.max()), "value": float(importance["loss"].iloc[0]),
                         "se": float(importance["se"].iloc[0])})
    return _frame(rows, SERIES_SCHEMA)


def causal_tables(ablation: pd.DataFrame, heads: pd.DataFrame, ri: pd.DataFrame | None, emergence: pd.DataFrame,
                  *, exclude: Iterable[tuple[str, int]] | None = None, direction: str = "forward",
                  gate: str = "argmax", variant: str = "source", k: int = DEFAULT_K, n_boot: int = DEFAULT_N_BOOT,
                  ci_level: float = DEFAULT_CI_LEVEL, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The causal analysis from the merged ablation, heads and relation-index tables and the analysis's
    emergence table: :data:`TABLES` by name (``exclude``: duplicate checkpoints, as the analysis leaves out)."""
    correlation = head_correlations(ablation, heads, ri, direction=direction, gate=gate, variant=variant,
                                    n_boot=n_boot, ci_level=ci_level, seed=seed, exclude=exclude)
    series = group_series(ablation, ci_level=ci_level, exclude=exclude)
    z = _z(ci_level)
    traj = standardise(series.assign(increasing=True), SERIES_KEYS, z) if len(series) else series
    estimates = _frame(_estimate_all(traj, SERIES_KEYS, k=k, n_boot=n_boot, seed=seed, ci_level=ci_level)
                       if len(series) else [], CAUSAL_EMERGENCE_SCHEMA)
    levels = emergence[emergence["metric"] == emergence["level"].map(LEVEL_METRIC)]
    tail = (1 - ci_level) / 2
    order = []
    for h in estimates.to_dict("records"):
        for m in levels[levels["model"] == h["model"]].to_dict("records"):
            order.append({**{key: h[key] for key in SERIES_KEYS}, **_midpoint(h, tail, "subject"),
                          "icl_level": m["level"], "icl_task": m["task"], "icl_shots": m["shots"],
                          "icl_metric": m["metric"], **_midpoint(m, tail, "level"),
                          **_transition_lag(h, m, ci_level, "no formation")})
    return {"causal_correlation": correlation, "causal_series": series, "causal_emergence": estimates,
            "causal_order": _frame(order, ORDER_SCHEMA)}
