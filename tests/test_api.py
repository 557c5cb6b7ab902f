"""The Python API on the relations toy zoo: load_results reads what the CLI wrote, score runs a stage on a
loaded checkpoint, and the figure functions draw into a caller's axes without touching its rcParams."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.figure import Figure

import icl_dynamics
from icl_dynamics import emergence, results
from icl_dynamics.checkpoints import StepError, model_slug
from icl_dynamics.cli import main
from icl_dynamics.io import read_provenance
from icl_dynamics.toyzoo import RELATIONS_MODEL_ID

REPO = Path(__file__).resolve().parents[1]
STEPS = (1000, 1600)
SLUG = model_slug(RELATIONS_MODEL_ID)
# small but real settings of every stage, by option name (the score command spells them --<stage>-<option>)
OPTIONS = {
    "heads": {"n_tokens": 10, "n_samples": 3},
    "loss": {"early": 5, "late": 60, "bootstrap": 100},
    "icl-tasks": {"shots": [0, 3], "n_prompts": 8},
    "relation-index": {"variants": ["source"], "gates": ["argmax"]},
    "ablation": {"n_docs": 8, "early": 5, "late": 60, "n_sequences": 6, "shots": 3, "n_prompts": 4, "top_k": 2,
                 "draws": 2, "bootstrap": 100},
}


def merge_rule() -> dict[str, tuple[str, ...]]:
    """The merge rule's PER_STEP (workflow/rules/merge.smk): merged table -> per-checkpoint tables."""
    text = (REPO / "workflow" / "rules" / "merge.smk").read_text()
    literal = re.search(r"^PER_STEP = (\{.*?^\})", text, re.S | re.M).group(1)
    return {name: tuple(parts) for name, parts in ast.literal_eval(literal).items()}


