"""Fetching and loading checkpoints offline from a cache laid out exactly like the hub's."""

import hashlib
import io
import logging
import pickle

import pytest
import torch
from conftest import tiny_neox
from safetensors.torch import save as save_safetensors

from icl_dynamics import hub
from icl_dynamics.checkpoints import PYTHIA, StepError
from icl_dynamics.cli import main
from icl_dynamics.models import load_checkpoint

MODEL = "test-org/tiny-neox"


def tokenizer_files() -> dict[str, bytes]:
    """A small word-level tokenizer's files (every branch carries tokenizer.json and tokenizer_config.json)."""
    from icl_dynamics.toyzoo import SPECIAL_TOKENS, build_tokenizer
    from icl_dynamics.toyzoo import tokenizer_files as files

    return files(build_tokenizer([*SPECIAL_TOKENS, *"ABCDEFGH"]), 64)


def model_files(model, safetensors: bool = True, bin_: bool = True) -> tuple[dict[str, bytes], list[str]]:
    files = {"config.json": model.config.to_json_string().encode(), **tokenizer_files()}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        files["model.safetensors"] = save_safetensors(state, metadata={"format": "pt"})
    if bin_:
        buf = io.BytesIO()
        torch.save(state, buf)
        files["pytorch_model.bin"] = buf.getvalue()
    return files, [n for n in files if n.startswith(("model.", "pytorch_model."))]


@pytest.fixture()
def cache(tmp_path):
    """step0, step1 and step16 identical (like Pythia's step0/step1), step2 different and .bin only,
    step4 both formats."""
    root = tmp_path / "hub"
    m0, m2 = tiny_neox(seed=0), tiny_neox(seed=2)
    files, lfs = model_files(m0, safetensors=False)
    hub.write_snapshot(root, MODEL, ["step0", "step1", "step16"], files, lfs)
    files, lfs = model_files(m2, safetensors=False)
    hub.write_snapshot(root, MODEL, ["step2"], files, lfs)
    files, lfs = model_files(m2)
    hub.write_snapshot(root, MODEL, ["step4"], files, lfs)
    return root


def test_write_snapshot_matches_hub_cache_layout(cache):
    repo = cache / "models--test-org--tiny-neox"
    commit = (repo / "refs" / "step4").read_text()
    snapshot = repo / "snapshots" / commit
    weights = snapshot / "model.safetensors"
    assert weights.is_symlink() and not weights.readlink().is_absolute()
    assert weights.resolve().parent == (repo / "blobs").resolve()
    assert weights.resolve().name == hashlib.sha256(weights.read_bytes()).hexdigest()
    config = snapshot / "config.json"
    assert config.resolve().name == hub.git_blob_sha1(config.read_bytes())
    # identical branches share one snapshot and their blobs are stored once
    assert (repo / "refs" / "step0").read_text() == (repo / "refs" / "step1").read_text()


def test_git_blob_sha1_matches_git():
    # `printf 'hello\n' | git hash-object --stdin`
    assert hub.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_offline_fetch_prefers_safetensors_and_never_takes_both(cache):
    both = hub.fetch_checkpoint(MODEL, 4, cache_dir=cache)
    assert both.weights_format == "safetensors"
    assert [w.name for w in both.weights] == ["model.safetensors"]
    only_bin = hub.fetch_checkpoint(MODEL, 2, cache_dir=cache)
    assert only_bin.weights_format == "bin" and [w.name for w in only_bin.weights] == ["pytorch_model.bin"]
    assert only_bin.hash_source == "cache-etag"
    assert only_bin.weights[0].expected == hashlib.sha256(only_bin.weights[0].path.read_bytes()).hexdigest()


