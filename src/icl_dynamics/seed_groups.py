"""Is "heads form, then ICL emerges" a property of the model or of one training run? Groups of runs.

A *group* (config key ``groups``) is a set of training runs of one model that differ only by seed:
PolyPythia's ``pythia-160m`` and ``pythia-160m-seed1`` ... ``-seed9`` (weight initialisation and data
order both change), or ``pythia-160m-data-seed<k>`` (data order only) and ``-weight-seed<k>``
(initialisation only); any set of runs, a group of one included. Each run is analysed on its own by
the ``analyze`` stage (:mod:`icl_dynamics.emergence`); this module reads that stage's ``summary``
table and, per group, puts the runs side by side:

* **Midpoints** (:func:`group_midpoints`): every subject's midpoint (a head class's median formation
  midpoint, an ICL level's emergence midpoint) per run with its bootstrap interval, the between-run
  spread, and a pooled midpoint. Pooled on log10(tokens), where the analysis fits and where the
  runs' intervals are near symmetric.
* **Lags** (:func:`group_lags`): per comparison (subject against an ICL level's series) each run's lag
  (subject minus level, in tokens) and verdict, how many runs say before / with / after, the pooled
  lag and a group verdict.
* **Sources** (:func:`source_spread`): with a group whose runs vary the data order only and one whose
  runs vary the initialisation only, at the same size, which moves a midpoint more.

**The pool: a random-effects mean with the modified Knapp-Hartung interval.** Each run contributes its
estimate y_i with the within-run variance v_i read from its 95 % bootstrap interval
(``((high - low) / (2 * 1.96))^2``); runs also differ by a between-run variance tau^2, estimated by
Paule-Mandel; the pooled mean weights each run by 1 / (v_i + tau^2), and its interval is the Hartung-Knapp-
Sidik-Jonkman one (the weighted residual scale times a t quantile with runs - 1 degrees of freedom) with the
scale never below 1 (Roever, Knapp and Friede 2015): plain HKSJ shrinks the interval when the runs agree more
than their own intervals say. statsmodels' ``combine_effects`` (``method_re="iterated"``) gives tau^2, the
mean and both scales. Measured on simulated groups (tests/test_seed_groups.py, 1,000 groups per setting):
coverage 0.991 with 3 runs (conservative), 0.955 with 5, 0.946 with 10; DerSimonian-Laird with a normal
interval, the common default, covers 0.857, 0.881, 0.923, and plain HKSJ 0.933, 0.926, 0.943. A
hierarchical bootstrap over runs then checkpoints was the alternative: with 3 to 10 runs it resamples too few
distinct runs to give an interval that holds, and it needs every run's checkpoints, not only their
midpoints. A group of one gets its run's own estimate and interval, and no between-run spread.

**The group verdict** of a comparison is ``consistent`` only when every run has a located lag, the
pooled interval excludes zero, and no run's own interval lies wholly on the other side of zero;
``contradicted`` when the pooled interval excludes zero but some run's interval says the opposite;
``inconclusive`` when the pooled interval holds zero; ``incomplete`` when some runs have no located
lag (the pool of those that do is still given); ``one run`` for a group of one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

from icl_dynamics.checkpoints import parameter_count
from icl_dynamics.emergence import _frame, _order

Z95 = float(stats.norm.ppf(0.975))
VARIES = ("seed", "data", "weights")  # what differs between a group's runs: both, data order only, init only
VERDICTS = ("consistent", "contradicted", "inconclusive", "incomplete", "one run")
SUBJECT_KEYS = ("subject_kind", "subject", "subject_task", "subject_shots", "subject_metric", "head_set")
LEVEL_KEYS = ("level", "task", "shots", "metric")
POOLED = "pooled"  # the ``run`` of a group's pooled row


@dataclass(frozen=True)
class Group:
    """Training runs of one model that differ only by seed (``varies``: what the seeds change)."""

    name: str
    runs: tuple[str, ...]
    varies: str = "seed"

    @property
    def parameters(self) -> float:
        """The model size its first run's id states (``pythia-160m-seed3`` -> 1.6e8)."""
        return parameter_count(self.runs[0])


