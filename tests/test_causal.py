"""The causal analysis of the ablation tables (icl_dynamics.causal): group importance over its controls by
hand, the head correlations against scipy, silence on noise and the order against ICL emergence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from icl_dynamics import causal
from icl_dynamics.emergence import _z

MODEL = "m/toy"
TPS = 2048


def ablation_rows(step: int, ablation: str, level: str, task: str, metric: str, value: float, half: float, *,
                  group: str | None = None, draw: int | None = None, layer: int | None = None,
                  head: int | None = None, shots: int | None = None, heads: list[str] | None = None) -> dict:
    """One row of a merged ablation table (``half``: half the interval's width)."""
    return {"model": MODEL, "step": step, "tokens": step * TPS, "ablation": ablation, "layer": layer, "head": head,
            "group": group, "draw": draw, "heads": heads or ["L0H0"], "level": level, "task": task, "shots": shots,
            "metric": metric, "value": value, "ci_low": value - half, "ci_high": value + half}


def frame(rows: list[dict]) -> pd.DataFrame:
    out = pd.DataFrame(rows)
    for name in ("layer", "head", "draw", "shots"):
        out[name] = out[name].astype("Int32")
    return out


def test_group_importance_is_the_groups_loss_over_its_controls_by_hand():
    z = _z(0.95)
    rows = [  # step 1: the SIH group and two controls on kg recall, and the tasks (two, averaged)
        ablation_rows(1, "group", "relation_recall", "kg", "tail_logprob", -2.0, 0.4, group="sih",
                      heads=["L1H0", "L1H2"]),
        ablation_rows(1, "control", "relation_recall", "kg", "tail_logprob", -0.2, 0.2, group="sih", draw=0),
        ablation_rows(1, "control", "relation_recall", "kg", "tail_logprob", -0.4, 0.1, group="sih", draw=1),
        ablation_rows(1, "importance", "relation_recall", "kg", "tail_logprob", -1.7, 0.25, group="sih",
                      heads=["L1H0", "L1H2"]),
        ablation_rows(1, "group", "format_compliance", "a", "format_compliance", -0.5, 0.1, group="sih", shots=5),
        ablation_rows(1, "group", "format_compliance", "b", "format_compliance", -0.3, 0.3, group="sih", shots=5),
        ablation_rows(1, "control", "format_compliance", "a", "format_compliance", 0.1, 0.1, group="sih", draw=0,
                      shots=5),
        ablation_rows(1, "control", "format_compliance", "b", "format_compliance", -0.1, 0.1, group="sih", draw=0,
                      shots=5),
        ablation_rows(1, "importance", "format_compliance", "a", "format_compliance", -0.6, 0.05, group="sih",
                      shots=5),
        ablation_rows(1, "importance", "format_compliance", "b", "format_compliance", -0.2, 0.2, group="sih",
                      shots=5),
        # step 0: nothing flagged yet, only the single heads
        ablation_rows(0, "head", "relation_recall", "kg", "tail_logprob", -0.1, 0.1, layer=0, head=0),
        ablation_rows(0, "head", "format_compliance", "a", "format_compliance", 0.0, 0.0, layer=0, head=0, shots=5),
        ablation_rows(0, "head", "format_compliance", "b", "format_compliance", 0.0, 0.0, layer=0, head=0, shots=5),
    ]
    got = causal.group_series(frame(rows)).set_index(["step", "level"])
    kg = got.loc[(1, "relation_recall")]
    assert kg["value"] == pytest.approx(1.7)  # recall lost by the group over the controls, from the importance row
    assert kg["se"] == pytest.approx(0.25 / z)  # its own interval: the group and controls resampled together
    assert (kg["group_loss"], kg["control_loss"]) == pytest.approx((2.0, 0.3))
    assert (kg["n_heads"], kg["n_controls"], kg["control_min"], kg["control_max"]) == (2, 2, 0.2, 0.4)
    tasks = got.loc[(1, "format_compliance")]  # the mean over tasks (tasks' prompts are independent)
    assert tasks["task"] == "mean" and tasks["value"] == pytest.approx(0.4)
    assert tasks["se"] == pytest.approx(np.sqrt((0.05 / z) ** 2 + (0.2 / z) ** 2) / 2)
    empty = got.loc[(0, "relation_recall")]  # ablating no head costs nothing
    assert (empty["value"], empty["se"], empty["n_heads"]) == (0.0, 0.0, 0)
    # a group without any layer-matched control has no importance over control
    alone = causal.group_series(frame(rows[:1]))
    assert alone["value"].isna().all() and alone["group_loss"].tolist() == [2.0]
    with pytest.raises(ValueError, match="no 'importance' rows.*rescore"):
        causal.group_series(frame(rows[:3]))


def test_group_importance_interval_covers_the_truth_at_its_level():
    """Simulated evaluation sets (32 units, as the ICL score's; each unit's cost of ablating anything in the
    layer shared by the group and its 5 controls, as real units are): the stage's own rows
    (ablation.cell_effects) read by group_series give a 95 % interval (value +- z se) that holds the true
    importance in ~95 % of 400 simulations. The sum of the group's and the controls' variances (the
    formula before) ignores their covariance and held it in every one, i.e. later onsets."""
    from icl_dynamics.ablation import cell_effects

    z = _z(0.95)
    labels = [dict(ablation="group", layer=None, head=None, group="induction", draw=None, heads=["L1H0"]),
              *[dict(ablation="control", layer=None, head=None, group="induction", draw=d, heads=["L1H1"])
                for d in range(5)]]
    rows, old_covered = [], 0
    for sim in range(400):  # one simulation per step, read by one group_series call
        rng = np.random.default_rng(sim)
        clean, shared = rng.normal(3, 1, 32), rng.normal(0, 1, 32)
        ablated = [clean + shared + truth + rng.normal(0, 0.3, 32) for truth in (1.0, 0, 0, 0, 0, 0)]
        kinds, value, low, high = cell_effects(np.stack([clean, *ablated], 1), labels, n_boot=1000, seed=sim)
        rows += [ablation_rows(sim, k["ablation"], "loss_reduction", "text", "icl_score", v, 0, group="induction",
                               draw=k.get("draw"), heads=k["heads"]) | {"ci_low": lo, "ci_high": hi}
                 for k, v, lo, hi in zip(kinds, value, low, high)]
        se = (high - low) / (2 * z)
        old = np.sqrt(se[0] ** 2 + (np.var(value[1:6], ddof=1) + np.mean(se[1:6] ** 2)) / 5)
        old_covered += abs(value[0] - value[1:6].mean() - 1.0) <= z * old
    series = causal.group_series(frame(rows))
    assert len(series) == 400
    covered = int((np.abs(series["value"] - 1.0) <= z * series["se"]).sum())  # +1 nat of ICL score lost
    assert 0.91 <= covered / 400 <= 0.98, covered
    assert old_covered == 400


def correlation_table(rng: np.random.Generator, n_heads: int, steps: list[int], planted: float) -> tuple:
    """Heads and ablation tables whose ICL-score effect is ``planted`` x prefix matching + noise."""
    heads, rows = [], []
    for step in steps:
        pm = rng.uniform(0, 1, n_heads)
        effect = planted * pm + rng.normal(0, 0.1, n_heads)
        for h in range(n_heads):
            heads.append({"model": MODEL, "step": step, "tokens": step * TPS, "layer": h // 4, "head": h % 4,
                          "prefix_matching": pm[h]})
            rows.append(ablation_rows(step, "head", "loss_reduction", "text", "icl_score", effect[h], 0.05,
                                      layer=h // 4, head=h % 4))
    return pd.DataFrame(heads), frame(rows)


def test_head_correlation_equals_scipy_and_its_interval_covers_it():
    heads, ablation = correlation_table(np.random.default_rng(0), 16, [0, 1], planted=1.0)
    got = causal.head_correlations(ablation, heads, n_boot=200)
    assert list(got["comparison"]) == ["prefix_matching_vs_icl_score"] * 2 and set(got["n_heads"]) == {16}
    for row in got.itertuples():
        x = heads.loc[heads["step"] == row.step, "prefix_matching"].to_numpy()
        y = ablation.loc[ablation["step"] == row.step, "value"].to_numpy()
        rho, p = stats.spearmanr(x, y)
        assert (row.rho, row.p_value) == pytest.approx((rho, p))
        assert row.ci_low <= row.rho <= row.ci_high and row.ci_low > 0.3  # planted: clearly positive


def test_head_correlation_interval_stays_on_zero_for_unrelated_scores():
    """Null: scores independent of the effects. The 95% interval excludes 0 in at most 10% of 100 seeds
    (measured: see the assertion's message), and the planted positive control above excludes it always."""
    excluded = 0
    for seed in range(100):
        heads, ablation = correlation_table(np.random.default_rng(seed), 24, [0], planted=0.0)
        row = causal.head_correlations(ablation, heads, n_boot=200, seed=seed).iloc[0]
        excluded += not row.ci_low <= 0 <= row.ci_high
    assert excluded <= 10, f"{excluded} of 100 null intervals exclude 0"


def series_ablation(values: np.ndarray, half: float, steps: np.ndarray) -> pd.DataFrame:
    """An ablation table in which the induction group's ICL-score effect, and so its importance over its
    controls, is ``values`` and its controls' (two draws) are 0, each with half-width ``half``."""
    rows = []
    for step, value in zip(steps, values):
        rows.append(ablation_rows(int(step), "group", "loss_reduction", "text", "icl_score", value, half,
                                  group="induction"))
        rows.append(ablation_rows(int(step), "importance", "loss_reduction", "text", "icl_score", value, half,
                                  group="induction"))
        for draw in range(2):
            rows.append(ablation_rows(int(step), "control", "loss_reduction", "text", "icl_score", 0.0, half,
                                      group="induction", draw=draw))
    return frame(rows)


STEPS = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 4000])


def emergence_row(tokens: float) -> dict:
    """An ICL level's emergence row located at ``tokens`` (bootstrap draws around it)."""
    draws = np.random.default_rng(1).normal(tokens, tokens * 0.05, 50).tolist()
    return {"model": MODEL, "level": "loss_reduction", "task": "text", "shots": None, "metric": "icl_score",
            "fit_status": "ok", "transition_tokens": tokens, "transition_boot_tokens": draws}


def test_causal_onsets_stay_silent_on_noise_and_order_a_planted_rise_before_icl():
    """Null: 100 seeds of an importance series that is pure noise at its own stated uncertainty give an onset
    in at most 5 (the rule's false-positive rate here); planted: a rise at ~step 30 is located there and
    called ``before`` an ICL level emerging at step 1000, and ``after`` one at step 2."""
    heads = pd.DataFrame({"model": [MODEL], "step": [0], "tokens": [0], "layer": [0], "head": [0],
                          "prefix_matching": [0.0]})
    emergence = pd.DataFrame([emergence_row(1000 * TPS)])
    onsets = 0
    for seed in range(100):
        noise = np.random.default_rng(seed).normal(0, 0.1, len(STEPS))
        tables = causal.causal_tables(series_ablation(noise, 0.1 * _z(0.95), STEPS), heads, None, emergence,
                                      k=3, n_boot=20, seed=seed)
        onsets += tables["causal_emergence"]["onset_step"].notna().sum()
    assert onsets <= 5, f"{onsets} of 100 noise series got an onset"

    rise = 2.0 / (1 + np.exp(-(np.log10(STEPS + 0.5) - np.log10(30)) * 6))
    emergence = pd.DataFrame([emergence_row(1000 * TPS), {**emergence_row(2 * TPS), "level": "format_compliance",
                                                           "metric": "format_compliance", "task": "mean"}])
    tables = causal.causal_tables(series_ablation(rise, 0.05, STEPS), heads, None, emergence, k=3, n_boot=50)
    located = tables["causal_emergence"].iloc[0]
    assert located["fit_status"] == "ok" and 10 < located["transition_step"] < 100
    order = tables["causal_order"].set_index("icl_level")["order"]
    assert order.to_dict() == {"loss_reduction": "before", "format_compliance": "after"}


def test_a_model_without_ablation_rows_gets_empty_tables_and_a_figure_that_says_so(tmp_path):
    """ablation.enabled false, or a model above ablation.max_parameters: the stage wrote empty tables."""
    from icl_dynamics.figures.causal import causal_figures

    empty = frame([ablation_rows(0, "head", "loss_reduction", "text", "icl_score", 0.0, 0.1, layer=0, head=0)])[:0]
    heads = pd.DataFrame({"model": [MODEL], "step": [0], "tokens": [0], "layer": [0], "head": [0],
                          "prefix_matching": [0.0]})
    tables = causal.causal_tables(empty, heads, None, pd.DataFrame([emergence_row(1000 * TPS)]))
    assert set(tables) == set(causal.TABLES) and all(t.empty for t in tables.values())
    for name, schema in causal.TABLES.items():
        assert list(tables[name].columns) == schema.names
    written = causal_figures(tables["causal_correlation"], tables["causal_series"], tmp_path, [MODEL])
    assert [p.name for p in written] == ["causal-m--toy.png", "causal-m--toy.pdf"]
