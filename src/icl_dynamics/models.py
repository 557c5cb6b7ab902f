"""Load a checkpoint (model and tokenizer) from the local Hugging Face cache onto a device.

Scoring jobs never reach the network: the fetch stage has already put the checkpoint into the
cache, and everything here loads with ``local_files_only=True`` through the same code path a real
Pythia checkpoint takes (``from_pretrained(repo_id, revision="step<N>")``).
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from icl_dynamics.architecture import architecture
from icl_dynamics.checkpoints import revision
from icl_dynamics.hub import IntegrityError, cached_commit, repo_cache_dir, verify_fetched
from icl_dynamics.schedules import cached_branch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    With several GPUs visible (one machine, ``snakemake --resources gpu=N``), ``auto`` and ``cuda``
    take a GPU no other icl-dynamics process on the machine holds (:func:`claim_gpu`), so concurrent
    jobs spread over the devices; ``cuda:N`` is used as given. Under SLURM each job sees only its own.
    """
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no GPU; use device: auto or cpu")
    if device in ("auto", "cuda"):
        count = torch.cuda.device_count()
        return torch.device(f"cuda:{claim_gpu([_gpu_name(i) for i in range(count)])}" if count > 1 else "cuda")
    return torch.device(device)


_CLAIMED: list[FileLock] = []  # the GPU this process holds, until it exits


def _gpu_name(index: int) -> str:
    """A name for GPU ``index`` that is the same in every process (its UUID where torch reports one)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"gpu-{uuid}" if uuid is not None else f"gpu{index}"


def claim_gpu(names: Sequence[str], lock_dir: str | Path | None = None, *, timeout: float | None = None,
              poll: float = 1.0) -> int:
    """The index in ``names`` of the first GPU whose lock file no other process holds; the lock stays
    with this process. When every GPU is held, waits (up to ``timeout`` seconds, None: for ever)."""
    # per user: another user's jobs are another run, and their lock files would not be writable
    root = Path(lock_dir) if lock_dir is not None else Path(tempfile.gettempdir()) / f"icl-dynamics-gpus-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = False
    while True:
        for index, name in enumerate(names):
            lock = FileLock(root / f"{name}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            _CLAIMED.append(lock)
            return index
        if deadline is not None and time.monotonic() >= deadline:
            raise RuntimeError(f"every GPU ({len(names)}) is held by another icl-dynamics job on this machine "
                               f"(locks in {root}); give snakemake --resources gpu=N with N at most the GPU count")
        if not waited:
            log.warning("every GPU (%d) is held by another icl-dynamics job on this machine (locks in %s); waiting "
                        "for one (snakemake --resources gpu=N should not exceed the GPU count)", len(names), root)
            waited = True
        time.sleep(poll)


def resolve_dtype(dtype: str) -> torch.dtype:
    """``auto`` -> float32 for every stage and device; otherwise the named dtype.

    Pythia's files are float16; float32 holds them exactly. Computing in float16 or bfloat16 changes
    the answers beyond what the measurements can carry (README, "Precision"): argmax gates flip on
    attention ties, small Pythia models overflow in float16 attention.
    """
    if dtype == "auto":
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class NonFiniteError(RuntimeError):
    """A forward pass produced NaN or Inf."""


@contextmanager
def finite_guard(model: nn.Module, context: str) -> Iterator[None]:
    """Within the block, stop any forward pass of ``model`` (any supported family) at the first NaN/Inf.

    Checked in execution order: the embedding, each layer's attention (output and probabilities),
    each layer's output, the final layer norm and the logits; the error names ``context`` (model,
    step, stage) and the first module that went bad.
    """
    modules = architecture(model).monitored_modules()  # raises for a family we do not support
    dtype = next(model.parameters()).dtype

    def check(where: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            tensors = output if isinstance(output, tuple) else (output,)
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    advice = "" if dtype == torch.float32 else "; rerun with dtype float32 (or auto)"
                    raise NonFiniteError(f"{context}: non-finite values (NaN/Inf) first appear in {where} "
                                         f"({str(dtype).removeprefix('torch.')}){advice}")

        return hook

    handles = [module.register_forward_hook(check(where)) for where, module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ContextError(ValueError):
    """An input is longer than the model's context."""


