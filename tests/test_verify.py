"""What the loaders verify before a stage reads a checkpoint (icl_dynamics.verify), on the Pythia-format
fixture: every file against the fetch record or the cache's hub hashes, the files transformers would
pick, what cannot be verified, the dtypes, and every entry point (load_checkpoint, load_tokenizer,
icl_dynamics.score). The issue's corruptions, run through the CLI, are tests/test_silent_wrong.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import PYTHIA_MODEL

import icl_dynamics
from icl_dynamics import hub, io
from icl_dynamics.models import load_checkpoint, load_tokenizer
from icl_dynamics.verify import verify_checkpoint


@pytest.fixture
def cache(pythia_cache: Path, tmp_path: Path) -> Path:
    """A private copy of the fixture: links kept, blobs hard-linked (replace a blob, never write through it)."""
    return shutil.copytree(pythia_cache, tmp_path / "hub", symlinks=True, copy_function=os.link)


def snapshot(cache: Path, step: int) -> Path:
    return hub.repo_cache_dir(PYTHIA_MODEL, cache) / "snapshots" / hub.cached_commit(PYTHIA_MODEL, f"step{step}", cache)


def replace(link: Path, data: bytes) -> None:
    blob = link.resolve()
    blob.unlink()
    blob.write_bytes(data)


def test_every_file_is_hashed_against_the_record_or_the_cache(cache: Path) -> None:
    row = hub.fetch_checkpoint(PYTHIA_MODEL, 2, cache_dir=cache).row(2)
    names = sorted(p.name for p in snapshot(cache, 2).iterdir())
    assert sorted([*row["files"], *row["other_files"]]) == names  # the record lists every file fetched
    for fetched, against in ((row, "fetch record"), (None, "hub cache")):
        verified = verify_checkpoint(PYTHIA_MODEL, 2, cache, fetched)
        assert verified.against == against and sorted([*verified.weights, *verified.files]) == names
        assert verified.weights_digest == row["weights_digest"]
        assert verified.weights == {"pytorch_model.bin": row["sha256"][0]}
        assert verified.files == dict(zip(row["other_files"], row["other_hashes"]))
    # each hash is the one the hub states: git blob sha1 of a small file, sha256 of the LFS weights
    config = snapshot(cache, 2) / "config.json"
    assert verified.files["config.json"] == hub.git_blob_sha1(config.read_bytes()) == config.resolve().name

    special = snapshot(cache, 2) / "special_tokens_map.json"
    replace(special, special.read_bytes().replace(b"endoftext", b"endofline"))  # same size, another hash
    for fetched in (row, None):
        with pytest.raises(hub.IntegrityError, match=r"@step2: special_tokens_map.json .* has hash"):
            verify_checkpoint(PYTHIA_MODEL, 2, cache, fetched)


def test_files_transformers_would_load_but_fetch_did_not_record_are_refused(cache: Path) -> None:
    """A model.safetensors added to a .bin snapshot (by another tool) is what from_pretrained would load."""
    row = hub.fetch_checkpoint(PYTHIA_MODEL, 1000, cache_dir=cache).row(1000)
    snap = snapshot(cache, 1000)
    weights = snap / "pytorch_model.bin"
    (snap / "model.safetensors").symlink_to(os.readlink(weights))
    with pytest.raises(hub.IntegrityError, match="serves safetensors weights .* but the fetch recorded bin"):
        verify_checkpoint(PYTHIA_MODEL, 1000, cache, row)


def test_a_file_that_is_no_hub_blob_is_checked_against_the_record_or_refused(cache: Path) -> None:
    """A snapshot file copied in place of its link (cp -L) has no hash in its name: only a record can check it."""
    row = hub.fetch_checkpoint(PYTHIA_MODEL, 1000, cache_dir=cache).row(1000)
    config = snapshot(cache, 1000) / "config.json"
    data = config.read_bytes()
    config.unlink()
    config.write_bytes(data)
    assert verify_checkpoint(PYTHIA_MODEL, 1000, cache, row).files["config.json"] == hub.git_blob_sha1(data)
    with pytest.raises(hub.IntegrityError, match=r"config.json .* is not a blob of the hub cache .*icl-dynamics fetch"):
        load_checkpoint(PYTHIA_MODEL, 1000, cache_dir=cache, device="cpu")
    config.unlink()
    config.write_bytes(data.replace(b'"layer_norm_eps": 1e-05', b'"layer_norm_eps": 1.000'))  # same size
    with pytest.raises(hub.IntegrityError, match=r"config.json at .* has hash .* but the fetch record says"):
        verify_checkpoint(PYTHIA_MODEL, 1000, cache, row)


def test_the_tokenizer_loader_verifies_its_files(cache: Path) -> None:
    """tokenize-text and relations load only the tokenizer: its files are checked all the same."""
    tokenizer = snapshot(cache, 0) / "tokenizer.json"
    content = json.loads(tokenizer.read_text())
    content["model"]["vocab"]["Hello"] += 1
    replace(tokenizer, json.dumps(content).encode())
    with pytest.raises(hub.IntegrityError, match=r"@step0: tokenizer.json at .* has hash"):
        load_tokenizer(PYTHIA_MODEL, 0, cache_dir=cache)


def test_an_invalid_json_file_served_under_its_own_hash_is_named(cache: Path) -> None:
    snap, repo = snapshot(cache, 2), hub.repo_cache_dir(PYTHIA_MODEL, cache)
    data = b'{"tokenizer_class": "GPTNeoXTokenizerFast",'
    blob = repo / "blobs" / hub.git_blob_sha1(data)
    blob.write_bytes(data)
    (snap / "tokenizer_config.json").unlink()
    (snap / "tokenizer_config.json").symlink_to(os.path.relpath(blob, snap))
    with pytest.raises(hub.IntegrityError, match=r"@step2: tokenizer_config.json .* is not valid JSON \(Expecting"):
        load_checkpoint(PYTHIA_MODEL, 2, cache_dir=cache, device="cpu")


def test_dtypes_are_checked_on_the_tensors_the_model_loads(cache: Path) -> None:
    """Pythia's files carry the rotary inv_freq, a buffer the model recomputes: its dtype does not matter.
    A parameter stored in another dtype than config.json's is refused (transformers would cast it)."""
    import io as bytes_io

    import torch

    snap = snapshot(cache, 2)
    state = torch.load(snap / "pytorch_model.bin", weights_only=True)
    files = {p.name: p.read_bytes() for p in snap.iterdir() if p.name != "pytorch_model.bin"}

    def branch(step: int, changed: dict) -> None:
        buffer = bytes_io.BytesIO()
        torch.save({**state, **changed}, buffer)
        hub.write_snapshot(cache, PYTHIA_MODEL, [f"step{step}"], {**files, "pytorch_model.bin": buffer.getvalue()},
                           ["pytorch_model.bin"])

    key = "gpt_neox.layers.0.attention.rotary_emb.inv_freq"
    branch(4, {key: state[key].float()})
    assert load_checkpoint(PYTHIA_MODEL, 4, cache_dir=cache, device="cpu", tokenizer=False).verified
    key = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    branch(8, {key: state[key].float()})
    with pytest.raises(hub.IntegrityError, match=rf"@step8: the weights store {key} \(float32\), not config.json's "
                                                 "dtype float16; transformers would cast them silently"):
        load_checkpoint(PYTHIA_MODEL, 8, cache_dir=cache, device="cpu", tokenizer=False)


