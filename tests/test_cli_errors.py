"""Expected failures end in one line naming the problem and a non-zero exit, never a traceback
(a traceback only with -v). Each case runs the real command line in a fresh process."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from icl_dynamics import hub
from icl_dynamics.toyzoo import TOY_MODEL_ID

HARNESS = "import sys\n{patch}\nfrom icl_dynamics.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def cli(args: list[str], patch: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HARNESS.format(patch=patch), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def serve(repo: Path, step: int, name: str, data: bytes) -> None:
    """Serve ``data`` as ``name`` of ``step`` under its own hash, as a bad mirror would (the cache's hashes
    agree, so only the loader can tell)."""
    snapshot = repo / "snapshots" / (repo / "refs" / f"step{step}").read_text().strip()
    blob = repo / "blobs" / (hub.git_blob_sha1(data) if name.endswith(".json") else hashlib.sha256(data).hexdigest())
    blob.write_bytes(data)
    (snapshot / name).unlink()
    (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture(scope="module")
def broken_cache(toy_zoo, tmp_path_factory) -> Path:
    """A copy of the toy zoo's cache (blobs hard-linked, never written through) serving, each under its
    own hash: step 100's safetensors truncated, step 200's pickle replaced by one that would run a
    command, step 400's config.json and step 600's tokenizer.json invalid JSON; and step 800's
    snapshot deleted."""
    cache = tmp_path_factory.mktemp("broken") / "hub"
    shutil.copytree(toy_zoo / "hub", cache, symlinks=True, copy_function=os.link)
    repo = cache / "models--icl-dynamics--toy-neox"
    for step, name in ((100, "model.safetensors"), (200, "pytorch_model.bin")):
        data = (repo / "snapshots" / (repo / "refs" / f"step{step}").read_text().strip() / name).read_bytes()
        serve(repo, step, name, data[: len(data) // 2] if name.endswith("safetensors") else pickle.dumps(_Evil()))
    serve(repo, 400, "config.json", b'{"model_type": "gpt_neox", "hidden_size": }')
    serve(repo, 600, "tokenizer.json", b'{"version": "1.0", "truncation": null, ')
    shutil.rmtree(repo / "snapshots" / (repo / "refs" / "step800").read_text().strip())
    return cache


def heads(cache: Path, step: int, out: Path) -> list:
    return ["heads", "--model", TOY_MODEL_ID, "--step", step, "--schedule", "toy", "--cache-dir", cache,
            "--device", "cpu", "--n-tokens", 10, "--n-samples", 2, "--out", out]


def fetch(cache: Path, step: int, out: Path) -> list:
    return ["fetch", "--model", TOY_MODEL_ID, "--step", step, "--schedule", "toy", "--cache-dir", cache, "--out", out]


def foreign_tokens(path: Path) -> Path:
    """A text-tokens table holding an id past the toy vocabulary (tokenised for another model)."""
    from icl_dynamics import io, schemas

    source = {"kind": "jsonl", "name": None, "path": "other.jsonl", "split": "train", "column": "text"}
    io.write_rows([{"doc_index": i, "token_ids": [3] * 60 + [1_000_000] + [3] * 3} for i in range(2)],
                  schemas.TEXT_TOKENS_SCHEMA, path, meta={"source": source})
    return path


def cases(cache: Path, tmp: Path, shared: Path, redirecting: str) -> dict[str, tuple[list, str, str]]:
    """name -> (arguments, patch, a fragment the one error line must hold)."""
    (tmp / "a-file").write_text("x")
    online = f"import os\nos.environ.update(HF_HUB_OFFLINE='0', HF_ENDPOINT={redirecting!r})"
    enospc = ("import errno, pyarrow.parquet as pq\n"
              "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device', str(a[1]))\n"
              "pq.write_table = full")
    bug = "import icl_dynamics.induction as m\nm.induction_rows = lambda *a, **k: 1 / 0"
    return {
        "truncated safetensors": (heads(cache, 100, tmp / "h.parquet"), "", "cannot be read (SafetensorError"),
        "refused pickle": (heads(cache, 200, tmp / "pickle.parquet"), "", "cannot be read (UnpicklingError"),
        "step not in the cache": (heads(cache, 2, tmp / "missing.parquet"), "", "is not a checkpoint of the toy schedule"),
        "output under a file": (heads(cache, 0, tmp / "a-file" / "h.parquet"), "", "a-file"),
        "disk full": (heads(cache, 0, tmp / "full.parquet"), enospc, "No space left on device"),
        "unknown spaCy model": (["relations", "--model", TOY_MODEL_ID, "--step", 0, "--schedule", "toy",
                                 "--cache-dir", cache, "--agenda-dir", shared / "data" / "agenda",
                                 "--spacy-model", "xx_no_such_pipeline", "--out-dir", tmp / "rel"],
                                "", "spaCy pipeline 'xx_no_such_pipeline' is not installed"),
        "unexpected bug": (heads(cache, 0, tmp / "bug.parquet"), bug, "unexpected ZeroDivisionError"),
        # issue 25: each message names the file, key or value and what to do
        "invalid config.json": (fetch(cache, 400, tmp / "config.parquet"), "", "@step400: config.json ("),
        "invalid tokenizer.json": (fetch(cache, 600, tmp / "tokenizer.parquet"), "", "@step600: tokenizer.json ("),
        "deleted snapshot": (fetch(cache, 800, tmp / "deleted.parquet"), "",
                             "refs/step800 points at commit"),
        "out-of-vocabulary ids": (["loss", "--model", TOY_MODEL_ID, "--step", 0, "--schedule", "toy", "--cache-dir",
                                   cache, "--device", "cpu", "--text-tokens", foreign_tokens(tmp / "foreign.parquet"),
                                   "--early", 4, "--late", 60, "--out", tmp / "l.parquet", "--out-curve",
                                   tmp / "c.parquet"], "", "token id 1000000 is outside the model's vocabulary"),
        "model id with a trailing newline": (["heads", "--model", TOY_MODEL_ID + "\n", *heads(cache, 0, tmp / "n")[3:]],
                                             "", "is not a hub model id (holds '\\n')"),
        "NaN option": ([*heads(cache, 0, tmp / "nan.parquet"), "--exclude-frac", "nan"], "",
                       "--exclude-frac nan: not a finite number"),
        "shot count given twice": (["icl-tasks", *heads(cache, 0, tmp / "s.parquet")[1:11], "--shots", 5, 5, "--out",
                                    tmp / "s.parquet"], "", "--shots lists 5 more than once"),
        "redirect loop": (fetch(cache, 0, tmp / "redirect.parquet"), online,
                          "the hub answered with a redirect loop"),
    }


@pytest.fixture(scope="module")
def redirecting(toy_zoo):
    """A fake hub that answers every request with a redirect to itself."""
    from fakehub import FakeHub, Fault

    with FakeHub(toy_zoo / "hub") as server:
        server.faults.append(Fault("redirect", times=10**6))
        yield server.endpoint


def test_every_expected_failure_is_one_line_without_traceback(broken_cache, shared_dir, tmp_path, redirecting):
    from concurrent.futures import ThreadPoolExecutor

    table = cases(broken_cache, tmp_path, shared_dir, redirecting)
    with ThreadPoolExecutor(max_workers=2) as pool:  # one process per core
        runs = dict(zip(table, pool.map(lambda case: cli(case[0], case[1]), table.values())))
    failures = {}
    for name, (_, _, fragment) in table.items():
        proc = runs[name]
        errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        if proc.returncode != 1 or "Traceback" in proc.stderr or len(errors) != 1 or fragment not in errors[0]:
            failures[name] = (proc.returncode, proc.stderr[-800:])
    assert not failures, failures
    assert "pwned" not in runs["refused pickle"].stdout  # the pickle was refused, never run


def test_verbose_shows_the_traceback(broken_cache, shared_dir, tmp_path):
    args, patch, _ = cases(broken_cache, tmp_path, shared_dir, "http://127.0.0.1:9")["unexpected bug"]
    proc = cli(["-v", *args], patch)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr
