"""Fetching from a flaky hub: a fake hub on 127.0.0.1 (tests/fakehub.py) serves the toy zoo and injects
each fault the hub's network shows; the fetch retries with backoff and succeeds once the fault clears,
and says in one line what failed when it never does."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from fakehub import FakeHub, Fault, closed_endpoint
from huggingface_hub import constants

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
    assert not hub.repo_cache_dir(TOY_MODEL_ID, cache).exists()  # the only revision: the repository went
    with caplog.at_level(logging.WARNING):
        assert main(["heads", *common, "--device", "cpu", "--provenance", str(provenance), "--n-tokens", "10",
                     "--out", str(tmp_path / "heads.parquet")]) == 0
    assert "no longer in the cache (evicted after scoring?): fetching it again" in caplog.text
    assert (tmp_path / "heads.parquet").exists()
