"""The seed-group analysis (icl_dynamics.seed_groups): the random-effects pool against a hand computation,
its coverage on simulated groups with a known lag and between-run variance, the group verdict on groups
whose runs disagree and on groups with no lag, and the tables on a synthetic analysis summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from icl_dynamics.seed_groups import (
    POOLED,
    Z95,
    Group,
    group_lags,
    group_midpoints,
    group_verdict,
    pool,
    sd_ratio_interval,
    source_spread,
)

N_SIM = 1000  # simulated groups per setting (>= 200; the binomial SD of a 95 % coverage is then 0.7 %)


def paule_mandel_hksj(y: np.ndarray, v: np.ndarray) -> tuple[float, float, float, float]:
    """The pool written out in float64: tau^2 solving sum w_i (y_i - mu)^2 = k - 1 (0 when even tau^2 = 0
    gives less), then the modified Knapp-Hartung interval
    mu +- t_{k-1} sqrt(max(1, sum w_i (y_i - mu)^2 / (k - 1)) / sum w_i)."""
    k = len(y)

    def q(t2: float) -> float:
        w = 1 / (v + t2)
        mu = (w * y).sum() / w.sum()
        return float((w * (y - mu) ** 2).sum()) - (k - 1)

    t2 = 0.0 if q(0.0) <= 0 else optimize.brentq(q, 0.0, 1e6 * (y.var() + v.max()), xtol=1e-14)
    w = 1 / (v + t2)
    mu = (w * y).sum() / w.sum()
    se = np.sqrt(max(1.0, (w * (y - mu) ** 2).sum() / (k - 1)) / w.sum())
    half = stats.t.ppf(0.975, k - 1) * se
    return float(mu), float(mu - half), float(mu + half), float(np.sqrt(t2))


def dersimonian_laird_normal(y: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """The common alternative the module docstring argues against: DL tau^2 and a normal interval."""
    w = 1 / v
    mu = (w * y).sum() / w.sum()
    t2 = max(0.0, ((w * (y - mu) ** 2).sum() - (len(y) - 1)) / (w.sum() - (w ** 2).sum() / w.sum()))
    ws = 1 / (v + t2)
    m = (ws * y).sum() / ws.sum()
    return m - Z95 / np.sqrt(ws.sum()), m + Z95 / np.sqrt(ws.sum())


def simulate(rng: np.random.Generator, k: int, truth: float, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """k runs: each run's true value truth + N(0, tau^2), measured with its own error of SD 0.3 .. 1.5."""
    se = rng.uniform(0.3, 1.5, k)
    return truth + rng.normal(0, tau, k) + rng.normal(0, se), se ** 2


@pytest.mark.parametrize("seed", range(5))
def test_the_pool_is_paule_mandel_with_the_modified_knapp_hartung_interval(seed):
    rng = np.random.default_rng(seed)
    y, v = simulate(rng, 3 + seed, 1.0, [0.0, 0.5, 1.0, 2.0, 0.1][seed])  # tau^2 = 0 and > 0 both occur
    got = pool(y, v)
    mu, low, high, tau = paule_mandel_hksj(y, v)
    np.testing.assert_allclose([got["estimate"], got["low"], got["high"]], [mu, low, high], rtol=1e-6, atol=1e-8)
    assert got["tau"] == pytest.approx(tau, abs=1e-5)
    assert got["between_sd"] == pytest.approx(np.std(y, ddof=1))


def test_a_group_of_one_is_its_runs_own_estimate():
    got = pool([2.0], [0.25])
    assert (got["estimate"], got["low"], got["high"]) == pytest.approx((2.0, 2.0 - Z95 * 0.5, 2.0 + Z95 * 0.5))
    assert np.isnan(got["tau"]) and group_verdict([1.0], [3.0], got["low"], got["high"], 1) == "one run"