def test_identical_branches_are_flagged_benign_only_when_consecutive(cache):
    """step0 = step1 (consecutive: benign, step1 measures nothing new); step16 also serves step0's
    weights, which no training run does: all three are suspect, none is silently kept or dropped.
    step2 and step4 (consecutive) share the .bin; step4 also has safetensors."""
    rows = [hub.fetch_checkpoint(MODEL, s, cache_dir=cache).row(tokens=s) for s in (16, 2, 1, 0)]
    flagged = {r["step"]: (r["duplicate_of_step"], r["suspect"], r["same_weights_as"])
               for r in hub.flag_duplicates(rows, PYTHIA)}
    assert flagged == {0: (None, True, [1, 16]), 1: (None, True, [0, 16]), 2: (None, False, []),
                       16: (None, True, [0, 1])}
    # the fetch saw step16's branch in the cache serve those weights: 0 and 1 stay suspect when only they are
    # measured (a branch pointing at another step's commit is flagged whether or not that step is measured)
    assert [r["same_weights_in_cache"] for r in rows] == [[0, 1], [4], [0, 16], [1, 16]]
    measured = hub.flag_duplicates([r for r in rows if r["step"] != 16], PYTHIA)
    assert {r["step"]: (r["duplicate_of_step"], r["suspect"]) for r in measured} == {
        0: (None, True), 1: (None, True), 2: (None, False)}
    # without step16 in the cache, step0 = step1 is benign
    alone = [{**r, "same_weights_in_cache": [s for s in r["same_weights_in_cache"] if s != 16]} for r in rows]
    benign = hub.flag_duplicates([r for r in alone if r["step"] != 16], PYTHIA)
    assert {r["step"]: (r["duplicate_of_step"], r["suspect"]) for r in benign} == {
        0: (None, False), 1: (0, False), 2: (None, False)}


def test_an_early_branch_serving_late_weights_never_drops_the_genuine_late_step():
    """pythia-2.8b: early branches serve step143000's weights. The later step must not become the
    "duplicate" of the early one; both are suspect, and a run of early branches too."""
    rows = [{"model": "m", "step": s, "weights_digest": d}
            for s, d in ((0, "a"), (1, "a"), (2, "z"), (4, "z"), (8, "b"), (1000, "c"), (143000, "z"))]
    flagged = {r["step"]: (r["duplicate_of_step"], r["suspect"]) for r in hub.flag_duplicates(rows, PYTHIA)}
    assert flagged == {0: (None, False), 1: (0, False), 2: (None, True), 4: (None, True), 8: (None, False),
                       1000: (None, False), 143000: (None, True)}
    with pytest.raises(StepError, match="step 3 is not a checkpoint"):
        hub.flag_duplicates([{"model": "m", "step": 3, "weights_digest": "a"}], PYTHIA)


def test_corrupt_blob_is_refused(cache):
    result = hub.fetch_checkpoint(MODEL, 2, cache_dir=cache)
    blob = result.weights[0].path.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(hub.IntegrityError, match="pytorch_model.bin .* has hash .* but the hub says"):
        hub.fetch_checkpoint(MODEL, 2, cache_dir=cache)


def test_missing_revision_says_what_to_do(cache):
    with pytest.raises(hub.CheckpointNotFound, match=r"step8 is not in the cache .*\(unset HF_HUB_OFFLINE\)"):
        hub.fetch_checkpoint(MODEL, 8, cache_dir=cache)


def test_both_formats_load_to_the_same_model_through_from_pretrained(cache):
    tokens = torch.tensor([[1, 5, 7, 9]])
    a = load_checkpoint(MODEL, 2, cache_dir=cache, device="cpu", dtype="float32", tokenizer=False)
    b = load_checkpoint(MODEL, 4, cache_dir=cache, device="cpu", dtype="float32", tokenizer=False)
    reference = tiny_neox(seed=2)
    with torch.no_grad():
        expected = reference(tokens).logits
        assert torch.equal(a.model(tokens).logits, expected)
        assert torch.equal(b.model(tokens).logits, expected)
    assert a.model.config._attn_implementation == "eager"


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_pickled_code_in_bin_weights_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files, lfs = model_files(tiny_neox(), safetensors=False)
    state = torch.load(io.BytesIO(files["pytorch_model.bin"]), weights_only=True)
    evil = io.BytesIO()
    torch.save({**state, "payload": _Payload()}, evil, pickle_module=pickle)
    files["pytorch_model.bin"] = evil.getvalue()
    hub.write_snapshot(tmp_path / "hub", MODEL, ["step0"], files, lfs)
    with pytest.raises(hub.IntegrityError, match="cannot be read .*UnpicklingError: Weights only load failed"):
        load_checkpoint(MODEL, 0, cache_dir=tmp_path / "hub", device="cpu", tokenizer=False)
    assert not (tmp_path / "PWNED").exists()


