"""When heads form, when in-context learning emerges, and how the two are related over training.

Every curve here is a *trajectory*: one value per checkpoint with its standard error. Head
formation and ICL emergence are found by one procedure on one scale (method notes §6 compare them
only by eye; this makes the comparison a measurement):

* **reference** -- each series is measured against its step-0 null: the mean ``mu0`` of the
  series' units at the first checkpoint (normally step 0; one unit for an ICL series, every head of
  the model for a head score) and its spread ``s0``, with ``s0^2`` the variance across those
  units plus their mean squared standard error (for one ICL series: its step-0 standard error
  squared). ``standardised = sign * (value - mu0) / s0`` is the series on that common scale
  (``sign`` = -1 where lower is better, the ICL score).
* **reliable** -- ``sign * (value - mu0) > z * sqrt(s0^2 + se^2)``: past the step-0 null beyond
  the checkpoint's own noise, with the same ``z`` for every series.
* **onset** -- the first checkpoint from which the flag holds for ``k + 1`` checkpoints in a row (a
  run cut short by the end of the data does not count). Only a series with an onset is fitted:
  the logistic of a curve that never leaves its null describes noise.
* **transition** (the midpoint every comparison uses) -- the midpoint of a monotone
  four-parameter logistic fitted to the standardised series in
  ``x = log10(tokens + tokens_per_step / 2)``: step 0 sits half a step before step 1, as far below
  step 1 on the log axis as step 2 is above it, so it stays in the fit instead of being dropped.
  The interval comes from a wild (Rademacher) residual bootstrap; a refit whose rise is sharper
  than the gap between the checkpoints around it has its midpoint drawn uniformly within that gap,
  so a jump that falls into a gap of the grid (Pythia has no checkpoint between steps 512 and
  1000) gets an interval spanning the gap instead of an arbitrary spot in it.

"Before / with / after" is read from the lag between two midpoints and the interval of its
bootstrap (formation minus emergence; negative: the head first); ``with`` means the interval
contains zero. Calibrated by simulation (tests): identical noisy curves give ``with`` in >= 95 %
of seeds, and a head curve shifted by a known lag gives ``before`` with an interval holding the
lag in >= 90 %.

ICL levels are compared on the same midpoints. Pattern discovery enters ordering claims through
``accuracy_constrained`` (argmax over the task's labels): unconstrained accuracy can never exceed
format compliance, so it would put format compliance first by construction. The model-free
``baseline_*`` rows of the ICL table are not series.

The relation between a head and an ICL series (:func:`relation_table`) is that lag and a
Spearman correlation across checkpoints. Two curves that both merely rise have a large Spearman
correlation of their *levels*, and a plain block-shuffle test of the levels called ~80 % of
independent pairs related in simulations, so the test statistic is the Spearman correlation of
their *first differences* (the change from one checkpoint to the next), with a null from block
permutations of one differenced series (blocks of ``ceil(sqrt(n))`` checkpoints by default).
p-values are Benjamini-Hochberg adjusted within each model and score (``q_value``).
:func:`summary_table` gives, per model, each ICL level's midpoint, each head class's midpoint
(induction = prefix matching, previous token, copying, SIH per relation family), the lags between
them with intervals, and the verdicts.

Tables are pandas DataFrames; the ``*_SCHEMA`` constants are their Parquet schemas (write with
``icl_dynamics.io.write_rows(df.to_dict("list"), SCHEMA, path)``).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import optimize, special, stats

from icl_dynamics.schemas import SCORES as HEAD_SCORES

ICL_KEYS = ("model", "level", "task", "shots", "metric")
HEAD_KEYS = ("model", "score", "layer", "head")
RI_PREFIX = "ri:"
LEVELS = ("loss_reduction", "format_compliance", "pattern_discovery")
# the series that stands for each level in ordering claims (constrained accuracy: see the docstring)
LEVEL_METRIC = {"loss_reduction": "icl_score", "format_compliance": "format_compliance",
                "pattern_discovery": "accuracy_constrained"}
BASELINE_PREFIX = "baseline_"  # model-free predictors stored beside the ICL accuracies; not series
LOWER_IS_BETTER = frozenset({"icl_score"})
# verdicts; "no formation" / "no emergence": the series never left its step-0 null (no onset); "undetermined":
# it did, but a midpoint is not located (a fit that is flat, pinned at an end of the data or undetermined),
# or there are no usable bootstrap draws (n_boot = 0, or every refit failed)
ORDERS = ("before", "with", "after", "no formation", "no emergence", "undetermined")
# a located midpoint whose bootstrap interval spans more than this fraction of the measured checkpoints' span
# (in log tokens) says little about when the change happened: its fit_status is "undetermined"
MAX_INTERVAL_FRACTION = 0.5
# head classes of the summary: a classic score, or the relation index pooled over one relation family
HEAD_CLASSES = {"prefix_matching": "induction", "previous_token": "previous_token", "copying": "copying"}

ICL_COLUMNS = ("model", "step", "tokens", "level", "task", "shots", "metric", "value", "ci_low", "ci_high", "n",
               "chance")
HEADS_COLUMNS = ("model", "step", "tokens", "layer", "head",
                 *HEAD_SCORES, *(f"{s}_control" for s in HEAD_SCORES), *(f"{s}_se" for s in HEAD_SCORES))
RI_COLUMNS = ("model", "step", "tokens", "layer", "head", "family", "relation", "direction", "gate", "variant",
              "ri", "control_tenth", "control_random", "effect", "effect_se", "effect_tenth", "effect_tenth_se",
              "effect_random", "effect_random_se", "negative_control")
# the SIH test's effects over its three controls (matched, tenth token, random), with their standard errors
RI_EFFECTS = (("effect", "effect_se"), ("effect_tenth", "effect_tenth_se"), ("effect_random", "effect_random_se"))

DEFAULT_K = 3
DEFAULT_N_BOOT = 200
DEFAULT_CI_LEVEL = 0.95
DEFAULT_N_PERM = 999
DEFAULT_ALPHA = 0.05
DEFAULT_TOP_K = 10
MIN_FIT_POINTS = 6
MIN_WIDTH_DECADES = 0.01  # narrowest logistic allowed: 10-90 % rise within ~0.04 decades of tokens
RISE_10_90 = 2 * np.log(9)  # a logistic's 10-90 % rise spans this many widths

# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------

_ESTIMATE_FIELDS = [
    pa.field("increasing", pa.bool_(), nullable=False),
    pa.field("n_checkpoints", pa.int32(), nullable=False),
    pa.field("k", pa.int32(), nullable=False),
    pa.field("reference_step", pa.int64()),  # where the null is read: step 0 unless too few units had a value
    pa.field("reference", pa.float64()),  # the step-0 null's mean (mu0) and spread (s0)
    pa.field("spread", pa.float64()),
    pa.field("onset_step", pa.int64()),
    pa.field("onset_tokens", pa.int64()),
    pa.field("onset_prev_step", pa.int64()),
    pa.field("onset_prev_tokens", pa.int64()),
    pa.field("transition_step", pa.float64()),
    pa.field("transition_step_low", pa.float64()),
    pa.field("transition_step_high", pa.float64()),
    pa.field("transition_tokens", pa.float64()),
    pa.field("transition_tokens_low", pa.float64()),
    pa.field("transition_tokens_high", pa.float64()),
    pa.field("fit_start", pa.float64()),
    pa.field("fit_end", pa.float64()),
    pa.field("fit_log10_mid", pa.float64()),
    pa.field("fit_width", pa.float64()),
    pa.field("fit_status", pa.string(), nullable=False),
    pa.field("n_boot_ok", pa.int32(), nullable=False),
    pa.field("transition_boot_tokens", pa.list_(pa.float64()), nullable=False),
]

EMERGENCE_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("level", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("shots", pa.int32()),
    pa.field("metric", pa.string(), nullable=False),
    *_ESTIMATE_FIELDS,
])
"""One row per ICL series (model, level, task, shots, metric): onset and transition of emergence."""

FORMATION_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("score", pa.string(), nullable=False),
    pa.field("family", pa.string(), nullable=False),  # relation family of an ri: score, else ""
    pa.field("layer", pa.int32(), nullable=False),
    pa.field("head", pa.int32(), nullable=False),
    *_ESTIMATE_FIELDS,
    pa.field("final_step", pa.int64(), nullable=False),
    pa.field("final_value", pa.float64()),
    pa.field("final_control", pa.float64()),
    pa.field("final_rank", pa.int32()),
])
"""One row per head and score: onset and transition of formation, and the head's rank at the final
checkpoint by ``value - control`` (1 = largest excess; null where the final value is missing)."""

_LAG_FIELDS = [
    pa.field("lag_tokens", pa.float64()),  # midpoint minus midpoint; negative: the subject first
    pa.field("lag_low_tokens", pa.float64()),
    pa.field("lag_high_tokens", pa.float64()),
    pa.field("order", pa.string(), nullable=False),  # ORDERS
]

RELATION_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("score", pa.string(), nullable=False),
    pa.field("family", pa.string(), nullable=False),
    pa.field("layer", pa.int32(), nullable=False),
    pa.field("head", pa.int32(), nullable=False),
    pa.field("final_rank", pa.int32()),
    pa.field("level", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("shots", pa.int32()),
    pa.field("metric", pa.string(), nullable=False),
    *_LAG_FIELDS,
    pa.field("n_checkpoints", pa.int32(), nullable=False),
    pa.field("rho_level", pa.float64()),
    pa.field("rho_diff", pa.float64()),
    pa.field("p_value", pa.float64()),
    pa.field("q_value", pa.float64()),
    pa.field("related", pa.bool_(), nullable=False),
])
"""One row per (head, score) x ICL series of the same model: the lag of the formation midpoint
behind the emergence midpoint (tokens, bootstrap interval, verdict) and the detrended,
block-permutation-tested correlation."""

SUMMARY_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("subject_kind", pa.string(), nullable=False),  # head_class | icl_level
    pa.field("subject", pa.string(), nullable=False),  # induction, copying, sih:kg, ... or an ICL level
    pa.field("subject_task", pa.string(), nullable=False),  # an ICL level's series ("" for head classes)
    pa.field("subject_shots", pa.int32()),
    pa.field("subject_metric", pa.string(), nullable=False),
    pa.field("head_set", pa.string(), nullable=False),  # top<k> | all (head classes); "" for levels
    pa.field("n_units", pa.int32(), nullable=False),
    pa.field("n_formed", pa.int32(), nullable=False),
    pa.field("subject_tokens", pa.float64()),
    pa.field("subject_low_tokens", pa.float64()),
    pa.field("subject_high_tokens", pa.float64()),
    pa.field("level", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("shots", pa.int32()),
    pa.field("metric", pa.string(), nullable=False),
    pa.field("level_tokens", pa.float64()),
    pa.field("level_low_tokens", pa.float64()),
    pa.field("level_high_tokens", pa.float64()),
    *_LAG_FIELDS,
    pa.field("n_before", pa.int32()),
    pa.field("n_with", pa.int32()),
    pa.field("n_after", pa.int32()),
    pa.field("n_related", pa.int32()),
    pa.field("median_rho_diff", pa.float64()),
])
"""Per model: each head class's (median) formation midpoint and each ICL level's emergence midpoint,
with bootstrap intervals, compared with every ICL level's series (``level``/``task``/``shots``/
``metric``, the level's :data:`LEVEL_METRIC`): the lag, its interval and the verdict. Head classes
also count their heads' own verdicts and related heads (null for level rows)."""

