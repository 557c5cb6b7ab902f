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
    return {"root": root, "folder": folder, "unmerged": unmerged, "zoo": toy_zoo_relations}


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
        pd.testing.assert_frame_equal(frame, pd.read_parquet(whole[0]))
        assert frame.attrs["files"] == [str(whole[0])]
        assert frame.attrs["provenance"] == {str(whole[0]): read_provenance(whole[0])}
    assert len(icl_dynamics.load_results(root, "heads")) == len(STEPS) * 2 * 4  # two layers of four heads


def test_load_results_concatenates_checkpoints_without_a_merge(made):
    """Where the merge has not run, the per-checkpoint files give the merged table, row for row."""
    unmerged, folder = made["unmerged"], made["folder"]
    for name, parts in {**results.MERGED, "loss": ("loss",), "icl_tasks": ("icl_tasks",)}.items():
        frame = icl_dynamics.load_results(unmerged, name)
        files = [unmerged / SLUG / f"step{step}" / f"{part}.parquet" for step in STEPS for part in parts]
        pd.testing.assert_frame_equal(frame, pd.concat([pd.read_parquet(f) for f in files], ignore_index=True))
        if name in results.MERGED:
            pd.testing.assert_frame_equal(frame, pd.read_parquet(folder / f"{name}.parquet"))
        assert frame.attrs["files"] == [str(f) for f in files]
        assert frame.attrs["provenance"] == {str(f): read_provenance(f) for f in files}
    runtime = icl_dynamics.load_results(unmerged, "heads").attrs["provenance"]
    assert [p["runtime"]["device"] for p in runtime.values()] == ["cpu", "cpu"]
    assert [p["probe"]["n_samples"] for p in runtime.values()] == [3, 3]


def test_load_results_selects_models_and_steps(made, tmp_path):
    root, unmerged, folder = made["root"], made["unmerged"], made["folder"]
    heads = pd.read_parquet(folder / "heads.parquet")
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
                                  pd.read_parquet(folder / "text_tokens.parquet"))
    summary = icl_dynamics.load_results(root, "summary", models=[RELATIONS_MODEL_ID])
    assert len(summary) and set(summary["model"]) == {RELATIONS_MODEL_ID}


def test_load_results_errors_say_what_exists_and_what_makes_it(made, tmp_path):
    root, unmerged = made["root"], made["unmerged"]
    with pytest.raises(ValueError, match="unknown table 'head'; choose one of ablation, causal_correlation, "
                       "causal_emergence, causal_order, causal_series, emergence, formation, heads, icl"):
        icl_dynamics.load_results(root, "head")
    with pytest.raises(ValueError, match=f"one model's folder: pass the results folder holding it \\({root}\\)"):
        icl_dynamics.load_results(root / SLUG, "heads")
    with pytest.raises(FileNotFoundError, match="analysis/emergence.parquet is missing: `icl-dynamics analyze`"):
        icl_dynamics.load_results(unmerged, "emergence")
    with pytest.raises(FileNotFoundError, match="analysis/causal_order.parquet is missing: `icl-dynamics causal`"):
        icl_dynamics.load_results(unmerged, "causal_order")
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
            pd.testing.assert_frame_equal(frame, pd.read_parquet(made["folder"] / "step1600" / f"{name}.parquet"))
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
        assert icl_figures.plot_loss_by_token(load["loss_curve"], steps=[1600], ax=ax) is ax
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
