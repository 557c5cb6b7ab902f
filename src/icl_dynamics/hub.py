"""Fetch checkpoints from the Hugging Face hub into its local cache, verify them, record provenance.

One call fetches one (model, step): the config, the tokenizer files, and exactly one weights format
(safetensors when the branch has it, else PyTorch ``.bin``; sharded checkpoints with their index). A
branch without ``config.json``, ``tokenizer.json``, ``tokenizer_config.json`` or weights is an error.
Files land in the shared HF cache, whose blobs are content-addressed, so branches that serve
identical weights are stored once. Every file is checked against the hub's own hashes (the LFS
sha256 for weights, the git blob sha1 for small files): online against the metadata the API
returns, offline (``HF_HUB_OFFLINE=1``) against the cache's blob names, which the hub wrote as
those same hashes; every file's hash goes into the provenance row, against which each later stage
checks the cache again (:mod:`icl_dynamics.verify`). Transient hub errors (429 and 5xx), stalls and
transfers slower than a minimum rate are retried with exponential backoff.
Downloads, cache layout, cache scans and eviction are huggingface_hub's; what is ours (the per-file
download loop, the hash check, the ref writer) says why in its docstring, and a test checks it
against the library on the same inputs (``tests/test_network.py``, ``tests/test_hub.py``).
``HF_TOKEN`` is honoured by ``huggingface_hub`` itself and never printed or stored here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from filelock import FileLock
from huggingface_hub import DeleteCacheStrategy, HfApi, constants, hf_hub_download, scan_cache_dir
from huggingface_hub.utils.sha import git_hash

from icl_dynamics.checkpoints import Schedule
from icl_dynamics.checkpoints import revision as step_revision
from icl_dynamics.io import current_umask, sha256_file, write_bytes_atomic
from icl_dynamics.schedules import ScheduleError, parse_branch
from icl_dynamics.schemas import CHECKPOINT_FIELDS
from icl_dynamics.transfer import (  # noqa: F401  (HubUnavailable: what a fetch that ran out of attempts raises)
    DEFAULT_MIN_RATE,
    HubUnavailable,
    download_timeout,
    minimum_rate,
    with_retries,
)

log = logging.getLogger(__name__)

CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# what the loaders cannot do without (special_tokens_map.json is optional: tokenizer_config.json holds the same)
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
# In order of preference; an index file names its shards.
WEIGHT_FORMATS = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)

PROVENANCE_SCHEMA = pa.schema(
    [
        *CHECKPOINT_FIELDS,
        pa.field("revision", pa.string(), nullable=False),
        pa.field("commit", pa.string(), nullable=False),
        pa.field("weights_format", pa.string(), nullable=False),
        pa.field("files", pa.list_(pa.string()), nullable=False),
        pa.field("sizes", pa.list_(pa.int64()), nullable=False),
        pa.field("sha256", pa.list_(pa.string()), nullable=False),
        pa.field("other_files", pa.list_(pa.string()), nullable=False),
        pa.field("other_sizes", pa.list_(pa.int64()), nullable=False),
        pa.field("other_hashes", pa.list_(pa.string()), nullable=False),
        pa.field("weights_digest", pa.string(), nullable=False),
        pa.field("hash_source", pa.string(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("duplicate_of_step", pa.int64()),
        pa.field("suspect", pa.bool_(), nullable=False),
        pa.field("same_weights_as", pa.list_(pa.int64()), nullable=False),
        pa.field("same_weights_in_cache", pa.list_(pa.int64()), nullable=False),
    ]
)
"""One row per checkpoint. ``sha256`` lists each weight file's sha256 (checked); ``other_files`` the
config, tokenizer and index files with their sizes and the hub's hash of each (``other_hashes``: the
git blob sha1, or the sha256 of an LFS file), so a stage can check every file it reads against what
fetch verified. ``weights_digest`` is the sha256 of the weights' hashes, so two steps with equal
digests serve byte-identical weights. ``same_weights_in_cache`` lists the other steps whose branches
in the cache served the same weights when this one was fetched. ``duplicate_of_step``, ``suspect``
and ``same_weights_as`` are filled by :func:`flag_duplicates` when tables are merged."""


class IntegrityError(RuntimeError):
    """A downloaded or cached file does not match the hub's hash for it."""


