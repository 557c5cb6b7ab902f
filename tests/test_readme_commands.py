"""Every command in README.md is executed here, read from the README itself (so an edit cannot drift from
what is tested): each fenced ``bash`` block's commands (a ``\\`` continues a line, ``&&`` chains steps)
and each fenced ``python`` block.

How each kind of step runs (a real run needs the network, a GPU or an hour; these need none of them):

* ``snakemake ...``: a dry run (``-n``) of exactly that command line in a copy of the repository, with the
  planned jobs counted and compared with the plan the configuration implies (computed here from the
  configuration, rule by rule): the default run, the SLURM profile's and the restarted one plan every job
  of every checkpoint; the demo plans the toy zoo's; rescoring one checkpoint plans exactly that
  checkpoint's one job, on a copy whose outputs all exist (marked done with ``snakemake --touch``).
  ``--unlock`` runs for real. (The demo's real run is .ci/run's, and the report of a real run is checked
  in a browser by ``tests/test_toyzoo.py``.)
* ``icl-dynamics <stage> ...`` by hand: parsed by the CLI's own parser (unknown or missing options fail
  as they would on the cluster) and checked to be one job of one subcommand whose input files are ones
  the workflow writes.
* ``pip install``: resolved against this environment: the extras and the constraints file exist, and
  every requirement is installed at a version its specifier and the constraints allow (the oldest
  versions' constraints are checked against pyproject.toml's ranges only); ``python3 -m venv`` creates
  the environment (without pip); ``. <venv>/bin/activate`` must find it.
* The "Tests" section's commands (``pytest`` and its installs) and the demo's are run by CI itself:
  ``.ci/run`` must hold them verbatim.
* ``python`` blocks (the API example): run for real on the toy workflow's results.

A command this file does not know fails the test: add a way to run it here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO

README = REPO / "README.md"
FENCE = re.compile(r"^( *)```(\w+)\n(.*?)^ *```", re.M | re.S)  # also fences indented in a list item
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Command:
    section: str  # the README heading above it
    line: str  # the whole command line (continuations joined)
    steps: tuple[tuple[str, ...], ...]  # its `&&` steps, split like a shell would

    def __str__(self) -> str:
        return f"{self.section}: {self.line}"


def readme_blocks(kind: str) -> list[tuple[str, str]]:
    """(section heading, body) of every fenced block of ``kind`` in the README."""
    text = README.read_text()
    out = []
    for match in FENCE.finditer(text):
        if match.group(2) == kind:
            heading = [h for h in re.findall(r"^#+ (.*)$", text[:match.start()], re.M)][-1]
            out.append((heading, textwrap.dedent(match.group(3))))
    return out


def readme_commands() -> list[Command]:
    commands = []
    for section, body in readme_blocks("bash"):
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = line.split(" #")[0].strip() if not line.strip().startswith("#") else ""
            if line:
                steps = tuple(tuple(shlex.split(step)) for step in line.split("&&"))
                commands.append(Command(section, line, steps))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_it_documents():
    """The parse found the sections this file's plans know (a README without them would test nothing)."""
    sections = {c.section for c in COMMANDS}
    assert {"Set up and run", "The offline demo: the toy zoo", "Rerun one checkpoint", "On a SLURM cluster"} <= \
        sections, sections
    assert len(COMMANDS) >= 10 and readme_blocks("python")


# --- the repository copy the dry runs plan in ---------------------------------------------------------------


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's tracked files, as a fresh clone has them (no results, no resources, no .venv)."""
    out = tmp_path_factory.mktemp("clone") / "icl-dynamics"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, out / name)
    return out


def fake_slurm_env(tmp: Path) -> dict[str, str]:
    return {"PATH": f"{REPO / 'tests' / 'fakeslurm'}{os.pathsep}{os.environ['PATH']}",
            "FAKESLURM_DIR": str(tmp / "slurm"), "FAKESLURM_PARTITIONS": "cpu* gpu transfer"}


def snakemake(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **OFFLINE, **(env or {})}
    environment.pop("SLURM_JOB_ID", None)
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The dry run's job counts by rule (its "Job stats" table); {} for "Nothing to be done"."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    if "Nothing to be done" in out:
        return {}
    table = re.search(r"^Job stats:\n(.*?)^total\s+\d+$", out, re.M | re.S).group(1)
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def configured(cwd: Path, configfiles: list[str], profile_config: list[str]) -> dict:
    """The run's configuration as the Snakefile sees it: config/config.yaml, then each --configfile, then the
    profile's --config entries, key by key (Snakemake's merge), validated with the schema's defaults."""
    from icl_dynamics.config import validate_config

    def merge(into: dict, update: dict) -> dict:
        for key, value in update.items():
            into[key] = merge(dict(into.get(key) or {}), value) if isinstance(value, dict) else value
        return into

    config = yaml.safe_load((cwd / "config" / "config.yaml").read_text())
    for path in configfiles:
        config = merge(config, yaml.safe_load((cwd / path).read_text()))
    for entry in profile_config:
        key, value = entry.split("=", 1)
        config[key] = yaml.safe_load(value)
    return validate_config(config, cwd / "workflow" / "schemas" / "config.schema.yaml")


