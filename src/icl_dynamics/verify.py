"""Verify a cached checkpoint before a stage reads it: every file, against fetch's record or the hub's hashes.

A score depends on every file ``from_pretrained`` reads from the checkpoint's snapshot: the weights,
``config.json`` (a changed ``layer_norm_eps`` changes every number; a raised ``max_position_embeddings``
lets inputs past the model's context through) and the tokenizer files (rotated ids change every task
prompt). So before a stage loads anything, every file in the snapshot is hashed and compared with

* the fetch stage's record (its provenance row: the commit, and each file's name, size and hub hash),
  when the job has one (``--provenance``; the workflow always passes it): a recorded file must link to
  the recorded blob and hash to it; and otherwise, and for files the record does not list,
* the hub's own hash, by which the hub cache names each blob (huggingface_hub stores a download under
  its ETag: the sha256 of an LFS file, the git blob sha1 of a regular one). A snapshot entry that is
  not such a blob (a copied file, a cache another tool wrote) cannot be checked and is refused, with
  the command that fetches it properly.

The snapshot must hold the required files, every JSON file must parse, and the weights format
transformers picks from the snapshot must be the one fetch recorded (else it would load files nobody
verified). :func:`check_dtypes` checks every tensor's dtype against the config (transformers casts a
tensor stored as int32 silently). Hashing reads every byte once, about a second per GB.

Why ours, not huggingface_hub's ``verify_repo_checksums``: it lists the repository on the hub (no
offline use) and knows nothing of the fetch record; the hash it computes is the same
(:func:`icl_dynamics.hub.content_hash`, tested against it in ``tests/test_network.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icl_dynamics import hub
from icl_dynamics.hub import CheckpointNotFound, IntegrityError, fetch_command
from icl_dynamics.schedules import cached_branch

HUB_HASH = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a git blob sha1, or an LFS file's sha256
# safetensors' dtype names -> torch's
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I8": "int8",
                      "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool"}
FLOATS = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Verified:
    """What :func:`verify_checkpoint` checked: the snapshot, its files' hashes and the parsed config."""

    model_id: str
    step: int
    commit: str
    snapshot: Path
    weights_format: str
    weights: dict[str, str]  # weight file -> its verified hash
    files: dict[str, str]  # every other file of the snapshot -> its verified hash
    against: str  # "fetch record" or "hub cache": what the hashes were compared with
    config: dict[str, Any]
    revision: str  # the step's branch (``step<N>``; OLMo's ``[stage1-]step<N>-tokens<M>B``)

    @property
    def where(self) -> str:
        return f"{self.model_id}@{self.revision}"

    @property
    def weights_digest(self) -> str:
        """The provenance row's ``weights_digest`` of these weights (equal digests: identical weights)."""
        return hub.weights_digest(self.weights)

    def record(self) -> dict[str, Any]:
        """What a table's provenance keeps of the verification (``checkpoint`` entry)."""
        return {"commit": self.commit, "weights_format": self.weights_format,
                "weights_digest": self.weights_digest, "verified_against": self.against}


def _recorded(fetched: Mapping, where: str) -> dict[str, tuple[int, str]]:
    """name -> (size, hash) of every file the fetch record lists."""
    if "other_files" not in fetched:
        raise IntegrityError(f"{where}: the fetch record lists the weights only (written by an older icl-dynamics): "
                             "run the fetch again to record every file (delete the step's provenance.parquet and "
                             "rerun snakemake, or icl-dynamics fetch)")
    recorded = dict(zip(fetched["files"], zip(fetched["sizes"], fetched["sha256"])))
    recorded.update(zip(fetched["other_files"], zip(fetched["other_sizes"], fetched["other_hashes"])))
    return recorded


def _checked_hash(where: str, name: str, path: Path, recorded: tuple[int, str] | None, refetch: str) -> str:
    """The hash of snapshot file ``name``, checked against ``recorded`` (size, hash) or its blob name."""
    blob = path.resolve()
    named = blob.name if blob.parent.name == "blobs" and HUB_HASH.fullmatch(blob.name) else None
    if not blob.exists():
        raise CheckpointNotFound(f"{where}: {name} ({path}) links to a blob that is missing; fetch the step again: "
                                 f"{refetch}")
    if recorded is not None:
        size, expected = recorded
        source = "the fetch record"
        problem = (f"links to blob {named[:12]}, not the verified {expected[:12]}" if named and named != expected
                   else f"has {blob.stat().st_size} bytes, not the verified {size}" if blob.stat().st_size != size
                   else "")
        if problem:
            raise IntegrityError(f"{where}: {name} ({path}) {problem}; the cache changed after the fetch: delete the "
                                 f"blob and fetch the step again: {refetch}")
    elif named is None:
        raise IntegrityError(f"{where}: {name} ({path}) is not a blob of the hub cache (a file named by its hub hash), "
                             f"so nothing can check it; fetch the checkpoint into a hub cache: {refetch}")
    else:
        expected, source = named, "the hub (the cache's blob name)"
    got = hub.content_hash(blob, lfs=len(expected) == 64)
    if got != expected:
        raise IntegrityError(f"{where}: {name} at {path} has hash {got}, but {source} says {expected}: the file "
                             f"changed after it was downloaded; delete the blob {blob} and fetch the step again: "
                             f"{refetch}")
    return expected