def test_every_table_records_the_verification_and_the_probe(pythia_cache: Path, tmp_path: Path) -> None:
    from icl_dynamics.cli import main

    prov = tmp_path / "provenance.parquet"
    assert main(["fetch", "--model", PYTHIA_MODEL, "--step", "2", "--cache-dir", str(pythia_cache),
                 "--out", str(prov)]) == 0
    assert main(["heads", "--model", PYTHIA_MODEL, "--step", "2", "--cache-dir", str(pythia_cache), "--device", "cpu",
                 "--provenance", str(prov), "--n-samples", "2", "--out", str(tmp_path / "heads.parquet")]) == 0
    record = io.read_provenance(tmp_path / "heads.parquet")["checkpoint"]
    row = io.read_table(prov).to_pylist()[0]
    assert record["commit"] == row["commit"] and record["weights_digest"] == row["weights_digest"]
    assert record["verified_against"] == "fetch record" and len(record["probe"]) == 31
    ckpt = load_checkpoint(PYTHIA_MODEL, 2, cache_dir=pythia_cache, device="cpu", tokenizer=False)
    assert ckpt.probe == record["probe"]  # the same model, the same probe outputs


def test_the_python_api_scores_only_a_verified_checkpoint(pythia_cache: Path) -> None:
    ckpt = load_checkpoint(PYTHIA_MODEL, 2, cache_dir=pythia_cache, device="cpu")
    assert ckpt.verified is not None and ckpt.verified.against == "hub cache"
    tables = icl_dynamics.score(ckpt, "heads", n_samples=2, n_tokens=10)
    assert len(tables["heads"]) == 8
    ckpt.verified = None  # a Checkpoint put together some other way
    with pytest.raises(ValueError, match="was not loaded by load_checkpoint, so nothing verified its files"):
        icl_dynamics.score(ckpt, "heads")


def test_io_environment_names_exactly_what_provenance_adds() -> None:
    assert set(io.provenance(reproducible=False)) <= io.ENVIRONMENT
    assert io.ENVIRONMENT - set(io.provenance(reproducible=False)) <= {"git_revision", "git_dirty"}
