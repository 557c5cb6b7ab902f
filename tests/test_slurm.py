"""The SLURM profile submits: through snakemake-executor-plugin-slurm to a fake sbatch (tests/fakeslurm/),
which runs each job here and records its command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import REPO, run_toy_workflow

pytest.importorskip("snakemake_executor_plugin_slurm", reason="the test extra installs the SLURM executor plugin")

FAKE_SLURM = Path(__file__).parent / "fakeslurm"
STEP = 1600


def test_slurm_profile_submits_the_score_job_with_a_gpu_and_keeps_network_rules_local(toy_zoo_relations, tmp_path):
    """The profile as shipped: the score job goes to the gpu partition with --gpus=1, its threads as
    CPUs and its memory and time scaled by the config; the relations job to the cpu partition without
    a GPU; fetch, tokenize_text (the network rules) and nothing else run in the Snakemake process."""
    target = f"results/icl-dynamics--toy-neox-relations/step{STEP}/heads.parquet"
    env = {"PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}", "FAKESLURM_DIR": str(tmp_path / "slurm"),
           "FAKESLURM_SYNC": "1", "FAKESLURM_PARTITIONS": "cpu* gpu"}
    os.environ.pop("SLURM_JOB_ID", None)  # a test run inside a real job must not look like one to the plugin
    run_toy_workflow("toy-relations.yaml", toy_zoo_relations, [0, STEP], tmp_path,
                     {"planted_map": str(toy_zoo_relations / "planted.json"),
                      "planted_texts": str(toy_zoo_relations / "relations.jsonl")},
                     args=["--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"),
                           "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5", target],
                     env=env)
    assert (tmp_path / target).exists()
    calls = [json.loads(line) for line in (tmp_path / "slurm" / "sbatch.jsonl").read_text().splitlines()]
    # the plugin comments each job "rule_<name>_wildcards_<values>"
    submitted = {call["opts"]["comment"].split("_wildcards_")[0]: call["opts"] for call in calls
                 if call["cmd"] == "sbatch"}
    assert sorted(submitted) == ["rule_relations", "rule_score"]  # fetch and tokenize_text stayed here
    score, relations = submitted["rule_score"], submitted["rule_relations"]
    # toy-relations.yaml: 4 threads; the model id states no size, so 1e8 parameters: 8000 + 1200 MB, 30 + 2 min
    assert (score["partition"], score["gpus"], score["cpus-per-task"], score["mem"], score["time"]) == \
        ("gpu", "1", "4", "9200", "32")
    assert "gres" not in score and "gpus" not in relations and relations["partition"] == "cpu"
