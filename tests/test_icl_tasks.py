"""ICL levels 2 and 3: prompt rules, single-token words, padding-exact batching, metrics, figures."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_neox

from icl_dynamics.icl_tasks import (
    BASELINES,
    SHOTS,
    TASKS,
    Prompt,
    evaluate_tasks,
    label_token_ids,
    load_words,
    lookup_prediction,
    majority_prediction,
    make_prompts,
    next_token_logits,
    wilson_interval,
)
from icl_dynamics.io import to_table
from icl_dynamics.schemas import ICL_SCHEMA

LINE = re.compile(r"^ (\S+), (\S+): (\d)$")
QUERY = re.compile(r"^ (\S+), (\S+):$")


def _category(word: str) -> str:
    return next(c for c, ws in load_words().items() if word in ws)


def _hand_label(task: str, a: str, b: str) -> int:
    """The issue's label rules, written out per task."""
    ca, cb = _category(a), _category(b)
    if task == "binary_fruit_month":
        return {("fruit", "month"): 0, ("month", "fruit"): 1}[ca, cb]
    if task == "binary_furniture_profession":
        return {("furniture", "profession"): 0, ("profession", "furniture"): 1}[ca, cb]
    if task == "four_class_fruit_month":
        idx = {"fruit": 0, "month": 1}
        return 2 * idx[ca] + idx[cb]
    idx = {"fruit": 0, "animal": 1, "month": 2}
    return 3 * idx[ca] + idx[cb]


def _parse(text: str) -> tuple[list[tuple[str, str, int]], tuple[str, str]]:
    *lines, last = text.split("\n")
    demos = [(m[1], m[2], int(m[3])) for m in map(LINE.match, lines)]
    q = QUERY.match(last)
    return demos, (q[1], q[2])


def test_word_lists() -> None:
    words = load_words()
    assert {c: len(ws) for c, ws in words.items()} == {
        "fruit": 14, "month": 12, "furniture": 19, "profession": 30, "animal": 30
    }
    all_words = [w for ws in words.values() for w in ws]
    assert len(all_words) == len(set(all_words))
    assert words["month"][0] == "January" and all(w.islower() for c, ws in words.items() if c != "month" for w in ws)


def test_words_and_labels_are_single_tokens_in_every_prompt(neox_tokenizer) -> None:
    """Each word and label is one token wherever it stands: a prompt is exactly 6 tokens per
    demonstration line and 4 for the query, and the tokens decode to the expected pieces."""
    tok = neox_tokenizer
    for word in [w for ws in load_words().values() for w in ws]:
        assert len(tok.encode(f" {word}", add_special_tokens=False)) == 1, word
    for task in TASKS:
        for prompt in make_prompts(task, 20) + make_prompts(task, 3):
            ids = tok.encode(prompt.text, add_special_tokens=False)
            pieces = [tok.decode([i]) for i in ids]
            expected = [p for a, b, y in prompt.demonstrations for p in (f" {a}", ",", f" {b}", ":", f" {y}", "\n")]
            expected += [f" {prompt.query[0]}", ",", f" {prompt.query[1]}", ":"]
            assert pieces == expected
    ids = label_token_ids(tok, 9, make_prompts(TASKS[3], 2)[0].text)
    assert tok.convert_ids_to_tokens(ids) == [f"Ġ{d}" for d in range(9)]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_prompt_rules(task) -> None:
    for shots in SHOTS:
        prompts = make_prompts(task, shots, n_prompts=50, seed=3)
        assert prompts == make_prompts(task, shots, n_prompts=50, seed=3)
        counts = Counter(p.label for p in prompts)
        assert set(counts) == set(range(task.n_classes)) and max(counts.values()) - min(counts.values()) <= 1
        for p in prompts:
            demos, query = _parse(p.text)
            assert demos == list(p.demonstrations) and query == p.query and len(demos) == shots
            assert _hand_label(task.name, *query) == p.label
            assert all(_hand_label(task.name, a, b) == y for a, b, y in demos)
            pairs = [frozenset((a, b)) for a, b, _ in demos]
            assert not set(query) & {w for a, b, _ in demos for w in (a, b)}  # query words held out
            assert len(set(pairs)) == len(pairs)
            assert query[0] != query[1] and all(a != b for a, b, _ in demos)
            demo_labels = [y for _, _, y in demos]
            if shots >= task.n_classes:
                assert set(demo_labels) == set(range(task.n_classes))
            else:
                assert len(set(demo_labels)) == shots
    assert make_prompts(task, 5, seed=0) != make_prompts(task, 5, seed=1)


