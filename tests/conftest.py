"""Shared test fixtures: paths to ../shared data, the Pythia-format cache and its tokenizer, tiny random models."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def neox_tokenizer(pythia_cache: Path):
    """The GPT-NeoX tokenizer exactly as the pipeline loads it from a Pythia repository."""
    from icl_dynamics.models import load_tokenizer

    return load_tokenizer(PYTHIA_MODEL, 0, cache_dir=pythia_cache)


@pytest.fixture(scope="session")
def agenda_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "agenda"


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
def toy_zoo(tmp_path_factory) -> Path:
    """The shipped toy zoo, trained once per test session (about a minute on 2 cores).

    Set ICL_TOY_ZOO to an existing zoo directory to reuse one between local runs.
    """
    from icl_dynamics.toyzoo import ToyConfig, read_manifest, train, write_zoo

    reuse = os.environ.get("ICL_TOY_ZOO")
    if reuse:
        read_manifest(reuse)
        return Path(reuse).resolve()
    return write_zoo(train(ToyConfig(), progress=False), tmp_path_factory.mktemp("toy") / "zoo")


@pytest.fixture(scope="session")
def toy_zoo_relations(tmp_path_factory) -> Path:
    """The relations toy zoo (planted relations), trained once per test session (a few minutes on 2 cores).

    Set ICL_TOY_ZOO_RELATIONS to an existing zoo directory to reuse one between local runs.
    """
    from icl_dynamics.toyzoo import TOY_RELATIONS, read_manifest, train, write_zoo, zoo_config

    reuse = os.environ.get("ICL_TOY_ZOO_RELATIONS")
    if reuse:
        read_manifest(reuse)
        return Path(reuse).resolve()
    return write_zoo(train(zoo_config(TOY_RELATIONS), progress=False), tmp_path_factory.mktemp("toy") / "relations")
