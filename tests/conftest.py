"""Shared test fixtures: paths to ../shared data, the Pythia-format cache and its tokenizer, tiny random models."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ICL_SHARED", REPO.parent / "shared")).resolve()

# No test may reach the network: every hub access goes through the local cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

PYTHIA_MODEL = "EleutherAI/pythia-random-tiny"
PYTHIA_STEPS = (0, 1, 2, 1000)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"test data folder {SHARED} is missing (set ICL_SHARED to the shared/ folder)")
    return SHARED


@pytest.fixture(scope="session")
def pythia_cache(shared_dir: Path, tmp_path_factory) -> Path:
    """A hub cache mirroring a real Pythia repository (see ``icl_dynamics.pythia_format``): fp16
    ``pytorch_model.bin`` with Pythia's key names, the published config and tokenizer files, and the
    branches of :data:`PYTHIA_STEPS`, ``step0`` and ``step1`` byte-identical as on the hub."""
    from icl_dynamics.pythia_format import write_pythia_cache

    root = tmp_path_factory.mktemp("pythia") / "hub"
    write_pythia_cache(root, PYTHIA_MODEL, shared_dir, PYTHIA_STEPS)
    return root


OLMO_MODELS = {"olmo": "allenai/OLMo-random-tiny-hf", "olmo2": "allenai/OLMo-2-random-tiny"}


def olmo_fixture_branches(family: str) -> dict[str, int]:
    """Each fixture branch and the seed of its weights: OLMo-2 an early branch without ``stage1-``, two
    ``stage1-`` ones, a late one (which pins the tokens per step; the weights of step 2000 again) and a stage-2
    branch; OLMo-1 three ``step<N>-tokens<M>B`` branches."""
    from icl_dynamics.olmo_format import olmo_branch

    if family == "olmo":
        return {olmo_branch("olmo", 0): 1, olmo_branch("olmo", 1000): 2, olmo_branch("olmo", 2000): 3}
    return {olmo_branch("olmo2", 150, stage=None): 1, olmo_branch("olmo2", 1000): 2, olmo_branch("olmo2", 2000): 3,
            olmo_branch("olmo2", 100_000): 3, olmo_branch("olmo2", 1000, stage="stage2-ingredient1"): 2}


@pytest.fixture(scope="session")
def olmo_caches(shared_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Hub caches mirroring allenai/OLMo-1B-hf and allenai/OLMo-2-0425-1B (``icl_dynamics.olmo_format``):
    float32 safetensors under the models' key names (OLMo-2 in two shards), the published config fields and
    the repositories' tokenizer files, on branches named as each family names them."""
    from icl_dynamics.olmo_format import olmo_branch, write_olmo_cache

    caches = {}
    for family, model_id in OLMO_MODELS.items():
        root = tmp_path_factory.mktemp(family) / "hub"
        main = olmo_branch(family, 100_000 if family == "olmo2" else 2000)
        write_olmo_cache(root, model_id, shared_dir, family, olmo_fixture_branches(family), main=main)
        caches[family] = root
    return caches


@pytest.fixture(scope="session")
def neox_tokenizer(pythia_cache: Path):
    """The GPT-NeoX tokenizer exactly as the pipeline loads it from a Pythia repository."""
    from icl_dynamics.models import load_tokenizer

    return load_tokenizer(PYTHIA_MODEL, 0, cache_dir=pythia_cache)


@pytest.fixture(scope="session")
def agenda_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "agenda"


AGENDA_SUBSET = 300  # abstracts behind the relation-index null and oracle tests


@pytest.fixture(scope="session")
def agenda_relations(agenda_dir: Path, neox_tokenizer):
    """Sequences and triplets (DataFrames) of every family -- kg, kg-letters, syntax -- of the first
    AGENDA_SUBSET abstracts, built by the relations stage's own function with the Pythia-format tokenizer."""
    from icl_dynamics import agenda, relations

    texts = [agenda.surface_text(r) for r in agenda.load_agenda(agenda_dir)[:AGENDA_SUBSET]]
    tables = relations.build_relations(agenda_dir, neox_tokenizer, syntax_texts=texts)
    seqs = tables.sequences.to_pandas()
    seqs = seqs[seqs["document_id"] < AGENDA_SUBSET].reset_index(drop=True)
    trips = tables.triplets.to_pandas()
    return seqs, trips[trips["sequence_id"].isin(seqs["sequence_id"])].reset_index(drop=True)


