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
                     env=env, overrides={"cluster": {"score_threads": 3}})
    assert (tmp_path / target).exists()
    calls = [json.loads(line) for line in (tmp_path / "slurm" / "sbatch.jsonl").read_text().splitlines()]
    # the plugin comments each job "rule_<name>_wildcards_<values>"
    submitted = {call["opts"]["comment"].split("_wildcards_")[0]: call["opts"] for call in calls
                 if call["cmd"] == "sbatch"}
    assert sorted(submitted) == ["rule_relations", "rule_score"]  # fetch and tokenize_text stayed here
    score, relations = submitted["rule_score"], submitted["rule_relations"]
    # 3 threads (cluster.score_threads); the model id states no size, so 1e8 parameters: 8000 + 1200 MB, 30 + 2 min
    assert (score["partition"], score["gpus"], score["cpus-per-task"], score["mem"], score["time"]) == \
        ("gpu", "1", "3", "9200", "32")
    log = (tmp_path / "logs" / "icl-dynamics--toy-neox-relations" / f"step{STEP}" / "score.log").read_text()
    # torch gets the job's threads: the 3 CPUs asked, capped by the CPUs the job sees (this machine's 2)
    assert f" --threads {min(3, os.cpu_count())} " in log
    assert "gres" not in score and "gpus" not in relations and relations["partition"] == "cpu"


def test_nothing_caps_the_score_jobs_and_network_rules_go_to_the_transfer_partition(toy_zoo_relations, tmp_path):
    """The SLURM profile as shipped, on a sweep with keep_weights false (checkpoints from a fake hub into an
    empty cache) and cluster.network_rules_local false: every score job is submitted while none has run (the
    fake queue holds them), so with the profile's max_cached_checkpoints at least 8 are in flight at once;
    the fetch and tokenize_text jobs are submitted to the transfer partition."""
    import re
    import subprocess
    import time

    import yaml
    from conftest import toy_workflow_command
    from fakehub import FakeHub

    from icl_dynamics.toyzoo import zoo_config

    steps = list(zoo_config("toy-relations").steps[:8])
    env = {"PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}", "FAKESLURM_DIR": str(tmp_path / "slurm"),
           "FAKESLURM_PARTITIONS": "cpu* gpu transfer", "FAKESLURM_HOLD": "^rule_score_"}
    os.environ.pop("SLURM_JOB_ID", None)
    with FakeHub(toy_zoo_relations / "hub") as hub:
        command, env = toy_workflow_command(
            "toy-relations.yaml", toy_zoo_relations, steps, tmp_path,
            {"planted_map": str(toy_zoo_relations / "planted.json"),
             "planted_texts": str(toy_zoo_relations / "relations.jsonl")}, hub_endpoint=hub.endpoint,
            args=["--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"),
                  "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5"], env=env)
        config = yaml.safe_load((tmp_path / "config.yaml").read_text())
        config.pop("max_cached_checkpoints")  # the profile's setting, not the test helper's
        config["cluster"] = {"network_rules_local": False}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        log = tmp_path / "snakemake.log"
        held, seen, changed = [], {}, time.monotonic()
        with open(log, "w") as out, subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                     start_new_session=True) as proc:
            deadline = time.monotonic() + 600
            # until every score job is held, or no job was submitted or finished for 150 s (a cap stalls the plan;
            # the executor's status checks back off by 10 s a round, so a slow fetch can leave 40 s and more
            # between a job finishing and the next submission: the CI machine's 45 s window ran out there)
            while proc.poll() is None and time.monotonic() < min(deadline, changed + 150) and len(held) < len(steps):
                time.sleep(0.5)
                states = {p.name: p.read_text().split(" ", 1)[0] for p in (tmp_path / "slurm" / "jobs").glob("*.state")}
                held = [name for name, state in states.items() if state == "PENDING"]
                if states != seen:
                    seen, changed = states, time.monotonic()
            running = proc.poll() is None
            if running:
                os.killpg(proc.pid, 9)
    assert running, log.read_text()[-3000:]
    calls = [json.loads(line) for line in (tmp_path / "slurm" / "sbatch.jsonl").read_text().splitlines()]
    calls = [call for call in calls if call["cmd"] == "sbatch"]
    rules = [(re.sub(r"_wildcards_.*", "", call["opts"]["comment"]), call["opts"]["partition"]) for call in calls]
    scores = [call for call, (rule, _) in zip(calls, rules) if rule == "rule_score"]
    assert len(held) == len(scores) == len(steps) >= 8, (len(held), rules)  # all in flight, none run
    assert not list((tmp_path / "results").rglob("weights_evicted.json"))
    partitions = {rule: {p for r, p in rules if r == rule} for rule, _ in rules}
    assert partitions["rule_fetch"] == partitions["rule_tokenize_text"] == {"transfer"}, partitions
    assert partitions["rule_score"] == {"gpu"} and partitions["rule_relations"] == {"cpu"}, partitions
