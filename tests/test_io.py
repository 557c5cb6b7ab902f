"""Parquet I/O: schema checks that name the column, provenance, and writes that never half-happen."""

from pathlib import Path

import pyarrow as pa
import pytest

from icl_dynamics import io

SCHEMA = pa.schema([pa.field("step", pa.int64(), nullable=False), pa.field("value", pa.float64())])


def test_rows_are_checked_against_the_schema():
    assert io.to_table([{"step": 1, "value": 0.5}], SCHEMA).to_pylist() == [{"step": 1, "value": 0.5}]
    with pytest.raises(io.SchemaError, match="column 'step' does not fit type int64"):
        io.to_table([{"step": "one", "value": 0.5}], SCHEMA)
    with pytest.raises(io.SchemaError, match=r"columns not in the schema: \['extra'\]"):
        io.to_table([{"step": 1, "value": 0.5, "extra": 1}], SCHEMA)
    with pytest.raises(io.SchemaError, match="column 'step' has nulls but is declared non-nullable"):
        io.to_table({"step": [None], "value": [1.0]}, SCHEMA)


def test_written_tables_carry_provenance_and_read_back(tmp_path):
    path = io.write_rows([{"step": 3, "value": 1.5}], SCHEMA, tmp_path / "t.parquet", meta={"stage": "demo"})
    assert io.read_table(path, SCHEMA).to_pylist() == [{"step": 3, "value": 1.5}]
    prov = io.read_provenance(path)
    assert prov["stage"] == "demo" and prov["icl_dynamics"] and prov["torch"]
    assert not {"written_at", "host"} & set(prov)  # same rows, same bytes
    again = io.write_rows([{"step": 3, "value": 1.5}], SCHEMA, tmp_path / "again.parquet", meta={"stage": "demo"})
    assert again.read_bytes() == path.read_bytes()
    stamped = io.write_rows([{"step": 3, "value": 1.5}], SCHEMA, tmp_path / "s.parquet", reproducible=False)
    assert {"written_at", "host"} <= set(io.read_provenance(stamped))  # the fetch stage's provenance table
    with pytest.raises(io.SchemaError, match="column 'value' has type double, expected string"):
        io.read_table(path, pa.schema([pa.field("value", pa.string())]))


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = io.write_rows([{"step": 1, "value": 1.0}], SCHEMA, tmp_path / "t.parquet")
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="killed"):
        with io.atomic_path(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_permissions_of_the_users_umask(tmp_path, umask, mode):
    """Tables, figures and cache refs all go through atomic_path; mkstemp alone would give 0600."""
    import os
    import stat

    from icl_dynamics import hub

    old = os.umask(umask)
    try:
        table = io.write_rows([{"step": 1, "value": 1.0}], SCHEMA, tmp_path / "t.parquet")
        ref = hub.repo_cache_dir("org/model", tmp_path / "hub") / "refs" / "step1"
        hub.write_snapshot(tmp_path / "hub", "org/model", ["step1"], {"config.json": b"{}"})
    finally:
        os.umask(old)
    assert os.umask(old) == old  # the umask is left as it was
    for path in (table, ref, ref.parent.parent / "blobs" / hub.git_blob_sha1(b"{}")):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_write_tables_shows_all_or_none(tmp_path):
    """One job's tables appear together: a failure while writing the second leaves neither (nor a temp file)."""
    table = pa.table({"a": [1, 2]})

    class FailsToWrite:  # a table whose write fails as a full disk would
        schema = table.schema

        def replace_schema_metadata(self, metadata):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        io.write_tables({tmp_path / "a.parquet": (table, None), tmp_path / "b.parquet": (FailsToWrite(), None)})
    assert list(tmp_path.iterdir()) == []
    written = io.write_tables({tmp_path / "a.parquet": (table, {"x": 1}), tmp_path / "b.parquet": (table, None)})
    assert [p.name for p in written] == ["a.parquet", "b.parquet"]
    assert io.read_table(written[0]).equals(table) and io.read_provenance(written[0])["x"] == 1


def test_a_killed_writers_temporary_file_is_removed_when_its_output_is_written_again(tmp_path):
    """kill -9 mid-write leaves a hidden temp file; the next write of that output (the rerun of the
    job Snakemake marked incomplete) removes it, and leaves other outputs' temp files alone."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "heads.parquet"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from icl_dynamics import io\n"
        "tmp = io.atomic_path(sys.argv[1]).__enter__()\n"
        "tmp.write_bytes(b'half a table')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"), str(path)])
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".heads.parquet.") and left.name.endswith(".tmp") and not path.exists()
    other = tmp_path / ".loss.parquet.abcd1234.tmp"  # another output's temp (its own job reruns it)
    lookalike = tmp_path / ".heads.parquet.backup.tmp"  # not a name atomic_path makes
    for keep in (other, lookalike):
        keep.write_bytes(b"x")
    io.write_rows([{"step": 1, "value": 1.0}], SCHEMA, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name, lookalike.name])


def test_provenance_names_the_git_revision_of_a_checkout_and_nothing_for_an_installed_copy(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    changed = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--quiet"]).returncode != 0
    prov = io.provenance()
    assert (prov["git_revision"], prov["git_dirty"]) == (head.stdout.strip(), changed)
    # the same package installed into a virtualenv inside some repository (.venv in a checkout): its files
    # are not tracked there, so that repository's revision says nothing about them
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "notes.txt").write_text("x")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "notes.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    copy = tmp_path / ".venv" / "site-packages"
    shutil.copytree(Path(io.__file__).parent, copy / "icl_dynamics")
    out = subprocess.run([sys.executable, "-c", "from icl_dynamics import io; print(io.__file__, io.source_revision())"],
                         cwd=copy, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(copy)})
    assert out.stdout.split()[0].startswith(str(copy)), out.stdout + out.stderr  # the copy was imported
    assert out.stdout.split(maxsplit=1)[1].strip() == "{}", out.stderr


def test_a_merged_table_keeps_each_inputs_provenance_keyed_by_step(tmp_path):
    """What all inputs share once, what differs (here a stage parameter) per model@step."""
    schema = pa.schema([pa.field("model", pa.string()), pa.field("step", pa.int64()), pa.field("value", pa.float64())])
    paths = []
    for step, seed in ((0, 1), (1000, 2)):
        paths.append(io.write_rows([{"model": "m", "step": step, "value": 1.0}], schema, tmp_path / f"{step}.parquet",
                                   meta={"params": {"seed": seed, "n": 5}}))
    merged = io.merged_provenance(paths)
    assert merged["inputs_common"] == {k: v for k, v in io.read_provenance(paths[0]).items() if k != "params"}
    assert merged["inputs"] == {"m@step0": {"params": {"seed": 1, "n": 5}}, "m@step1000": {"params": {"seed": 2, "n": 5}}}
