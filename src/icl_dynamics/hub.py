"""Fetch checkpoints from the Hugging Face hub into its local cache, verify them, record provenance.

One call fetches one (model, step): the config, the tokenizer files, and exactly one weights format
(safetensors when the branch has it, else PyTorch ``.bin``; sharded checkpoints with their index).
Files land in the shared HF cache, whose blobs are content-addressed, so branches that serve
identical weights are stored once. Every file is checked against the hub's own hashes (the LFS
sha256 for weights, the git blob sha1 for small files): online against the metadata the API
returns, offline (``HF_HUB_OFFLINE=1``) against the cache's blob names, which the hub wrote as
those same hashes. Transient hub errors (429 and 5xx) are retried with exponential backoff.
Downloads, cache layout, cache scans and eviction are huggingface_hub's; what is ours (the per-file
download loop, the hash check, the ref writer) says why in its docstring, and a test checks it
against the library on the same inputs (``tests/test_network.py``, ``tests/test_hub.py``).
``HF_TOKEN`` is honoured by ``huggingface_hub`` itself and never printed or stored here.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
from filelock import FileLock
from huggingface_hub import DeleteCacheStrategy, HfApi, constants, hf_hub_download, scan_cache_dir
from huggingface_hub.utils.sha import git_hash

from icl_dynamics.checkpoints import Schedule
from icl_dynamics.checkpoints import revision as step_revision
from icl_dynamics.io import current_umask, sha256_file, write_bytes_atomic
from icl_dynamics.schemas import CHECKPOINT_FIELDS

log = logging.getLogger(__name__)
T = TypeVar("T")

CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# In order of preference; an index file names its shards.
WEIGHT_FORMATS = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

PROVENANCE_SCHEMA = pa.schema(
    [
        *CHECKPOINT_FIELDS,
        pa.field("revision", pa.string(), nullable=False),
        pa.field("commit", pa.string(), nullable=False),
        pa.field("weights_format", pa.string(), nullable=False),
        pa.field("files", pa.list_(pa.string()), nullable=False),
        pa.field("sizes", pa.list_(pa.int64()), nullable=False),
        pa.field("sha256", pa.list_(pa.string()), nullable=False),
        pa.field("weights_digest", pa.string(), nullable=False),
        pa.field("hash_source", pa.string(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("duplicate_of_step", pa.int64()),
        pa.field("suspect", pa.bool_(), nullable=False),
        pa.field("same_weights_as", pa.list_(pa.int64()), nullable=False),
    ]
)
"""One row per checkpoint. ``sha256`` lists each weight file's sha256 (checked); ``weights_digest`` is
the sha256 of those, so two steps with equal digests serve byte-identical weights.
``duplicate_of_step``, ``suspect`` and ``same_weights_as`` are filled by :func:`flag_duplicates`
when tables are merged."""


class IntegrityError(RuntimeError):
    """A downloaded or cached file does not match the hub's hash for it."""


class CheckpointNotFound(FileNotFoundError):
    """The requested revision or its files are neither on the hub nor in the cache."""


@dataclass
class FileRecord:
    """One file of a checkpoint as it sits in the cache, with its verified hash."""

    name: str
    path: Path
    size: int
    expected: str  # sha256 for LFS files, git blob sha1 otherwise
    lfs: bool


@dataclass
class FetchResult:
    """What :func:`fetch_checkpoint` put in the cache and checked."""

    model_id: str
    step: int
    revision: str
    commit: str
    weights_format: str
    files: list[FileRecord]
    hash_source: str
    seconds: float = 0.0
    weights: list[FileRecord] = field(default_factory=list)

    @property
    def weights_digest(self) -> str:
        """sha256 over the weight files' sha256s in name order: equal digests, identical weights."""
        joined = "\n".join(f"{w.name}:{w.expected}" for w in sorted(self.weights, key=lambda w: w.name))
        return hashlib.sha256(joined.encode()).hexdigest()

    def row(self, tokens: int) -> dict:
        """The provenance row for this checkpoint (see :data:`PROVENANCE_SCHEMA`)."""
        return {
            "model": self.model_id,
            "step": self.step,
            "tokens": tokens,
            "revision": self.revision,
            "commit": self.commit,
            "weights_format": self.weights_format,
            "files": [w.name for w in self.weights],
            "sizes": [w.size for w in self.weights],
            "sha256": [w.expected for w in self.weights],
            "weights_digest": self.weights_digest,
            "hash_source": self.hash_source,
            "seconds": self.seconds,
            "duplicate_of_step": None,
            "suspect": False,
            "same_weights_as": [],
        }


