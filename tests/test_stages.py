"""The score job: every per-checkpoint stage on one model load, outputs all-or-none, light commands light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from icl_dynamics.cli import main
from icl_dynamics.io import read_provenance
from icl_dynamics.stages import STAGES
from icl_dynamics.toyzoo import RELATIONS_MODEL_ID

STEP = "1600"
TABLES = [table for stage in STAGES.values() for table in stage.outputs]


@pytest.fixture(scope="module")
def inputs(toy_zoo_relations: Path, tmp_path_factory) -> dict[str, Path]:
    """Fetch provenance, text tokens and planted relation tables of the relations zoo's last checkpoint."""
    tmp = tmp_path_factory.mktemp("score-inputs")
    common = checkpoint(toy_zoo_relations, device=False)
    assert main(["fetch", *common, "--out", str(tmp / "provenance.parquet")]) == 0
    assert main(["tokenize-text", *common, "--kind", "jsonl", "--path", str(toy_zoo_relations / "text.jsonl"),
                 "--n-docs", "40", "--context", "64", "--out", str(tmp / "text.parquet")]) == 0
    assert main(["relations", *common, "--planted-map", str(toy_zoo_relations / "planted.json"),
                 "--planted-texts", str(toy_zoo_relations / "relations.jsonl"), "--out-dir", str(tmp / "rel")]) == 0
    return {"provenance": tmp / "provenance.parquet", "text": tmp / "text.parquet", "relations": tmp / "rel"}


def checkpoint(zoo: Path, *, device: bool = True, provenance: Path | None = None) -> list[str]:
    flags = ["--model", RELATIONS_MODEL_ID, "--step", STEP, "--schedule", "toy-relations",
             "--cache-dir", str(zoo / "hub")]
    if device:
        flags += ["--device", "cpu"] + (["--provenance", str(provenance)] if provenance else [])
    return flags


# small but real settings of every stage, as the single-stage subcommands spell them
OPTIONS = {
    "heads": ["--n-tokens", "10", "--n-samples", "3"],
    "loss": ["--early", "5", "--late", "60", "--bootstrap", "100"],
    "icl-tasks": ["--shots", "0", "3", "--n-prompts", "8"],
    "relation-index": ["--variants", "source", "--gates", "argmax"],
    "ablation": ["--n-docs", "8", "--early", "5", "--late", "60", "--n-sequences", "6", "--shots", "3", "--n-prompts",
                 "4", "--top-k", "2", "--draws", "2", "--bootstrap", "100"],
}


def score_flags(*stages: str) -> list[str]:
    """OPTIONS of ``stages`` (default: all) as the score command spells them (--<stage>-<option>)."""
    return [f"--{stage}-{arg[2:]}" if arg.startswith("--") else arg for stage, args in OPTIONS.items()
            if stage in (stages or OPTIONS) for arg in args]


def test_score_writes_what_the_single_stages_write(toy_zoo_relations: Path, inputs: dict, tmp_path: Path, caplog):
    common = checkpoint(toy_zoo_relations, provenance=inputs["provenance"])
    files = ["--text-tokens", str(inputs["text"]), "--relations-dir", str(inputs["relations"])]
    caplog.set_level("INFO")
    assert main(["score", *common, *files, *score_flags(), "--out-dir", str(tmp_path / "score")]) == 0
    assert caplog.text.count(f"loaded {RELATIONS_MODEL_ID}@step{STEP}") == 1  # one load for every stage
    singles = {
        "heads": ["heads", *OPTIONS["heads"], "--out", "heads"],
        "loss": ["loss", "--text-tokens", str(inputs["text"]), *OPTIONS["loss"], "--out", "loss",
                 "--out-curve", "loss_curve"],
        "icl-tasks": ["icl-tasks", *OPTIONS["icl-tasks"], "--out", "icl_tasks"],
        "relation-index": ["relation-index", "--relations-dir", str(inputs["relations"]), *OPTIONS["relation-index"],
                           "--out", "relation_index"],
        # on its own, the ablation reads the heads and relation-index tables the single stages above wrote
        "ablation": ["ablation", *files, "--heads-table", "heads", "--relation-index-table", "relation_index",
                     *OPTIONS["ablation"], "--out", "ablation"],
    }
    for command, *args in singles.values():
        args = [str(tmp_path / "single" / f"{a}.parquet") if a in TABLES else a for a in args]
        assert main([command, *common, *args]) == 0
    for table in TABLES:
        scored, single = (pd.read_parquet(tmp_path / where / f"{table}.parquet") for where in ("score", "single"))
        assert len(scored) > 0
        pd.testing.assert_frame_equal(scored, single)
    # the stage options reached each stage, and the provenance says how the numbers were made
    heads = read_provenance(tmp_path / "score" / "heads.parquet")
    assert heads["probe"]["n_tokens"] == 10 and heads["probe"]["n_samples"] == 3
    assert set(pd.read_parquet(tmp_path / "score" / "icl_tasks.parquet")["shots"]) == {0, 3}
    ri = pd.read_parquet(tmp_path / "score" / "relation_index.parquet")
    assert set(ri["variant"]) == {"source"} and set(ri["gate"]) == {"argmax"} and ri["sih"].any()
    assert heads["runtime"]["device"] == "cpu" and heads["runtime"]["dtype"] == "float32"
    ablation = pd.read_parquet(tmp_path / "score" / "ablation.parquet")
    flagged = sorted({f"L{a}H{b}" for a, b, sih in zip(ri["layer"], ri["head"], ri["sih"]) if sih})
    assert list(ablation.loc[ablation["ablation"] == "group", "heads"].iloc[0]) == flagged  # this job's SIH flags
    assert set(ablation["shots"].dropna()) == {3} and set(ablation["n"][ablation["level"] == "loss_reduction"]) == {8}
    # a rerun of the same job writes the same bytes (no time or host in the tables)
    assert main(["score", *common, *files, *score_flags(), "--out-dir", str(tmp_path / "again")]) == 0
    for table in TABLES:
        assert (tmp_path / "again" / f"{table}.parquet").read_bytes() == (tmp_path / "score" / f"{table}.parquet").read_bytes()
    # a model above ablation.max_parameters gets an empty table that says why
    assert main(["score", *common, *files, "--stages", "ablation", "--ablation-max-parameters", "1000",
                 "--heads-table", str(tmp_path / "score" / "heads.parquet"), "--relation-index-table",
                 str(tmp_path / "score" / "relation_index.parquet"), "--out-dir", str(tmp_path / "big")]) == 0
    assert pd.read_parquet(tmp_path / "big" / "ablation.parquet").empty
    assert read_provenance(tmp_path / "big" / "ablation.parquet")["skipped"].startswith("skipped: 0M parameters > ")