def test_baselines_by_hand() -> None:
    demos = (("apple", "May", 0), ("June", "fig", 1), ("pear", "July", 0), ("May", "plum", 1))
    prompt = Prompt("", 0, ("March", "fig"), demos)
    assert lookup_prediction(prompt) == 1  # "fig" in the second slot of the second demonstration
    assert lookup_prediction(Prompt("", 0, ("fig", "March"), demos)) == 1  # no slot match: majority, a tie -> last
    assert majority_prediction(Prompt("", 0, ("fig", "March"), demos[:3])) == 0
    assert lookup_prediction(Prompt("", 1, ("apple", "March"), demos)) == 0  # "apple" in the first slot
    assert majority_prediction(Prompt("", 1, ("fig", "March"), ())) == 0


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_lookup_shortcut_is_at_chance_on_the_prompts(task) -> None:
    """With the query's words in the demonstrations, copying the label of a demonstration sharing a
    query word scored 0.89 on binary fruit/month at 20 shots. Held out, no demonstration shares one:
    the lookup is the majority guess, and both are at chance (99.9 % binomial interval, 600 prompts)."""
    from scipy.stats import binomtest

    for shots in (5, 20):
        prompts = make_prompts(task, shots, n_prompts=600, seed=11)
        lookup = [lookup_prediction(p) for p in prompts]
        assert lookup == [majority_prediction(p) for p in prompts]
        hits = sum(y == p.label for y, p in zip(lookup, prompts))
        ci = binomtest(hits, len(prompts)).proportion_ci(confidence_level=0.999)
        assert ci.low <= task.chance <= ci.high, (shots, hits / len(prompts))


def test_right_padded_batch_matches_unpadded_prompts() -> None:
    model = tiny_neox(vocab_size=64, hidden=32, layers=2, heads=4)
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 7, 3, 12, 12, 5, 9, 2, 11]
    seqs = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in lengths]
    batched = next_token_logits(model, seqs, pad_id=17, batch_size=4)
    with torch.no_grad():
        single = torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])
    assert batched.shape == (len(seqs), 64)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def _fixed_token_model(token_id: int) -> torch.nn.Module:
    """A real GPT-NeoX whose next-token logits are 50 for ``token_id`` and 0 elsewhere, for any
    input: the final LayerNorm outputs its bias (weight 0) and only one unembedding row reads it."""
    model = tiny_neox(vocab_size=50304, hidden=8, layers=1, heads=2)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight.zero_()
        model.gpt_neox.final_layer_norm.bias.copy_(torch.eye(8)[0])
        model.get_output_embeddings().weight.zero_()
        model.get_output_embeddings().weight[token_id, 0] = 50.0
    return model


def test_constant_label_model_complies_at_chance(neox_tokenizer) -> None:
    tok = neox_tokenizer
    one = tok.convert_tokens_to_ids("Ġ1")
    shots = (0, 2, 10)
    rows = evaluate_tasks(_fixed_token_model(one), tok, shots=shots, n_prompts=50, batch_size=16)
    assert len(rows) == len(TASKS) * len(shots) * (3 + len(BASELINES))
    for row in rows:
        task = next(t for t in TASKS if t.name == row["task"])
        prompts = make_prompts(task, row["shots"], 50, 0)
        k_ones = sum(p.label == 1 for p in prompts)
        expected = 1.0 if row["metric"] == "format_compliance" else k_ones / 50
        if row["metric"] in BASELINES:
            expected = sum(BASELINES[row["metric"]](p) == p.label for p in prompts) / 50
        assert row["value"] == pytest.approx(expected)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(round(expected * 50), 50))
        assert row["chance"] == (None if row["metric"] == "format_compliance" else pytest.approx(1 / task.n_classes))
        if row["level"] == "pattern_discovery" and row["metric"] not in BASELINES:
            assert abs(row["value"] - task.chance) <= 1 / 50  # balanced queries: chance up to rounding
    table = to_table([{**r, "model": "m", "step": 0, "tokens": 0} for r in rows], ICL_SCHEMA)
    assert table.num_rows == len(rows)

    apple = tok.convert_tokens_to_ids("Ġapple")
    rows = evaluate_tasks(_fixed_token_model(apple), tok, tasks=TASKS[:1], shots=(1,), n_prompts=10)
    assert [r["value"] for r in rows if r["metric"] in ("format_compliance", "accuracy")] == [0.0, 0.0]