@pytest.mark.parametrize("k", [3, 5, 10])
def test_the_pooled_interval_covers_the_true_lag_in_95_percent_of_groups(k):
    """N_SIM groups of k runs, true lag -2, between-run SD 1, within-run SDs 0.3 .. 1.5 (rng seeded with k).
    Measured: the pool covers 0.991 (k=3: conservative), 0.955 (5), 0.946 (10, PolyPythia's original run and
    nine seeds); the DL normal interval 0.857, 0.881, 0.923 (why not DL); plain HKSJ 0.933, 0.926, 0.943."""
    rng = np.random.default_rng(k)
    hits = dl_hits = 0
    for _ in range(N_SIM):
        y, v = simulate(rng, k, -2.0, 1.0)
        got = pool(y, v)
        hits += got["low"] <= -2.0 <= got["high"]
        low, high = dersimonian_laird_normal(y, v)
        dl_hits += low <= -2.0 <= high
    assert (0.93 if k > 3 else 0.95) <= hits / N_SIM <= (0.97 if k > 3 else 1.0), hits / N_SIM
    assert dl_hits / N_SIM < 0.935  # the common alternative undercovers at every k here


def _verdict(rng, k: int, lags: np.ndarray, tau: float = 0.0) -> str:
    se = rng.uniform(0.3, 1.0, k)
    y = lags + rng.normal(0, tau, k) + rng.normal(0, se)
    lows, highs = y - Z95 * se, y + Z95 * se
    p = pool(y, se ** 2)
    return group_verdict(list(lows), list(highs), p["low"], p["high"], k)