def full_plan(config: dict, zoo_built: bool) -> dict[str, int]:
    """Every job of a run from nothing, rule by rule, from the configuration (not from Snakemake)."""
    n_models = len(config["models"])
    checkpoints = sum(len(steps) for steps in config["model_steps"].values())
    relations = config["relations"]
    plan = {"fetch_slot": checkpoints, "fetch": checkpoints, "score": checkpoints,
            "merge": 6 * n_models, "tokenize_text": n_models, "relations": n_models, "figures": n_models,
            "analyze": 1, "causal": 1, "front_page": 1, "all": 1}
    if not config["keep_weights"]:
        plan["evict"] = checkpoints
    if not relations["agenda_dir"] and not relations["planted_map"]:
        plan["fetch_agenda"] = 1
    if config["groups"]:
        plan["groups"] = 1
    if config["schedule"] not in ("pythia", "hub") and not zoo_built:
        plan["toy_zoo"] = 1
    return plan


def options(step: tuple[str, ...], name: str) -> list[str]:
    """The values of every ``name`` option of a command line (``--name value``)."""
    return [step[i + 1] for i, word in enumerate(step[:-1]) if word == name]


def profile_config(step: tuple[str, ...], cwd: Path) -> list[str]:
    profiles = options(step, "--workflow-profile")
    return yaml.safe_load((cwd / profiles[0] / "config.yaml").read_text()).get("config", []) if profiles else []


# --- the steps ----------------------------------------------------------------------------------------------


def run_snakemake(step: tuple[str, ...], cwd: Path, tmp: Path, command: Command) -> None:
    args = list(step[1:])
    env = fake_slurm_env(tmp) if "workflow/profiles/slurm" in args else {}
    if "--unlock" in args:  # harmless and offline: run it
        proc = snakemake(args, cwd, env)
        assert proc.returncode == 0, (str(command), proc.stderr[-2000:])
        return
    config = configured(cwd, options(step, "--configfile"), profile_config(step, cwd))
    targets = [a for a in args if a.endswith(".parquet")]
    if targets:  # rescore one checkpoint: on a copy whose every output exists and is up to date
        assert len(targets) == 1, command
        mark_everything_done(cwd, [a for a in args if a not in ("--force", "--forcerun", "score", *targets)])
        plan = planned_jobs(snakemake([*args, "-n"], cwd, env))
        assert plan == {"score": 1}, (str(command), plan)
        model, step_n = re.fullmatch(r".*/([^/]+)/step(\d+)/heads\.parquet", targets[0]).groups()
        assert int(step_n) in config["steps"]
        return
    if "--report" in args:  # the report of a real run is tests/test_toyzoo.py's (a dry run writes none)
        i = args.index("--report")
        args = [a for a in args[:i] + args[i + 2:] if a != "--report-after-run"]
    plan = planned_jobs(snakemake([*args, "-n"], cwd, env))
    zoo = Path(config["toy_zoo"]["dir"])
    assert plan == full_plan(config, (cwd / zoo / "zoo.json").exists()), (str(command), plan)


def mark_everything_done(cwd: Path, args: list[str]) -> None:
    """Create every output of the run (the dry run's "output:" lines list them) and mark them up to date
    with --touch: the state after a finished run, without running it."""
    base = args
    dry = snakemake([*base, "-n"], cwd)
    assert dry.returncode == 0, dry.stderr[-2000:]
    for listed in re.findall(r"^    output: (.*)$", dry.stdout, re.M):
        for path in listed.split(", "):
            target = cwd / path
            if target.name == "figures":  # the figures rule's directory() output
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
    touched = snakemake([*base, "--touch"], cwd)
    assert touched.returncode == 0, touched.stderr[-2000:]


def run_cli(step: tuple[str, ...], command: Command) -> None:
    """One stage (or fetch) by hand: parsed by the CLI's parser, one subcommand, one job."""
    from icl_dynamics.cli import build_parser, cmd_fetch, cmd_score, cmd_stage

    try:
        args = build_parser().parse_args(list(step[1:]))
    except SystemExit as exc:
        pytest.fail(f"{command}: the CLI refuses it (exit {exc.code})")
    assert args.func in (cmd_fetch, cmd_score, cmd_stage), command
    written = {"text_tokens": "text_tokens.parquet", "relations_dir": "relations"}  # what the workflow writes
    for dest, name in written.items():
        value = getattr(args, dest, None)
        if value is not None:
            assert Path(value).name == name and Path(value).parent.name == args.model.replace("/", "--"), command