def check_context(model: nn.Module, length: int, what: str) -> None:
    """Refuse ``length`` tokens beyond the model's ``max_position_embeddings``: rotary models run on
    past it without complaint and return numbers for positions they never trained on. ``what`` names
    the input and its config key(s) for the message."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ContextError(f"{what}: {length} tokens, longer than the model's context of {limit} positions; "
                           "lower it in the config")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode on its device, and the repository's tokenizer."""

    model_id: str
    step: int
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def guard(self, stage: str):
        """:func:`finite_guard` naming this checkpoint and ``stage`` in its error."""
        return finite_guard(self.model, f"{self.model_id}@{revision(self.step)}, stage {stage}")

    def runtime(self) -> dict[str, str | None]:
        """Where and how the numbers were computed: device, dtype, GPU name (None on the CPU), torch's
        CUDA version and the attention implementation (recorded in every table's provenance)."""
        device = self.device
        return {
            "device": str(device),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
        }


def load_checkpoint(
    model_id: str,
    step: int,
    *,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: bool = True,
    fetched: Mapping | None = None,
    revision: str | None = None,
) -> Checkpoint:
    """Load ``model_id`` at ``step`` from the local cache (run the fetch stage first).

    ``tokenizer=False`` skips the tokenizer (``Checkpoint.tokenizer`` is then None). ``fetched`` (the
    fetch stage's provenance row) makes the weights be checked against what fetch verified first
    (:func:`icl_dynamics.hub.verify_fetched`). A weights file with missing, unexpected or misshapen
    tensors is refused (transformers would initialise a missing one at random and go on). ``revision``: the
    step's branch (default: the one ``fetched`` records, else the cached branch that names ``step``:
    ``step<N>``, OLMo's ``[stage1-]step<N>-tokens<M>B``).
    """
    dev = resolve_device(device)
    rev = revision or (fetched or {}).get("revision") or cached_branch(model_id, step, cache_dir)
    kwargs = dict(revision=rev, cache_dir=cache_dir, local_files_only=True)
    if fetched is not None:
        verify_fetched(model_id, step, fetched, cache_dir)
    tok = load_tokenizer(model_id, step, cache_dir=cache_dir, revision=rev) if tokenizer else None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=resolve_dtype(dtype), attn_implementation="eager", output_loading_info=True, **kwargs
        )
    except OSError as exc:
        raise _not_cached(model_id, step, cache_dir, exc, rev) from exc
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, ValueError) as exc:  # a corrupt or refused file
        raise _unreadable(model_id, step, cache_dir, exc, rev) from exc
    problems = {kind: sorted(info.get(key) or []) for kind, key in (
        ("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("misshapen", "mismatched_keys"))}
    if any(problems.values()):
        listed = "; ".join(f"{kind}: {', '.join(map(str, keys[:5]))}{' ...' if len(keys) > 5 else ''}"
                           for kind, keys in problems.items() if keys)
        raise IntegrityError(f"{model_id}@{rev}: the weights file does not match the model's tensors "
                             f"({listed}); refusing to score a partly random model")
    model.to(dev).eval()
    return Checkpoint(model_id, step, model, tok)


def load_tokenizer(model_id: str, step: int, *, cache_dir: str | Path | None = None,
                   revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer stored with ``model_id`` at ``step`` (always the model repository's own; ``revision`` as
    for :func:`load_checkpoint`)."""
    rev = revision or cached_branch(model_id, step, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(model_id, revision=rev, cache_dir=cache_dir, local_files_only=True)
    except OSError as exc:
        raise _not_cached(model_id, step, cache_dir, exc, rev) from exc


def _unreadable(model_id: str, step: int, cache_dir: str | Path | None, exc: Exception,
                rev: str | None = None) -> IntegrityError:
    rev = rev or revision(step)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    try:
        where = repo_cache_dir(model_id, cache_dir) / "snapshots" / cached_commit(model_id, rev, cache_dir)
    except (OSError, ValueError):
        where = repo_cache_dir(model_id, cache_dir)
    return IntegrityError(
        f"{model_id}@{rev}: the cached weights in {where} cannot be read ({type(exc).__name__}: {first}); "
        f"delete that snapshot's weight blobs and run `icl-dynamics fetch --model {model_id} --step {step}` again"
    )


def _not_cached(model_id: str, step: int, cache_dir: str | Path | None, exc: Exception,
                rev: str | None = None) -> FileNotFoundError:
    return FileNotFoundError(
        f"{model_id}@{rev or revision(step)} is not in the local cache {cache_dir or '(default)'}; "
        f"run `icl-dynamics fetch --model {model_id} --step {step}` first ({exc})"
    )
