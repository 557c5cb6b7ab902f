import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from conftest import REPO

from icl_dynamics.config import ConfigError, validate_config

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def load(name: str = "config/config.yaml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_default_config_is_valid_and_complete():
    config = validate_config(load(), SCHEMA)
    assert config["models"] == ["EleutherAI/pythia-70m-deduped"]
    assert config["device"] == "auto"
    assert config["steps"][:3] == [0, 1, 2] and config["steps"][-1] == 143_000 and len(config["steps"]) == 20
    assert config["induction"] == {"n_tokens": 25, "repeats": 4, "n_samples": 10, "exclude_frac": 0.05, "seed": 0}
    assert config["fetch"]["attempts"] == 6


@pytest.mark.parametrize("name, schedule", [("config/toy.yaml", "toy"), ("config/toy-relations.yaml", "toy-relations")])
def test_toy_configs_are_valid(name, schedule):
    config = validate_config(load(name), SCHEMA)
    assert config["schedule"] == schedule and len(config["steps"]) >= 12


def test_defaults_fill_without_mutating_the_schema():
    schema = yaml.safe_load(SCHEMA.read_text())
    a = validate_config({"models": ["org/a"]}, schema)
    a["loss"]["early"] = 7
    b = validate_config({"models": ["org/b"]}, schema)
    assert b["loss"]["early"] == 50
    assert b["checkpoints"] == {"preset": "log"}


def test_snakemake_stops_on_invalid_config_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**load(), "checkpoints": {"steps": [1500]}}))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(bad)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "config key 'checkpoints': step 1500 is not a checkpoint" in proc.stdout + proc.stderr
    assert "nearest valid steps: 1000, 2000" in proc.stdout + proc.stderr