def tiny_neox(vocab_size: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0, **overrides):
    """A randomly initialised GPT-NeoX small enough for exhaustive reference checks."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
        rotary_pct=0.25,
        rotary_emb_base=100,
        **overrides,
    )
    config._attn_implementation = "eager"
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="session")
def _zoo_builds(tmp_path_factory):
    """Both toy zoos, trained at once in two background processes (one thread each, so both fit
    the 2-core machines side by side) the first time a test needs either; a zoo named by
    ICL_TOY_ZOO / ICL_TOY_ZOO_RELATIONS is reused instead of trained."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("toy")
    builds: dict[str, tuple] = {}
    for kind, variable in (("toy", "ICL_TOY_ZOO"), ("toy-relations", "ICL_TOY_ZOO_RELATIONS")):
        if os.environ.get(variable):
            builds[kind] = (None, Path(os.environ[variable]).resolve(), None)
            continue
        out, log = root / kind, root / f"{kind}.log"
        with open(log, "w") as stream:
            proc = subprocess.Popen([sys.executable, "-m", "icl_dynamics.cli", "toy-zoo", "--kind", kind,
                                     "--out", str(out)], stdout=stream, stderr=subprocess.STDOUT)
        builds[kind] = (proc, out, log)
    yield {**builds, "_seeds_root": root / "seeds"}
    for proc in [proc for proc, _, _ in builds.values()] + list(_SEED_BUILDS["procs"].values()):
        if proc is not None and proc.poll() is None:
            proc.kill()


TOY_GROUP_SEEDS = (2, 3)  # with the shipped zoo's seed 1: the toy seed group (tests/test_seed_groups.py)
_SEED_BUILDS: dict = {"wanted": False, "procs": {}, "root": None}


def pytest_collection_modifyitems(session, config, items):
    """Note whether a selected test needs the toy zoo's extra seeds (trained in the background once the two
    shipped zoos are built, so that the tests in between use the cores the training leaves idle)."""
    _SEED_BUILDS["wanted"] = any("toy_zoo_seeds" in getattr(item, "fixturenames", ()) for item in items)


