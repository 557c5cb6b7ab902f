"""The repository's conventions, checked in the default test run (the Snakemake workflow catalog's and
the code style's): the workflow files are snakefmt-formatted, `snakemake --lint` finds nothing,
`ruff check` passes, and config/README.md documents exactly the schema's keys with its defaults.

Each tool check also runs once on a deliberately broken copy, so a check that silently passes (no
files given, an exit status that does not propagate, the project's settings not applied) fails here.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO

PYPROJECT = REPO / "pyproject.toml"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIG_README = REPO / "config" / "README.md"
LINT_CLEAN = "Congratulations, your workflow is in a good condition!"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_module(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m <args>`` with this interpreter (its environment's tools), offline."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**os.environ, **OFFLINE},
                          capture_output=True, text=True, timeout=300)


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit status {proc.returncode}; output:\n{proc.stdout}{proc.stderr}"


def workflow_files(root: Path = REPO) -> list[Path]:
    files = [root / "workflow" / "Snakefile", *sorted((root / "workflow" / "rules").glob("*.smk"))]
    assert len(files) > 1 and all(f.is_file() for f in files), files
    return files


def snakefmt_check(files: list[Path]) -> subprocess.CompletedProcess:
    """snakefmt with the repository's settings ([tool.snakefmt]); a diff of what it would change."""
    return run_module("snakefmt", "--config", str(PYPROJECT), "--check", "--compact-diff", *map(str, files))


def snakemake_lint(root: Path) -> subprocess.CompletedProcess:
    """`snakemake --lint` of ``root``'s workflow/Snakefile with its config/config.yaml (the default run)."""
    return run_module("snakemake", "--lint", "--nolock", cwd=root)


def ruff_check(*paths: str) -> subprocess.CompletedProcess:
    """`ruff check` with the repository's settings ([tool.ruff]); no paths: the whole repository."""
    return run_module("ruff", "check", "--no-cache", "--config", str(PYPROJECT), *paths)


# --- the tools ---

def test_workflow_files_are_snakefmt_formatted():
    proc = snakefmt_check(workflow_files())
    assert proc.returncode == 0, f"run `snakefmt workflow` to reformat; {output(proc)}"


def test_snakefmt_check_catches_a_misformatted_file(tmp_path):
    copies = []
    for f in workflow_files():
        copies.append(tmp_path / f.name)
        shutil.copy(f, copies[-1])
    copies[-1].write_text(copies[-1].read_text() + "\n\n\nunformatted=[1,2]\n")
    proc = snakefmt_check(copies)
    assert proc.returncode == 1, output(proc)
    assert f"Diff for {copies[-1]}" in proc.stdout and "unformatted = [1, 2]" in proc.stdout, output(proc)


def test_snakemake_lint_is_clean():
    proc = snakemake_lint(REPO)
    assert proc.returncode == 0 and LINT_CLEAN in proc.stdout + proc.stderr, output(proc)


def test_snakemake_lint_catches_a_rule_without_log(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    shutil.copytree(REPO / "workflow", tmp_path / "workflow")
    with open(tmp_path / "workflow" / "Snakefile", "a") as f:
        f.write('\n\nrule unlogged:\n    output:\n        "unlogged.txt",\n    shell:\n        "touch {output}"\n')
    proc = snakemake_lint(tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Lints for rule unlogged" in text and "No log directive" in text, output(proc)
    assert LINT_CLEAN not in text and "Lints for rule fetch" not in text, output(proc)


def test_ruff_check_is_clean():
    proc = ruff_check()
    assert proc.returncode == 0, f"run `ruff check --fix` for what it can fix; {output(proc)}"


def test_ruff_check_catches_unsorted_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nprint(os, sys)\n")  # rule I is selected in pyproject.toml only
    proc = ruff_check(str(bad))
    assert proc.returncode == 1 and "I001" in proc.stdout, output(proc)


# --- config/README.md against the schema ---

def schema_keys(node: dict, prefix: str = "") -> dict[str, tuple[dict, bool]]:
    """Every key of the schema as a dotted path (``[]`` for each item of a list of mappings), with its
    schema and whether it is required."""
    keys: dict[str, tuple[dict, bool]] = {}
    required = set(node.get("required", []))
    for name, sub in node.get("properties", {}).items():
        path = prefix + name
        keys[path] = (sub, name in required)
        keys.update(schema_keys(sub, path + "."))
        if isinstance(sub.get("items"), dict):
            keys.update(schema_keys(sub["items"], path + "[]."))
    return keys


def readme_rows() -> dict[str, list[str]]:
    """The key table of config/README.md: key -> [type, default, meaning] (cells as written)."""
    rows: dict[str, list[str]] = {}
    for line in CONFIG_README.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"config/README.md: a row needs 4 cells (key, type, default, meaning): {line}"
        key = re.fullmatch(r"`([^`]+)`", cells[0])
        assert key, f"config/README.md: the key cell must be one `code` span: {line}"
        assert key.group(1) not in rows, f"config/README.md lists {key.group(1)} twice"
        rows[key.group(1)] = cells[1:]
    return rows


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True)  # type-strict: 1 != 1.0 != true


def test_every_schema_key_has_a_description():
    missing = [key for key, (sub, _) in schema_keys(yaml.safe_load(SCHEMA.read_text())).items()
               if not str(sub.get("description", "")).strip()]
    assert not missing, f"add a description to these keys of {SCHEMA.name}: {missing}"


def test_config_readme_documents_exactly_the_schema_keys_and_defaults():
    keys = schema_keys(yaml.safe_load(SCHEMA.read_text()))
    rows = readme_rows()
    missing, unknown = sorted(keys.keys() - rows.keys()), sorted(rows.keys() - keys.keys())
    assert not missing, f"keys of the schema missing in config/README.md: {missing}"
    assert not unknown, f"keys in config/README.md the schema lacks: {unknown}"
    wrong = []
    for key, (sub, required) in keys.items():
        typ, default, meaning = rows[key]
        if "default" in sub:
            written = re.fullmatch(r"`([^`]*)`", default)
            if not written or canonical(yaml.safe_load(written.group(1))) != canonical(sub["default"]):
                wrong.append(f"{key}: default {default}, schema {canonical(sub['default'])}")
        elif default != ("required" if required else "—"):
            wrong.append(f"{key}: default {default}, but the schema has none ({'required' if required else '—'})")
        enum = sub.get("enum") or (sub.get("items") or {}).get("enum") or []
        wrong += [f"{key}: type {typ} omits `{value}`" for value in enum if f"`{value}`" not in typ]
        if not meaning:
            wrong.append(f"{key}: no meaning")
    assert not wrong, "config/README.md disagrees with the schema:\n" + "\n".join(wrong)
