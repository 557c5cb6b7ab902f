"""Parquet I/O at the edges of the pipeline: explicit schemas, provenance, atomic writes.

Every table the pipeline writes goes through :func:`write_table`, which checks the rows against
an explicit :class:`pyarrow.Schema`, stamps provenance into the file's metadata and writes to a
temporary name in the target directory before renaming, so a killed job never leaves a
half-written file that Snakemake (or a reader) would take for a finished one.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from icl_dynamics import __version__

PROVENANCE_KEY = b"icl_dynamics.provenance"


class SchemaError(ValueError):
    """Rows do not fit the table's declared schema."""


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


TEMP_SUFFIX = ".tmp"


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed writer of ``path`` left beside it; return them.

    Called whenever ``path`` is about to be written: Snakemake lets one job at a time produce an
    output, so a temporary file of that output found then belongs to a writer that died (kill -9,
    node loss) and would otherwise stay for ever.
    """
    path = Path(path)
    # the names atomic_path gives: '.<name>.' + mkstemp's 8 random characters + '.tmp'
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")
    stale = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*") if pattern.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it.

    Readers (and Snakemake) never see a half-written file under the final name, and temporary
    files of ``path`` left by a killed writer are removed first (:func:`remove_stale_temps`). The file gets the
    permissions the user's umask gives a new file (``mkstemp`` alone would leave it 0600, unreadable
    to colleagues sharing a results folder or cache).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (read by setting it and putting it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# the keys provenance() adds about the environment; the rest of a table's provenance is what its writer passed
ENVIRONMENT = frozenset({"icl_dynamics", "git_revision", "git_dirty", "torch", "transformers", "huggingface_hub",
                         "pyarrow", "python", "host", "written_at"})


def provenance(extra: Mapping[str, Any] | None = None, *, reproducible: bool = True) -> dict[str, Any]:
    """Return the provenance stamped into every table: package and library versions, and ``extra``.

    ``reproducible=False`` adds the time and host (the fetch stage's provenance table, which records
    when and where); left out everywhere else, so a rerun writes the same bytes.
    """
    info: dict[str, Any] = {
        "icl_dynamics": __version__,
        **source_revision(),
        **{name: _installed(name) for name in ("torch", "transformers", "huggingface_hub")},
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
    }
    if not reproducible:
        info["host"] = platform.node()
        info["written_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if extra:
        info.update(extra)
    return info


@functools.cache
def source_revision() -> dict[str, Any]:
    """``git_revision`` and ``git_dirty`` (tracked files changed) of the checkout the package runs from;
    empty when it is an installed copy (its files are not tracked by a git repository) or git is missing."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", Path(__file__).name) is None:
        return {}
    revision = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if revision is None or status is None:
        return {}
    return {"git_revision": revision.strip(), "git_dirty": bool(status.strip())}


def _installed(distribution: str) -> str | None:
    """The installed version of ``distribution`` (read from its metadata: importing torch to ask
    would make every table write, merge included, pay for loading it)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def to_table(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly ``schema``'s columns, naming the offending column on a mismatch."""
    if isinstance(rows, Mapping):
        columns = dict(rows)
    else:
        columns = {name: [row.get(name) for row in rows] for name in schema.names}
        extra = set().union(*(row.keys() for row in rows)) - set(schema.names) if rows else set()
        if extra:
            raise SchemaError(f"columns not in the schema: {sorted(extra)}")
    missing = [name for name in schema.names if name not in columns]
    if missing:
        raise SchemaError(f"missing columns {missing} (schema has {schema.names})")
    arrays = []
    for field in schema:
        try:
            arrays.append(pa.array(columns[field.name], type=field.type, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
            raise SchemaError(f"column {field.name!r} does not fit type {field.type}: {exc}") from exc
    table = pa.Table.from_arrays(arrays, schema=schema)
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"column {field.name!r} has nulls but is declared non-nullable")
    return table


def write_table(
    table: pa.Table,
    path: str | os.PathLike[str],
    *,
    meta: Mapping[str, Any] | None = None,
    reproducible: bool = True,
) -> Path:
    """Write ``table`` to ``path`` atomically (temp file in the same directory, then rename).

    The provenance has no time or host unless ``reproducible=False``: same table, same bytes.
    """
    with atomic_path(path) as tmp:
        _write_parquet(table, tmp, meta, reproducible)
    return Path(path)


def write_tables(tables: Mapping[str | os.PathLike[str], tuple[pa.Table, Mapping[str, Any] | None]]) -> list[Path]:
    """Write several tables (path -> (table, metadata)) so that they appear together: all are written
    to temporary names first and renamed only once every one is complete; on any failure none is.

    One job's outputs (e.g. every table of one checkpoint) are thus all there or all absent.
    """
    with ExitStack() as stack:
        for path, (table, meta) in tables.items():
            _write_parquet(table, stack.enter_context(atomic_path(path)), meta, True)
    return [Path(p) for p in tables]


def _write_parquet(table: pa.Table, path: Path, meta: Mapping[str, Any] | None, reproducible: bool) -> None:
    existing = dict(table.schema.metadata or {})
    existing[PROVENANCE_KEY] = json.dumps(provenance(meta, reproducible=reproducible), sort_keys=True,
                                          default=str).encode()
    pq.write_table(table.replace_schema_metadata(existing), path, compression="zstd")


def write_rows(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    schema: pa.Schema,
    path: str | os.PathLike[str],
    *,
    meta: Mapping[str, Any] | None = None,
    reproducible: bool = True,
) -> Path:
    """Check ``rows`` against ``schema`` and write them atomically to ``path``."""
    return write_table(to_table(rows, schema), path, meta=meta, reproducible=reproducible)


def read_table(path: str | os.PathLike[str], schema: pa.Schema | None = None) -> pa.Table:
    """Read a table, checking (when given) that it carries every column of ``schema`` with its type."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no table at {path}; run the stage that writes it first")
    table = pq.read_table(path)
    if schema is not None:
        for field in schema:
            if field.name not in table.schema.names:
                raise SchemaError(f"{path}: column {field.name!r} missing")
            got = table.schema.field(field.name).type
            if got != field.type:
                raise SchemaError(f"{path}: column {field.name!r} has type {got}, expected {field.type}")
    return table


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the provenance dictionary stamped into a table written by :func:`write_table`."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def merged_provenance(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """The provenance a merged table keeps of its inputs: ``inputs_common`` (what every input's
    provenance shares) and ``inputs``, keyed ``<model>@step<N>`` (the path for an input without rows),
    with what differs per input, so every merged row still says how its checkpoint was measured."""
    keyed = {}
    for path in paths:
        ids = pq.read_table(path, columns=["model", "step"]).slice(0, 1).to_pylist()
        keyed[f"{ids[0]['model']}@step{ids[0]['step']}" if ids else str(path)] = read_provenance(path)
    provs = list(keyed.values())
    common = {k: v for k, v in provs[0].items() if all(k in p and p[k] == v for p in provs[1:])} if provs else {}
    return {"inputs_common": common,
            "inputs": {key: {k: v for k, v in prov.items() if k not in common} for key, prov in keyed.items()}}


def concat_tables(paths: Iterable[str | os.PathLike[str]], schema: pa.Schema | None = None) -> pa.Table:
    """Concatenate per-checkpoint tables of one stage into one table (the merge rule's work)."""
    tables = [read_table(p, schema) for p in paths]
    if not tables:
        raise ValueError("nothing to merge: no input tables given")
    if schema is not None:
        tables = [t.select(schema.names).cast(schema) for t in tables]
    merged = pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="default")
    return merged