# the tables the analyze command writes (analysis/<name>.parquet), by name
TABLES = {"emergence": EMERGENCE_SCHEMA, "formation": FORMATION_SCHEMA, "relation": RELATION_SCHEMA,
          "summary": SUMMARY_SCHEMA}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def duplicate_checkpoints(provenance: pd.DataFrame, *, include_suspect: bool = False) -> set[tuple[str, int]]:
    """The (model, step) pairs to leave out: duplicates of the step before them, and (unless
    ``include_suspect``) suspect steps whose weights equal a non-consecutive step's. Warns about the latter."""
    _require_columns(provenance, ("model", "step", "duplicate_of_step", "suspect"), "provenance")
    dup = provenance[provenance["duplicate_of_step"].notna()]
    out = {(str(m), int(s)) for m, s in zip(dup["model"], dup["step"])}
    suspect = provenance[provenance["suspect"].astype(bool)]
    if len(suspect):
        listed = "; ".join(f"{m} step {s}" for m, s in zip(suspect["model"], suspect["step"]))
        if include_suspect:
            warnings.warn(f"keeping suspect checkpoints (weights equal to a non-consecutive step's): {listed}",
                          stacklevel=2)
        else:
            warnings.warn(f"leaving out suspect checkpoints (weights equal to a non-consecutive step's): {listed}; "
                          "include them with analysis.include_suspect / --include-suspect", stacklevel=2)
            out |= {(str(m), int(s)) for m, s in zip(suspect["model"], suspect["step"])}
    return out


def tokens_per_step(table: pd.DataFrame) -> dict[str, int]:
    """Tokens per optimiser step of each model, checked to be constant over its nonzero steps."""
    out: dict[str, int] = {}
    for model, g in table[["model", "step", "tokens"]].drop_duplicates().groupby("model", sort=True):
        g = g[g["step"] > 0]
        if g.empty:
            raise ValueError(f"model {model!r}: no checkpoint after step 0, cannot infer tokens per step")
        ratios = g["tokens"].to_numpy(np.int64) // g["step"].to_numpy(np.int64)
        if (ratios * g["step"].to_numpy(np.int64) != g["tokens"].to_numpy(np.int64)).any() or len(set(ratios)) != 1:
            raise ValueError(f"model {model!r}: tokens / step is not one constant integer "
                             f"(steps {g['step'].tolist()[:5]}..., tokens {g['tokens'].tolist()[:5]}...)")
        out[str(model)] = int(ratios[0])
    return out


def _drop_excluded(table: pd.DataFrame, exclude: Iterable[tuple[str, int]] | None) -> pd.DataFrame:
    if not exclude:
        return table
    drop = pd.MultiIndex.from_tuples(sorted({(str(m), int(s)) for m, s in exclude}), names=["model", "step"])
    index = pd.MultiIndex.from_arrays([table["model"].astype(str), table["step"].astype(np.int64)])
    return table[~index.isin(drop)]