def test_retries_transient_errors_with_backoff():
    class Response:
        def __init__(self, status, headers=None):
            self.status_code, self.headers = status, headers or {}

    class HTTPError(Exception):
        def __init__(self, status, headers=None):
            super().__init__(f"HTTP {status}")
            self.response = Response(status, headers)

    outcomes = [HTTPError(503), HTTPError(429, {"retry-after": "7"}), "ok"]
    sleeps = []

    def call():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert hub.with_retries(call, backoff=2.0, sleep=sleeps.append) == "ok"
    assert len(sleeps) == 2
    assert 2.0 <= sleeps[0] <= 2.5  # backoff * 2**0 with up to 25% jitter
    assert 7.0 <= sleeps[1] <= 8.75  # Retry-After honoured

    def not_found():
        raise HTTPError(404)

    sleeps.clear()
    with pytest.raises(HTTPError, match="404"):
        hub.with_retries(not_found, sleep=sleeps.append)
    assert sleeps == []

    def always_503():
        raise HTTPError(503)

    with pytest.raises(hub.HubUnavailable, match="listing m@step1 failed 3 times; last error: HTTPError: HTTP 503"):
        hub.with_retries(always_503, attempts=3, sleep=sleeps.append, what="listing m@step1")
    assert len(sleeps) == 2


def test_fetch_cli_writes_provenance_and_never_prints_the_token(cache, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETSECRETSECRET")
    out = tmp_path / "prov.parquet"
    with caplog.at_level(logging.DEBUG):
        assert main(["fetch", "--model", MODEL, "--step", "4", "--cache-dir", str(cache), "--out", str(out)]) == 0
    import pyarrow.parquet as pq

    from icl_dynamics.io import read_provenance

    row = pq.read_table(out).to_pylist()[0]
    assert row["step"] == 4 and row["tokens"] == 4 * 2_097_152 and row["weights_format"] == "safetensors"
    assert row["files"] == ["model.safetensors"] and row["sizes"][0] > 0 and len(row["sha256"][0]) == 64
    captured = capsys.readouterr()
    everything = caplog.text + captured.out + captured.err + out.read_bytes().decode("latin-1")
    assert "SECRET" not in everything
    assert "icl_dynamics" in read_provenance(out)


def test_fetch_cli_rejects_a_step_pythia_never_published(cache, tmp_path, caplog):
    out = tmp_path / "prov.parquet"
    assert main(["fetch", "--model", MODEL, "--step", "3", "--cache-dir", str(cache), "--out", str(out)]) == 1
    assert "nearest valid steps: 2, 4" in caplog.text
    assert not out.exists()


class MockHub:
    """Stands in for the hub's API and downloads (no network): serves ``files`` at one commit."""

    def __init__(self, root, files: dict[str, bytes], lfs: set[str], corrupt: str | None = None):
        from types import SimpleNamespace

        self.root, self.files, self.corrupt, self.downloaded = root, files, corrupt, []
        self.sha = "c0ffee" * 6 + "c0ff"
        self.siblings = [
            SimpleNamespace(
                rfilename=name,
                lfs=SimpleNamespace(sha256=hashlib.sha256(data).hexdigest()) if name in lfs else None,
                blob_id=None if name in lfs else hub.git_blob_sha1(data),
            )
            for name, data in files.items()
        ]

    def api(self):
        fake = self

        class Api:
            def model_info(self, repo_id, revision, files_metadata, timeout):
                assert files_metadata and revision.startswith("step") and timeout > 0
                from types import SimpleNamespace

                return SimpleNamespace(sha=fake.sha, siblings=fake.siblings)

        return Api()

    def download(self, repo_id, filename, revision, cache_dir, etag_timeout):
        assert revision == self.sha and etag_timeout > 0  # every file from the same commit
        self.downloaded.append(filename)
        path = hub.repo_cache_dir(repo_id, cache_dir) / "snapshots" / revision / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.files[filename]
        path.write_bytes(data + b"!" if filename == self.corrupt else data)
        return str(path)


def serve(monkeypatch, fake: MockHub) -> None:
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HfApi", fake.api)
    monkeypatch.setattr(hub, "hf_hub_download", fake.download)


def test_online_fetch_takes_one_format_and_checks_the_lfs_hashes(tmp_path, monkeypatch):
    files, lfs = model_files(tiny_neox())
    files["tokenizer.json"] = b"{}"
    fake = MockHub(tmp_path, files, set(lfs))
    serve(monkeypatch, fake)
    result = hub.fetch_checkpoint(MODEL, 4, cache_dir=tmp_path / "hub")
    assert sorted(fake.downloaded) == ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                                       "tokenizer_config.json"]
    assert result.hash_source == "hub-api" and result.commit == fake.sha
    assert result.weights[0].expected == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert hub.cached_commit(MODEL, "step4", tmp_path / "hub") == fake.sha  # refs/step4 for from_pretrained