# --- hashing -------------------------------------------------------------------------------------


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what the hub reports for non-LFS files)."""
    return git_hash(data)  # huggingface_hub's (what its verify_repo_checksums computes)


def content_hash(path: str | os.PathLike[str], lfs: bool) -> str:
    """The hash the hub states for a file with this content: sha256 for an LFS file, else the git blob sha1."""
    return sha256_file(path) if lfs else git_blob_sha1(Path(path).read_bytes())


def _verify(record: FileRecord) -> None:
    """Raise :class:`IntegrityError` unless ``record``'s file hashes to ``record.expected``.

    Why ours, not HfApi.verify_repo_checksums: it lists the tree again, with no timeout, and cannot run offline.
    """
    got = content_hash(record.path, record.lfs)
    if got != record.expected:
        raise IntegrityError(
            f"{record.name} at {record.path} has hash {got}, but the hub says {record.expected}; "
            "delete it from the cache and fetch again"
        )


# --- retries -------------------------------------------------------------------------------------


class HubUnavailable(OSError):
    """A hub request kept failing with transient errors until the attempts ran out."""


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures (refused, reset, truncated body, timeout) of the HTTP client the
    installed huggingface_hub uses (httpx2 from version 2, httpx before) and of the stdlib."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _transient(exc: BaseException) -> bool:
    """Worth retrying: HTTP 429/5xx, or a transport error (not in offline mode), here or in its cause
    chain (huggingface_hub wraps a failed metadata request in LocalEntryNotFoundError). The first
    HTTP status met decides (a 404 wrapped the same way is not transient)."""
    transport = _transport_errors()
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        status = _status(seen)
        if status is not None:
            return status in RETRY_STATUS
        if isinstance(seen, transport):
            return not constants.HF_HUB_OFFLINE
        seen = seen.__cause__ or seen.__context__
    return False


def with_retries(
    call: Callable[[], T],
    *,
    attempts: int = 6,
    backoff: float = 2.0,
    sleep: Callable[[float], None] | None = None,
    what: str = "hub request",
) -> T:
    """Run ``call``, retrying on HTTP 429/5xx and connection errors (refused, reset, truncated, timed
    out) with exponential backoff + jitter, or the server's Retry-After. When the attempts run out,
    raises :class:`HubUnavailable` naming ``what`` and the last error; other errors pass through."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - filtered just below
            if not _transient(exc):
                raise
            status = _status(exc)
            if attempt == attempts - 1:
                last = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise HubUnavailable(f"{what} failed {attempts} times; last error: {type(exc).__name__}: {last}") \
                    from exc
            retry_after = getattr(getattr(exc, "response", None), "headers", {}).get("retry-after")
            delay = float(retry_after) if retry_after and str(retry_after).isdigit() else backoff * 2**attempt
            delay *= 1 + 0.25 * random.random()
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, status or type(exc).__name__,
                        attempt + 1, attempts - 1, delay)
            (sleep or time.sleep)(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --- choosing files ------------------------------------------------------------------------------


def choose_weights(available: Iterable[str]) -> tuple[str, str | None, str | None]:
    """Pick one weights format from a branch's file list: (format, single file, index file)."""
    names = set(available)
    for fmt, single, index in WEIGHT_FORMATS:
        if index in names:
            return fmt, None, index
        if single in names:
            return fmt, single, None
    raise CheckpointNotFound(f"no weights file ({', '.join(w[1] for w in WEIGHT_FORMATS)}, or an index) in {sorted(names)}")


def _shards(index_path: Path) -> list[str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"weights index {index_path} is malformed: {exc}") from exc
    return sorted(set(weight_map.values()))


# --- the cache -----------------------------------------------------------------------------------


def repo_cache_dir(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the hub cache keeps ``model_id`` (``<cache>/models--org--name``)."""
    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    return root / ("models--" + model_id.replace("/", "--"))


def repo_lock(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> FileLock:
    """The lock fetching and evicting hold on ``model_id``'s cache: an eviction deletes blobs no other
    cached revision links to, so it must not run while a fetch is linking its snapshot to them
    (revisions share the tokenizer and config blobs, and identical weights)."""
    folder = repo_cache_dir(model_id, cache_dir)
    path = folder.parent / ".locks" / folder.name / "icl-dynamics.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def evict_checkpoint(model_id: str, step: int, commit: str, cache_dir: str | os.PathLike[str] | None = None,
                     revision: str | None = None) -> dict:
    """Remove ``model_id`` at ``step`` (its snapshot at ``commit``, its ref, and every blob no other
    cached revision links to) from the HF cache with huggingface_hub's cache API. When another step's
    branch points at the same commit, only this step's ref goes. Returns what went: the blobs deleted
    and the bytes freed (nothing when the revision is no longer cached). ``revision``: the step's branch when it
    is not ``step<N>`` (OLMo)."""
    with repo_lock(model_id, cache_dir):
        cache = scan_cache_dir(cache_dir)
        folder = repo_cache_dir(model_id, cache_dir)
        damaged = [w for w in cache.warnings if str(folder) in str(w)]
        if damaged:  # huggingface_hub leaves such a repository out of the scan: evicting would do nothing
            raise IntegrityError(f"cannot evict {model_id}@step{step}: the cache scan refused {folder} ({damaged[0]}); "
                                 "repair or delete that folder")
        repo = next((r for r in cache.repos if r.repo_type == "model" and r.repo_id.lower() == model_id.lower()), None)
        cached = next((rev for rev in repo.revisions if rev.commit_hash == commit), None) if repo else None
        if cached is None:
            return {"model": model_id, "step": step, "commit": commit, "deleted_blobs": 0, "freed_bytes": 0}
        ref = revision or step_revision(step)
        if any(other != ref and other != "main" for other in cached.refs):  # another step's branch: keep the files
            strategy = DeleteCacheStrategy(expected_freed_size=0, blobs=frozenset(), repos=frozenset(),
                                           snapshots=frozenset(), refs=frozenset({repo.repo_path / "refs" / ref}))
        else:
            strategy = cache.delete_revisions(commit)
        # the last revision of a repository takes the whole repository (its blobs are not listed one by one)
        deleted = len(strategy.blobs) + sum(len(list((path / "blobs").glob("*"))) for path in strategy.repos)
        strategy.execute()
    return {"model": model_id, "step": step, "commit": commit, "deleted_blobs": deleted,
            "freed_bytes": strategy.expected_freed_size}


def remove_orphaned_downloads(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Delete the partial downloads (``blobs/*.incomplete``, found by huggingface_hub's cache scan) a
    killed fetch of ``model_id`` left; return the bytes freed. Call with :func:`repo_lock` held: no
    other fetch of the repository is then running, so every such file is an orphan (huggingface_hub
    names them per process and never reuses or removes one left by a dead process)."""
    folder = repo_cache_dir(model_id, cache_dir)
    if not folder.is_dir():
        return 0
    # huggingface_hub 1.3 (our oldest) has no incomplete_files: it names a partial download by its etag, resumes it
    partial = getattr(scan_cache_dir(folder.parent), "incomplete_files", frozenset())
    orphans = [f for f in partial if f.file_path.parent.parent == folder]
    for orphan in orphans:
        orphan.file_path.unlink(missing_ok=True)
    freed = sum(f.size_on_disk for f in orphans)
    if orphans:
        log.info("removed %d partial download(s) of %s (%d bytes) left by a killed fetch", len(orphans), model_id, freed)
    return freed


def cached_commit(model_id: str, revision: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The commit a branch points to in the local cache (``refs/<revision>``)."""
    ref = repo_cache_dir(model_id, cache_dir) / "refs" / revision
    if not ref.is_file():
        raise CheckpointNotFound(
            f"{model_id}@{revision} is not in the cache {repo_cache_dir(model_id, cache_dir).parent}; "
            "fetch it with network access (unset HF_HUB_OFFLINE) or point hf_cache at a seeded cache"
        )
    return ref.read_text().strip()


def _cached_record(model_id: str, commit: str, name: str, cache_dir: str | os.PathLike[str] | None) -> FileRecord:
    path = repo_cache_dir(model_id, cache_dir) / "snapshots" / commit / name
    if not path.exists():
        raise CheckpointNotFound(f"{name} of {model_id}@{commit} is missing from the cache")
    blob = path.resolve()
    expected = blob.name  # the hub's etag: sha256 for LFS files, git sha1 otherwise
    return FileRecord(name, path, blob.stat().st_size, expected, lfs=len(expected) == 64)


def verify_fetched(model_id: str, step: int, fetched: Mapping, cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Check that the cache still serves what the fetch stage verified for ``step`` (``fetched``: its
    provenance row), before a stage loads it: the revision's commit, and per weight file the blob
    the snapshot links to (its hash name, so a link to another step's blob is caught), its size
    and its content's sha256 (so flipped bytes are caught; one streamed read, seconds for 1.4b).
    Raises :class:`IntegrityError` naming the file."""
    rev = fetched.get("revision") or step_revision(step)
    where = f"{model_id}@{rev}"
    commit = cached_commit(model_id, rev, cache_dir)
    if commit != fetched["commit"]:
        raise IntegrityError(f"{where}: the cache's {rev} points at commit {commit[:12]}, but the fetch stage "
                             f"verified {str(fetched['commit'])[:12]}; fetch the step again")
    for name, size, sha in zip(fetched["files"], fetched["sizes"], fetched["sha256"]):
        record = _cached_record(model_id, commit, name, cache_dir)
        problem = (f"links to blob {record.expected[:12]}, not the verified {sha[:12]}" if record.expected != sha
                   else f"has {record.size} bytes, not the verified {size}" if record.size != size else "")
        if problem:
            raise IntegrityError(f"{where}: weight file {name} ({record.path}) {problem}; the cache is corrupt: "
                                 f"delete the blob and fetch the step again")
        _verify(record)  # its blob is the verified one: the content must still hash to that name


def _fetch_offline(model_id: str, step: int, cache_dir: str | os.PathLike[str] | None, rev: str) -> FetchResult:
    commit = cached_commit(model_id, rev, cache_dir)
    snapshot = repo_cache_dir(model_id, cache_dir) / "snapshots" / commit
    present = [p.name for p in snapshot.iterdir()] if snapshot.is_dir() else []
    fmt, single, index = choose_weights(present)
    weight_names = [single] if single else _shards(snapshot / index)
    others = [n for n in (*CONFIG_FILES, *TOKENIZER_FILES, *([index] if index else [])) if n in present]
    if "config.json" not in others:
        raise CheckpointNotFound(f"config.json of {model_id}@{rev} is missing from the cache")
    files = [_cached_record(model_id, commit, n, cache_dir) for n in others]
    weights = [_cached_record(model_id, commit, n, cache_dir) for n in weight_names]
    return FetchResult(model_id, step, rev, commit, fmt, files + weights, "cache-etag", weights=weights)


def _fetch_online(model_id: str, step: int, cache_dir: str | os.PathLike[str] | None, attempts: int,
                  timeout: float, rev: str) -> FetchResult:
    """List ``model_id`` at ``step``, download the chosen files one by one with :func:`hf_hub_download`, check
    each one's hash as it lands, and write the ref last.

    Why ours, not snapshot_download: it lists with no timeout, checks no hash, writes the ref before any file lands.
    """
    api = HfApi()
    info = with_retries(lambda: api.model_info(model_id, revision=rev, files_metadata=True, timeout=timeout),
                        attempts=attempts, what=f"listing {model_id}@{rev}")
    siblings = {s.rfilename: s for s in info.siblings or []}
    fmt, single, index = choose_weights(siblings)

    def download(name: str) -> FileRecord:
        sib = siblings.get(name)
        if sib is None:
            raise CheckpointNotFound(f"{name} is listed by the index but absent from {model_id}@{rev}")
        lfs = sib.lfs is not None
        expected = sib.lfs.sha256 if lfs else sib.blob_id
        for tries in (1, 2):  # a blob that fails its hash is deleted and fetched once more
            # Download by commit so every file comes from the same tree even if the branch moves.
            path = Path(with_retries(
                lambda: hf_hub_download(model_id, name, revision=info.sha, cache_dir=cache_dir, etag_timeout=timeout),
                attempts=attempts, what=f"downloading {name} of {model_id}@{rev}"))
            record = FileRecord(name, path, path.stat().st_size, expected, lfs)
            try:
                _verify(record)
                return record
            except IntegrityError:
                if tries == 2:
                    raise
                log.warning("%s of %s@%s failed its hash check; deleting the blob and fetching it again", name,
                            model_id, rev)
                path.resolve().unlink(missing_ok=True)
                path.unlink(missing_ok=True)
        raise AssertionError("unreachable")  # pragma: no cover

    others = [n for n in (*CONFIG_FILES, *TOKENIZER_FILES, *([index] if index else [])) if n in siblings]
    files = [download(n) for n in others]
    weight_names = [single] if single else _shards(next(f.path for f in files if f.name == index))
    weights = [download(n) for n in weight_names]
    _write_ref(model_id, rev, info.sha, cache_dir)
    return FetchResult(model_id, step, rev, info.sha, fmt, files + weights, "hub-api", weights=weights)


def _write_ref(model_id: str, revision: str, commit: str, cache_dir: str | os.PathLike[str] | None) -> None:
    """Point ``refs/<revision>`` at ``commit`` atomically: a kill leaves the old ref or the new one, no other file.

    Why ours, not huggingface_hub's (private) writer: 1.3's truncates in place, 2.x's puts its temp file in refs/.
    """
    repo = repo_cache_dir(model_id, cache_dir)
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file lies beside refs/, not in it: scan_cache_dir reads every file in refs/ as a ref, so an
    # empty one left by a kill would make it refuse the whole repository (and evict_checkpoint with it).
    prefix = f".ref-{revision.replace('/', '--')}."
    for stale in [p for p in repo.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]:
        stale.unlink(missing_ok=True)  # left by a killed writer
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=repo)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(commit.encode())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, ref)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _download_timeout(seconds: float) -> Iterator[None]:
    """huggingface_hub reads its download read-timeout (HF_HUB_DOWNLOAD_TIMEOUT) from ``constants``
    on each download; set it for the fetch and put the user's value back after."""
    previous = constants.HF_HUB_DOWNLOAD_TIMEOUT
    constants.HF_HUB_DOWNLOAD_TIMEOUT = seconds
    try:
        yield
    finally:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = previous


def fetch_checkpoint(
    model_id: str,
    step: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    attempts: int = 6,
    timeout: float = 60.0,
    revision: str | None = None,
) -> FetchResult:
    """Make ``model_id`` at ``step`` available in the local cache and verify every file's hash.

    With ``HF_HUB_OFFLINE=1`` nothing is downloaded: the cache must already hold the branch, and
    each file is checked against the hash the hub cache named its blob by. Online, a request that
    sends nothing for ``timeout`` seconds counts as failed and is retried like a 5xx. ``revision``: the step's
    branch when it is not ``step<N>`` (:meth:`icl_dynamics.checkpoints.Schedule.revision`).
    """
    start = time.perf_counter()
    rev = revision or step_revision(step)
    if constants.HF_HUB_OFFLINE:  # reads only (nothing is evicted offline): no lock, a read-only cache works
        result = _fetch_offline(model_id, step, cache_dir, rev)
        for record in result.files:
            _verify(record)
    else:
        with repo_lock(model_id, cache_dir), _download_timeout(timeout):
            remove_orphaned_downloads(model_id, cache_dir)
            result = _fetch_online(model_id, step, cache_dir, attempts, timeout, rev)
    result.seconds = time.perf_counter() - start
    return result


def flag_duplicates(rows: list[Mapping], schedule: Schedule) -> list[dict]:
    """Flag provenance rows (per model) whose weights are byte-identical to another measured step's.

    Two failure shapes look alike here and must not be confused. Consecutive checkpoints of
    ``schedule`` serving one set of weights are benign (Pythia's ``step0`` and ``step1``): every step
    after the first of such a run gets ``duplicate_of_step`` (it measures nothing new). Identical
    weights on steps that are *not* consecutive mean a branch serves another step's weights
    (pythia-2.8b's early branches serve late weights), and nothing says which step is genuine: all of
    them become ``suspect``. ``same_weights_as`` lists the other steps with those weights.
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["weights_digest"]), []).append(row["step"])
    out = []
    for row in sorted(rows, key=lambda r: (r["model"], r["step"])):
        steps = sorted(groups[(row["model"], row["weights_digest"])])
        positions = [schedule.steps.index(schedule.check(s)) for s in steps]
        consecutive = positions == list(range(positions[0], positions[0] + len(positions)))
        duplicate_of = steps[0] if consecutive and row["step"] != steps[0] else None
        out.append({**row, "duplicate_of_step": duplicate_of, "suspect": not consecutive,
                    "same_weights_as": [s for s in steps if s != row["step"]]})
    return out


def write_snapshot(
    cache_dir: str | os.PathLike[str],
    model_id: str,
    revisions: Iterable[str],
    files: Mapping[str, bytes],
    lfs: Iterable[str] = (),
) -> str:
    """Lay ``files`` out in ``cache_dir`` exactly as the hub cache would after downloading them.

    Blobs are named by their hub hash (sha256 for ``lfs`` files, git sha1 otherwise), snapshots link
    to them relatively, and each of ``revisions`` gets a ``refs/`` entry pointing at a commit id
    derived from the file hashes. Returns that commit id. Used to build the toy zoo and test caches.
    """
    lfs = set(lfs)
    repo = repo_cache_dir(model_id, cache_dir)
    hashes = {name: (hashlib.sha256(data).hexdigest() if name in lfs else git_blob_sha1(data))
              for name, data in files.items()}
    tree = "\n".join(f"{name} {hashes[name]}" for name in sorted(files))
    commit = git_blob_sha1(tree.encode())
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashes[name]
        if not blob.exists():
            write_bytes_atomic(blob, data)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    for rev in revisions:
        _write_ref(model_id, rev, commit, cache_dir)
    return commit