def run_pip(step: tuple[str, ...], command: Command) -> None:
    """``pip install [-c constraints] -e '.[extras]'`` resolved against this environment without pip (a
    ``pip install --dry-run`` took minutes): every requirement of the project and of the extras it names
    is installed at a version its specifier and the constraints file allow."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    assert step[1] == "install", command
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins: dict[str, Requirement] = {}
    for constraint in options(step, "-c"):
        assert (REPO / constraint).is_file(), command
        for line in (REPO / constraint).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                requirement = Requirement(line.split("#")[0].strip())
                pins[requirement.name.lower()] = requirement
    targets = [a for a in step[2:] if a.startswith(".")]
    assert targets, command
    oldest = any("oldest" in c for c in options(step, "-c"))
    for target in targets:
        extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", target).group(1)
        requirements = list(pyproject["dependencies"])
        for extra in filter(None, (extras or "").split(",")):
            assert extra in pyproject["optional-dependencies"], (str(command), extra)
            requirements += pyproject["optional-dependencies"][extra]
        for requirement in map(Requirement, requirements):
            installed = Version(metadata.version(requirement.name))
            assert requirement.specifier.contains(installed, prereleases=True), (str(command), str(requirement))
            pin = pins.get(requirement.name.lower())
            if pin is not None and not oldest:  # the oldest pins are another environment's (CI installs them)
                assert pin.specifier.contains(Version(installed.base_version)), (str(command), str(pin), installed)
            if pin is not None:
                assert any(requirement.specifier.contains(Version(s.version)) for s in pin.specifier), \
                    (str(command), f"the constraint {pin} is outside {requirement}")


def in_ci(command: Command) -> None:
    """The test commands run in CI itself: .ci/run must hold the README's line verbatim."""
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command.line in ci, f".ci/run does not run the README's command {command.line!r}"


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.section[:20]}: {c.line[:60]}" for c in COMMANDS])
def test_readme_command(command, clone, tmp_path):
    venvs: dict[str, Path] = {}
    if command.section == "Tests":  # the test suite's own commands: CI runs them (and this file with them)
        in_ci(command)
    for step in command.steps:
        program = step[0]
        if program in ("python3", "python") and step[1:3] == ("-m", "venv"):
            proc = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / step[3])],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            venvs[step[3]] = tmp_path / step[3]
        elif program in (".", "source"):
            venv = step[1].split("/bin/activate")[0]
            assert venv in venvs and (venvs[venv] / "bin" / "activate").is_file(), command
        elif program == "pip":
            run_pip(step, command)
        elif program == "pytest":
            assert command.section == "Tests", command  # run by CI, verbatim (in_ci above)
        elif program == "snakemake":
            if not (tmp_path / "repo").exists():  # each command plans in its own fresh clone
                shutil.copytree(clone, tmp_path / "repo")
            run_snakemake(step, tmp_path / "repo", tmp_path, command)
        elif program == "icl-dynamics":
            run_cli(step, command)
        else:
            pytest.fail(f"README command step {shlex.join(step)!r} ({command.section}): no way to run it in "
                        "tests/test_readme_commands.py; add one")


def test_ci_runs_the_readme_demo_exactly():
    """.ci/run runs the demo's install and run commands as the README writes them (on a clean clone)."""
    demo = [c for c in COMMANDS if c.section == "The offline demo: the toy zoo"]
    assert len(demo) == 2 and "pip install" in demo[0].line and demo[1].line.startswith("snakemake ")
    for command in demo:
        in_ci(command)


def test_the_python_api_example_runs_on_the_toy_workflow(toy_workflow, toy_zoo, tmp_path):
    """The README's Python block, verbatim, in a folder laid out as after the demo: results/toy (the
    session's toy workflow run) and resources/toy-zoo."""
    import matplotlib

    workdir = toy_workflow[0]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toy").symlink_to(workdir / "results")
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "toy-zoo").symlink_to(toy_zoo)
    blocks = [body for section, body in readme_blocks("python")]
    assert blocks
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with matplotlib.rc_context():
            for body in blocks:
                namespace: dict = {}
                exec(compile(body, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
        heads = namespace["tables"]["heads"]
        assert len(heads) == 8 and heads["prefix_matching"].max() > 0.5
        assert len(namespace["loss"]["loss"]) == 1
    finally:
        os.chdir(cwd)
        import matplotlib.pyplot as plt

        plt.close("all")