def verify_checkpoint(model_id: str, step: int, cache_dir: str | os.PathLike[str] | None = None,
                      fetched: Mapping | None = None, *, weights: bool = True, revision: str | None = None) -> Verified:
    """Check every file of ``model_id`` at ``step`` in the cache before a stage reads it (module docstring).

    ``fetched`` is the fetch stage's provenance row; without it the files are checked against the hub
    hashes the cache names its blobs by. ``weights=False`` leaves the weight files unhashed (a
    tokenizer load never reads them). Raises :class:`~icl_dynamics.hub.IntegrityError` naming the
    file and what to do, or :class:`~icl_dynamics.hub.CheckpointNotFound` (fetch again) when files are
    missing. ``revision``: the step's branch (default: the one ``fetched`` records, else the cached branch
    that names ``step``: :func:`icl_dynamics.schedules.cached_branch`).
    """
    rev = revision or (fetched or {}).get("revision") or cached_branch(model_id, step, cache_dir)
    where, refetch = f"{model_id}@{rev}", fetch_command(model_id, step)
    recorded = _recorded(fetched, where) if fetched is not None else {}
    commit, snapshot = hub.cached_snapshot(model_id, step, cache_dir, rev)
    if fetched is not None and commit != fetched["commit"]:
        raise IntegrityError(f"{where}: the cache's {rev} points at commit {commit[:12]}, but the fetch stage "
                             f"verified {str(fetched['commit'])[:12]}; fetch the step again: {refetch}")
    present = {p.relative_to(snapshot).as_posix(): p for p in sorted(snapshot.rglob("*")) if not p.is_dir()}
    missing = hub.missing_required(present) + [name for name in recorded if name not in present]
    if missing:
        raise CheckpointNotFound(f"{where}: {', '.join(missing)} missing from the cached snapshot {snapshot}; fetch "
                                 f"the step again: {refetch}")
    fmt, single, index = hub.choose_weights(present)
    names = [single] if single else hub.shard_names(snapshot / index)
    if fetched is not None and (fmt != fetched["weights_format"] or sorted(names) != sorted(fetched["files"])):
        raise IntegrityError(f"{where}: the snapshot {snapshot} serves {fmt} weights ({', '.join(names)}), but the "
                             f"fetch recorded {fetched['weights_format']} ({', '.join(fetched['files'])}); transformers "
                             "would load files nobody verified: remove the files another tool added to the snapshot, "
                             f"or fetch the step again: {refetch}")
    absent = [name for name in names if name not in present]
    if absent:
        raise CheckpointNotFound(f"{where}: weight file(s) {', '.join(absent)} missing from the cached snapshot "
                                 f"{snapshot}; fetch the step again: {refetch}")
    hashes = {name: _checked_hash(where, name, path, recorded.get(name), refetch)
              for name, path in present.items() if weights or name not in names}
    for name, path in present.items():
        if name.endswith(".json"):
            hub.parsed_json(where, name, path)
    config = hub.parsed_json(where, "config.json", present["config.json"])
    if not isinstance(config, dict):
        raise IntegrityError(f"{where}: config.json ({present['config.json']}) is not a JSON object; fetch the "
                             "checkpoint from a source with a valid file")
    return Verified(model_id, step, commit, snapshot, fmt, {n: hashes[n] for n in names if n in hashes},
                    {n: h for n, h in hashes.items() if n not in names},
                    "fetch record" if fetched is not None else "hub cache", config, rev)


def tensor_dtypes(path: str | os.PathLike[str]) -> dict[str, str]:
    """Each tensor's dtype (torch's name) in a weights file, read without loading the data (safetensors'
    header, or a memory-mapped ``torch.load`` with ``weights_only``)."""
    path = Path(path)
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {key: SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), f.get_slice(key).get_dtype().lower())
                    for key in f.keys()}
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (pre-zip) file cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: str(value.dtype).removeprefix("torch.") for key, value in state.items()
            if isinstance(value, torch.Tensor)}


def check_dtypes(verified: Verified, ignore: Sequence[str] = ()) -> None:
    """Refuse weight tensors whose dtype is not the config's (``dtype``, or ``torch_dtype`` as older
    transformers write it; without one, every tensor must be floating point and of one dtype).

    Boolean tensors (causal masks) and names matching ``ignore`` (regular expressions of the file keys
    the model never loads: :func:`icl_dynamics.models.load_checkpoint` passes the model class's own list
    and its recomputed buffers) are not checked.
    """
    expected = verified.config.get("dtype") or verified.config.get("torch_dtype")
    dtypes: dict[str, str] = {}
    for name in verified.weights:
        dtypes.update(tensor_dtypes(verified.snapshot / name))
    checked = {key: dtype for key, dtype in dtypes.items()
               if dtype != "bool" and not any(re.search(pattern, key) for pattern in ignore)}
    if expected:
        bad = {key: dtype for key, dtype in checked.items() if dtype != expected}
        want = f"config.json's dtype {expected}"
    else:
        floats = sorted({dtype for dtype in checked.values() if dtype in FLOATS})
        bad = {key: dtype for key, dtype in checked.items() if dtype not in floats[:1]}
        want = "one floating-point dtype (config.json names none)" if len(floats) <= 1 else f"one dtype, not {floats}"
    if bad:
        listed = ", ".join(f"{key} ({dtype})" for key, dtype in sorted(bad.items())[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise IntegrityError(f"{verified.where}: the weights store {listed}{more}, not {want}; transformers would "
                             "cast them silently, so these are not the published weights: fetch the checkpoint from "
                             "a source that serves them")
