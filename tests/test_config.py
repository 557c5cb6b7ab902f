import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from icl_dynamics.config import ConfigError, validate_config

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def load(name: str = "config.yaml") -> dict:
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


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"device": "tpu"}, r"config key 'device': 'tpu' is not one of \['auto', 'cpu', 'cuda'\]"),
        ({"checkpoints": {"steps": [1500]}}, r"config key 'checkpoints': step 1500 .*nearest valid steps: 1000, 2000"),
        ({"checkpoints": {"preset": "weekly"}}, r"config key 'checkpoints.preset': 'weekly' is not one of"),
        ({"models": []}, r"config key 'models': \[\] should be non-empty"),
        ({"models": ["pythia-70m"]}, r"config key 'models.0': 'pythia-70m' does not match"),
        ({"batch": 3}, r"config key 'batch': unknown key"),
        ({"loss": {"early": 50, "late": 600}}, r"config key 'loss.late': need loss.early < loss.late < text.context"),
        ({"loss": {"early": "fifty"}}, r"config key 'loss.early': 'fifty' is not of type 'integer'"),
        ({"text": {"kind": "jsonl"}}, r"config key 'text.path': a jsonl text source needs a path"),
        ({"figures": {"heatmap_steps": [3000]}}, r"config key 'figures.heatmap_steps': step 3000 is not among"),
        ({"models": ["a/b", "a/b"]}, r"config key 'models': a model is listed twice"),
        ({"relations": {"planted_map": "zoo/planted.json"}}, r"config key 'relations.planted_texts': planted_map and"),
    ],
)
def test_malformed_configs_name_key_and_problem(patch, message):
    config = {**load(), **patch}
    with pytest.raises(ConfigError, match=message):
        validate_config(config, SCHEMA)


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