class CheckpointNotFound(FileNotFoundError):
    """The requested revision or its files are neither on the hub nor in the cache."""


def fetch_command(model_id: str, step: int) -> str:
    """The command that fetches ``model_id`` at ``step`` (for messages that say what to do)."""
    return f"`icl-dynamics fetch --model {model_id} --step {step} --out <provenance.parquet>`"


def weights_digest(hashes: Mapping[str, str]) -> str:
    """sha256 over the weight files' hashes (name -> hash) in name order: equal digests, identical weights."""
    joined = "\n".join(f"{name}:{hashes[name]}" for name in sorted(hashes))
    return hashlib.sha256(joined.encode()).hexdigest()


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
    same_weights_in_cache: list[int] = field(default_factory=list)
    # what this fetch added to the cache (the only things an eviction may take away again): the blobs it
    # downloaded, and whether the step's ref was already there at this commit (another run's or user's)
    downloaded: list[str] = field(default_factory=list)
    was_cached: bool = True

    def record(self) -> dict:
        """What the fetch added to the cache, for the provenance table's metadata (read back by the eviction)."""
        return {"downloaded_blobs": sorted(self.downloaded), "revision_was_cached": self.was_cached}

    @property
    def weights_digest(self) -> str:
        """sha256 over the weight files' sha256s in name order: equal digests, identical weights."""
        return weights_digest({w.name: w.expected for w in self.weights})

    def row(self, tokens: int) -> dict:
        """The provenance row for this checkpoint (see :data:`PROVENANCE_SCHEMA`)."""
        weights = {w.name for w in self.weights}
        others = sorted((f for f in self.files if f.name not in weights), key=lambda f: f.name)
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
            "other_files": [f.name for f in others],
            "other_sizes": [f.size for f in others],
            "other_hashes": [f.expected for f in others],
            "weights_digest": self.weights_digest,
            "hash_source": self.hash_source,
            "seconds": self.seconds,
            "duplicate_of_step": None,
            "suspect": False,
            "same_weights_as": [],
            "same_weights_in_cache": sorted(self.same_weights_in_cache),
        }


# --- hashing -------------------------------------------------------------------------------------


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what the hub reports for non-LFS files)."""
    return git_hash(data)  # huggingface_hub's (what its verify_repo_checksums computes)


def content_hash(path: str | os.PathLike[str], lfs: bool) -> str:
    """The hash the hub states for a file with this content: sha256 for an LFS file, else the git blob sha1."""
    return sha256_file(path) if lfs else git_blob_sha1(Path(path).read_bytes())


def parsed_json(where: str, name: str, path: str | os.PathLike[str]) -> object:
    """The content of a checkpoint's JSON file ``name``; an :class:`IntegrityError` naming it when it does not parse."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{where}: {name} ({path}) is not valid JSON ({exc}); it hashes as the hub (or mirror) "
                             "served it, so the source serves it broken: fetch the checkpoint from a source with a "
                             "valid file") from exc


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


def shard_names(index_path: Path) -> list[str]:
    """The shard files a sharded checkpoint's index names."""
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


def evict_checkpoint(model_id: str, step: int, commit: str, cache_dir: str | os.PathLike[str] | None = None, *,
                     fetched: Mapping | None = None, revision: str | None = None) -> dict:
    """Take out of the HF cache what the fetch of ``model_id`` at ``step`` (at ``commit``) put there, and
    nothing else: the cache may be shared with other runs and users.

    ``fetched`` is the fetch's :meth:`FetchResult.record` (stored in its provenance table's metadata):
    a revision whose ref was already in the cache (``revision_was_cached``) stays whole; otherwise its ref
    goes, its snapshot too unless another ref points at the same commit, and of its blobs only those the
    fetch downloaded (``downloaded_blobs``) that no other cached revision links to. Without a record
    (provenance written before fetches kept one) nothing is deleted. Uses huggingface_hub's cache scan and
    deletion strategy. ``revision``: the step's branch when it is not ``step<N>`` (OLMo). Returns what went:
    the blobs deleted and the bytes freed, and ``kept`` saying why anything stayed."""
    record = {"model": model_id, "step": step, "commit": commit, "deleted_blobs": 0, "freed_bytes": 0, "kept": ""}
    if fetched is None or "downloaded_blobs" not in fetched:
        record["kept"] = "no record of what the fetch downloaded: nothing is deleted (fetch the step again to get one)"
        return record
    if fetched.get("revision_was_cached", True):
        record["kept"] = "the revision was in the cache before this run fetched it"
        return record
    downloaded = set(fetched["downloaded_blobs"])
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
            record["kept"] = "the revision is no longer cached"
            return record
        ref = revision or step_revision(step)
        others = [r for r in cached.refs if r != ref]
        refs = frozenset({repo.repo_path / "refs" / ref}) if ref in cached.refs else frozenset()
        if others:  # another branch (another step, or someone's ref) holds the same commit: only our ref goes
            strategy = DeleteCacheStrategy(expected_freed_size=0, blobs=frozenset(), repos=frozenset(),
                                           snapshots=frozenset(), refs=refs)
            record["kept"] = f"the snapshot is also the cache's {', '.join(sorted(others))}"
        else:
            linked_elsewhere = {f.blob_path for rev in repo.revisions if rev.commit_hash != commit for f in rev.files}
            blobs = {f.blob_path: f.size_on_disk for f in cached.files
                     if f.blob_path not in linked_elsewhere and f.blob_path.name in downloaded}
            strategy = DeleteCacheStrategy(expected_freed_size=sum(blobs.values()), blobs=frozenset(blobs),
                                           repos=frozenset(), snapshots=frozenset({cached.snapshot_path}), refs=refs)
            shared = len({f.blob_path for f in cached.files}) - len(blobs)
            if shared:
                record["kept"] = f"{shared} blob(s) another revision links to or this run did not download"
        strategy.execute()
    return {**record, "deleted_blobs": len(strategy.blobs), "freed_bytes": strategy.expected_freed_size}


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


def cached_snapshot(model_id: str, step: int, cache_dir: str | os.PathLike[str] | None = None,
                    revision: str | None = None) -> tuple[str, Path]:
    """The commit the step's branch names (``refs/step<N>``, or ``revision``: OLMo's names) and its snapshot
    folder, which must exist."""
    rev = revision or step_revision(step)
    commit = cached_commit(model_id, rev, cache_dir)
    snapshot = repo_cache_dir(model_id, cache_dir) / "snapshots" / commit
    if not snapshot.is_dir():
        raise CheckpointNotFound(
            f"{model_id}@{rev}: refs/{rev} points at commit {commit[:12]}, but its snapshot folder {snapshot} is "
            f"missing (deleted?); fetch the step again with network access: {fetch_command(model_id, step)}"
        )
    return commit, snapshot


def missing_required(present: Iterable[str]) -> list[str]:
    """The files of :data:`REQUIRED_FILES` absent from ``present``."""
    names = set(present)
    return [name for name in REQUIRED_FILES if name not in names]


def steps_sharing_weights(model_id: str, step: int, hashes: Mapping[str, str],
                          cache_dir: str | os.PathLike[str] | None = None) -> list[int]:
    """The other steps whose cached branches serve the weight files ``hashes`` (name -> hash): the same
    names linked to the same blobs. A branch pointing at another step's commit shows up here even when
    that step is never measured (fetch records them; :func:`flag_duplicates` reads them)."""
    repo = repo_cache_dir(model_id, cache_dir)
    found = []
    for ref in sorted((repo / "refs").iterdir()) if (repo / "refs").is_dir() else []:
        try:
            branch = parse_branch(ref.name)
        except ScheduleError:  # someone's own ref: not a checkpoint
            continue
        if branch is None or branch.segment != "stage1" or branch.step == step:
            continue
        snapshot = repo / "snapshots" / ref.read_text().strip()
        links = [snapshot / name for name in hashes]
        if all(link.exists() for link in links) and all(link.resolve().name == hashes[link.name] for link in links):
            found.append(branch.step)
    return sorted(set(found))


def _cached_record(model_id: str, commit: str, name: str, cache_dir: str | os.PathLike[str] | None) -> FileRecord:
    path = repo_cache_dir(model_id, cache_dir) / "snapshots" / commit / name
    if not path.exists():
        raise CheckpointNotFound(f"{name} of {model_id}@{commit} is missing from the cache")
    blob = path.resolve()
    expected = blob.name  # the hub's etag: sha256 for LFS files, git sha1 otherwise
    return FileRecord(name, path, blob.stat().st_size, expected, lfs=len(expected) == 64)


def _fetch_offline(model_id: str, step: int, cache_dir: str | os.PathLike[str] | None, rev: str) -> FetchResult:
    commit, snapshot = cached_snapshot(model_id, step, cache_dir, rev)
    present = [p.name for p in snapshot.iterdir()]
    missing = missing_required(present)
    if missing:
        raise CheckpointNotFound(f"{model_id}@{rev}: {', '.join(missing)} missing from the cached snapshot {snapshot} "
                                 f"(a stage cannot load the checkpoint without it); fetch the step again with network "
                                 f"access: {fetch_command(model_id, step)}")
    fmt, single, index = choose_weights(present)
    weight_names = [single] if single else shard_names(snapshot / index)
    others = [n for n in (*CONFIG_FILES, *TOKENIZER_FILES, *([index] if index else [])) if n in present]
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
    missing = missing_required(siblings)
    if missing:
        raise CheckpointNotFound(f"{model_id}@{rev} (commit {str(info.sha)[:12]}) has no {', '.join(missing)} on the "
                                 f"hub (it lists {', '.join(sorted(siblings)) or 'no file'}); the pipeline cannot load "
                                 "a checkpoint without it")
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
    weight_names = [single] if single else shard_names(next(f.path for f in files if f.name == index))
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


def fetch_checkpoint(
    model_id: str,
    step: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    attempts: int = 6,
    timeout: float = 60.0,
    min_rate: float = DEFAULT_MIN_RATE,
    revision: str | None = None,
) -> FetchResult:
    """Make ``model_id`` at ``step`` available in the local cache and verify every file's hash.

    With ``HF_HUB_OFFLINE=1`` nothing is downloaded: the cache must already hold the branch, and
    each file is checked against the hash the hub cache named its blob by. Online, a request that
    sends nothing for ``timeout`` seconds, or brings fewer than ``min_rate`` bytes per second over
    ``timeout`` seconds, counts as failed and is retried like a 5xx. The result also lists the other
    cached steps whose branches serve the same weights (:func:`steps_sharing_weights`). ``revision``: the
    step's branch when it is not ``step<N>`` (:meth:`icl_dynamics.checkpoints.Schedule.revision`).
    """
    start = time.perf_counter()
    rev = revision or step_revision(step)
    if constants.HF_HUB_OFFLINE:  # reads only (nothing is evicted offline): no lock, a read-only cache works
        result = _fetch_offline(model_id, step, cache_dir, rev)
        for record in result.files:
            _verify(record)
    else:
        with repo_lock(model_id, cache_dir), download_timeout(timeout), minimum_rate(min_rate, timeout):
            remove_orphaned_downloads(model_id, cache_dir)
            blobs = repo_cache_dir(model_id, cache_dir) / "blobs"
            before = {p.name for p in blobs.iterdir()} if blobs.is_dir() else set()
            ref = repo_cache_dir(model_id, cache_dir) / "refs" / rev
            ref_before = ref.read_text().strip() if ref.is_file() else None
            result = _fetch_online(model_id, step, cache_dir, attempts, timeout, rev)
            result.downloaded = sorted({w.path.resolve().name for w in result.files} - before)
            result.was_cached = ref_before == result.commit
    for record in result.files:
        if record.name.endswith(".json"):
            parsed_json(f"{model_id}@{result.revision}", record.name, record.path)
    result.same_weights_in_cache = steps_sharing_weights(model_id, step, {w.name: w.expected for w in result.weights},
                                                         cache_dir)
    result.seconds = time.perf_counter() - start
    return result


