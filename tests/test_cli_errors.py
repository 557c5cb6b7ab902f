"""Expected failures end in one line naming the problem and a non-zero exit, never a traceback
(a traceback only with -v). Each case runs the real command line in a fresh process."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from icl_dynamics.toyzoo import TOY_MODEL_ID

HARNESS = "import sys\n{patch}\nfrom icl_dynamics.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def cli(args: list[str], patch: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HARNESS.format(patch=patch), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def broken_cache(toy_zoo, tmp_path_factory) -> Path:
    """A copy of the toy zoo's cache with step 100's safetensors truncated and step 200's pickle
    replaced by one that would run a command."""
    cache = tmp_path_factory.mktemp("broken") / "hub"
    shutil.copytree(toy_zoo / "hub", cache)
    repo = cache / "models--icl-dynamics--toy-neox"
    for step, name in ((100, "model.safetensors"), (200, "pytorch_model.bin")):
        commit = (repo / "refs" / f"step{step}").read_text().strip()
        blob = (repo / "snapshots" / commit / name).resolve()
        data = blob.read_bytes()
        blob.unlink()
        blob.write_bytes(data[: len(data) // 2] if name.endswith("safetensors") else pickle.dumps(_Evil()))
    return cache


def heads(cache: Path, step: int, out: Path) -> list:
    return ["heads", "--model", TOY_MODEL_ID, "--step", step, "--schedule", "toy", "--cache-dir", cache,
            "--device", "cpu", "--n-tokens", 10, "--n-samples", 2, "--out", out]


def cases(cache: Path, tmp: Path, shared: Path) -> dict[str, tuple[list, str, str]]:
    """name -> (arguments, patch, a fragment the one error line must hold)."""
    (tmp / "a-file").write_text("x")
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
    }


def test_every_expected_failure_is_one_line_without_traceback(broken_cache, shared_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    table = cases(broken_cache, tmp_path, shared_dir)
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
    args, patch, _ = cases(broken_cache, tmp_path, shared_dir)["unexpected bug"]
    proc = cli(["-v", *args], patch)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr
