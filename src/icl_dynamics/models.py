"""Load a checkpoint (model and tokenizer) from the local Hugging Face cache onto a device.

Scoring jobs never reach the network: the fetch stage has already put the checkpoint into the
cache, and everything here loads with ``local_files_only=True`` through the same code path a real
Pythia checkpoint takes (``from_pretrained(repo_id, revision="step<N>")``). Every file is verified
first (:mod:`icl_dynamics.verify`), the weights' dtypes are checked against the config, and the
loaded model answers a fixed probe whose outputs every table's provenance keeps (:func:`probe_outputs`).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from icl_dynamics.architecture import architecture
from icl_dynamics.checkpoints import revision
from icl_dynamics.hub import IntegrityError, cached_commit, repo_cache_dir
from icl_dynamics.schedules import cached_branch
from icl_dynamics.verify import Verified, check_dtypes, verify_checkpoint

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


def check_token_ids(model: nn.Module, ids: np.ndarray | torch.Tensor, what: str) -> None:
    """Refuse token ids outside the model's vocabulary (``config.vocab_size``): the embedding would fail
    with an IndexError deep in a forward pass, or, on some devices, read memory it should not."""
    vocab = model.config.vocab_size
    ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.max()) if ids.max() >= vocab else int(ids.min())
        raise ValueError(f"{what}: token id {bad} is outside the model's vocabulary (0..{vocab - 1}, config.json "
                         "vocab_size); it was tokenised for another model: rerun the stage that wrote it with this "
                         "model's tokenizer")


class ImplausibleOutput(RuntimeError):
    """A checkpoint's outputs are not what any trained or initialised model gives: corrupt weights."""


# A model guessing uniformly scores log(vocab) nats on any text, a trained one less, a freshly initialised
# one log(vocab) + s^2/2 for logits of spread s: Pythia's initialisation keeps s near 0.6 at every width
# (+0.2 nats); transformers' default (std 0.02) reaches s = 1.4 at width 5,120 (+1.0). Measured on 9 random
# initialisations and every toy-zoo checkpoint (tests/test_plausibility.py): at most +0.1. Corrupt weights
# (a flipped KiB of the unembedding) score about 1,400 nats.
LOSS_MARGIN = 2.0


def check_loss(model_id: str, step: int, model: nn.Module, losses: np.ndarray, what: str) -> float:
    """The mean of ``losses`` (next-token losses on natural text, NaN where undefined), refused unless finite
    and below log(vocab) + :data:`LOSS_MARGIN`: weights that pass every hash but are wrong (a mirror serving
    flipped bytes under their own hash) give wild losses, which would otherwise become wild ICL scores."""
    mean = float(np.nanmean(losses))
    bound = float(np.log(model.config.vocab_size)) + LOSS_MARGIN
    if not np.isfinite(mean) or mean > bound:
        raise ImplausibleOutput(
            f"{model_id}@{revision(step)}: mean loss {mean:.2f} nats on {what} is above log(vocabulary "
            f"{model.config.vocab_size}) + {LOSS_MARGIN:g} = {bound:.2f}, worse than guessing uniformly: these weights "
            "are not a trained or initialised model's (corrupt bytes under a valid hash, e.g. a bad mirror); fetch "
            "the checkpoint from the hub again"
        )
    return mean


PROBE_TOKENS = 32  # length of the fixed probe sequence (at most the model's context)


def probe_outputs(model: nn.Module, seed: int = 0) -> list[float]:
    """The log-probability the model gives each next token of a fixed random sequence (``seed``; the same
    ids for every checkpoint of a model): a fingerprint of what the weights compute.

    Every table a job writes keeps it in its provenance (``checkpoint.probe``), so the merge can compare
    checkpoints without loading any model again (:mod:`icl_dynamics.validation`): two steps that give the
    same outputs from differently stored weights serve one set of weights. Comparing at the merge, where
    every step's provenance is at hand, keeps each per-checkpoint job independent of the others.
    """
    config = model.config
    n = min(PROBE_TOKENS, config.max_position_embeddings)
    ids = torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    return [float(x) for x in logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).flatten().cpu()]


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode on its device, and the repository's tokenizer; with
    what verified its files and its outputs on the fixed probe (:func:`load_checkpoint` sets both)."""

    model_id: str
    step: int
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    verified: Verified | None = None
    probe: list[float] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def guard(self, stage: str):
        """:func:`finite_guard` naming this checkpoint and ``stage`` in its error."""
        where = self.verified.where if self.verified else f"{self.model_id}@{revision(self.step)}"
        return finite_guard(self.model, f"{where}, stage {stage}")

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

    def record(self) -> dict:
        """The verification and probe outputs every table's provenance keeps (``checkpoint`` entry)."""
        return {**(self.verified.record() if self.verified else {}), "probe": self.probe}


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

    Every file of the checkpoint is verified first (:func:`icl_dynamics.verify.verify_checkpoint`):
    against ``fetched`` (the fetch stage's provenance row) when given, else against the hub's hashes the
    cache names its blobs by. ``tokenizer=False`` skips the tokenizer (``Checkpoint.tokenizer`` is then
    None). A weights file with missing, unexpected or misshapen tensors, or tensors of another dtype
    than the config's, is refused (transformers would initialise a missing one at random, cast the
    others, and go on). The loaded model's outputs on the fixed probe are kept (:func:`probe_outputs`).
    ``revision``: the step's branch (default: the one ``fetched`` records, else the cached branch that
    names ``step``: ``step<N>``, OLMo's ``[stage1-]step<N>-tokens<M>B``).
    """
    dev = resolve_device(device)
    rev = revision or (fetched or {}).get("revision") or cached_branch(model_id, step, cache_dir)
    kwargs = dict(revision=rev, cache_dir=cache_dir, local_files_only=True)
    verified = verify_checkpoint(model_id, step, cache_dir, fetched, revision=rev)
    tok = _tokenizer(model_id, step, cache_dir, rev) if tokenizer else None
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
    check_dtypes(verified, _not_loaded(model))
    model.to(dev).eval()
    return Checkpoint(model_id, step, model, tok, verified, probe_outputs(model))


def _not_loaded(model: nn.Module) -> list[str]:
    """Patterns of file keys that never reach the model: those the model class drops on load
    (``_keys_to_ignore_on_load_unexpected``, e.g. GPT-NeoX's old attention masks) and its non-persistent
    buffers, which it recomputes (the rotary ``inv_freq`` Pythia's files still carry)."""
    buffers = {f"{name.rsplit('.', 1)[-1]}.{buffer}" for name, module in model.named_modules()
               for buffer in getattr(module, "_non_persistent_buffers_set", ())}
    return [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
            *(re.escape(suffix) + "$" for suffix in sorted(buffers))]


def load_tokenizer(model_id: str, step: int, *, cache_dir: str | Path | None = None,
                   fetched: Mapping | None = None, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer stored with ``model_id`` at ``step`` (always the model repository's own), its files
    verified first (against ``fetched``, the fetch stage's provenance row, when given) as
    :func:`load_checkpoint` verifies them; ``revision`` as for :func:`load_checkpoint`."""
    rev = revision or (fetched or {}).get("revision") or cached_branch(model_id, step, cache_dir)
    verify_checkpoint(model_id, step, cache_dir, fetched, weights=False, revision=rev)
    return _tokenizer(model_id, step, cache_dir, rev)


def _tokenizer(model_id: str, step: int, cache_dir: str | Path | None, rev: str) -> PreTrainedTokenizerBase:
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