def flags(options: dict) -> list[str]:
    """``options`` as the score command spells them (--<stage>-<option> value...)."""
    out = []
    for stage, values in options.items():
        for key, value in values.items():
            out += [f"--{stage}-{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return out


@pytest.fixture(scope="module")
def made(toy_zoo_relations: Path, tmp_path_factory) -> dict[str, Path]:
    """A results folder as the workflow lays it out, made by the CLI: two checkpoints of the relations zoo
    (fetch, score), the model's text tokens and relations, every merged table and the analysis; and a
    copy without the merged tables and the analysis."""
    tmp = tmp_path_factory.mktemp("api")
    root, folder = tmp / "results", tmp / "results" / SLUG
    common = ["--model", RELATIONS_MODEL_ID, "--schedule", "toy-relations",
              "--cache-dir", str(toy_zoo_relations / "hub")]
    first = [*common, "--step", str(STEPS[0])]
    texts = tmp / "relations.jsonl"  # the first 40 of the zoo's 400 held-out sequences: seconds, not a minute
    texts.write_text("".join((toy_zoo_relations / "relations.jsonl").read_text().splitlines(keepends=True)[:40]))
    assert main(["tokenize-text", *first, "--kind", "jsonl", "--path", str(toy_zoo_relations / "text.jsonl"),
                 "--n-docs", "30", "--context", "64", "--out", str(folder / "text_tokens.parquet")]) == 0
    assert main(["relations", *first, "--planted-map", str(toy_zoo_relations / "planted.json"),
                 "--planted-texts", str(texts), "--out-dir", str(folder / "relations")]) == 0
    for step in STEPS:
        out = folder / f"step{step}"
        checkpoint = [*common, "--step", str(step)]
        assert main(["fetch", *checkpoint, "--out", str(out / "provenance.parquet")]) == 0
        assert main(["score", *checkpoint, "--device", "cpu", "--provenance", str(out / "provenance.parquet"),
                     "--text-tokens", str(folder / "text_tokens.parquet"), "--relations-dir", str(folder / "relations"),
                     *flags(OPTIONS), "--out-dir", str(out)]) == 0
    unmerged = tmp / "unmerged"
    shutil.copytree(root, unmerged)
    for stage, parts in merge_rule().items():  # the merge rule's inputs: every step, each of its tables
        inputs = [str(folder / f"step{step}" / f"{part}.parquet") for step in STEPS for part in parts]
        assert main(["merge", "--stage", stage, "--schedule", "toy-relations",
                     "--out", str(folder / f"{stage}.parquet"), *inputs]) == 0
    merged = {name: [str(folder / f"{name}.parquet")] for name in ("icl", "heads", "relation_index", "provenance")}
    assert main(["analyze", *(f for name, paths in merged.items() for f in (f"--{name.replace('_', '-')}", *paths)),
                 "--k", "1", "--n-boot", "20", "--n-perm", "19", "--ri-families", "planted", "decoy",
                 "--out-dir", str(root / "analysis")]) == 0
    assert main(["causal", "--ablation", str(folder / "ablation.parquet"), "--heads", *merged["heads"],
                 "--relation-index", *merged["relation_index"], "--emergence", str(root / "analysis" / "emergence.parquet"),
                 "--k", "1", "--n-boot", "20", "--out-dir", str(root / "analysis")]) == 0
    assert main(["groups", "--summary", str(root / "analysis" / "summary.parquet"), "--group", "toy", "seed",
                 RELATIONS_MODEL_ID, "--out-dir", str(root / "analysis" / "groups")]) == 0  # a group of one run
    return {"root": root, "folder": folder, "unmerged": unmerged, "zoo": toy_zoo_relations}


def read_parquet(path: Path) -> pd.DataFrame:
    """A table as load_results should give it: pandas' reading, with every integer column the file's schema
    declares nullable as a nullable integer of its width (pandas alone makes a column with nulls float)."""
    frame = pd.read_parquet(path)
    for field in pq.read_schema(path):
        if pa.types.is_integer(field.type) and field.nullable:
            frame[field.name] = frame[field.name].astype({8: "Int8", 16: "Int16", 32: "Int32", 64: "Int64"}[
                field.type.bit_width])
    return frame


def parquet_files(root: Path) -> dict[str, list[Path]]:
    """Every Parquet file under a results folder by the table name it holds (step files under their table)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.parquet")):
        parent = path.parent.name
        name = f"relations/{path.stem}" if parent == "relations" else path.stem
        found.setdefault(name, []).append(path)
    return found


def test_load_results_reads_every_table_the_pipeline_writes(made):
    root = made["root"]
    assert results.MERGED == merge_rule()
    files = parquet_files(root)
    assert sorted(files) == results.table_names()  # no table the CLI writes is unknown, none listed is never written
    for name, paths in files.items():
        whole = [p for p in paths if not p.parent.name.startswith("step")]
        if not whole:
            continue  # per checkpoint only (loss, icl_tasks): test_load_results_concatenates_checkpoints
        frame = icl_dynamics.load_results(root, name)
        pd.testing.assert_frame_equal(frame, read_parquet(whole[0]))
        assert frame.attrs["files"] == [str(whole[0])]
        assert frame.attrs["provenance"] == {str(whole[0]): read_provenance(whole[0])}
    assert len(icl_dynamics.load_results(root, "heads")) == len(STEPS) * 2 * 4  # two layers of four heads
    # the group of one: its pooled rows are its run's own numbers, and its verdicts say so
    mids = icl_dynamics.load_results(root, "group_midpoints")
    run, pooled = mids[mids["run"] == RELATIONS_MODEL_ID], mids[mids["run"] == "pooled"]
    assert len(run) == len(pooled) > 0
    np.testing.assert_allclose(pooled["midpoint_tokens"].to_numpy(float), run["midpoint_tokens"].to_numpy(float))
    lags = icl_dynamics.load_results(root, "group_lags", models=["pooled"])
    assert set(lags["verdict"]) == {"one run"}


def test_load_results_concatenates_checkpoints_without_a_merge(made):
    """Where the merge has not run, the per-checkpoint files give the merged table, row for row."""
    unmerged, folder = made["unmerged"], made["folder"]
    for name, parts in {**results.MERGED, "loss": ("loss",), "icl_tasks": ("icl_tasks",)}.items():
        frame = icl_dynamics.load_results(unmerged, name)
        files = [unmerged / SLUG / f"step{step}" / f"{part}.parquet" for step in STEPS for part in parts]
        pd.testing.assert_frame_equal(frame, pd.concat([read_parquet(f) for f in files], ignore_index=True))
        if name in results.MERGED:
            pd.testing.assert_frame_equal(frame, read_parquet(folder / f"{name}.parquet"))
        assert frame.attrs["files"] == [str(f) for f in files]
        assert frame.attrs["provenance"] == {str(f): read_provenance(f) for f in files}
    runtime = icl_dynamics.load_results(unmerged, "heads").attrs["provenance"]
    assert [p["runtime"]["device"] for p in runtime.values()] == ["cpu", "cpu"]
    assert [p["probe"]["n_samples"] for p in runtime.values()] == [3, 3]


def test_load_results_selects_models_and_steps(made, tmp_path):
    root, unmerged, folder = made["root"], made["unmerged"], made["folder"]
    heads = read_parquet(folder / "heads.parquet")
    last = heads[heads["step"] == 1600].reset_index(drop=True)
    for where in (root, unmerged):
        pd.testing.assert_frame_equal(icl_dynamics.load_results(where, "heads", steps=[1600]), last)
    assert icl_dynamics.load_results(unmerged, "heads", steps=[1600]).attrs["files"] == [
        str(unmerged / SLUG / "step1600" / "heads.parquet")]
    with pytest.raises(ValueError, match=r"no heads rows at steps \[5\]"):
        icl_dynamics.load_results(root, "heads", steps=[5, 1600])
    # a second model beside it
    two = tmp_path / "two"
    shutil.copytree(folder, two / SLUG)
    other = pq.read_table(folder / "heads.parquet")
    other = other.set_column(other.schema.get_field_index("model"), other.schema.field("model"),
                             pa.array(["org/other"] * other.num_rows))
    (two / "org--other").mkdir()
    pq.write_table(other, two / "org--other" / "heads.parquet")
    both = icl_dynamics.load_results(two, "heads")
    assert both["model"].value_counts().to_dict() == {"org/other": len(heads), RELATIONS_MODEL_ID: len(heads)}
    for models in ("org/other", ["org/other"]):
        chosen = icl_dynamics.load_results(two, "heads", models=models)
        assert set(chosen["model"]) == {"org/other"}
        assert chosen.attrs["files"] == [str(two / "org--other" / "heads.parquet")]
    in_order = icl_dynamics.load_results(two, "heads", models=["org/other", RELATIONS_MODEL_ID])
    assert list(in_order["model"].unique()) == ["org/other", RELATIONS_MODEL_ID]
    with pytest.raises(FileNotFoundError,
                       match=r"no results of \['org/absent'\].*folders: icl-dynamics--toy-neox-relations, org--other"):
        icl_dynamics.load_results(two, "heads", models=["org/absent"])
    with pytest.raises(ValueError, match="text_tokens has no model column: name one model"):
        icl_dynamics.load_results(two, "text_tokens")
    pd.testing.assert_frame_equal(icl_dynamics.load_results(two, "text_tokens", models=RELATIONS_MODEL_ID),
                                  read_parquet(folder / "text_tokens.parquet"))
    summary = icl_dynamics.load_results(root, "summary", models=[RELATIONS_MODEL_ID])
    assert len(summary) and set(summary["model"]) == {RELATIONS_MODEL_ID}


def test_load_results_errors_say_what_exists_and_what_makes_it(made, tmp_path):
    root, unmerged = made["root"], made["unmerged"]
    with pytest.raises(ValueError, match="unknown table 'head'; choose one of ablation, causal_correlation, "
                       "causal_emergence, causal_order, causal_series, emergence, formation, group_lags, "
                       "group_midpoints, group_sources, heads, icl"):
        icl_dynamics.load_results(root, "head")
    with pytest.raises(ValueError, match=f"one model's folder: pass the results folder holding it \\({root}\\)"):
        icl_dynamics.load_results(root / SLUG, "heads")
    with pytest.raises(FileNotFoundError, match="analysis/emergence.parquet is missing: `icl-dynamics analyze`"):
        icl_dynamics.load_results(unmerged, "emergence")
    with pytest.raises(FileNotFoundError, match="analysis/causal_order.parquet is missing: `icl-dynamics causal`"):
        icl_dynamics.load_results(unmerged, "causal_order")
    with pytest.raises(FileNotFoundError, match="analysis/groups/group_lags.parquet is missing: `icl-dynamics groups`"):
        icl_dynamics.load_results(unmerged, "group_lags")
    with pytest.raises(ValueError, match="emergence is not a per-checkpoint table"):
        icl_dynamics.load_results(root, "emergence", steps=[1000])
    partial = tmp_path / "partial" / SLUG
    for step in STEPS:  # fetched, never scored
        (partial / f"step{step}").mkdir(parents=True)
        shutil.copy(unmerged / SLUG / f"step{step}" / "provenance.parquet", partial / f"step{step}")
    with pytest.raises(FileNotFoundError, match=r"no icl table: neither step<N>/loss.parquet \(`icl-dynamics score "
                                                r"--stages loss`\), step<N>/icl_tasks.parquet \(`icl-dynamics score "
                                                r"--stages icl-tasks`\) nor icl.parquet \(`icl-dynamics merge`\); it "
                                                r"holds no merged table and, per checkpoint \(2 steps\), provenance"):
        icl_dynamics.load_results(partial.parent, "icl")
    with pytest.raises(FileNotFoundError, match="text_tokens.parquet is missing: `icl-dynamics tokenize-text`"):
        icl_dynamics.load_results(partial.parent, "text_tokens")
    assert len(icl_dynamics.load_results(partial.parent, "provenance")) == len(STEPS)


def test_score_runs_a_stage_on_a_loaded_checkpoint_as_the_cli_does(made):
    ckpt = icl_dynamics.load_checkpoint(RELATIONS_MODEL_ID, 1600, cache_dir=made["zoo"] / "hub", device="cpu")
    step = made["folder"] / "step1600"
    inputs = {"loss": {"text_tokens": made["folder"] / "text_tokens.parquet"},
              "relation-index": {"relations_dir": made["folder"] / "relations"},
              "ablation": {"text_tokens": made["folder"] / "text_tokens.parquet",
                           "relations_dir": made["folder"] / "relations", "heads_table": step / "heads.parquet",
                           "relation_index_table": step / "relation_index.parquet"}}
    for stage, options in OPTIONS.items():
        tables = icl_dynamics.score(ckpt, stage.replace("-", "_"), schedule="toy-relations",
                                    **options, **inputs.get(stage, {}))
        assert tables  # heads; loss and loss_curve; icl_tasks; relation_index; ablation
        for name, frame in tables.items():
            pd.testing.assert_frame_equal(frame, read_parquet(made["folder"] / "step1600" / f"{name}.parquet"))
    assert set(icl_dynamics.score(ckpt, "icl-tasks", schedule="toy-relations", shots=3, n_prompts=4)["icl_tasks"]
               ["shots"]) == {3}  # one value of a list option
    with pytest.raises(TypeError, match="stage heads has no option n_sample; its options: n_tokens, repeats, n_sam"):
        icl_dynamics.score(ckpt, "heads", schedule="toy-relations", n_sample=3)
    with pytest.raises(ValueError, match=r"stage loss needs text_tokens= \(output of tokenize-text"):
        icl_dynamics.score(ckpt, "loss", schedule="toy-relations")
    with pytest.raises(ValueError, match=r"\['top1'\] not among \['argmax', 'margin'\]"):
        icl_dynamics.score(ckpt, "relation-index", schedule="toy-relations", gates="top1",
                           relations_dir=made["folder"] / "relations")
    with pytest.raises(ValueError, match="the heads table has no rows of icl-dynamics/toy-neox-relations@step1600"):
        icl_dynamics.score(ckpt, "ablation", schedule="toy-relations", **{
            **OPTIONS["ablation"], **inputs["ablation"], "heads_table": made["folder"] / "step1000" / "heads.parquet"})
    with pytest.raises(StepError, match="step 1600 is not a checkpoint of the pythia schedule.*schedule='toy'"):
        icl_dynamics.score(ckpt, "heads")


def test_figures_draw_into_the_callers_axes_and_leave_its_rcparams_alone(made):
    from icl_dynamics.figures import STYLE
    from icl_dynamics.figures import causal as causal_figures
    from icl_dynamics.figures import emergence as emergence_figures
    from icl_dynamics.figures import heads as heads_figures
    from icl_dynamics.figures import icl as icl_figures
    from icl_dynamics.figures import relation_index as ri_figures

    root = made["root"]
    load = {name: icl_dynamics.load_results(root, name) for name in (
        "heads", "icl", "loss_curve", "relation_index", "provenance", "emergence", "formation", "relation",
        "causal_correlation", "causal_series")}
    with matplotlib.rc_context({"figure.dpi": 72, "lines.linewidth": 3.0, "font.size": 12}):  # the caller's own
        before = dict(matplotlib.rcParams)
        fig, ax = plt.subplots()
        assert icl_figures.plot_loss_by_token(load["loss_curve"], steps=[1600], ax=ax) is fig
        curve = load["loss_curve"][load["loss_curve"]["step"] == 1600].sort_values("position")
        line, = ax.get_lines()
        np.testing.assert_array_equal(line.get_ydata(), curve["loss"])
        assert line.get_linewidth() == STYLE["lines.linewidth"] and ax.get_legend() is not None
        plt.close(fig)
        ri = ri_figures.select_rows(load["relation_index"], model=None, gate="argmax", variant="source",
                                    direction="forward")
        figures = [
            heads_figures.plot_prefix_matching_heatmaps(load["heads"]),
            heads_figures.plot_top_heads_vs_icl(load["heads"], load["icl"], provenance=load["provenance"]),
            icl_figures.plot_level(load["icl"], "format_compliance", "format_compliance"),
            ri_figures.final_heatmaps(ri, "planted"),
            ri_figures.top_heads_over_training(ri, "planted"),
            emergence_figures.plot_ri_heatmaps(load["relation_index"], "planted"),
            emergence_figures.plot_emergence_panel(emergence.icl_trajectories(load["icl"]), load["emergence"],
                                                   emergence.head_trajectories(load["heads"], load["relation_index"]),
                                                   load["formation"]),
            emergence_figures.plot_formation_emergence_scatter(load["formation"], load["emergence"]),
            emergence_figures.plot_correlation_map(load["relation"]),
            causal_figures.plot_causal(load["causal_correlation"], load["causal_series"], RELATIONS_MODEL_ID),
        ]
        for fig in figures:
            assert isinstance(fig, Figure) and fig.dpi == STYLE["figure.dpi"]  # drawn in the project's style
            plt.close(fig)
        assert dict(matplotlib.rcParams) == before


def test_importing_the_figures_keeps_the_callers_backend():
    """A notebook's backend survives ``import icl_dynamics.figures`` (the CLI picks Agg for itself)."""
    script = "import icl_dynamics.figures, matplotlib; print(matplotlib.get_backend())"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MPLBACKEND": "svg"})
    assert proc.stdout.split() == ["svg"], proc.stderr[-2000:]


def test_integer_columns_come_back_as_integers(made):
    """``shots`` is null on the loss rows of the icl table: a nullable integer, not float64 (pandas' own
    reading); columns that are never null keep numpy's integers."""
    icl = icl_dynamics.load_results(made["root"], "icl")
    assert icl["shots"].dtype == "Int32" and icl["shots"].isna().any() and icl["shots"].notna().any()
    assert pd.read_parquet(made["folder"] / "icl.parquet")["shots"].dtype == "float64"
    heads = icl_dynamics.load_results(made["root"], "heads")
    assert (heads["step"].dtype, heads["layer"].dtype, heads["head"].dtype) == ("int64", "int32", "int32")
    summary = icl_dynamics.load_results(made["root"], "summary")
    assert summary["shots"].dtype == "Int32" and summary["n_formed"].dtype == "int32"


def test_score_takes_dataframes_for_every_table_input(made):
    """What load_results (or score itself) returned goes straight back in: the same tables as from the files."""
    ckpt = icl_dynamics.load_checkpoint(RELATIONS_MODEL_ID, 1600, cache_dir=made["zoo"] / "hub", device="cpu")
    root, step = made["root"], made["folder"] / "step1600"
    frames = {"text_tokens": icl_dynamics.load_results(root, "text_tokens"),
              "relations_dir": {name: icl_dynamics.load_results(root, f"relations/{name}")
                                for name in ("sequences", "triplets")},
              "heads_table": icl_dynamics.load_results(root, "heads", steps=[1600]),
              "relation_index_table": icl_dynamics.score(ckpt, "relation-index", schedule="toy-relations",
                                                         **OPTIONS["relation-index"],
                                                         relations_dir=made["folder"] / "relations")["relation_index"]}
    for stage, names in (("loss", ("text_tokens",)), ("relation-index", ("relations_dir",)),
                         ("ablation", ("text_tokens", "relations_dir", "heads_table", "relation_index_table"))):
        tables = icl_dynamics.score(ckpt, stage, schedule="toy-relations", **OPTIONS[stage],
                                    **{name: frames[name] for name in names})
        for name, frame in tables.items():
            pd.testing.assert_frame_equal(frame, read_parquet(step / f"{name}.parquet"))
    with pytest.raises(ValueError, match="relations_dir: a mapping of DataFrames needs the keys sequences and "
                                         r"triplets \(missing \['triplets'\]\)"):
        icl_dynamics.score(ckpt, "relation-index", schedule="toy-relations",
                           relations_dir={"sequences": frames["relations_dir"]["sequences"]})
    with pytest.raises(ValueError, match=r"text_tokens: the DataFrame lacks columns \['token_ids'\]"):
        icl_dynamics.score(ckpt, "loss", schedule="toy-relations", text_tokens=frames["text_tokens"].drop(
            columns="token_ids"))


def test_every_figure_function_draws_into_the_callers_figure_and_returns_it(made):
    """One-panel figures take ax=, figures of several panels fig= (here a SubFigure of the caller's figure);
    each returns the caller's Figure and draws only there (no new figure opened)."""
    from matplotlib.figure import SubFigure

    from icl_dynamics.figures import causal as causal_figures
    from icl_dynamics.figures import emergence as emergence_figures
    from icl_dynamics.figures import heads as heads_figures
    from icl_dynamics.figures import icl as icl_figures
    from icl_dynamics.figures import relation_index as ri_figures
    from icl_dynamics.planted import phase_change_step

    root = made["root"]
    load = {name: icl_dynamics.load_results(root, name) for name in (
        "heads", "icl", "loss_curve", "relation_index", "provenance", "emergence", "formation", "relation",
        "causal_correlation", "causal_series")}
    ri = ri_figures.select_rows(load["relation_index"], model=None, gate="argmax", variant="source",
                                direction="forward")
    training = pd.read_parquet(made["zoo"] / "training.parquet")
    curve = training.dropna(subset=["relation_loss"])
    multi = {
        heads_figures.plot_prefix_matching_heatmaps: lambda fig: heads_figures.plot_prefix_matching_heatmaps(
            load["heads"], fig=fig),
        heads_figures.plot_top_heads_vs_icl: lambda fig: heads_figures.plot_top_heads_vs_icl(
            load["heads"], load["icl"], fig=fig),
        icl_figures.plot_level: lambda fig: icl_figures.plot_level(load["icl"], "format_compliance",
                                                                   "format_compliance", fig=fig),
        ri_figures.final_heatmaps: lambda fig: ri_figures.final_heatmaps(ri, "planted", fig=fig),
        ri_figures.top_heads_over_training: lambda fig: ri_figures.top_heads_over_training(ri, "planted", fig=fig),
        ri_figures.planted_control: lambda fig: ri_figures.planted_control(
            ri[ri["family"].isin(["planted", "decoy"])], training,
            phase_change_step(curve["step"], curve["relation_loss"]), fig=fig),
        emergence_figures.plot_ri_heatmaps: lambda fig: emergence_figures.plot_ri_heatmaps(
            load["relation_index"], "planted", fig=fig),
        emergence_figures.plot_emergence_panel: lambda fig: emergence_figures.plot_emergence_panel(
            emergence.icl_trajectories(load["icl"]), load["emergence"],
            emergence.head_trajectories(load["heads"], load["relation_index"]), load["formation"], fig=fig),
        emergence_figures.plot_formation_emergence_scatter: lambda fig: emergence_figures.plot_formation_emergence_scatter(
            load["formation"], load["emergence"], fig=fig),
        emergence_figures.plot_correlation_map: lambda fig: emergence_figures.plot_correlation_map(
            load["relation"], fig=fig),
        causal_figures.plot_causal: lambda fig: causal_figures.plot_causal(
            load["causal_correlation"], load["causal_series"], RELATIONS_MODEL_ID, fig=fig),
    }
    public = {getattr(module, name) for module in (heads_figures, icl_figures, ri_figures, emergence_figures,
                                                   causal_figures)
              for name in dir(module) if name.startswith("plot_") or name in ("final_heatmaps",
                                                                               "top_heads_over_training",
                                                                               "planted_control")}
    assert public == {*multi, icl_figures.plot_loss_by_token}, "test every public figure function"
    for function, draw in multi.items():
        before = plt.get_fignums()
        caller = plt.figure(figsize=(8, 4))
        left, right = caller.subfigures(1, 2)
        assert isinstance(left, SubFigure)
        assert draw(left) is caller, function.__name__
        assert left.axes and not right.axes and plt.get_fignums() == [*before, caller.number], function.__name__
        plt.close(caller)
    caller, ax = plt.subplots()
    assert icl_figures.plot_loss_by_token(load["loss_curve"], ax=ax) is caller and ax.get_lines()
    plt.close(caller)
    with pytest.raises(ValueError, match="fig= must be an empty Figure or SubFigure"):
        heads_figures.plot_prefix_matching_heatmaps(load["heads"], fig=plt.subplots()[0])
    plt.close("all")


def test_the_relation_index_figure_draws_the_matched_control(made):
    """The SIH test compares with three controls; the figure of the top heads draws all three, the matched
    one (a token of the tail's kind) included: its line is the chosen heads' mean control_matched."""
    from icl_dynamics.figures import relation_index as ri_figures

    ri = ri_figures.select_rows(icl_dynamics.load_results(made["root"], "relation_index"), model=None,
                                gate="argmax", variant="source", direction="forward")
    fig = ri_figures.top_heads_over_training(ri, "planted", k=2)
    rel = ri[(ri["family"] == "planted") & (ri["relation"] == "capital")]
    chosen = ri_figures.top_heads(rel, 2)
    expected = rel.merge(chosen, on=["layer", "head"]).groupby("step")["control_matched"].mean()
    ax = next(a for a in fig.axes if a.get_title() == "capital")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {"matched ctrl", "tenth ctrl", "random ctrl"} <= set(lines)
    np.testing.assert_allclose(lines["matched ctrl"].get_ydata(), expected.to_numpy())
    plt.close(fig)