# ----------------------------------------------------------------------------- the pool


def within_variance(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A run's estimate variance from its 95 % interval: ((high - low) / (2 * 1.96))^2."""
    return ((np.asarray(high, float) - np.asarray(low, float)) / (2 * Z95)) ** 2


def pool(estimates: Sequence[float], variances: Sequence[float], *, alpha: float = 0.05) -> dict[str, float]:
    """Random-effects pooled mean of ``estimates`` (within-run ``variances``): Paule-Mandel tau^2 and the
    modified Knapp-Hartung t interval (module docstring), from statsmodels. One estimate: itself, its own
    interval, no tau."""
    y, v = np.asarray(estimates, float), np.asarray(variances, float)
    if len(y) == 0:
        return {"estimate": np.nan, "low": np.nan, "high": np.nan, "tau": np.nan, "between_sd": np.nan}
    if len(y) == 1:
        half = float(stats.norm.ppf(1 - alpha / 2) * np.sqrt(v[0]))
        return {"estimate": float(y[0]), "low": float(y[0] - half), "high": float(y[0] + half), "tau": np.nan,
                "between_sd": np.nan}
    from statsmodels.stats.meta_analysis import combine_effects

    v = np.maximum(v, 1e-12 * max(float(np.max(np.abs(y))) ** 2, 1e-300))  # a run with no spread: tiny, not 0
    with warnings.catch_warnings():  # statsmodels warns that the runs' own intervals use the normal; we read none
        warnings.simplefilter("ignore")
        result = combine_effects(y, v, method_re="iterated", use_t=True, alpha=alpha)
        frame = result.summary_frame(alpha=alpha, use_t=True)
    # the modified Knapp-Hartung interval: the HKSJ scale, never below the plain random-effects one
    estimate = float(frame.loc["random effect wls", "eff"])
    sd = max(float(frame.loc["random effect wls", "sd_eff"]), float(frame.loc["random effect", "sd_eff"]))
    half = float(stats.t.ppf(1 - alpha / 2, len(y) - 1)) * sd
    return {"estimate": estimate, "low": estimate - half, "high": estimate + half,
            "tau": float(np.sqrt(max(result.tau2, 0.0))), "between_sd": float(np.std(y, ddof=1))}


def group_verdict(lows: Sequence[float], highs: Sequence[float], pooled_low: float, pooled_high: float,
                  n_runs: int) -> str:
    """The group verdict of a comparison (module docstring) from its located runs' intervals (``lows``,
    ``highs``), the pooled interval and the group's number of runs."""
    if n_runs == 1:
        return "one run"
    if len(lows) < n_runs:
        return "incomplete"
    if not (pooled_high < 0 or pooled_low > 0):
        return "inconclusive"
    against = [low > 0 for low in lows] if pooled_high < 0 else [high < 0 for high in highs]
    return "contradicted" if any(against) else "consistent"


# ----------------------------------------------------------------------------- the tables

_SUBJECT_FIELDS = [pa.field(k, pa.int32() if k == "subject_shots" else pa.string(), nullable=k == "subject_shots")
                   for k in SUBJECT_KEYS]
_RUN_FIELDS = [
    pa.field("group", pa.string(), nullable=False),
    pa.field("varies", pa.string(), nullable=False),
    pa.field("parameters", pa.float64(), nullable=False),
    pa.field("run", pa.string(), nullable=False),  # a model id, or "pooled"
    *_SUBJECT_FIELDS,
]

MIDPOINT_SCHEMA = pa.schema([
    *_RUN_FIELDS,
    pa.field("n_runs", pa.int32(), nullable=False),  # the group's runs
    pa.field("n_located", pa.int32(), nullable=False),  # runs with a located midpoint (1/0 on a run's row)
    pa.field("midpoint_tokens", pa.float64()),
    pa.field("midpoint_low_tokens", pa.float64()),
    pa.field("midpoint_high_tokens", pa.float64()),
    pa.field("between_sd_log10", pa.float64()),  # pooled rows: the located runs' SD of log10 midpoints
    pa.field("tau_log10", pa.float64()),  # pooled rows: Paule-Mandel between-run SD, log10 tokens
])
"""Per group and subject: every run's midpoint (the analysis' own) and the pooled one (``run`` "pooled")."""

LAG_SCHEMA = pa.schema([
    *_RUN_FIELDS,
    *(pa.field(k, pa.int32() if k == "shots" else pa.string(), nullable=k == "shots") for k in LEVEL_KEYS),
    pa.field("n_runs", pa.int32(), nullable=False),
    pa.field("n_located", pa.int32(), nullable=False),
    pa.field("lag_tokens", pa.float64()),
    pa.field("lag_low_tokens", pa.float64()),
    pa.field("lag_high_tokens", pa.float64()),
    pa.field("order", pa.string(), nullable=False),  # a run's verdict as in summary; pooled: from its interval
    pa.field("n_before", pa.int32()),
    pa.field("n_with", pa.int32()),
    pa.field("n_after", pa.int32()),
    pa.field("between_sd_tokens", pa.float64()),
    pa.field("tau_tokens", pa.float64()),
    pa.field("verdict", pa.string()),  # pooled rows only (VERDICTS)
])
"""Per group and comparison: every run's lag and verdict (the analysis' own) and the pooled lag with the
group verdict."""

SOURCE_SCHEMA = pa.schema([
    pa.field("data_group", pa.string(), nullable=False),
    pa.field("weights_group", pa.string(), nullable=False),
    pa.field("parameters", pa.float64(), nullable=False),
    *_SUBJECT_FIELDS,
    pa.field("n_data", pa.int32(), nullable=False),
    pa.field("n_weights", pa.int32(), nullable=False),
    pa.field("sd_data_log10", pa.float64()),
    pa.field("sd_weights_log10", pa.float64()),
    pa.field("sd_ratio", pa.float64()),  # data-order spread over initialisation spread
    pa.field("sd_ratio_low", pa.float64()),
    pa.field("sd_ratio_high", pa.float64()),
    pa.field("moves_more", pa.string(), nullable=False),  # data | weights | neither shown | too few runs
])
"""Per pair of groups of one size, one varying the data order and one the initialisation: which moves a
subject's midpoint more (the ratio of their runs' spreads, with an F interval)."""

TABLES = {"group_midpoints": MIDPOINT_SCHEMA, "group_lags": LAG_SCHEMA, "group_sources": SOURCE_SCHEMA}


def _check_runs(summary: pd.DataFrame, groups: Sequence[Group]) -> None:
    analysed = set(summary["model"])
    for group in groups:
        missing = [run for run in group.runs if run not in analysed]
        if missing:
            raise ValueError(f"group {group.name!r}: run(s) {', '.join(missing)} have no rows in the analysis summary "
                             "(not in models, or the analysis gave them no ICL level series); add them to models and "
                             "rerun the analysis")


def _subjects(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, subject): head classes' and ICL levels' midpoints (the levels from their
    ``level_*`` columns, as subjects of their own)."""
    heads = summary[summary["subject_kind"] == "head_class"][
        ["model", *SUBJECT_KEYS, "subject_tokens", "subject_low_tokens", "subject_high_tokens"]]
    levels = summary[["model", "level", "task", "shots", "metric", "level_tokens", "level_low_tokens",
                      "level_high_tokens"]].rename(columns={
        "level": "subject", "task": "subject_task", "shots": "subject_shots", "metric": "subject_metric",
        "level_tokens": "subject_tokens", "level_low_tokens": "subject_low_tokens",
        "level_high_tokens": "subject_high_tokens"}).assign(subject_kind="icl_level", head_set="")
    both = pd.concat([heads, levels[heads.columns]], ignore_index=True)
    both["subject_shots"] = both["subject_shots"].astype("Int64")
    return both.drop_duplicates(["model", *SUBJECT_KEYS]).reset_index(drop=True)


def _key_rows(frame: pd.DataFrame, keys: Sequence[str]):
    for key, g in frame.groupby(list(keys), dropna=False, sort=True):
        yield dict(zip(keys, key)), g


def _clean(value):
    return None if pd.isna(value) else value


def _per_group(frame: pd.DataFrame, groups: Sequence[Group], keys: Sequence[str]):
    """Per group and key (a subject, or a comparison): the group, the columns every row of it gets, the key's
    values and its rows indexed by run."""
    for group in groups:
        base = {"group": group.name, "varies": group.varies, "parameters": group.parameters, "n_runs": len(group.runs)}
        for key, g in _key_rows(frame[frame["model"].isin(group.runs)], keys):
            yield group, base, {k: _clean(v) for k, v in key.items()}, g.set_index("model")


def group_midpoints(summary: pd.DataFrame, groups: Sequence[Group]) -> pd.DataFrame:
    """Per group and subject: each run's midpoint (unchanged from its own analysis) and the pooled one."""
    _check_runs(summary, groups)
    subjects = _subjects(summary)
    rows = []
    for group, base, key, by_run in _per_group(subjects, groups, SUBJECT_KEYS):
        located = []
        for run in group.runs:
            r = by_run.loc[run] if run in by_run.index else None
            mid = r["subject_tokens"] if r is not None else np.nan
            ok = bool(np.isfinite(mid) and np.isfinite(r["subject_low_tokens"])
                      and np.isfinite(r["subject_high_tokens"]) and r["subject_low_tokens"] > 0)
            rows.append({**base, "run": run, **key, "n_located": int(ok),
                         "midpoint_tokens": mid if r is not None else np.nan,
                         "midpoint_low_tokens": r["subject_low_tokens"] if r is not None else np.nan,
                         "midpoint_high_tokens": r["subject_high_tokens"] if r is not None else np.nan,
                         "between_sd_log10": np.nan, "tau_log10": np.nan})
            if ok:
                located.append((np.log10(mid), np.log10(r["subject_low_tokens"]), np.log10(r["subject_high_tokens"])))
        y = np.array([m for m, _, _ in located])
        p = pool(y, within_variance([lo for _, lo, _ in located], [hi for _, _, hi in located]))
        rows.append({**base, "run": POOLED, **key, "n_located": len(located),
                     "midpoint_tokens": 10 ** p["estimate"], "midpoint_low_tokens": 10 ** p["low"],
                     "midpoint_high_tokens": 10 ** p["high"], "between_sd_log10": p["between_sd"],
                     "tau_log10": p["tau"]})
    return _frame(rows, MIDPOINT_SCHEMA)


def group_lags(summary: pd.DataFrame, groups: Sequence[Group]) -> pd.DataFrame:
    """Per group and comparison (a summary row's subject against its level series): each run's lag and
    verdict (unchanged), the counts of before / with / after, the pooled lag and the group verdict."""
    _check_runs(summary, groups)
    keys = (*SUBJECT_KEYS, *LEVEL_KEYS)
    summary = summary.assign(subject_shots=summary["subject_shots"].astype("Int64"),
                             shots=summary["shots"].astype("Int64"))
    rows = []
    for group, base, key, by_run in _per_group(summary, groups, keys):
        lows, highs, estimates, orders = [], [], [], []
        for run in group.runs:
            r = by_run.loc[run] if run in by_run.index else None
            order = r["order"] if r is not None else "undetermined"
            ok = r is not None and bool(np.isfinite([r["lag_tokens"], r["lag_low_tokens"],
                                                     r["lag_high_tokens"]]).all())
            rows.append({**base, "run": run, **key, "n_located": int(ok),
                         **{c: (r[c] if r is not None else np.nan)
                            for c in ("lag_tokens", "lag_low_tokens", "lag_high_tokens")},
                         "order": order, "n_before": None, "n_with": None, "n_after": None,
                         "between_sd_tokens": np.nan, "tau_tokens": np.nan, "verdict": None})
            orders.append(order)
            if ok:
                estimates.append(r["lag_tokens"])
                lows.append(r["lag_low_tokens"])
                highs.append(r["lag_high_tokens"])
        p = pool(estimates, within_variance(lows, highs))
        located = len(estimates) > 0
        rows.append({**base, "run": POOLED, **key, "n_located": len(estimates),
                     "lag_tokens": p["estimate"], "lag_low_tokens": p["low"], "lag_high_tokens": p["high"],
                     "order": _order(p["low"], p["high"]) if located else "undetermined",
                     **{f"n_{o}": orders.count(o) for o in ("before", "with", "after")},
                     "between_sd_tokens": p["between_sd"], "tau_tokens": p["tau"],
                     "verdict": group_verdict(lows, highs, p["low"], p["high"], len(group.runs))
                     if located else ("one run" if len(group.runs) == 1 else "incomplete")})
    return _frame(rows, LAG_SCHEMA)


def sd_ratio_interval(a: Sequence[float], b: Sequence[float], *, alpha: float = 0.05) -> tuple[float, float, float]:
    """SD(a) / SD(b) and its interval from the F distribution of the variance ratio (normal runs;
    scipy's F quantiles): needs two or more values on each side, else NaNs."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return np.nan, np.nan, np.nan
    va, vb = np.var(a, ddof=1), np.var(b, ddof=1)
    if vb == 0:
        return (np.inf if va > 0 else np.nan), np.nan, np.nan
    ratio = va / vb
    dfa, dfb = len(a) - 1, len(b) - 1
    low = ratio / stats.f.ppf(1 - alpha / 2, dfa, dfb)
    high = ratio / stats.f.ppf(alpha / 2, dfa, dfb)
    return float(np.sqrt(ratio)), float(np.sqrt(low)), float(np.sqrt(high))


def source_spread(midpoints: pd.DataFrame, groups: Sequence[Group]) -> pd.DataFrame:
    """For each pair of groups of one size, one with ``varies: data`` and one with ``varies: weights``:
    per subject, the spread of their runs' log10 midpoints and which source moves it more (the SD
    ratio's F interval wholly above 1: data order; below: initialisation)."""
    runs = midpoints[midpoints["run"] != POOLED]
    runs = runs[runs["n_located"] == 1]
    rows = []
    for data in (g for g in groups if g.varies == "data"):
        for weights in (g for g in groups if g.varies == "weights" and g.parameters == data.parameters):
            both = runs[runs["group"].isin([data.name, weights.name])]
            for key, g in _key_rows(both, SUBJECT_KEYS):
                a = np.log10(g.loc[g["group"] == data.name, "midpoint_tokens"].to_numpy(float))
                b = np.log10(g.loc[g["group"] == weights.name, "midpoint_tokens"].to_numpy(float))
                ratio, low, high = sd_ratio_interval(a, b)
                moves = ("too few runs" if not np.isfinite(low) else "data" if low > 1 else
                         "weights" if high < 1 else "neither shown")
                rows.append({"data_group": data.name, "weights_group": weights.name, "parameters": data.parameters,
                             **{k: _clean(v) for k, v in key.items()}, "n_data": len(a), "n_weights": len(b),
                             "sd_data_log10": float(np.std(a, ddof=1)) if len(a) > 1 else np.nan,
                             "sd_weights_log10": float(np.std(b, ddof=1)) if len(b) > 1 else np.nan,
                             "sd_ratio": ratio, "sd_ratio_low": low, "sd_ratio_high": high, "moves_more": moves})
    return _frame(rows, SOURCE_SCHEMA)


def group_tables(summary: pd.DataFrame, groups: Sequence[Group]) -> dict[str, pd.DataFrame]:
    """Every table of the group analysis (:data:`TABLES`) from the analysis' summary table."""
    midpoints = group_midpoints(summary, groups)
    return {"group_midpoints": midpoints, "group_lags": group_lags(summary, groups),
            "group_sources": source_spread(midpoints, groups)}