def test_online_fetch_refuses_a_download_that_differs_from_the_hub_hash(tmp_path, monkeypatch):
    files, lfs = model_files(tiny_neox(), safetensors=False)
    serve(monkeypatch, MockHub(tmp_path, files, set(lfs), corrupt="pytorch_model.bin"))
    with pytest.raises(hub.IntegrityError, match="pytorch_model.bin"):
        hub.fetch_checkpoint(MODEL, 4, cache_dir=tmp_path / "hub")
    assert not (hub.repo_cache_dir(MODEL, tmp_path / "hub") / "refs" / "step4").exists()


def test_online_fetch_of_a_sharded_checkpoint_takes_the_index_and_its_shards(tmp_path, monkeypatch):
    import json

    files = {
        "config.json": b"{}",
        **tokenizer_files(),
        "pytorch_model.bin.index.json": json.dumps(
            {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
        ).encode(),
        "pytorch_model-00001-of-00002.bin": b"shard one",
        "pytorch_model-00002-of-00002.bin": b"shard two",
    }
    lfs = {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"}
    fake = MockHub(tmp_path, files, lfs)
    serve(monkeypatch, fake)
    result = hub.fetch_checkpoint(MODEL, 4, cache_dir=tmp_path / "hub")
    assert result.weights_format == "bin"
    assert [w.name for w in result.weights] == sorted(lfs)
    assert set(fake.downloaded) == set(files)


def test_pythia_style_bin_keys_load_into_the_right_parameters(tmp_path):
    """Pythia's .bin files name the unembedding ``embed_out`` and carry old attention buffers."""
    model = tiny_neox(seed=3)
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    for layer in range(model.config.num_hidden_layers):
        prefix = f"gpt_neox.layers.{layer}.attention."
        state[prefix + "bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
        state[prefix + "masked_bias"] = torch.tensor(-1e9)
        state[prefix + "rotary_emb.inv_freq"] = torch.ones(2)
    buf = io.BytesIO()
    torch.save(state, buf)
    files = {"config.json": model.config.to_json_string().encode(), **tokenizer_files(),
             "pytorch_model.bin": buf.getvalue()}
    hub.write_snapshot(tmp_path, MODEL, ["step0"], files, ["pytorch_model.bin"])
    loaded = load_checkpoint(MODEL, 0, cache_dir=tmp_path, device="cpu", dtype="float32", tokenizer=False).model
    assert torch.equal(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight)
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_a_ref_write_killed_midway_leaves_a_cache_huggingface_hub_still_reads(tmp_path):
    """``hub._write_ref`` is ours (its docstring says why). Killed (SIGKILL) between writing its temporary file and
    the rename, it leaves the new ref absent, the others intact, and no file in refs/ (huggingface_hub's
    scan_cache_dir reads each as a ref: an empty one would make it refuse the repository, and evict_checkpoint with
    it); the refs write_snapshot wrote resolve through the library's readers; the next write of the ref removes the
    leftover."""
    import os
    import signal
    import subprocess
    import sys

    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    root = tmp_path / "hub"
    commit = hub.write_snapshot(root, MODEL, ["step0", "step1"], {"config.json": b"{}"})
    repo = hub.repo_cache_dir(MODEL, root)
    kill_at_rename = (
        "import os, signal\n"
        "from icl_dynamics import hub\n"
        "os.replace = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"hub._write_ref({MODEL!r}, 'step2', {commit!r}, {str(root)!r})\n"
    )
    assert subprocess.run([sys.executable, "-c", kill_at_rename], timeout=120).returncode == -signal.SIGKILL
    assert sorted(os.listdir(repo / "refs")) == ["step0", "step1"]
    assert len(list(repo.glob(".ref-step2.*.tmp"))) == 1  # the killed writer's, beside refs/

    def library_refs() -> dict[str, frozenset[str]]:
        scan = scan_cache_dir(root)
        assert scan.warnings == []
        return {rev.commit_hash: rev.refs for r in scan.repos for rev in r.revisions}

    assert library_refs() == {commit: frozenset({"step0", "step1"})}
    for ref in ("step0", "step1"):
        assert try_to_load_from_cache(MODEL, "config.json", cache_dir=root, revision=ref) == str(
            repo / "snapshots" / commit / "config.json")
    hub._write_ref(MODEL, "step2", commit, root)
    assert library_refs() == {commit: frozenset({"step0", "step1", "step2"})}
    assert list(repo.glob(".ref-step2.*.tmp")) == []