# Bad configurations, each a patch merged key by key into config.yaml (as Snakemake merges a
# --configfile into it), with the one-line message naming the key that Snakemake must stop with
# before any job.
# "TMP" stands for a per-test directory holding a file ("TMP/file") and toy zoo manifests.
BAD_CONFIGS = [
    ({"device": "tpu"}, r"config key 'device': 'tpu' is not one of"),
    ({"dtype": "float8"}, r"config key 'dtype': 'float8' is not one of"),
    ({"schedule": "daily"}, r"config key 'schedule': 'daily' is not one of"),
    ({"models": []}, r"config key 'models': \[\] should be non-empty"),
    # model families (issue 27): an unsupported one is refused by name, OLMo needs the hub's own schedule
    ({"models": ["meta-llama/Llama-3.2-1B"]},
     r"config key 'models': meta-llama/Llama-3.2-1B is a model of a family the measurements do not support: Llama"),
    ({"models": ["allenai/OLMo-1B"]}, r"config key 'models': allenai/OLMo-1B .*hf_olmo.*use its -hf repository"),
    ({"models": ["allenai/OLMo-2-0425-1B"]},
     r"config key 'schedule': allenai/OLMo-2-0425-1B is an OLMo-2 model, .* set schedule: hub"),
    ({"models": ["org/model"], "schedule": "hub"}, r"config key 'families': the family of org/model cannot be told"),
    ({"models": ["org/model"], "families": {"org/model": "llama"}},
     r"config key 'families.org/model': 'llama' is not one of"),
    ({"models": ["org/model"], "families": {"org/other": "olmo2"}},
     r"config key 'families': 'org/other' is not among the models"),
    ({"models": ["pythia-70m"]}, r"config key 'models.0': 'pythia-70m' does not match"),
    ({"models": "EleutherAI/pythia-70m"}, r"config key 'models': 'EleutherAI/pythia-70m' is not of type 'array'"),
    ({"models": ["a/b", "a/b"]}, r"config key 'models': 'a/b' is listed twice"),
    ({"models": ["EleutherAI/pythia-70m", "eleutherai/Pythia-70m"]},
     r"config key 'models': 'eleutherai/Pythia-70m' and 'EleutherAI/pythia-70m' name one hub repository"),
    ({"models": ["a/b--c", "a--b/c"]}, r"config key 'models': 'a/b--c' and 'a--b/c' would share the results folder"),
    ({"batch": 3}, r"config key 'batch': unknown key"),
    ({"induction": {"tokens": 3}}, r"config key 'induction.tokens': unknown key"),
    ({"checkpoints": {"steps": [1500]}}, r"config key 'checkpoints': step 1500 .*nearest valid steps: 1000, 2000"),
    ({"checkpoints": {"preset": "weekly"}}, r"config key 'checkpoints.preset': 'weekly' is not one of"),
    ({"checkpoints": {"steps": [-1]}}, r"config key 'checkpoints.steps.0': -1 is less than the minimum"),
    ({"checkpoints": {"ranges": [{"start": 0}]}}, r"config key 'checkpoints.ranges.0': 'stop' is a required property"),
    ({"checkpoints": {"ranges": [{"start": 0, "stop": 9000, "every": 0}]}},
     r"config key 'checkpoints.ranges.0.every': 0 is less than the minimum"),
    ({"checkpoints": {}}, r"config key 'checkpoints': "),
    ({"hf_cache": 3}, r"config key 'hf_cache': 3 is not of type 'string', 'null'"),
    ({"hub_offline": "yes"}, r"config key 'hub_offline': 'yes' is not of type 'boolean'"),
    ({"keep_weights": "no"}, r"config key 'keep_weights': 'no' is not of type 'boolean'"),
    ({"max_cached_checkpoints": 0}, r"config key 'max_cached_checkpoints': 0 is less than the minimum"),
    ({"hub_offline": True}, r"config key 'keep_weights': false with hub_offline: true would delete checkpoints"),
    ({"schedule": "toy", "toy_zoo": {"dir": "TMP/zoo-seed1", "seed": 1}, "hf_cache": "TMP/zoo-seed1/hub",
      "checkpoints": {"preset": "all"}},
     r"config key 'keep_weights': false would delete the toy zoo's checkpoints"),
    ({"results": ""}, r"config key 'results': empty"),
    ({"results": "TMP/file"}, r"config key 'results': '.*file' is a file, not a directory"),
    ({"fetch": {"attempts": 0}}, r"config key 'fetch.attempts': 0 is less than the minimum"),
    ({"induction": {"n_tokens": 1}}, r"config key 'induction.n_tokens': 1 is less than the minimum"),
    ({"induction": {"repeats": 1}}, r"config key 'induction.repeats': 1 is less than the minimum"),
    ({"induction": {"exclude_frac": 0.5}}, r"config key 'induction.exclude_frac': 0.5 is greater than or equal"),
    ({"text": {"kind": "jsonl"}}, r"config key 'text.path': a jsonl text source needs a path"),
    ({"text": {"kind": "hub", "name": None}}, r"config key 'text.name': a hub text source needs a dataset name"),
    ({"text": {"kind": "csv"}}, r"config key 'text.kind': 'csv' is not one of"),
    ({"loss": {"early": 50, "late": 600}}, r"config key 'loss.late': need loss.early < loss.late < text.context"),
    ({"loss": {"early": "fifty"}}, r"config key 'loss.early': 'fifty' is not of type 'integer'"),
    ({"relations": {"unit": "paragraph"}}, r"config key 'relations.unit': 'paragraph' is not one of"),
    ({"relations": {"anchor": "last"}}, r"config key 'relations.anchor': 'last' is not one of"),
    ({"relations": {"planted_map": "zoo/planted.json"}}, r"config key 'relations.planted_texts': planted_map and"),
    ({"icl_tasks": {"shots": []}}, r"config key 'icl_tasks.shots': \[\] should be non-empty"),
    ({"icl_tasks": {"shots": [-1]}}, r"config key 'icl_tasks.shots.0': -1 is less than the minimum"),
    ({"icl_tasks": {"n_prompts": 1}}, r"config key 'icl_tasks.n_prompts': 1 is less than the minimum"),
    ({"relation_index": {"gates": ["top1"]}}, r"config key 'relation_index.gates.0': 'top1' is not one of"),
    ({"relation_index": {"variants": ["source", "source"]}}, r"config key 'relation_index.variants': .* non-unique"),
    ({"relation_index": {"tau": 0}}, r"config key 'relation_index.tau': 0 is less than or equal to the minimum"),
    ({"relation_index": {"alpha": 1}}, r"config key 'relation_index.alpha': 1 is greater than or equal"),
    ({"relation_index": {"min_clusters": 1}}, r"config key 'relation_index.min_clusters': 1 is less than the minimum"),
    ({"analysis": {"ri_gate": "top1"}}, r"config key 'analysis.ri_gate': 'top1' is not one of"),
    ({"analysis": {"n_boot": 5}}, r"config key 'analysis.n_boot': 5 is less than the minimum"),
    ({"figures": {"heatmap_steps": [3000]}}, r"config key 'figures.heatmap_steps': step 3000 is not among"),
    ({"figures": {"top_k": 0}}, r"config key 'figures.top_k': 0 is less than the minimum"),
    ({"relation_index": {"variants": ["literal"]}},
     r"config key 'analysis.ri_variant': 'source' is not among relation_index.variants \['literal'\]"),
    ({"ablation": {"n_docs": 300}}, r"config key 'ablation.n_docs': 300 documents, but text.n_docs selects 200"),
    ({"ablation": {"max_parameters": -1}}, r"config key 'ablation.max_parameters': -1 is less than the minimum"),
    ({"schedule": "toy", "toy_zoo": {"dir": "TMP/zoo-seed1", "seed": 2}},
     r"config key 'toy_zoo.seed': .*zoo-seed1 was trained with seed 1, not 2"),
    ({"schedule": "toy-relations", "toy_zoo": {"dir": "TMP/zoo-seed1", "seed": 1}},
     r"config key 'toy_zoo.dir': .*zoo-seed1 holds the 'toy' zoo, but schedule is 'toy-relations'"),
    # issue 25
    ({"models": ["EleutherAI/pythia-70m\n"]},
     r"config key 'models.0': 'EleutherAI/pythia-70m\\n' does not match org/name .*no spaces or control characters"),
    ({"models": ["EleutherAI/pythia 70m"]}, r"config key 'models.0': 'EleutherAI/pythia 70m' does not match org/name"),
    ({"relation_index": {"alpha": float("nan")}}, r"config key 'relation_index.alpha': nan is not a finite number"),
    ({"fetch": {"timeout": float("inf")}}, r"config key 'fetch.timeout': inf is not a finite number"),
    ({"induction": {"exclude_frac": float("nan")}}, r"config key 'induction.exclude_frac': nan is not a finite number"),
    ({"fetch": {"min_rate": 0}}, r"config key 'fetch.min_rate': 0 is less than or equal to the minimum"),
    ({"icl_tasks": {"shots": [0, 5, 5]}}, r"config key 'icl_tasks.shots': .* non-unique elements; give each value once"),
    ({"analysis": {"shots": 7}}, r"config key 'analysis.shots': 7 is not among icl_tasks.shots \[0, 1, 2, 3, 4, 5, 10, 20\]"),
    ({"relations": {"agenda_dir": "TMP/no-agenda"}},
     r"config key 'relations.agenda_dir': '.*no-agenda' does not exist; point it at a copy of the AGENDA files"),
    ({"relations": {"agenda_dir": "TMP/zoo-seed1"}},
     r"config key 'relations.agenda_dir': '.*zoo-seed1' lacks preprocessed.test.tsv, relations.vocab"),
]