def flag_duplicates(rows: list[Mapping], schedule: Schedule) -> list[dict]:
    """Flag provenance rows (per model) whose weights are byte-identical to another step's.

    Two failure shapes look alike here and must not be confused. Consecutive checkpoints of
    ``schedule`` serving one set of weights are benign (Pythia's ``step0`` and ``step1``): every step
    after the first of such a run gets ``duplicate_of_step`` (it measures nothing new). Identical
    weights on steps that are *not* consecutive mean a branch serves another step's weights
    (pythia-2.8b's early branches serve late weights, or a ref points at another step's commit), and
    nothing says which step is genuine: all of them become ``suspect``. The steps compared are the
    measured ones and, per row, the cached branches its fetch found serving the same weights
    (``same_weights_in_cache``), so a branch that serves an unmeasured step's weights is suspect too.
    ``same_weights_as`` lists the other measured steps with those weights.
    """
    groups: dict[tuple[str, str], set[int]] = {}
    for row in rows:
        group = groups.setdefault((row["model"], row["weights_digest"]), set())
        group.update([row["step"], *(row.get("same_weights_in_cache") or [])])
    measured: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        measured.setdefault((row["model"], row["weights_digest"]), []).append(row["step"])
    out = []
    for row in sorted(rows, key=lambda r: (r["model"], r["step"])):
        key = (row["model"], row["weights_digest"])
        steps = sorted(groups[key])
        positions = [schedule.steps.index(schedule.check(s)) for s in steps]
        consecutive = positions == list(range(positions[0], positions[0] + len(positions)))
        first_measured = min(measured[key])  # a benign run's steps measure nothing new after its first measured one
        duplicate_of = first_measured if consecutive and row["step"] != first_measured else None
        out.append({**row, "duplicate_of_step": duplicate_of, "suspect": not consecutive,
                    "same_weights_as": [s for s in sorted(measured[key]) if s != row["step"]]})
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


def fetch(model_id: str, step: int, *, cache_dir: str | os.PathLike[str] | None = None, schedule: str = "pythia",
          attempts: int = 6, timeout: float = 60.0) -> dict:
    """The Python API's fetch (``icl_dynamics.fetch``): what ``icl-dynamics fetch`` does, without the file.

    Puts ``model_id`` at ``step`` into the cache through :func:`fetch_checkpoint` (every file checked
    against the hub's hash; offline, against the cache's) and returns the provenance row the fetch stage
    writes (:data:`PROVENANCE_SCHEMA`), which ``load_checkpoint(..., fetched=row)`` checks the weights
    against before loading them. ``schedule`` (``pythia``, ``toy``, ``toy-relations``) gives the tokens seen.
    """
    from icl_dynamics.config import schedule_named
    from icl_dynamics.toyzoo import TOY_SEED

    grid = schedule_named(schedule, TOY_SEED)
    grid.check(step)
    result = fetch_checkpoint(model_id, step, cache_dir=cache_dir, attempts=attempts, timeout=timeout)
    return result.row(grid.tokens(step))