def test_a_failing_stage_leaves_no_table_of_the_job(toy_zoo_relations: Path, inputs: dict, tmp_path: Path):
    out = tmp_path / "step"
    out.mkdir()
    (out / "provenance.parquet").write_bytes(b"kept")  # another job's output in the same folder
    common = checkpoint(toy_zoo_relations, provenance=inputs["provenance"])
    # heads and loss succeed, then the ICL tasks' prompts overflow the 64-position context
    args = ["score", *common, "--stages", "heads", "loss", "icl-tasks", "--text-tokens", str(inputs["text"]),
            *score_flags("heads", "loss"), "--icl-tasks-shots", "40", "--out-dir", str(out)]
    assert main(args) == 1
    assert sorted(p.name for p in out.iterdir()) == ["provenance.parquet"]  # no table, no temp file


def test_score_reads_its_inputs_before_loading_the_model(toy_zoo_relations: Path, inputs: dict, tmp_path: Path,
                                                         caplog):
    common = checkpoint(toy_zoo_relations, provenance=inputs["provenance"])
    assert main(["score", *common, "--stages", "heads", "relation-index", "--out-dir", str(tmp_path)]) == 1
    assert "stage relation-index needs --relations-dir" in caplog.text
    caplog.clear()
    assert main(["score", *common, "--relations-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)]) == 1
    assert "needs --text-tokens" in caplog.text
    caplog.clear()
    assert main(["score", *common, "--stages", "relation-index", "--relations-dir", str(tmp_path / "nowhere"),
                 "--out-dir", str(tmp_path)]) == 1
    assert "nowhere/sequences.parquet" in caplog.text and "loaded" not in caplog.text
    caplog.clear()  # the ablation alone needs this checkpoint's heads and relation-index tables
    files = ["--text-tokens", str(inputs["text"]), "--relations-dir", str(inputs["relations"])]
    assert main(["score", *common, *files, "--stages", "ablation", "--out-dir", str(tmp_path)]) == 1
    assert "stage ablation needs the heads table: run its stage in the same job or give --heads-table" in caplog.text
    assert "loaded" not in caplog.text


def test_light_commands_do_not_import_torch(toy_zoo_relations: Path, tmp_path: Path):
    """--help, the config check, fetch and merge (toy schedule) run without loading torch or transformers."""
    fetched, merged = tmp_path / "provenance.parquet", tmp_path / "merged.parquet"
    script = f"""
import sys
from icl_dynamics.cli import build_parser, main
from icl_dynamics.config import validate_config
build_parser().format_help()
validate_config({{"models": ["m/x"], "schedule": "toy-relations", "checkpoints": {{"preset": "all"}}, "toy_zoo": {{"dir": {str(toy_zoo_relations)!r}}}}},
                "workflow/schemas/config.schema.yaml")
fetch = main(["fetch", *{checkpoint(toy_zoo_relations, device=False)!r}, "--out", {str(fetched)!r}])
merge = main(["merge", "--stage", "provenance", "--schedule", "toy-relations", "--out", {str(merged)!r},
              {str(fetched)!r}])
print(fetch, merge, sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.split() == ["0", "0", "[]"], proc.stderr[-2000:]
    provenance = read_provenance(merged)
    assert provenance["torch"] and provenance["transformers"]  # versions still recorded, read from metadata
    assert len(pd.read_parquet(merged)) == 1


def test_concurrent_jobs_on_one_machine_take_different_gpus(tmp_path, monkeypatch):
    """claim_gpu hands each process a GPU no other holds (lock files; released when the process ends),
    and resolve_device uses it when several GPUs are visible (simulated: this machine has none)."""
    import torch

    from icl_dynamics import models

    script = ("import sys, time; from icl_dynamics.models import claim_gpu; "
              f"print(claim_gpu(['a', 'b'], {str(tmp_path)!r}, timeout=0), flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"  # another job holds GPU 0
        assert models.claim_gpu(["a", "b"], tmp_path, timeout=0) == 1
        with pytest.raises(RuntimeError, match="every GPU \\(2\\) is held"):
            models.claim_gpu(["a", "b"], tmp_path, timeout=0)
    finally:
        holder.kill()
        holder.wait()
    assert models.claim_gpu(["a", "b"], tmp_path, timeout=5) == 0  # free again once its holder is gone

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(models, "_gpu_name", lambda i: f"test-{tmp_path.name}-{i}")
    monkeypatch.setattr(models.tempfile, "gettempdir", lambda: str(tmp_path))
    assert [str(models.resolve_device(d)) for d in ("auto", "cuda", "auto", "cuda:1")] == \
        ["cuda:0", "cuda:1", "cuda:2", "cuda:1"]