def _bad_workdir(tmp_path):
    (tmp_path / "file").write_text("not a directory\n")
    zoo = tmp_path / "zoo-seed1"
    zoo.mkdir()
    (zoo / "zoo.json").write_text(json.dumps({"kind": "toy", "config": {"seed": 1}}))


def _merged(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _with_tmp(value, tmp: str):
    if isinstance(value, dict):
        return {k: _with_tmp(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_tmp(v, tmp) for v in value]
    return value.replace("TMP", tmp) if isinstance(value, str) else value


def test_snakemake_refuses_each_bad_config_with_one_line_naming_the_key(tmp_path):
    """At least 40 bad configurations, each run as a real (not dry) Snakemake invocation: non-zero
    exit, the expected one-line message, and not one job started."""
    assert len(BAD_CONFIGS) >= 40
    _bad_workdir(tmp_path)

    def run(i: int) -> tuple[int, str, list[str]]:
        work = tmp_path / f"run{i}"
        work.mkdir()
        (work / "bad.yaml").write_text(yaml.safe_dump(_merged(load(), _with_tmp(BAD_CONFIGS[i][0], str(tmp_path)))))
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-s", str(REPO / "workflow" / "Snakefile"),
                               "-d", str(work), "--configfile", str(work / "bad.yaml")],
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr, sorted(p.name for p in work.iterdir())

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(run, range(len(BAD_CONFIGS))))
    failures = []
    for (patch, message), (code, output, files) in zip(BAD_CONFIGS, outcomes):
        lines = [line for line in output.splitlines() if "config key" in line]
        if code == 0 or not lines or not re.search(message, lines[0]) or "Select jobs to execute" in output \
                or set(files) - {"bad.yaml", ".snakemake"}:
            failures.append((patch, code, lines[:1] or output[-300:], files))
    assert not failures, failures


def test_a_configfile_replaces_the_default_checkpoint_selection(tmp_path):
    """config.yaml leaves the selection to the schema default, so a --configfile's steps are the run's
    steps (Snakemake would union a preset written in config.yaml with them)."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"checkpoints": {"steps": [1000, 143000]}}))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile",
                           str(tmp_path / "run.yaml")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    planned = set(re.findall(r"step(\d+)/provenance\.parquet", proc.stdout + proc.stderr))
    assert planned == {"1000", "143000"}
    assert "checkpoints" not in load()  # the reason, stated in config.yaml


@pytest.mark.parametrize("patch, message", BAD_CONFIGS)
def test_each_bad_config_names_its_key(patch, message, tmp_path):
    """The same table through validate_config directly (the function the Snakefile calls), one case each."""
    _bad_workdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_config(_merged(load(), _with_tmp(patch, str(tmp_path))), SCHEMA)
