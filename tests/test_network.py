"""Fetching from a flaky hub: a fake hub on 127.0.0.1 (tests/fakehub.py) serves the toy zoo and injects
each fault the hub's network shows; the fetch retries with backoff and succeeds once the fault clears,
and says in one line what failed when it never does."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from fakehub import FakeHub, Fault, closed_endpoint
from huggingface_hub import HfApi, constants, scan_cache_dir, snapshot_download, try_to_load_from_cache

from icl_dynamics import hub
from icl_dynamics.cli import main
from icl_dynamics.toyzoo import TOY_MODEL_ID

STEP = 1000
REPO = "models--icl-dynamics--toy-neox"


def point_hub_at(monkeypatch, endpoint: str) -> None:
    """huggingface_hub reads HF_ENDPOINT once, at import: patch both places it keeps it."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for every other test


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Every backoff (ours and huggingface_hub's), recorded instead of slept."""
    record: list[float] = []
    monkeypatch.setattr(time, "sleep", record.append)
    return record


@pytest.fixture
def fake(toy_zoo: Path, monkeypatch):
    with FakeHub(toy_zoo / "hub") as server:
        point_hub_at(monkeypatch, server.endpoint)
        yield server


def fetch(cache: Path, **kwargs) -> hub.FetchResult:
    return hub.fetch_checkpoint(TOY_MODEL_ID, STEP, cache_dir=cache, **kwargs)


def assert_fetched(result: hub.FetchResult, toy_zoo: Path, cache: Path) -> None:
    """The cache holds the zoo's step: its ref, and every file byte-identical to the zoo's blob."""
    source = toy_zoo / "hub" / REPO
    assert result.commit == (source / "refs" / f"step{STEP}").read_text().strip()
    assert hub.cached_commit(TOY_MODEL_ID, f"step{STEP}", cache) == result.commit
    for record in result.files:
        assert record.path.read_bytes() == (source / "snapshots" / result.commit / record.name).read_bytes()
    assert result.weights_format == "safetensors" and len(result.weights) == 1


FAULTS = {  # each fails the first matching requests, then clears
    "429 with Retry-After (listing)": Fault("429", match="/api/models/", times=2),
    "503 (file metadata)": Fault("503", match="/resolve/", times=2, method="HEAD"),
    "connection reset mid-body (weights)": Fault("reset", match="/__cdn__/", times=2),
    # huggingface_hub retries a truncated download 5 times itself: 7 outlast it, so ours must retry too
    "truncated body (weights)": Fault("truncate", match="/__cdn__/", times=7),
    "corrupt body (weights: fails its hash, deleted, fetched again)": Fault("corrupt", match="/__cdn__/", times=1),
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_a_transient_fault_is_retried_until_it_clears(fault, fake, toy_zoo, tmp_path, sleeps, caplog):
    fake.faults.append(fault)
    result = fetch(tmp_path / "cache")
    assert_fetched(result, toy_zoo, tmp_path / "cache")
    assert fake.faults == []  # every injected failure was met, and the fetch got past it
    if fault.kind == "corrupt":
        assert "failed its hash check; deleting the blob and fetching it again" in caplog.text
    else:
        assert sleeps and all(s > 0 for s in sleeps)  # with backoff, never in a tight loop
    if fault.kind == "429":
        assert min(sleeps) >= 1  # Retry-After: 1 honoured


def test_a_stalled_request_is_cut_by_the_timeout_and_retried(fake, toy_zoo, tmp_path, sleeps):
    fake.faults.append(Fault("stall", match="/api/models/", times=1, seconds=20))
    start = time.perf_counter()
    result = fetch(tmp_path / "cache", timeout=0.5)
    assert time.perf_counter() - start < 10  # not the 20 s stall
    assert_fetched(result, toy_zoo, tmp_path / "cache")
    assert fake.faults == [] and sleeps


def test_a_refused_connection_is_retried_until_the_hub_answers(toy_zoo, tmp_path, monkeypatch):
    """Nothing listens on the port at first; the hub comes up during the first backoff."""
    endpoint = closed_endpoint()
    point_hub_at(monkeypatch, endpoint)
    started: list[FakeHub] = []

    def come_up(seconds: float) -> None:
        if not started:
            started.append(FakeHub(toy_zoo / "hub", port=int(endpoint.rsplit(":", 1)[1])).__enter__())

    monkeypatch.setattr(time, "sleep", come_up)
    try:
        assert_fetched(fetch(tmp_path / "cache"), toy_zoo, tmp_path / "cache")
    finally:
        for server in started:
            server.__exit__(None, None, None)
    assert started and started[0].requests  # it was refused first, then served


def test_a_fault_that_never_clears_ends_in_one_line_naming_model_step_and_error(fake, tmp_path, sleeps, caplog):
    fake.faults.append(Fault("503", match="/api/models/", times=1000))
    args = ["fetch", "--model", TOY_MODEL_ID, "--step", str(STEP), "--schedule", "toy", "--cache-dir",
            str(tmp_path / "cache"), "--attempts", "3", "--out", str(tmp_path / "provenance.parquet")]
    with caplog.at_level(logging.WARNING):
        assert main(args) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert f"listing {TOY_MODEL_ID}@step{STEP} failed 3 times; last error: HfHubHTTPError" in errors[0]
    assert "503" in errors[0] and len(sleeps) == 2
    assert not (tmp_path / "provenance.parquet").exists()


def test_a_job_that_needs_an_evicted_checkpoint_fetches_it_again(fake, toy_zoo, tmp_path, caplog):
    """keep_weights: false evicts a scored checkpoint; rescoring it (here one stage) fetches it again
    from the hub and checks it against the first fetch's provenance before measuring."""
    cache, provenance = tmp_path / "cache", tmp_path / "provenance.parquet"
    common = ["--model", TOY_MODEL_ID, "--step", str(STEP), "--schedule", "toy", "--cache-dir", str(cache)]
    assert main(["fetch", *common, "--out", str(provenance)]) == 0
    assert main(["evict", *common, "--provenance", str(provenance), "--out", str(tmp_path / "evicted.json")]) == 0
    repo = hub.repo_cache_dir(TOY_MODEL_ID, cache)  # what the fetch added went: ref, snapshot, every blob
    assert not list(repo.glob("refs/*")) and not list(repo.glob("snapshots/*")) and not list(repo.glob("blobs/*"))
    with caplog.at_level(logging.WARNING):
        assert main(["heads", *common, "--device", "cpu", "--provenance", str(provenance), "--n-tokens", "10",
                     "--out", str(tmp_path / "heads.parquet")]) == 0
    assert "no longer in the cache (evicted after scoring?): fetching it again" in caplog.text
    assert (tmp_path / "heads.parquet").exists()


def test_a_partial_download_left_by_a_killed_fetch_is_removed_by_the_next_fetch(fake, toy_zoo, tmp_path):
    """kill -9 during a weights download leaves huggingface_hub's per-process ``*.incomplete`` file, which
    it never reuses; the next fetch (holding the repository's lock, so no fetch is running) deletes it.
    Another repository's partial download is not touched."""
    import os
    import signal
    import subprocess
    import sys

    cache = tmp_path / "cache"
    fake.faults.append(Fault("stall", match="/__cdn__/", times=1, seconds=60))
    env = {**os.environ, "HF_ENDPOINT": fake.endpoint, "HF_HUB_OFFLINE": "0"}
    env.pop("TRANSFORMERS_OFFLINE", None)
    proc = subprocess.Popen([sys.executable, "-m", "icl_dynamics.cli", "fetch", "--model", TOY_MODEL_ID, "--step",
                             str(STEP), "--schedule", "toy", "--cache-dir", str(cache), "--out",
                             str(tmp_path / "provenance.parquet")], env=env)
    deadline = time.monotonic() + 60
    # until the weights download is stalled (the fault is taken; the small files' downloads also pass
    # through *.incomplete files, but finish)
    while (fake.faults or not list(cache.glob(f"{REPO}/blobs/*.incomplete"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (orphan,) = cache.glob(f"{REPO}/blobs/*.incomplete")
    other = cache / "models--org--other" / "blobs" / "abc.0123abcd.incomplete"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"partial")
    assert_fetched(fetch(cache), toy_zoo, cache)
    assert not orphan.exists() and other.exists()


def test_our_hash_check_flags_exactly_what_huggingface_hubs_verify_repo_checksums_flags(fake, tmp_path):
    """``hub._verify`` is ours (its docstring says why). On one fetched cache it agrees with
    ``HfApi.verify_repo_checksums`` file by file, expected and actual hash alike, with the expected hashes it gets
    online (model_info) and offline (the blob names): all clean after a fetch; then, with a byte flipped in the
    weights blob (sha256) and in config.json (git blob sha1), both flag exactly those two."""
    cache = tmp_path / "cache"
    online = fetch(cache)
    offline = hub._fetch_offline(TOY_MODEL_ID, STEP, cache, f"step{STEP}").files
    api = HfApi(endpoint=fake.endpoint)

    def library() -> dict[str, tuple[str, str]]:
        report = api.verify_repo_checksums(TOY_MODEL_ID, revision=online.commit, cache_dir=cache)
        # it checked every file we fetched; the branch's other weights format was never fetched
        assert report.checked_count == len(online.files) and report.missing_paths == ["pytorch_model.bin"]
        return {m["path"]: (m["expected"], m["actual"]) for m in report.mismatches}

    def ours(records: list[hub.FileRecord]) -> dict[str, tuple[str, str]]:
        flagged = {}
        for record in records:
            try:
                hub._verify(record)
            except hub.IntegrityError:
                flagged[record.name] = (record.expected, hub.content_hash(record.path, record.lfs))
        return flagged

    assert library() == ours(online.files) == ours(offline) == {}
    for name in ("model.safetensors", "config.json"):
        blob = (hub.repo_cache_dir(TOY_MODEL_ID, cache) / "snapshots" / online.commit / name).resolve()
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))
    flagged = library()
    assert sorted(flagged) == ["config.json", "model.safetensors"]
    assert ours(online.files) == flagged == ours(offline)


def test_our_fetch_lays_out_the_cache_and_the_ref_as_snapshot_download_does(fake, tmp_path):
    """The per-file download loop and ``hub._write_ref`` are ours (their docstrings say why). For the same files of
    the same branch, huggingface_hub's snapshot_download writes the same ref (byte for byte), snapshot links and
    blobs; and the library's own readers (try_to_load_from_cache, scan_cache_dir) resolve the ref we wrote."""
    ours, library, ref = tmp_path / "ours", tmp_path / "library", f"step{STEP}"
    result = fetch(ours)
    names = sorted(r.name for r in result.files)
    snapshot_download(TOY_MODEL_ID, revision=ref, cache_dir=library, allow_patterns=names, endpoint=fake.endpoint)

    def layout(cache: Path) -> dict:
        repo = hub.repo_cache_dir(TOY_MODEL_ID, cache)
        snapshot = repo / "snapshots" / result.commit
        return {"refs": {p.name: p.read_bytes() for p in (repo / "refs").iterdir()},
                "links": {p.name: os.readlink(p) for p in snapshot.iterdir()},
                "blobs": {p.name: p.stat().st_size for p in (repo / "blobs").iterdir()}}

    assert layout(ours) == layout(library)
    assert sorted(layout(ours)["links"]) == names
    snapshot = hub.repo_cache_dir(TOY_MODEL_ID, ours) / "snapshots" / result.commit
    for name in names:
        assert Path(try_to_load_from_cache(TOY_MODEL_ID, name, cache_dir=ours, revision=ref)) == snapshot / name
    scan = scan_cache_dir(ours)
    assert scan.warnings == []
    assert [(rev.commit_hash, rev.refs) for repo in scan.repos for rev in repo.revisions] == [
        (result.commit, frozenset({ref}))]


def test_a_fetch_records_what_it_added_to_the_cache(fake, tmp_path):
    """What the eviction may take away again: the first fetch into an empty cache downloaded every blob
    of the step; fetching the same step again downloads nothing and finds the revision cached."""
    cache = tmp_path / "cache"
    first = fetch(cache)
    blobs = sorted(p.name for p in (cache / REPO / "blobs").iterdir())
    assert first.record() == {"downloaded_blobs": blobs, "revision_was_cached": False}
    assert sorted(r.path.resolve().name for r in first.files) == blobs
    assert fetch(cache).record() == {"downloaded_blobs": [], "revision_was_cached": True}


def test_the_python_api_fetches_through_the_same_verified_path(fake, toy_zoo, tmp_path):
    """icl_dynamics.fetch is the fetch stage from Python: the provenance row the CLI writes (but its
    seconds), against which load_checkpoint checks the weights before loading them."""
    import pyarrow.parquet as pq

    import icl_dynamics

    cache = tmp_path / "cache"
    row = icl_dynamics.fetch(TOY_MODEL_ID, STEP, cache_dir=cache, schedule="toy")
    assert main(["fetch", "--model", TOY_MODEL_ID, "--step", str(STEP), "--schedule", "toy", "--cache-dir",
                 str(cache), "--out", str(tmp_path / "provenance.parquet")]) == 0
    written = pq.read_table(tmp_path / "provenance.parquet").to_pylist()[0]
    assert {k: v for k, v in row.items() if k != "seconds"} == {k: v for k, v in written.items() if k != "seconds"}
    assert icl_dynamics.load_checkpoint(TOY_MODEL_ID, STEP, cache_dir=cache, device="cpu", fetched=row).model
    blob = (cache / REPO / "snapshots" / row["commit"] / row["files"][0]).resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(hub.IntegrityError, match="has hash"):
        icl_dynamics.load_checkpoint(TOY_MODEL_ID, STEP, cache_dir=cache, device="cpu", fetched=row)


def test_a_dripping_download_is_cut_by_the_minimum_rate_retried_and_ends_in_one_line(fake, tmp_path, caplog):
    """A server sending a byte every 0.2 s never trips the read timeout (1 s); the minimum rate, measured
    over the same 1 s, cuts each attempt, the fetch retries, and when the drip never clears it ends in
    one line naming the file, the rate and the option. Without the minimum rate the fetch ran on (the
    weights, 3.2e5 bytes at 5 bytes/s, would take 18 hours)."""
    fake.faults.append(Fault("drip", match="/__cdn__/", times=1000, seconds=0.2))
    args = ["fetch", "--model", TOY_MODEL_ID, "--step", str(STEP), "--schedule", "toy", "--cache-dir",
            str(tmp_path / "cache"), "--attempts", "2", "--timeout", "1", "--out", str(tmp_path / "provenance.parquet")]
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        assert main(args) == 1
    assert time.perf_counter() - start < 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("retry 1/1" in w and "SlowTransfer" in w for w in warnings)  # retried once
    assert len(errors) == 1 and "\n" not in errors[0]
    assert f"downloading model.safetensors of {TOY_MODEL_ID}@step{STEP} failed 2 times" in errors[0]
    assert "below the minimum transfer rate of 100000 bytes/s (fetch.min_rate)" in errors[0]
    assert not (tmp_path / "provenance.parquet").exists()


def test_a_redirect_loop_ends_in_one_line_without_retrying(fake, tmp_path, sleeps, caplog):
    fake.faults.append(Fault("redirect", match="/api/models/", times=1000))
    args = ["fetch", "--model", TOY_MODEL_ID, "--step", str(STEP), "--schedule", "toy", "--cache-dir",
            str(tmp_path / "cache"), "--out", str(tmp_path / "provenance.parquet")]
    assert main(args) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"listing {TOY_MODEL_ID}@step{STEP}: the hub answered with a redirect loop" in errors[0]
    assert "check HF_ENDPOINT" in errors[0] and not errors[0].startswith("unexpected") and sleeps == []