def _start_seed_builds(root: Path) -> None:
    import subprocess
    import sys

    if _SEED_BUILDS["procs"] or os.environ.get("ICL_TOY_ZOO_SEEDS"):
        return
    _SEED_BUILDS["root"] = root
    root.mkdir(parents=True, exist_ok=True)
    for seed in TOY_GROUP_SEEDS:
        with open(root / f"seed{seed}.log", "w") as stream:
            _SEED_BUILDS["procs"][seed] = subprocess.Popen(
                [sys.executable, "-m", "icl_dynamics.cli", "toy-zoo", "--kind", "toy", "--seed", str(seed),
                 "--out", str(root / f"toy-seed{seed}")], stdout=stream, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def toy_zoo_seeds(_zoo_builds) -> dict[int, Path]:
    """The copy zoo trained again with seeds 2 and 3 (model ids icl-dynamics/toy-neox-seed2, -seed3), in two
    background processes started once the shipped zoos are built (or now); ICL_TOY_ZOO_SEEDS (a folder holding
    toy-seed2/ and toy-seed3/) names zoos to reuse instead."""
    from icl_dynamics.toyzoo import read_manifest

    if os.environ.get("ICL_TOY_ZOO_SEEDS"):
        return {seed: Path(os.environ["ICL_TOY_ZOO_SEEDS"]).resolve() / f"toy-seed{seed}" for seed in TOY_GROUP_SEEDS}
    _start_seed_builds(_zoo_builds["_seeds_root"])
    root = _SEED_BUILDS["root"]
    for seed, proc in _SEED_BUILDS["procs"].items():
        if proc.wait() != 0:
            pytest.fail(f"training the toy zoo with seed {seed} failed:\n{(root / f'seed{seed}.log').read_text()[-3000:]}")
        read_manifest(root / f"toy-seed{seed}")
    return {seed: root / f"toy-seed{seed}" for seed in TOY_GROUP_SEEDS}


def _built(builds: dict, kind: str) -> Path:
    from icl_dynamics.toyzoo import read_manifest

    proc, out, log = builds[kind]
    if proc is not None and proc.wait() != 0:
        pytest.fail(f"training the {kind} zoo failed:\n{log.read_text()[-3000:]}")
    read_manifest(out)
    shipped = [build for name, build in builds.items() if not name.startswith("_")]
    if _SEED_BUILDS["wanted"] and all(p is None or p.poll() is not None for p, _, _ in shipped):
        _start_seed_builds(builds["_seeds_root"])  # both shipped zoos are built: the extra seeds train beside the tests
    return out


@pytest.fixture(scope="session")
def toy_zoo(_zoo_builds) -> Path:
    """The shipped toy zoo (copies; induction heads form), trained once per test session."""
    return _built(_zoo_builds, "toy")


@pytest.fixture(scope="session")
def toy_zoo_relations(_zoo_builds) -> Path:
    """The relations toy zoo (planted relations), trained once per test session."""
    return _built(_zoo_builds, "toy-relations")


def toy_workflow_command(config_file: str, zoo: Path, steps: list[int], workdir: Path, relations: dict, *,
                         hub_endpoint: str | None = None, max_cached: int = 2, args: Sequence[str] = (),
                         env: dict[str, str] | None = None,
                         overrides: dict | None = None) -> tuple[list[str], dict[str, str]]:
    """Write the config of the offline Snakemake demo of ``config/<config_file>`` on ``zoo`` at ``steps``
    into ``workdir`` (``relations`` overrides that section; the analysis is cut down to a few
    checkpoints) and return the Snakemake command and its environment.

    With ``hub_endpoint`` (a fake hub serving the zoo) the checkpoints are fetched from it into an empty
    cache ``workdir/hf-cache`` with ``keep_weights: false`` and ``max_cached``. ``args`` are further
    Snakemake arguments (targets, a profile), ``env`` further environment variables, ``overrides`` config
    keys set last (a mapping value updates that section).
    """
    import sys

    import yaml

    from icl_dynamics.toyzoo import read_manifest

    config = yaml.safe_load((REPO / "config" / config_file).read_text())
    config.update(checkpoints={"steps": steps}, hf_cache=str(zoo / "hub"), results="results",
                  toy_zoo={"dir": str(zoo), "seed": read_manifest(zoo)["config"]["seed"]})
    env = {**os.environ, **(env or {})}
    if hub_endpoint:
        config.update(hf_cache=str(workdir / "hf-cache"), hub_offline=False, keep_weights=False,
                      max_cached_checkpoints=max_cached)
        env.update(HF_ENDPOINT=hub_endpoint, HF_HOME=str(workdir / "hf-home"))
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # either keeps huggingface_hub offline
            env.pop(key, None)
    config["text"]["path"] = str(zoo / "text.jsonl")
    if "agenda_dir" in relations:  # AGENDA's families instead of the config's planted or decoy map
        config["relations"].update(planted_map=None, planted_texts=None)
    config["relations"].update(relations)
    config["analysis"] = {"k": 1, "n_boot": 50, "n_perm": 99}  # a few checkpoints only
    # small ablation sets: a tenth of the demo's tokens (its heads' effects on the toy are nats, not noise)
    config["ablation"].update(n_docs=8, n_sequences=8, n_prompts=4, draws=2, bootstrap=200)
    for key, value in (overrides or {}).items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    cores = [] if "--workflow-profile" in args else ["--cores", "2"]  # a cluster profile sets jobs, not cores
    command = [sys.executable, "-m", "snakemake", *cores, "-s", str(REPO / "workflow" / "Snakefile"),
               "-d", str(workdir), "--configfile", str(workdir / "config.yaml"), *args]
    return command, env


def run_toy_workflow(config_file: str, zoo: Path, steps: list[int], workdir: Path, relations: dict, *,
                     hub_endpoint: str | None = None, max_cached: int = 2,
                     watch: Callable[[], int] | None = None, args: Sequence[str] = (),
                     env: dict[str, str] | None = None, overrides: dict | None = None) -> tuple[list[str], int]:
    """Run the demo :func:`toy_workflow_command` sets up, assert it succeeded, and return the command
    (so a test can rerun it: ``--report``, ``-n``) and the largest value ``watch`` returned while
    polled during the run."""
    import subprocess
    import time

    command, env = toy_workflow_command(config_file, zoo, steps, workdir, relations, hub_endpoint=hub_endpoint,
                                        max_cached=max_cached, args=args, env=env, overrides=overrides)
    seen, log = 0, workdir / "snakemake.log"
    with open(log, "w") as out, subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env) as proc:
        deadline = time.monotonic() + 1800  # a loaded 2-core machine (other test runs beside it) is slow
        while proc.poll() is None and time.monotonic() < deadline:
            seen = max(seen, watch()) if watch else seen
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    return command, seen


TOY_WORKFLOW_STEPS = [0, 1000, 1600]  # before, during and after the toy zoo's phase change


@pytest.fixture(scope="session")
def toy_workflow(toy_zoo, shared_dir, tmp_path_factory):
    """One uninterrupted offline run of the toy workflow (AGENDA's relations from ../shared), shared by every
    test that reads it: (workdir, command, wall seconds)."""
    import time

    workdir = tmp_path_factory.mktemp("toy-workflow")
    start = time.monotonic()
    command, _ = run_toy_workflow("toy.yaml", toy_zoo, TOY_WORKFLOW_STEPS, workdir,
                                  {"agenda_dir": str(shared_dir / "data" / "agenda")})
    return workdir, command, time.monotonic() - start