def test_wilson_interval_hand_values() -> None:
    # 8/10, z = 1.96: centre (0.8 + 3.8416/20) / 1.38416 = 0.7167374,
    # half 1.96 / 1.38416 * sqrt(0.016 + 3.8416/400) = 1.4160217 * 0.1600125 = 0.2265812
    assert wilson_interval(8, 10) == pytest.approx((0.4901562, 0.9433186), abs=1e-6)
    # 0/10: upper = (z^2/n) / (1 + z^2/n) = 0.38416 / 1.38416
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.38416 / 1.38416), abs=1e-12)
    # SciPy's independent implementation (it uses the exact 97.5% normal quantile)
    from scipy.stats import binomtest, norm

    for k, n in [(8, 10), (0, 10), (17, 50), (50, 50)]:
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n, z=norm.ppf(0.975)) == pytest.approx((ci.low, ci.high), abs=1e-12)
    with pytest.raises(ValueError, match="k=11, n=10"):
        wilson_interval(11, 10)


def test_level_figure_plots_the_table(tmp_path) -> None:
    from icl_dynamics.figures.icl import plot_level, plot_loss_by_token, write_icl_figures

    rows = []
    for step in (0, 1, 512, 1000):
        for task in TASKS[:2]:
            for shots in (0, 5):
                value = (step + shots) / 2000
                rows.append(dict(model="org/m-1.4b", step=step, tokens=step, level="pattern_discovery",
                                 task=task.name, shots=shots, metric="accuracy", value=value,
                                 ci_low=value - 0.1, ci_high=value + 0.1, n=50, chance=0.5))
            rows.append(dict(model="org/m-1.4b", step=step, tokens=step, level="pattern_discovery", task=task.name,
                             shots=5, metric="baseline_lookup", value=0.48, ci_low=0.4, ci_high=0.6, n=50, chance=0.5))
        rows.append(dict(model="org/m-1.4b", step=step, tokens=step, level="loss_reduction", task="pile",
                         shots=None, metric="icl_score", value=-step / 1000, ci_low=-1, ci_high=0, n=10,
                         chance=None))
    table = pd.DataFrame(rows)
    fig = plot_level(table, "pattern_discovery", "accuracy")
    ax = fig.axes[0]
    five = next(line for line in ax.get_lines() if line.get_label() == "5-shot")
    np.testing.assert_allclose(five.get_xdata(), [0, 1, 512, 1000])
    np.testing.assert_allclose(five.get_ydata(), [0.0025, 0.003, 0.2585, 0.5025])
    assert any(line.get_label() == "chance" and line.get_ydata()[0] == 0.5 for line in ax.get_lines())
    lookup = next(line for line in ax.get_lines() if line.get_label() == "lookup baseline, 5-shot")
    np.testing.assert_allclose(lookup.get_ydata(), [0.48] * 4)

    curves = pd.DataFrame([dict(model="org/m-1.4b", step=s, position=p, loss=5 - p / (s + 1), ci_low=0, ci_high=9)
                           for s in (0, 1, 512, 1000) for p in range(1, 6)])
    lines = plot_loss_by_token(curves, n_curves=2).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["step 0", "step 1000"]
    np.testing.assert_allclose(lines[1].get_ydata(), [5 - p / 1001 for p in range(1, 6)])

    paths = write_icl_figures(table, curves, tmp_path, model="org/m-1.4b")
    assert sorted(p.name for p in paths) == sorted(
        f"org--m-1.4b_{name}.{ext}" for name in ("pattern_discovery_accuracy", "loss_reduction_icl_score",
                                                 "loss_by_token") for ext in ("png", "pdf"))
