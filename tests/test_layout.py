"""The repository follows the Snakemake workflow catalog's layout (workflow/Snakefile, config/config.yaml,
LICENSE, .snakemake-workflow-catalog.yml), the process that drives the workflow needs no GPU stack (the
Snakefile is parsed with torch and transformers blocked), and the conda environment of the rules is pinned
to the versions the tests run on, inside pyproject.toml's ranges. (The conda environment itself is not
built here: no conda on the CI machines.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.version import Version

ENV = REPO / "workflow" / "envs" / "icl-dynamics.yaml"
# run snakemake with torch and transformers unimportable: what a login node without the GPU stack has
BLOCKED_RUN = """
import sys

class Blocked:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked: the Snakefile must not import it")

sys.meta_path.insert(0, Blocked())
from snakemake.cli import main
sys.argv = ["snakemake", *sys.argv[1:]]
main()
"""


def test_catalog_layout():
    for path in ("workflow/Snakefile", "config/config.yaml", "LICENSE", ".snakemake-workflow-catalog.yml"):
        assert (REPO / path).is_file(), path
    assert not (REPO / "Snakefile").exists() and not (REPO / "config.yaml").exists()
    license_text = (REPO / "LICENSE").read_text()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "MIT" and license_text.startswith("MIT License")
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["software-stack-deployment"]["conda"] is True and catalog["usage"]["report"] is True
    assert "--workflow-profile workflow/profiles/local" in catalog["usage"]["mandatory-flags"]["flags"]


def blocked_dry_run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, "-n", "--nolock", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_snakefile_parses_and_plans_without_torch_or_transformers():
    """`snakemake -n` from the repository root (workflow/Snakefile and config/config.yaml found by
    Snakemake's own search) plans the default run and the toy demo with torch and transformers blocked."""
    for args in ((), ("--configfile", "config/toy.yaml")):
        proc = blocked_dry_run("--cores", "8", *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "This was a dry-run" in out, out[-3000:]
        assert "blocked" not in out, out[-3000:]


def test_the_blocker_blocks(tmp_path):
    """The same run fails when the Snakefile does import torch (so the test above can fail)."""
    import shutil

    shutil.copytree(REPO / "workflow", tmp_path / "workflow")
    shutil.copytree(REPO / "config", tmp_path / "config")
    snakefile = tmp_path / "workflow" / "Snakefile"
    snakefile.write_text("import torch\n" + snakefile.read_text())
    proc = blocked_dry_run("--cores", "1", cwd=tmp_path)
    assert proc.returncode != 0 and "torch is blocked" in proc.stdout + proc.stderr


def _pins() -> dict[str, str]:
    env = yaml.safe_load(ENV.read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {}
    for line in pip:
        if line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)", line)
        assert match, f"{ENV.name}: {line!r} is not pinned exactly (name==version)"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    assert "--editable ../.." in pip, f"{ENV.name} must install this repository against the pins"
    return pins


def test_conda_env_pins_every_dependency_at_the_tested_version():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in pyproject}
    pins = _pins()
    assert sorted(pins) == sorted(requirements), "pin exactly pyproject.toml's dependencies in " + ENV.name
    for name, version in pins.items():
        assert requirements[name].specifier.contains(version), f"{name}=={version} is outside {requirements[name]}"
        installed = Version(metadata.version(name)).base_version  # torch 2.13.0+cpu is torch 2.13.0
        assert installed == version, (f"{ENV.name} pins {name}=={version}, but the tests run on {installed}: "
                                      "update the pin to the tested version")
    python = next(d for d in yaml.safe_load(ENV.read_text())["dependencies"] if isinstance(d, str)
                  and d.startswith("python="))
    assert python == f"python={sys.version_info.major}.{sys.version_info.minor}"
