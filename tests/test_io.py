"""Parquet I/O: schema checks that name the column, provenance, and writes that never half-happen."""

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