def _require_columns(table: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{name} table lacks columns {missing} (has {list(table.columns)})")


def _z(ci_level: float) -> float:
    if not 0 < ci_level < 1:
        raise ValueError(f"ci_level must lie in (0, 1), got {ci_level}")
    return float(stats.norm.ppf(0.5 + ci_level / 2))


# ---------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------

def level_curves(icl: pd.DataFrame, *, ci_level: float = DEFAULT_CI_LEVEL) -> pd.DataFrame:
    """One curve per (model, level, shots, metric): the mean over tasks (``task = "mean"``).

    Its interval is a normal one, ``mean +/- z * sqrt(sum se_i^2) / T``, with each task's standard
    error read from its interval as ``(ci_high - ci_low) / (2 z)``; ``chance`` is the mean chance
    (null if any task's is). Every step must have the same set of tasks.
    """
    _require_columns(icl, ICL_COLUMNS, "icl")
    z = _z(ci_level)
    frame = icl.assign(_se=(icl["ci_high"] - icl["ci_low"]) / (2 * z), _se2=lambda d: d["_se"] ** 2)
    rows = []
    groups = frame.groupby(["model", "level", "shots", "metric"], dropna=False, sort=True)
    for (model, level, shots, metric), g in groups:
        tasks_per_step = g.groupby("step")["task"].agg(frozenset)
        if tasks_per_step.nunique() != 1:
            raise ValueError(f"icl: model {model!r} {level}/{metric} shots={shots}: the tasks differ between steps "
                             f"({dict(tasks_per_step.head(3))} ...); cannot average over tasks")
        for step, s in g.groupby("step", sort=True):
            if s["task"].duplicated().any():
                raise ValueError(f"icl: model {model!r} step {step} {level}/{metric} shots={shots}: "
                                 "duplicate task rows")
            mean = s["value"].mean()
            se = np.sqrt(s["_se2"].sum()) / len(s)
            chance = s["chance"].mean() if s["chance"].notna().all() else None
            rows.append({"model": model, "step": step, "tokens": s["tokens"].iloc[0], "level": level, "task": "mean",
                         "shots": shots, "metric": metric, "value": mean, "ci_low": mean - z * se,
                         "ci_high": mean + z * se, "n": s["n"].sum(), "chance": chance})
    out = pd.DataFrame(rows, columns=list(ICL_COLUMNS))
    out["shots"] = out["shots"].astype("Int64")
    out["chance"] = out["chance"].astype("float64")
    return out


TRAJ_COLUMNS = ("step", "tokens", "value", "se", "reference_step", "reference", "spread", "standardised",
                "increasing", "reliable")


def standardise(traj: pd.DataFrame, groups: Sequence[str], z: float) -> pd.DataFrame:
    """Add ``reference_step``, ``reference``, ``spread``, ``standardised`` and ``reliable`` (see the
    module docstring) to trajectories with ``step``, ``value``, ``se`` and ``increasing``.

    ``groups`` name the rows that share one step-0 null (an ICL series; a model's head score: all
    its heads). The null is read from the units with a finite value and standard error at the
    group's first checkpoint, or, where fewer than half its units have one there (a relation-index
    cell needs events and two documents), at the first checkpoint where at least half do, with a
    warning. A group with no such checkpoint never becomes reliable (warned); a zero spread leaves
    ``standardised`` unscaled (warned).
    """
    traj = traj.reset_index(drop=True)
    parts = []
    for key, g in traj.groupby(list(groups), dropna=False, sort=False):
        finite = np.isfinite(g["value"].to_numpy(float)) & np.isfinite(g["se"].to_numpy(float))
        units = g.groupby("step")["step"].size()
        usable = g[finite].groupby("step")["step"].size().reindex(units.index, fill_value=0)
        enough = usable[usable * 2 >= units]
        name = dict(zip(groups, key if isinstance(key, tuple) else (key,)))
        if enough.empty:
            warnings.warn(f"{name}: no checkpoint where half the units have a value and standard error; "
                          "no step-0 null, so it never counts as formed or emerged", stacklevel=3)
            parts.append(g.assign(reference_step=pd.NA, reference=np.nan, spread=np.nan, standardised=np.nan,
                                  reliable=False))
            continue
        step0 = int(enough.index[0])
        if step0 != int(units.index[0]):
            warnings.warn(f"{name}: fewer than half the units have a value at step {int(units.index[0])}; "
                          f"its null is read at step {step0}", stacklevel=3)
        first = g[finite & (g["step"] == step0).to_numpy()]
        v0, se0 = first["value"].to_numpy(float), first["se"].to_numpy(float)
        mu0 = float(v0.mean())
        spread = float(np.sqrt((v0.var(ddof=1) if len(v0) > 1 else 0.0) + np.mean(se0**2)))
        if spread == 0:
            warnings.warn(f"{name}: zero spread at step {step0} (deterministic and identical units); "
                          "standardised is left unscaled and any excess counts", stacklevel=3)
        sign = np.where(g["increasing"].to_numpy(bool), 1.0, -1.0)
        excess = sign * (g["value"].to_numpy(float) - mu0)
        with np.errstate(invalid="ignore"):  # NaN values (no events, too few documents) are never reliable
            reliable = excess > z * np.sqrt(spread**2 + g["se"].to_numpy(float) ** 2)
        parts.append(g.assign(reference_step=step0, reference=mu0, spread=spread,
                              standardised=excess / spread if spread > 0 else excess, reliable=reliable))
    if not parts:
        return traj.assign(reference_step=pd.NA, reference=np.nan, spread=np.nan, standardised=np.nan, reliable=False)
    out = pd.concat(parts).loc[traj.index]
    out["reference_step"] = out["reference_step"].astype("Int64")
    return out


def icl_trajectories(icl: pd.DataFrame, *, ci_level: float = DEFAULT_CI_LEVEL,
                     exclude: Iterable[tuple[str, int]] | None = None) -> pd.DataFrame:
    """Long table of ICL series (the ICL keys and :data:`TRAJ_COLUMNS`) with the flag that defines
    emergence; ``se`` is read from each interval as ``(ci_high - ci_low) / (2 z)`` and ``increasing``
    is False for the ICL score (lower is better). ``baseline_*`` rows are left out."""
    _require_columns(icl, ICL_COLUMNS, "icl")
    z = _z(ci_level)
    frame = _drop_excluded(icl, exclude)
    frame = frame[~frame["metric"].astype(str).str.startswith(BASELINE_PREFIX)]
    if frame[["value", "ci_low", "ci_high"]].isna().any().any():
        bad = frame[frame[["value", "ci_low", "ci_high"]].isna().any(axis=1)].iloc[0]
        raise ValueError(f"icl: missing value or interval at model {bad['model']!r} step {bad['step']} "
                         f"{bad['level']}/{bad['task']}/{bad['metric']}")
    if frame.empty:
        raise ValueError("icl table is empty (after excluding duplicate checkpoints)")
    frame = frame.assign(shots=frame["shots"].astype("Int64"))
    steps = frame.groupby(list(ICL_KEYS), dropna=False)["step"]
    if (steps.size() != steps.nunique()).any():
        key = (steps.size() != steps.nunique()).idxmax()
        raise ValueError(f"icl: series {dict(zip(ICL_KEYS, key))} has duplicate steps")
    out = frame[[*ICL_KEYS, "step", "tokens", "value", "ci_low", "ci_high"]].assign(
        se=(frame["ci_high"] - frame["ci_low"]) / (2 * z),
        increasing=~frame["metric"].isin(LOWER_IS_BETTER))
    out = standardise(out, ICL_KEYS, z)
    return out.sort_values([*ICL_KEYS, "step"], ignore_index=True)


def head_trajectories(heads: pd.DataFrame, ri: pd.DataFrame | None = None, *, ci_level: float = DEFAULT_CI_LEVEL,
                      direction: str = "forward", gate: str = "argmax", variant: str = "source",
                      exclude: Iterable[tuple[str, int]] | None = None) -> pd.DataFrame:
    """Long table of per-head score trajectories (``model, score, family, layer, head, control`` and
    :data:`TRAJ_COLUMNS`) with the flag that defines formation, by the same rule as emergence.

    Scores are ``prefix_matching``, ``previous_token``, ``copying`` (``se`` from their ``*_se``
    columns; ``control`` is kept for ranking heads, not for the flag) and, from the relation-index
    table filtered to one ``direction/gate/variant``, ``ri:<relation>`` (see :func:`ri_formation_value`).
    """
    _require_columns(heads, HEADS_COLUMNS, "heads")
    z = _z(ci_level)
    frame = _drop_excluded(heads, exclude)
    keys = frame[["model", "step", "layer", "head"]]
    if keys.duplicated().any():
        raise ValueError("heads: duplicate rows for (model, step, layer, head), first "
                         f"{keys[keys.duplicated()].iloc[0].to_dict()}")
    parts = []
    for score in HEAD_SCORES:
        se = frame[f"{score}_se"]
        if se.isna().any():
            raise ValueError(f"heads: column {score}_se has {int(se.isna().sum())} missing values "
                             "(a deterministic score must write se = 0)")
        parts.append(pd.DataFrame({
            "model": frame["model"].to_numpy(), "score": score, "family": "", "layer": frame["layer"].to_numpy(),
            "head": frame["head"].to_numpy(), "step": frame["step"].to_numpy(), "tokens": frame["tokens"].to_numpy(),
            "value": frame[score].to_numpy(float), "control": frame[f"{score}_control"].to_numpy(float),
            "se": se.to_numpy(float)}))
    if ri is not None:
        parts.append(_ri_trajectories(_drop_excluded(ri, exclude), direction, gate, variant))
    out = pd.concat(parts, ignore_index=True).assign(increasing=True)
    out = out.astype({"step": np.int64, "tokens": np.int64, "layer": np.int32, "head": np.int32})
    out = standardise(out, ("model", "score"), z)
    return out.sort_values(["model", "score", "layer", "head", "step"], ignore_index=True)


def ri_formation_value(ri: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The value an ``ri:<relation>`` series follows, and its standard error, per relation-index row: the
    smallest of the SIH test's three effects (RI minus the matched, the tenth-token and the random
    control, each paired per event) with that effect's own cluster-robust standard error.

    The flag needs RI above *every* control (the cell's p is the largest of the three), so formation
    follows the comparison the flag finds hardest: a head above its matched control but below the
    tenth-token control never forms. A missing effect (no events, no such control) makes the value
    missing, never reliable. Holm's correction is not part of it: formation is the flag's criterion
    over training, measured against the step-0 null of every head (:func:`standardise`), not a
    per-checkpoint test.
    """
    effects = np.stack([ri[e].to_numpy(float) for e, _ in RI_EFFECTS], 1)
    errors = np.stack([ri[se].to_numpy(float) for _, se in RI_EFFECTS], 1)
    missing = np.isnan(effects).any(1)
    pick = np.argmin(np.where(np.isnan(effects), np.inf, effects), 1)
    rows = np.arange(len(effects))
    return np.where(missing, np.nan, effects[rows, pick]), np.where(missing, np.nan, errors[rows, pick])


def _ri_trajectories(ri: pd.DataFrame, direction: str, gate: str, variant: str) -> pd.DataFrame:
    """``ri:<relation>`` series of every head (:func:`ri_formation_value`), ``ri:<family>/<relation>`` where
    two families name a relation alike (``kg`` and ``kg-letters`` under ``contextual``); negative-control
    cells (the letter family under literal/source) form no class and are left out."""
    _require_columns(ri, RI_COLUMNS, "relation index")
    sel = ri[(ri["direction"] == direction) & (ri["gate"] == gate) & (ri["variant"] == variant)]
    if sel.empty:
        combos = ri[["direction", "gate", "variant"]].drop_duplicates().to_dict("records")
        raise ValueError(f"relation index: no rows with direction={direction!r} gate={gate!r} variant={variant!r}; "
                         f"available: {combos}")
    sel = sel[~sel["negative_control"].astype(bool)]
    keys = sel[["model", "step", "layer", "head", "family", "relation"]]
    if keys.duplicated().any():
        raise ValueError(f"relation index: duplicate rows for {keys[keys.duplicated()].iloc[0].to_dict()} "
                         "(several tau or parameter settings in one table? select one first)")
    for name in ("ri", "control_tenth", "control_random"):
        arr = sel[name].to_numpy(float)
        if ((arr < 0) | (arr > 1)).any():
            raise ValueError(f"relation index: column {name} has values outside [0, 1]")
    value, se = ri_formation_value(sel)
    family, relation = sel["family"].astype(str), sel["relation"].astype(str)
    shared = relation.map(pd.DataFrame({"f": family, "r": relation}).drop_duplicates()["r"].value_counts()) > 1
    return pd.DataFrame({
        "model": sel["model"].to_numpy(),
        "score": RI_PREFIX + np.where(shared, family + "/" + relation, relation),
        "family": sel["family"].astype(str).to_numpy(), "layer": sel["layer"].to_numpy(),
        "head": sel["head"].to_numpy(), "step": sel["step"].to_numpy(), "tokens": sel["tokens"].to_numpy(),
        "value": value, "control": np.zeros(len(sel)), "se": se})


# ---------------------------------------------------------------------------------------------
# Estimators on one trajectory
# ---------------------------------------------------------------------------------------------

def onset_index(reliable: Sequence[bool] | np.ndarray, k: int = DEFAULT_K) -> int | None:
    """Index of the first checkpoint that starts a run of ``k + 1`` reliable checkpoints, else None."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    flags = np.asarray(reliable, dtype=bool)
    run = 0
    for i, flag in enumerate(flags):
        run = run + 1 if flag else 0
        if run == k + 1:
            return i - k
    return None


def logistic(x: np.ndarray, start: float, change: float, log10_mid: float, width: float) -> np.ndarray:
    """Four-parameter logistic: ``start`` far left, ``start + change`` far right, midpoint ``log10_mid``."""
    return start + change * special.expit((np.asarray(x) - log10_mid) / width)


@dataclass
class TransitionFit:
    """A monotone logistic fit in log10 tokens and its bootstrap midpoints (NaN where a refit failed)."""

    status: str
    params: tuple[float, float, float, float] = (np.nan, np.nan, np.nan, np.nan)
    boot_mid: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def log10_mid(self) -> float:
        return self.params[2] if self.status == "ok" else np.nan


def _lsq(x: np.ndarray, y: np.ndarray, p0: np.ndarray,
         bounds: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, float]:
    def residuals(p: np.ndarray) -> np.ndarray:
        return logistic(x, *p) - y

    result = optimize.least_squares(residuals, p0, jac=lambda p: _jacobian(x, p[None])[0], bounds=bounds,
                                    method="trf", x_scale="jac")
    return result.x, float(2 * result.cost)


def _jacobian(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """d logistic / d (start, change, mid, width) for each parameter row of ``p``: shape (rows, len(x), 4)."""
    z = (x - p[:, 2:3]) / p[:, 3:4]
    s = special.expit(z)
    ds = p[:, 1:2] * s * (1 - s) / p[:, 3:4]
    return np.stack([np.ones_like(s), s, -ds, -ds * z], axis=2)


def _batch_residuals(x: np.ndarray, ys: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p[:, :1] + p[:, 1:2] * special.expit((x - p[:, 2:3]) / p[:, 3:4]) - ys


def _lm_batch(x: np.ndarray, ys: np.ndarray, p0: np.ndarray, lower: np.ndarray, upper: np.ndarray,
              max_iter: int = 200) -> np.ndarray:
    """Least-squares logistic fits of many series ``ys[b]`` at once: Levenberg-Marquardt steps,
    projected onto the box [lower, upper]. Used for bootstrap refits (one vectorised loop instead
    of ``n_boot`` scipy calls); tests check it reaches scipy's optimum."""
    params = np.clip(p0.astype(float), lower, upper)
    n_series = len(ys)
    resid = _batch_residuals(x, ys, params)
    cost = (resid**2).sum(axis=1)
    damping = np.full(n_series, 1e-3)
    active = np.ones(n_series, dtype=bool)
    for _ in range(max_iter):
        if not active.any():
            break
        p, r = params[active], resid[active]
        jac = _jacobian(x, p)
        hess = np.einsum("bni,bnj->bij", jac, jac)
        grad = np.einsum("bni,bn->bi", jac, r)
        # a parameter on a bound that the gradient pushes outwards stays fixed for this step
        fixed = ((p <= lower) & (grad > 0)) | ((p >= upper) & (grad < 0))
        grad = np.where(fixed, 0.0, grad)
        pair = fixed[:, :, None] | fixed[:, None, :]
        hess = np.where(pair, 0.0, hess) + np.eye(4) * fixed[:, :, None]
        diag = np.einsum("bii->bi", hess)
        scale = diag + 1e-12 * diag.max(axis=1, keepdims=True) + 1e-300
        step = np.linalg.solve(hess + damping[active, None, None] * np.eye(4) * scale[:, :, None], -grad[..., None])
        trial = np.clip(p + step[..., 0], lower, upper)
        trial_resid = _batch_residuals(x, ys[active], trial)
        trial_cost = (trial_resid**2).sum(axis=1)
        better = trial_cost < cost[active]
        rows = np.flatnonzero(active)
        accepted = rows[better]
        params[accepted], resid[accepted], cost[accepted] = trial[better], trial_resid[better], trial_cost[better]
        damping[rows] = np.where(better, damping[rows] / 3, damping[rows] * 4)
        converged = damping[rows] > 1e12
        active[rows[converged]] = False
    return params


def _status(params: np.ndarray, lo: float, hi: float, scale: float) -> np.ndarray:
    """``flat`` (no change), ``at_bound`` (midpoint pinned at the data's first or last point) or ``ok``."""
    params = np.atleast_2d(params)
    flat = np.abs(params[:, 1]) <= 1e-6 * scale
    pinned = np.minimum(params[:, 2] - lo, hi - params[:, 2]) <= 1e-4 * (hi - lo)
    return np.where(flat, "flat", np.where(pinned, "at_bound", "ok"))


def fit_transition(x: np.ndarray, y: np.ndarray, *, increasing: bool, n_boot: int = DEFAULT_N_BOOT,
                   rng: np.random.Generator | None = None) -> TransitionFit:
    """Fit a monotone logistic to ``y`` over ``x`` (sorted log10 tokens) and bootstrap its midpoint.

    The change is constrained to the metric's good direction, the midpoint to the data's range
    (a fit pinned at either end is ``at_bound``: the transition is not located there), and the
    width to [0.01 decades, the data's span]. The point estimate is scipy's best of several starts.
    Bootstrap replicates are ``fit + residual / (1 - leverage) * (+/-1)`` (wild bootstrap with
    HC3-scaled residuals: checkpoints inside a sharp transition have high leverage, and unscaled
    residuals gave ~80 % coverage of nominal 95 % intervals in simulations). A refit whose 10-90 %
    rise is narrower than the gap between the two checkpoints around its midpoint fits equally well
    with the midpoint anywhere in that gap, so its midpoint is drawn uniformly within the gap. A
    replicate pinned at a bound keeps the bound's value (the transition may lie there); a flat one
    is NaN.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < MIN_FIT_POINTS:
        return TransitionFit("too_few_points")
    if np.any(np.diff(x) <= 0):
        raise ValueError("fit_transition: x must be strictly increasing")
    rng = rng if rng is not None else np.random.default_rng(0)
    lo, hi = float(x[0]), float(x[-1])
    span = hi - lo
    yscale = float(np.ptp(y)) or 1.0
    sign = 1.0 if increasing else -1.0
    lower = np.array([-np.inf, 0.0 if increasing else -np.inf, lo, MIN_WIDTH_DECADES])
    upper = np.array([np.inf, np.inf if increasing else 0.0, hi, max(span, 2 * MIN_WIDTH_DECADES)])
    head, tail = y[: max(1, len(y) // 10)].mean(), y[-max(1, len(y) // 10):].mean()
    change0 = sign * max(sign * (tail - head), 0.5 * yscale)
    half = np.flatnonzero(sign * (y - (head + tail) / 2) > 0)
    starts = np.unique(np.concatenate([np.quantile(x, [0.2, 0.4, 0.6, 0.8]), x[half[:1]]]))
    width0 = max(span / 20, 2 * MIN_WIDTH_DECADES)
    best, best_cost = None, np.inf
    for mid0 in np.clip(starts, lo + 1e-6 * span, hi - 1e-6 * span):
        params, cost = _lsq(x, y, np.array([head, change0, mid0, width0]), (lower, upper))
        if cost < best_cost:
            best, best_cost = params, cost
    status = str(_status(best, lo, hi, yscale)[0])
    if status != "ok" or n_boot == 0:
        return TransitionFit(status, tuple(best))
    fitted = logistic(x, *best)
    jac = _jacobian(x, best[None])[0]
    leverage = np.clip(np.einsum("ij,ji->i", jac, np.linalg.pinv(jac.T @ jac) @ jac.T), 0.0, 0.99)
    resid = (y - fitted) / (1 - leverage)
    ys = fitted + resid * rng.choice([-1.0, 1.0], size=(n_boot, len(y)))
    params = _lm_batch(x, ys, np.tile(best, (n_boot, 1)), lower, upper)
    mids = params[:, 2].copy()
    right = np.clip(np.searchsorted(x, mids, side="right"), 1, len(x) - 1)
    gap_lo, gap_hi = x[right - 1], x[right]
    inside_gap = RISE_10_90 * params[:, 3] < gap_hi - gap_lo
    mids[inside_gap] = rng.uniform(gap_lo[inside_gap], gap_hi[inside_gap])
    boot = np.where(_status(params, lo, hi, yscale) == "flat", np.nan, mids)
    return TransitionFit("ok", tuple(best), boot)


# ---------------------------------------------------------------------------------------------
# Emergence and formation tables
# ---------------------------------------------------------------------------------------------

def _rng(seed: int, key: tuple) -> np.random.Generator:
    """A generator that depends on the series' identity, not on the order series are processed in."""
    return np.random.default_rng([seed, zlib.crc32("|".join(map(str, key)).encode())])


def _estimates(g: pd.DataFrame, key: tuple, tps: int, *, increasing: bool, k: int, n_boot: int, seed: int,
               ci_level: float) -> dict:
    steps, tokens = g["step"].to_numpy(np.int64), g["tokens"].to_numpy(np.int64)
    onset = onset_index(g["reliable"].to_numpy(bool), k)
    row = {"increasing": increasing, "n_checkpoints": len(g), "k": k, "reference_step": g["reference_step"].iloc[0],
           "reference": float(g["reference"].iloc[0]), "spread": float(g["spread"].iloc[0]),
           "onset_step": None, "onset_tokens": None,
           "onset_prev_step": None, "onset_prev_tokens": None, "n_boot_ok": 0, "transition_boot_tokens": []}
    for name in ("step", "tokens"):
        row.update({f"transition_{name}": np.nan, f"transition_{name}_low": np.nan, f"transition_{name}_high": np.nan})
    row.update(fit_start=np.nan, fit_end=np.nan, fit_log10_mid=np.nan, fit_width=np.nan)
    if onset is None:
        row["fit_status"] = "no_onset"
        return row
    row.update(onset_step=int(steps[onset]), onset_tokens=int(tokens[onset]))
    if onset > 0:
        row.update(onset_prev_step=int(steps[onset - 1]), onset_prev_tokens=int(tokens[onset - 1]))
    value = g["standardised"].to_numpy(float)  # the sign is folded in: every standardised series rises
    finite = np.isfinite(value)
    x = np.log10(tokens[finite] + tps / 2)
    fit = fit_transition(x, value[finite], increasing=True, n_boot=n_boot, rng=_rng(seed, key))
    start, change, mid, width = fit.params
    row.update(fit_status=fit.status, fit_start=start, fit_end=start + change, fit_log10_mid=mid, fit_width=width)
    if fit.status != "ok":
        return row
    boot_tokens = 10.0 ** fit.boot_mid - tps / 2
    ok = np.isfinite(boot_tokens)
    tail = (1 - ci_level) / 2
    low, high = np.quantile(boot_tokens[ok], [tail, 1 - tail]) if ok.any() else (np.nan, np.nan)
    point = 10.0**mid - tps / 2
    row.update(transition_tokens=point, transition_tokens_low=low, transition_tokens_high=high,
               transition_step=point / tps, transition_step_low=low / tps, transition_step_high=high / tps,
               n_boot_ok=int(ok.sum()), transition_boot_tokens=boot_tokens.tolist())
    row["fit_status"] = _located_status(row, x, tps)
    return row


def _located_status(row: Mapping, x: np.ndarray, tps: int) -> str:
    """``ok`` for a midpoint that says when the change happened, else ``undetermined``: its bootstrap
    interval spans more than :data:`MAX_INTERVAL_FRACTION` of the fitted checkpoints' span in log
    tokens, or the midpoint lies before the checkpoint preceding the onset (the series would be half-way
    risen while still inside its step-0 null: onset and midpoint would contradict each other)."""
    low, high = row["transition_tokens_low"], row["transition_tokens_high"]
    if not (np.isfinite(low) and np.isfinite(high)):
        return "ok"  # no bootstrap (n_boot = 0): the verdicts say "undetermined" themselves
    width = np.log10(high + tps / 2) - np.log10(max(low, 0.0) + tps / 2)
    if width > MAX_INTERVAL_FRACTION * (x[-1] - x[0]):
        return "undetermined"
    before = row["onset_prev_tokens"]
    if before is not None and row["transition_tokens"] < before:
        return "undetermined"
    return "ok"


def _estimate_all(traj: pd.DataFrame, keys: Sequence[str], *, k: int, n_boot: int, seed: int, ci_level: float,
                  extra=None) -> list[dict]:
    _z(ci_level)
    tps = tokens_per_step(traj)
    rows = []
    for key, g in traj.groupby(list(keys), dropna=False, sort=True):
        g = g.sort_values("step")
        increasing = bool(g["increasing"].iloc[0]) if "increasing" in g else True
        row = dict(zip(keys, key))
        row.update(_estimates(g, key, tps[str(key[0])], increasing=increasing, k=k, n_boot=n_boot, seed=seed,
                              ci_level=ci_level))
        if extra is not None:
            row.update(extra(g))
        rows.append(row)
    return rows


def _frame(rows: list[dict], schema: pa.Schema) -> pd.DataFrame:
    """A DataFrame with exactly ``schema``'s columns, nullable integers as pandas ``Int64``."""
    out = pd.DataFrame(rows, columns=schema.names)
    for f in schema:
        if pa.types.is_integer(f.type):
            out[f.name] = out[f.name].astype("Int64" if f.nullable else f.type.to_pandas_dtype())
        elif pa.types.is_floating(f.type):
            out[f.name] = out[f.name].astype("float64")
    return out


def emergence_table(icl_traj: pd.DataFrame, *, k: int = DEFAULT_K, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                    ci_level: float = DEFAULT_CI_LEVEL) -> pd.DataFrame:
    """Onset and transition of every ICL series of :func:`icl_trajectories` (EMERGENCE_SCHEMA columns)."""
    rows = _estimate_all(icl_traj, ICL_KEYS, k=k, n_boot=n_boot, seed=seed, ci_level=ci_level)
    return _frame(rows, EMERGENCE_SCHEMA)


def formation_table(head_traj: pd.DataFrame, *, k: int = DEFAULT_K, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                    ci_level: float = DEFAULT_CI_LEVEL) -> pd.DataFrame:
    """Onset and transition of every head's score of :func:`head_trajectories` (FORMATION_SCHEMA columns).

    ``final_rank`` ranks the heads of one model and score by ``value - control`` at the model's
    last checkpoint -- the trajectory-blind choice of "top-k heads".
    """
    final_steps = head_traj.groupby("model")["step"].max()

    def final(g: pd.DataFrame) -> dict:
        step = int(final_steps[g["model"].iloc[0]])
        last = g[g["step"] == step]
        value = float(last["value"].iloc[0]) if len(last) else np.nan
        control = float(last["control"].iloc[0]) if len(last) else np.nan
        return {"family": g["family"].iloc[0], "final_step": step, "final_value": value, "final_control": control}

    out = _frame(_estimate_all(head_traj, HEAD_KEYS, k=k, n_boot=n_boot, seed=seed, ci_level=ci_level, extra=final),
                 FORMATION_SCHEMA)
    excess = out["final_value"] - out["final_control"]
    ranks = excess.groupby([out["model"], out["score"]]).rank(ascending=False, method="first")
    out["final_rank"] = ranks.astype("Int64")
    return out


# ---------------------------------------------------------------------------------------------
# Relation between formation and emergence
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _block_permutations(n: int, block_length: int, n_perm: int, seed: int) -> np.ndarray:
    """``n_perm`` permutations of ``range(n)`` that shuffle contiguous blocks (random phase)."""
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    rng = np.random.default_rng([seed, n, block_length])
    perms = np.empty((n_perm, n), dtype=np.intp)
    idx = np.arange(n)
    for i in range(n_perm):
        phase = int(rng.integers(block_length))
        cuts = np.arange(phase if phase else block_length, n, block_length)
        blocks = np.split(idx, cuts)
        perms[i] = np.concatenate([blocks[j] for j in rng.permutation(len(blocks))])
    perms.setflags(write=False)
    return perms


def _centred_ranks(v: np.ndarray) -> np.ndarray | None:
    r = stats.rankdata(v)
    r = r - r.mean()
    norm = np.sqrt(r @ r)
    return r / norm if norm > 0 else None


def spearman_block_test(x: Sequence[float], y: Sequence[float], *, difference: bool = True,
                        block_length: int | None = None, n_perm: int = DEFAULT_N_PERM,
                        seed: int = 0) -> tuple[float, float]:
    """Spearman correlation of two aligned series and its two-sided block-permutation p-value.

    With ``difference`` (the default) both series are first differenced, so a shared upward trend
    alone does not make them correlated; ``difference=False`` tests the levels (kept to show why the
    default is needed). The null shuffles blocks of ``block_length`` consecutive values of ``x``
    (default ``ceil(sqrt(len))``: short blocks break a rise's run of positive differences apart
    and made the null too narrow in simulations). Returns ``(rho, p)``; NaN for a constant series.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman_block_test: series must be 1-D and aligned, got {x.shape} and {y.shape}")
    if difference:
        x, y = np.diff(x), np.diff(y)
    if len(x) < 3:
        return np.nan, np.nan
    rx, ry = _centred_ranks(x), _centred_ranks(y)
    if rx is None or ry is None:
        return np.nan, np.nan
    rho = float(rx @ ry)
    length = block_length if block_length is not None else int(np.ceil(np.sqrt(len(x))))
    null = rx[_block_permutations(len(x), length, n_perm, seed)] @ ry
    p = (1 + np.count_nonzero(np.abs(null) >= abs(rho) - 1e-12)) / (n_perm + 1)
    return rho, float(p)


def _order(low: float, high: float) -> str:
    if high < 0:
        return "before"
    if low > 0:
        return "after"
    return "with"


def _key(values: Iterable) -> tuple:
    """A hashable key with every kind of missing value (NaN, pd.NA, None) turned into None."""
    return tuple(None if pd.isna(v) else v for v in values)


def _records(table: pd.DataFrame, keys: Sequence[str], name: str) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for record in table.to_dict("records"):
        key = _key(record[k] for k in keys)
        if key in out:
            raise ValueError(f"{name} table has two rows for {dict(zip(keys, key))}")
        out[key] = record
    return out


def _unlocated(series: Mapping, never: str) -> str:
    """The verdict for a series without a located midpoint: ``never`` ("no formation" / "no emergence")
    when it never left its step-0 null, "undetermined" when it did (it has an onset)."""
    return never if series["fit_status"] == "no_onset" or pd.isna(series.get("onset_tokens")) else "undetermined"


def _transition_lag(h: Mapping, m: Mapping, ci_level: float, unlocated: str = "no formation") -> dict:
    """Formation midpoint minus emergence midpoint, its percentile interval from the paired draws of
    the two independent bootstraps, and the verdict; ``unlocated`` is the verdict when ``h`` has no
    midpoint (another level's: "no emergence")."""
    missing = (_unlocated(m, "no emergence") if m["fit_status"] != "ok"
               else _unlocated(h, unlocated) if h["fit_status"] != "ok" else None)
    draws = np.empty(0)
    if missing is None:
        hb, mb = np.asarray(h["transition_boot_tokens"], float), np.asarray(m["transition_boot_tokens"], float)
        if len(hb) != len(mb):
            raise ValueError(f"formation and emergence were bootstrapped {len(hb)} and {len(mb)} times; "
                             "use one n_boot")
        draws = hb - mb
        draws = draws[np.isfinite(draws)]
    if missing is not None or not len(draws):
        return {"lag_tokens": np.nan, "lag_low_tokens": np.nan, "lag_high_tokens": np.nan,
                "order": missing or "undetermined"}
    tail = (1 - ci_level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return {"lag_tokens": float(h["transition_tokens"] - m["transition_tokens"]), "lag_low_tokens": float(low),
            "lag_high_tokens": float(high), "order": _order(low, high)}


def _on_grid(trajectory: pd.DataFrame, grid: np.ndarray, key: tuple) -> np.ndarray:
    """A trajectory's values at the model's checkpoints ``grid`` (NaN where it has none)."""
    out = np.full(len(grid), np.nan)
    steps = trajectory["step"].to_numpy(np.int64)
    if len(np.unique(steps)) != len(steps):
        raise ValueError(f"trajectory {key} has duplicate steps")
    out[np.searchsorted(grid, steps)] = trajectory["value"].to_numpy(float)
    return out


def relation_table(head_traj: pd.DataFrame, formation: pd.DataFrame, icl_traj: pd.DataFrame,
                   emergence: pd.DataFrame, *, block_length: int | None = None, n_perm: int = DEFAULT_N_PERM,
                   alpha: float = DEFAULT_ALPHA, ci_level: float = DEFAULT_CI_LEVEL, seed: int = 0) -> pd.DataFrame:
    """Every head's score against every ICL series of its model (RELATION_SCHEMA columns).

    Lags are formation minus emergence midpoints in tokens (negative: the head formed first);
    ``order`` says ``before``/``with``/``after`` from whether the lag's interval lies below, around or
    above zero. ``rho_level`` is the Spearman correlation of the two curves over their common checkpoints
    (descriptive only); ``rho_diff`` and ``p_value`` are the detrended test of
    :func:`spearman_block_test`; ``q_value`` is Benjamini-Hochberg adjusted within each model and
    score, and ``related`` is ``q_value <= alpha``.
    """
    form = _records(formation, HEAD_KEYS, "formation")
    emer = _records(emergence, ICL_KEYS, "emergence")
    grids = {model: np.union1d(g["step"], icl_traj.loc[icl_traj["model"] == model, "step"]).astype(np.int64)
             for model, g in head_traj.groupby("model")}
    icl_series: dict[str, list[tuple[tuple, np.ndarray]]] = {}
    for ikey, g in icl_traj.groupby(list(ICL_KEYS), dropna=False, sort=True):
        if ikey[0] in grids:
            icl_series.setdefault(ikey[0], []).append((_key(ikey), _on_grid(g, grids[ikey[0]], ikey)))
    rows = []
    for hkey, g in head_traj.groupby(list(HEAD_KEYS), sort=True):
        h = form.get(_key(hkey))
        if h is None:
            raise ValueError(f"formation table has no row for {dict(zip(HEAD_KEYS, hkey))}")
        head_values = _on_grid(g, grids[hkey[0]], hkey)
        for ikey, metric_values in icl_series.get(hkey[0], []):
            m = emer.get(ikey)
            if m is None:
                raise ValueError(f"emergence table has no row for {dict(zip(ICL_KEYS, ikey))}")
            both = np.isfinite(head_values) & np.isfinite(metric_values)
            a, b = head_values[both], metric_values[both]
            ra, rb = (_centred_ranks(a), _centred_ranks(b)) if len(a) >= 3 else (None, None)
            rho_level = float(ra @ rb) if ra is not None and rb is not None else np.nan
            rho_diff, p = spearman_block_test(a, b, block_length=block_length, n_perm=n_perm, seed=seed)
            rows.append({**dict(zip(HEAD_KEYS, hkey)), "family": h["family"], "final_rank": h["final_rank"],
                         **dict(zip(ICL_KEYS, ikey)), **_transition_lag(h, m, ci_level),
                         "n_checkpoints": len(a), "rho_level": rho_level, "rho_diff": rho_diff, "p_value": p,
                         "q_value": np.nan, "related": False})
    out = _frame(rows, RELATION_SCHEMA)
    for _, idx in out.groupby(["model", "score"]).groups.items():
        p = out.loc[idx, "p_value"]
        tested = p[p.notna()]
        if len(tested):
            out.loc[tested.index, "q_value"] = stats.false_discovery_control(tested.to_numpy(), method="bh")
    out["related"] = (out["q_value"] <= alpha).fillna(False).astype(bool)
    return out


def head_class(score: str, family: str) -> str:
    """The summary's class of a head score: ``induction`` (prefix matching), ``previous_token``,
    ``copying``, or ``sih:<family>`` for the relation index of any relation of that family."""
    return f"sih:{family}" if score.startswith(RI_PREFIX) else HEAD_CLASSES.get(score, score)


def _median_draws(boots: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap of a median over units: each replicate resamples the units and takes each one's
    draw of that replicate (``boots``: units x replicates; NaN where a unit's refit failed)."""
    n_units, n_boot = boots.shape
    picks = rng.integers(n_units, size=(n_boot, n_units))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate whose resampled units all failed
        return np.nanmedian(boots[picks, np.arange(n_boot)[:, None]], axis=1)


def _midpoint(located: Mapping, tail: float, prefix: str) -> dict:
    """A midpoint (``fit_status``, ``transition_tokens``, ``transition_boot_tokens``) and its percentile
    interval, as ``<prefix>_tokens`` and ``<prefix>_low/high_tokens`` (NaN when not located)."""
    if located["fit_status"] != "ok":
        return {f"{prefix}_tokens": np.nan, f"{prefix}_low_tokens": np.nan, f"{prefix}_high_tokens": np.nan}
    draws = np.asarray(located["transition_boot_tokens"], float)
    draws = draws[np.isfinite(draws)]
    low, high = np.quantile(draws, [tail, 1 - tail]) if len(draws) else (np.nan, np.nan)
    return {f"{prefix}_tokens": float(located["transition_tokens"]), f"{prefix}_low_tokens": low,
            f"{prefix}_high_tokens": high}


def summary_table(relation: pd.DataFrame, formation: pd.DataFrame, emergence: pd.DataFrame, *,
                  top_k: int = DEFAULT_TOP_K, ci_level: float = DEFAULT_CI_LEVEL, seed: int = 0) -> pd.DataFrame:
    """Before, with or after? Per model, every head class and every ICL level against every ICL
    level's series (SUMMARY_SCHEMA columns).

    A head class's midpoint is the median of its formed heads' midpoints (for ``top<k>``, the
    ``top_k`` heads of each score at the final checkpoint; for ``all``, every head), with a
    bootstrap that resamples heads and pairs each with one of its bootstrap midpoints. The lag to a
    level is that median minus the level's midpoint, replicate by replicate, and the verdict
    comes from its interval, as for a single head. Levels are compared with each other the same way.
    Where ``top_k`` takes every head of a class (a model with at most ``top_k`` heads), the class has
    only its ``all`` rows: the same heads cannot get two verdicts. A class none of whose heads has a
    located midpoint is "undetermined" when some head left its null, "no formation" when none did.
    """
    tail = (1 - ci_level) / 2
    emergence = emergence.assign(_level_metric=emergence["level"].map(LEVEL_METRIC))
    levels = emergence[emergence["metric"] == emergence["_level_metric"]]
    formation = formation.assign(_class=[head_class(sc, fa) for sc, fa in zip(formation["score"], formation["family"])])
    relation = relation.assign(_class=[head_class(sc, fa) for sc, fa in zip(relation["score"], relation["family"])])
    in_top = (formation["final_rank"] <= top_k).fillna(False).astype(bool)
    missing_models = sorted(set(formation["model"]) - set(levels["model"]))
    if missing_models:
        warnings.warn(f"summary: models {missing_models} have no ICL level series "
                      f"({', '.join(LEVEL_METRIC.values())}); they get no summary rows", stacklevel=2)
    rows = []
    for model, model_levels in levels.groupby("model", sort=True):
        # (kind, name, series, head_set, n_units, n_formed, midpoint as fit_status/transition_*, relation rows)
        subjects = []
        mine = formation[formation["model"] == model]
        for set_name, units in ((f"top{top_k}", formation[in_top]), ("all", formation)):
            for name, g in units[units["model"] == model].groupby("_class", sort=True):
                if set_name != "all" and len(g) == int((mine["_class"] == name).sum()):
                    continue  # top_k takes every head of the class: the same heads as "all", one row set
                formed = g[g["fit_status"] == "ok"]
                onsets = g["onset_tokens"].dropna()
                boots = np.array([np.asarray(b, float) for b in formed["transition_boot_tokens"]])
                located = {"fit_status": "ok" if len(formed) else "no_onset" if onsets.empty else "undetermined",
                           "onset_tokens": float(onsets.median()) if len(onsets) else np.nan,
                           "transition_tokens": float(formed["transition_tokens"].median()) if len(formed) else np.nan,
                           "transition_boot_tokens": _median_draws(boots, _rng(seed, (model, name, set_name)))
                           if len(formed) else []}
                heads = relation[(relation["model"] == model) & (relation["_class"] == name)]
                heads = heads.merge(g[["score", "layer", "head"]], on=["score", "layer", "head"])
                subjects.append(("head_class", name, None, set_name, len(g), len(formed), located, heads))
        for level in model_levels.itertuples():
            subjects.append(("icl_level", level.level, level, "", 1, int(level.fit_status == "ok"), level._asdict(),
                             None))
        for kind, name, series, set_name, n_units, n_formed, h, heads in subjects:
            for m in model_levels.itertuples():
                if series is not None and (name == m.level or (
                        series.task != m.task and "loss_reduction" not in (name, m.level))):
                    continue  # a level against itself, or two tasks' series of different levels
                row = {"model": model, "subject_kind": kind, "subject": name,
                       "subject_task": series.task if series is not None else "",
                       "subject_shots": series.shots if series is not None else None,
                       "subject_metric": series.metric if series is not None else "", "head_set": set_name,
                       "n_units": n_units, "n_formed": n_formed, **_midpoint(h, tail, "subject"),
                       "level": m.level, "task": m.task, "shots": m.shots, "metric": m.metric,
                       **_midpoint(m._asdict(), tail, "level"),
                       **_transition_lag(h, m._asdict(), ci_level,
                                         "no emergence" if kind == "icl_level" else "no formation")}
                if heads is not None:
                    shots = heads["shots"].astype("Int64")
                    same_shots = shots.isna() if pd.isna(m.shots) else shots.eq(m.shots).fillna(False)
                    mine = heads[(heads["level"] == m.level) & (heads["task"] == m.task)
                                 & (heads["metric"] == m.metric) & same_shots]
                    row.update({f"n_{o}": int((mine["order"] == o).sum()) for o in ORDERS[:3]})
                    row.update(n_related=int(mine["related"].sum()), median_rho_diff=mine["rho_diff"].median())
                rows.append(row)
    return _frame(rows, SUMMARY_SCHEMA)


def warn_flagged_negative_controls(ri: pd.DataFrame) -> None:
    """Warn, naming model, checkpoints and cells, when a relation-index table holds a flagged negative
    control (``negative_control_flagged``): the SIH test passed a family no head can know, so its
    flags on those checkpoints must not be trusted."""
    if "negative_control_flagged" not in ri:
        return
    flagged = ri[ri["negative_control_flagged"].astype(bool)]
    for model, rows in flagged.groupby("model", sort=True):
        steps = sorted(set(rows["step"].astype(int)))
        warnings.warn(f"NEGATIVE CONTROL FLAGGED for {model} at step(s) {', '.join(map(str, steps))}: {len(rows)} "
                      "cell(s) of a family no head can know under its variant passed the SIH test; the test is "
                      "broken on those checkpoints and their SIH flags must not be trusted", stacklevel=2)


def analyze(icl: pd.DataFrame, heads: pd.DataFrame, ri: pd.DataFrame | None = None,
            provenance: pd.DataFrame | None = None, *, shots: int | None = None, per_task: bool = False,
            direction: str = "forward", gate: str = "argmax", variant: str = "source", tau: float | None = None,
            k: int = DEFAULT_K, n_boot: int = DEFAULT_N_BOOT, n_perm: int = DEFAULT_N_PERM,
            block_length: int | None = None, alpha: float = DEFAULT_ALPHA, top_k: int = DEFAULT_TOP_K,
            ci_level: float = DEFAULT_CI_LEVEL, seed: int = 0, include_suspect: bool = False) -> dict[str, pd.DataFrame]:
    """The whole analysis from the merged per-checkpoint tables: trajectories and the four tables.

    Checkpoints whose weights duplicate the step before them (``provenance``) are left out, and so are
    suspect ones (weights equal to a non-consecutive step's) unless ``include_suspect``. The ICL
    tasks enter at one shot count (``shots``, default the largest measured) and, unless
    ``per_task``, averaged over tasks (:func:`level_curves`); the relation index at one direction,
    gate and variant (and ``tau`` for the margin gate). Heads form and ICL emerges by one rule (the
    module docstring). Returns ``icl_traj``, ``head_traj``,
    ``emergence``, ``formation``, ``relation`` and ``summary``.
    """
    exclude = duplicate_checkpoints(provenance, include_suspect=include_suspect) if provenance is not None else set()
    task_rows = icl["shots"].notna()
    chosen = shots if shots is not None else (int(icl.loc[task_rows, "shots"].max()) if task_rows.any() else None)
    icl = icl[~task_rows | (icl["shots"] == chosen)]
    kept = icl["shots"].notna()
    if not per_task and kept.any():
        icl = pd.concat([icl[~kept], level_curves(icl[kept], ci_level=ci_level)], ignore_index=True)
    if ri is not None and tau is not None and "tau" in ri:
        ri = ri[(ri["gate"] != "margin") | (ri["tau"] == tau)]
    if ri is not None:
        warn_flagged_negative_controls(ri)
    icl_traj = icl_trajectories(icl, ci_level=ci_level, exclude=exclude)
    head_traj = head_trajectories(heads, ri, ci_level=ci_level, direction=direction, gate=gate, variant=variant,
                                  exclude=exclude)
    emergence = emergence_table(icl_traj, k=k, n_boot=n_boot, seed=seed, ci_level=ci_level)
    formation = formation_table(head_traj, k=k, n_boot=n_boot, seed=seed, ci_level=ci_level)
    relation = relation_table(head_traj, formation, icl_traj, emergence, block_length=block_length, n_perm=n_perm,
                              alpha=alpha, ci_level=ci_level, seed=seed)
    summary = summary_table(relation, formation, emergence, top_k=top_k, ci_level=ci_level, seed=seed)
    return {"icl_traj": icl_traj, "head_traj": head_traj, "emergence": emergence, "formation": formation,
            "relation": relation, "summary": summary}