def test_a_group_whose_runs_disagree_is_never_consistent():
    """Half the runs 4 units before, half 4 after, each measured with an SD of 0.3 .. 1.0: never consistent."""
    rng = np.random.default_rng(1)
    verdicts = [_verdict(rng, k, np.repeat([-4.0, 4.0], k // 2)) for k in (2, 4, 6, 10) for _ in range(N_SIM // 4)]
    assert "consistent" not in verdicts
    assert set(verdicts) <= {"inconclusive", "contradicted"}


def test_one_run_against_a_clear_pool_contradicts_it():
    """Nine runs 3 units before (SD 0.3), one 3 units after: the pool still says before, the group does not."""
    y = np.array([-3.0] * 9 + [3.0]) + np.linspace(-0.1, 0.1, 10)
    se = np.full(10, 0.3)
    p = pool(y, se ** 2)
    assert p["high"] < 0
    assert group_verdict(list(y - Z95 * se), list(y + Z95 * se), p["low"], p["high"], 10) == "contradicted"
    assert group_verdict(list(y[:9] - Z95 * se[:9]), list(y[:9] + Z95 * se[:9]), p["low"], p["high"], 9) == "consistent"


def test_no_lag_is_rarely_called_consistent_and_a_real_lag_is_found():
    """Null: true lag 0, between-run SD 0.5, 5 runs: "consistent" (a false claim of order) at most the
    interval's 5 % (measured 2.6 % of N_SIM). Planted: true lag -3, same noise: consistent (measured 100 %)."""
    rng = np.random.default_rng(2)
    null = [_verdict(rng, 5, np.zeros(5), tau=0.5) for _ in range(N_SIM)]
    planted = [_verdict(rng, 5, np.full(5, -3.0), tau=0.5) for _ in range(N_SIM)]
    assert null.count("consistent") / N_SIM <= 0.05
    assert planted.count("consistent") / N_SIM >= 0.95


# ----------------------------------------------------------------------------- the tables


def _summary(runs: dict[str, dict]) -> pd.DataFrame:
    """A summary table as the analysis writes it: per run, the induction class and loss reduction against
    format compliance (``lag``: induction minus format compliance), and format compliance's own row."""
    rows = []
    for model, r in runs.items():
        fc = r["fc"]
        for subject, kind, mid in (("induction", "head_class", r["induction"]), ("loss_reduction", "icl_level", 3e6)):
            lag = mid - fc if np.isfinite(mid) else np.nan
            rows.append({"model": model, "subject_kind": kind, "subject": subject,
                         "subject_task": "" if kind == "head_class" else "mean",
                         "subject_shots": None, "subject_metric": "" if kind == "head_class" else "icl_score",
                         "head_set": "all" if kind == "head_class" else "", "n_units": 8, "n_formed": 3,
                         "subject_tokens": mid, "subject_low_tokens": mid / 1.5, "subject_high_tokens": mid * 1.5,
                         "level": "format_compliance", "task": "mean", "shots": 8, "metric": "format_compliance",
                         "level_tokens": fc, "level_low_tokens": fc / 1.2, "level_high_tokens": fc * 1.2,
                         "lag_tokens": lag, "lag_low_tokens": lag - 4e5, "lag_high_tokens": lag + 4e5,
                         "order": ("undetermined" if not np.isfinite(lag) else
                                   "before" if lag + 4e5 < 0 else "after" if lag - 4e5 > 0 else "with")})
    return pd.DataFrame(rows)


def test_each_runs_rows_are_its_own_analysis_and_the_pool_counts_them():
    summary = _summary({"org/m-seed1": {"induction": 1e6, "fc": 2e6}, "org/m-seed2": {"induction": 1.2e6, "fc": 2.1e6},
                        "org/m-seed3": {"induction": 0.9e6, "fc": 1.8e6}, "org/other": {"induction": 5e6, "fc": 1e6}})
    groups = [Group("m", ("org/m-seed1", "org/m-seed2", "org/m-seed3")), Group("alone", ("org/other",))]
    lags = group_lags(summary, groups)
    runs = lags[(lags["run"] != POOLED) & (lags["subject"] == "induction")].set_index("run")
    mine = summary[summary["subject"] == "induction"].set_index("model")
    for column in ("lag_tokens", "lag_low_tokens", "lag_high_tokens", "order"):
        assert runs[column].to_dict() == mine[column].to_dict()
    pooled = lags[(lags["run"] == POOLED) & (lags["subject"] == "induction")].set_index("group")
    assert pooled.loc["m", ["n_before", "n_with", "n_after", "n_located"]].tolist() == [3, 0, 0, 3]
    assert pooled.loc["m", "verdict"] == "consistent" and pooled.loc["m", "lag_high_tokens"] < 0
    assert pooled.loc["alone", "verdict"] == "one run" and pooled.loc["alone", "lag_tokens"] == 4e6
    midpoints = group_midpoints(summary, groups)
    m = midpoints[(midpoints["group"] == "m") & (midpoints["subject"] == "induction")].set_index("run")
    assert m.loc["org/m-seed2", "midpoint_tokens"] == 1.2e6
    assert m.loc[POOLED, "midpoint_tokens"] == pytest.approx(
        10 ** pool(np.log10([1e6, 1.2e6, 0.9e6]), [(np.log10(2.25) / (2 * Z95)) ** 2] * 3)["estimate"])
    levels = midpoints[midpoints["subject"] == "format_compliance"]
    assert len(levels) == 3 + 1 + 1 + 1  # three runs and the pool, the lone run and its pool
    with pytest.raises(ValueError, match="'gone'.*org/missing"):
        group_lags(summary, [Group("gone", ("org/m-seed1", "org/missing"))])


def test_a_run_without_a_located_lag_makes_the_group_incomplete():
    summary = _summary({"a/s1": {"induction": 1e6, "fc": 2e6}, "a/s2": {"induction": np.nan, "fc": 2e6}})
    pooled = group_lags(summary, [Group("a", ("a/s1", "a/s2"))])
    row = pooled[(pooled["run"] == POOLED) & (pooled["subject"] == "induction")].iloc[0]
    assert row["verdict"] == "incomplete" and row["n_located"] == 1 and row["lag_tokens"] == -1e6


def test_equal_spreads_rarely_name_a_source():
    """Null: data-order and initialisation runs drawn with one spread (3 runs a side, the decoupled PolyPythia
    shape): the F interval names a source in about its 5 % (measured 5.3 % of N_SIM pairs)."""
    rng = np.random.default_rng(4)
    named = 0
    for _ in range(N_SIM):
        _, low, high = sd_ratio_interval(rng.normal(0, 1.0, 3), rng.normal(0, 1.0, 3))
        named += low > 1 or high < 1
    assert named / N_SIM <= 0.075  # 5 % plus 3.5 binomial standard errors of N_SIM draws


def test_the_sd_ratio_interval_covers_and_names_the_source_that_moves_more():
    """The F interval of SD(data runs) / SD(weight runs) covers the true ratio in ~95 % of N_SIM pairs of groups
    (3 and 4 runs; measured 0.965); and on a toy pair whose data runs spread 10 times wider it says "data"."""
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(N_SIM):
        ratio, low, high = sd_ratio_interval(rng.normal(0, 2.0, 3), rng.normal(0, 1.0, 4))
        hits += low <= 2.0 <= high
    assert 0.92 <= hits / N_SIM <= 0.98
    rows = []
    for group, spread in (("d", 10.0), ("w", 1.0)):
        for i, z in enumerate(rng.normal(0, 1, 6)):
            rows.append({"group": group, "run": f"x/160m-{group}{i}", "subject_kind": "head_class",
                         "subject": "induction", "subject_task": "", "subject_shots": None, "subject_metric": "",
                         "head_set": "all", "n_located": 1, "midpoint_tokens": 10 ** (9 + 0.02 * spread * z)})
    groups = [Group("d", tuple(f"x/160m-d{i}" for i in range(6)), "data"),
              Group("w", tuple(f"x/160m-w{i}" for i in range(6)), "weights")]
    got = source_spread(pd.DataFrame(rows), groups).iloc[0]
    assert got["moves_more"] == "data" and got["sd_ratio_low"] > 1 and got["n_data"] == got["n_weights"] == 6


# ----------------------------------------------------------------------------- the workflow on a toy seed group

GROUP_STEPS = [0, 400, 800, 1000, 1200, 1600]  # the fewest checkpoints a fit takes (6 with a value)


@pytest.fixture(scope="module")
def toy_group(toy_zoo, toy_zoo_seeds, tmp_path_factory):
    """The demo workflow on the copy zoo trained with seeds 1, 2 and 3 (one hub cache holding the three runs),
    declared as one group, the ablation off (the group analysis reads the analysis summary only); run once."""
    import shutil

    from conftest import run_toy_workflow

    from icl_dynamics.toyzoo import read_manifest

    work = tmp_path_factory.mktemp("toy-group")
    runs = []
    for zoo in (toy_zoo, *toy_zoo_seeds.values()):
        runs.append(read_manifest(zoo)["model_id"])
        folder = "models--" + runs[-1].replace("/", "--")
        shutil.copytree(zoo / "hub" / folder, work / "hub" / folder, symlinks=True)
    overrides = {"models": runs, "hf_cache": str(work / "hub"), "groups": {"toy": {"runs": runs, "varies": "seed"}},
                 "ablation": {"enabled": False}}
    untrained = {"planted_map": str(toy_zoo / "planted.json"), "planted_texts": str(toy_zoo / "relations.jsonl")}
    run_toy_workflow("toy.yaml", toy_zoo, GROUP_STEPS, work, untrained, overrides=overrides)
    return work / "results", runs


def test_a_toy_seed_group_runs_through_the_workflow_and_keeps_each_runs_own_analysis(toy_group, tmp_path):
    """Three seeds of the copy zoo as one group: the group tables hold, per run, exactly the midpoints and lags
    the analysis of that run *alone* finds (analyze rerun on seed 2's tables only, with the workflow's
    options), the pooled rows count the three runs, and the figures are drawn."""
    from icl_dynamics import io
    from icl_dynamics.cli import main

    results, runs = toy_group
    groups = results / "analysis" / "groups"
    midpoints = pd.read_parquet(groups / "group_midpoints.parquet")
    lags = pd.read_parquet(groups / "group_lags.parquet")
    assert set(midpoints["run"]) == {*runs, POOLED} and set(lags["group"]) == {"toy"}
    assert (lags.loc[lags["run"] == POOLED, "n_runs"] == 3).all()
    assert (groups / "figures" / "lag_forest.png").stat().st_size > 0
    assert (groups / "figures" / "midpoints-toy.png").stat().st_size > 0

    seed2 = runs[1]
    options = io.read_provenance(results / "analysis" / "summary.parquet")
    slug = seed2.replace("/", "--")
    alone = tmp_path / "alone"
    flags = ["--shots", str(options["shots"])] if options.get("shots") is not None else []
    flags += ["--ri-tau", str(options["ri_tau"])] if options.get("ri_tau") is not None else []
    flags += ["--per-task"] if options.get("per_task") else []
    assert main(["analyze", "--icl", str(results / slug / "icl.parquet"), "--heads", str(results / slug / "heads.parquet"),
                 "--relation-index", str(results / slug / "relation_index.parquet"),
                 "--provenance", str(results / slug / "provenance.parquet"), *flags,
                 "--ri-direction", options["ri_direction"], "--ri-gate", options["ri_gate"],
                 "--ri-variant", options["ri_variant"], "--ri-families", *options["ri_families"],
                 "--k", str(options["k"]), "--n-boot", str(options["n_boot"]), "--n-perm", str(options["n_perm"]),
                 "--top-k", str(options["top_k"]), "--seed", str(options["seed"]), "--out-dir", str(alone)]) == 0
    own = pd.read_parquet(alone / "summary.parquet")
    heads = own[own["subject_kind"] == "head_class"].drop_duplicates(["subject", "head_set"]).set_index(
        ["subject", "head_set"])
    mine = midpoints[(midpoints["run"] == seed2) & (midpoints["subject_kind"] == "head_class")].set_index(
        ["subject", "head_set"])
    assert len(mine) and sorted(mine.index) == sorted(heads.index)
    np.testing.assert_array_equal(mine.loc[heads.index, "midpoint_tokens"].to_numpy(),
                                  heads["subject_tokens"].to_numpy())
    keys = ["subject_kind", "subject", "head_set", "level", "task", "metric"]
    got = lags[lags["run"] == seed2].set_index(keys).sort_index()
    expected = own.set_index(keys).sort_index()
    assert list(got.index) == list(expected.index)
    np.testing.assert_array_equal(got["lag_tokens"].to_numpy(), expected["lag_tokens"].to_numpy())
    assert got["order"].tolist() == expected["order"].tolist()
    located = lags[(lags["run"] != POOLED) & lags["lag_tokens"].notna()]
    assert len(located), "no run of the toy group has a located lag: the test shows nothing"


def test_the_figures_draw_the_tables_numbers():
    """The forest plot's diamonds sit at the pooled lags and its dots at the runs'; the size figure's points
    at the pooled midpoints of each group's size."""
    from icl_dynamics.figures.seed_groups import plot_group_midpoints, plot_lag_forest, plot_sizes
    from icl_dynamics.seed_groups import group_tables

    summary = _summary({"org/m-14m-s1": {"induction": 1e6, "fc": 2e6}, "org/m-14m-s2": {"induction": 1.3e6, "fc": 2e6},
                        "org/m-70m-s1": {"induction": 3e6, "fc": 2e6}})
    tables = group_tables(summary, [Group("m-14m", ("org/m-14m-s1", "org/m-14m-s2")), Group("m-70m", ("org/m-70m-s1",))])
    fig = plot_lag_forest(tables["group_lags"])
    drawn = {(round(x, 3), m) for ax in fig.axes for line in ax.get_lines() for x, m in
             zip(line.get_xdata(), [line.get_marker()] * len(line.get_xdata())) if m in ("D", "o")}
    lags = tables["group_lags"][tables["group_lags"]["subject_kind"] == "head_class"]
    expected = {(round(float(r.lag_tokens), 3), "D" if r.run == POOLED else "o") for r in lags.itertuples()}
    assert drawn == expected
    sizes = plot_sizes(tables["group_midpoints"])
    points = {(round(float(x)), round(float(y))) for line in sizes.axes[0].get_lines() for x, y in line.get_xydata()}
    pooled = tables["group_midpoints"][(tables["group_midpoints"]["run"] == POOLED)
                                       & (tables["group_midpoints"]["subject"] == "induction")]
    assert {round(float(v)) for v in pooled["midpoint_tokens"]} <= {y for _, y in points}
    assert plot_group_midpoints(tables["group_midpoints"], "m-14m").axes[0].get_xscale() == "log"
