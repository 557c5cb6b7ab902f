"""Checkpoint schedules read from a model's hub branches: which steps exist, what each branch is called and
how many tokens each step has seen.

Families name their training checkpoints differently:

* Pythia (GPT-NeoX): ``step<N>``, 2,097,152 tokens per step (:data:`icl_dynamics.checkpoints.PYTHIA_TOKENS_PER_STEP`).
* OLMo-1 ``-hf`` repositories: ``step<N>-tokens<M>B``.
* OLMo-2: ``stage1-step<N>-tokens<M>B``, a few early ones without ``stage1-`` (``step150-tokens1B``), at
  irregular intervals with missing steps; then ``stage2-ingredient<k>-step<N>-tokens<M>B``, mid-training runs
  that restart the step count from the end of stage 1. Stage 2 is recorded and refused: a stage-2 step is not
  a point on stage 1's curve (README, "Model families").

``<M>B`` is the token count rounded to whole billions (up, for OLMo-2: ``step150-tokens1B`` has seen 0.3B),
too coarse for the early checkpoints a log-token axis spreads out. So the tokens of step N are
N x tokens-per-step, the rate the largest-step branch names (relative error below 1B / its tokens), and
every branch must agree with that rate to within its rounding (1B, plus 0.2 %): a branch that does not, a
step named twice, or a name of no known pattern is an error naming the branch, never silently dropped.

The branches are listed online once per model (:func:`list_branches`, huggingface_hub's ``list_repo_refs``)
and recorded with provenance (:func:`write_record`); every later run reads that record offline
(:func:`read_record`, :func:`schedule_from_record`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from icl_dynamics.checkpoints import PYTHIA_TOKENS_PER_STEP, Schedule, StepError

RECORD_VERSION = 1
PYTHIA_BRANCH = re.compile(r"step(?P<step>\d+)")
OLMO_BRANCH = re.compile(r"(?P<stage>stage1-)?step(?P<step>\d+)-tokens(?P<tokens>\d+)B")
STAGE2_BRANCH = re.compile(r"stage2-ingredient(?P<ingredient>\d+)-step(?P<step>\d+)-tokens(?P<tokens>\d+)B")
NOT_CHECKPOINTS = frozenset({"main"})  # refs that name no training step
KNOWN = "step<N>, [stage1-]step<N>-tokens<M>B, stage2-ingredient<k>-step<N>-tokens<M>B or main"
TOKEN_SLACK_B = 1.0  # a name's whole billions may be rounded either way ...
TOKEN_SLACK_REL = 0.002  # ... and the rate estimated from the largest step carries a little error


class ScheduleError(StepError):
    """A model's branches do not form a schedule we can trust (the message names the branch)."""


@dataclass(frozen=True)
class Branch:
    """One parsed branch name: its stage-1 step (or stage 2's own count), the tokens it names (None: Pythia's
    names state none) and its segment (``stage1``; ``stage2-ingredient<k>``)."""

    name: str
    step: int
    tokens_named_b: int | None
    segment: str = "stage1"


def parse_branch(name: str) -> Branch | None:
    """The checkpoint a branch name stands for; None for ``main``; :class:`ScheduleError` for any other name."""
    if name in NOT_CHECKPOINTS:
        return None
    if match := STAGE2_BRANCH.fullmatch(name):
        return Branch(name, int(match["step"]), int(match["tokens"]), f"stage2-ingredient{match['ingredient']}")
    if match := OLMO_BRANCH.fullmatch(name):
        return Branch(name, int(match["step"]), int(match["tokens"]))
    if match := PYTHIA_BRANCH.fullmatch(name):
        return Branch(name, int(match["step"]), None)
    raise ScheduleError(f"branch {name!r} is not a checkpoint name we know ({KNOWN}); it is not guessed at: "
                        "report the model's naming so it can be added")


def schedule_from_branches(model_id: str, names: Iterable[str]) -> Schedule:
    """The stage-1 :class:`~icl_dynamics.checkpoints.Schedule` of ``model_id`` from its branch names (see the
    module docstring); stage-2 branches are kept in ``refused`` with the reason."""
    parsed = [b for b in (parse_branch(name) for name in sorted(set(names))) if b is not None]
    stage1 = [b for b in parsed if b.segment == "stage1"]
    stage2 = [b for b in parsed if b.segment != "stage1"]
    if not stage1:
        raise ScheduleError(f"{model_id}: no stage-1 checkpoint branch among {len(parsed)} checkpoint branches")
    named = {b.tokens_named_b is not None for b in stage1}
    if len(named) > 1:  # step<N> beside step<N>-tokens<M>B: two namings in one repository
        odd = next(b for b in stage1 if (b.tokens_named_b is None) != (stage1[0].tokens_named_b is None))
        raise ScheduleError(f"{model_id}: branch {odd.name!r} is named unlike {stage1[0].name!r} (one repository, "
                            "two namings): irregular, not guessed at")
    by_step: dict[int, Branch] = {}
    for branch in stage1:
        if branch.step in by_step:
            raise ScheduleError(f"{model_id}: step {branch.step} is named twice, by branches {by_step[branch.step].name!r} "
                                f"and {branch.name!r}: irregular, not guessed at")
        by_step[branch.step] = branch
    steps = tuple(sorted(by_step))
    if named == {False}:
        tokens_per_step = PYTHIA_TOKENS_PER_STEP
    else:
        last = by_step[steps[-1]]
        if last.step == 0:
            raise ScheduleError(f"{model_id}: only step 0 names its tokens; the tokens per step are unknown")
        rate = last.tokens_named_b * 1e9 / last.step
        for branch in by_step.values():
            implied = branch.step * rate / 1e9
            if abs(implied - branch.tokens_named_b) > TOKEN_SLACK_B + TOKEN_SLACK_REL * branch.tokens_named_b:
                raise ScheduleError(
                    f"{model_id}: branch {branch.name!r} names {branch.tokens_named_b}B tokens, but at the "
                    f"{rate:,.0f} tokens per step that {last.name!r} names, step {branch.step} has seen {implied:.1f}B: "
                    "irregular, not guessed at")
        tokens_per_step = int(round(rate))
    refused = {b.step: (f"step {b.step} of {model_id} is only a stage-2 branch ({b.name}): stage 2 restarts the "
                        "step count from the end of stage 1 and is not a point on stage 1's training curve; "
                        "measure stage 1") for b in stage2 if b.step not in by_step}
    return Schedule(model_id, steps, tokens_per_step, branches=tuple(by_step[s].name for s in steps),
                    refused=refused, stage2=tuple(sorted(b.name for b in stage2)))


# ----------------------------------------------------------------------------- the record


def list_branches(model_id: str, *, timeout: float | None = 60.0) -> dict[str, Any]:
    """List ``model_id``'s branches on the hub (huggingface_hub's ``list_repo_refs``) into a record with its
    provenance: when, from which endpoint, with which huggingface_hub, and each branch's commit."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    refs = HfApi().list_repo_refs(model_id)
    return {
        "record_version": RECORD_VERSION,
        "model": model_id,
        "listed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "endpoint": constants.ENDPOINT,
        "huggingface_hub": huggingface_hub.__version__,
        "branches": {ref.name: ref.target_commit for ref in sorted(refs.branches, key=lambda r: r.name)},
    }


def write_record(record: Mapping[str, Any], path: str | Path) -> Path:
    """Write a branch record atomically (a kill leaves the old file or the new one)."""
    from icl_dynamics.io import write_bytes_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    """A branch record written by :func:`write_record`; one clear error for a file that is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        if record.get("record_version") != RECORD_VERSION or not isinstance(record.get("branches"), dict):
            raise ValueError(f"record_version {record.get('record_version')!r}, branches "
                             f"{type(record.get('branches')).__name__}")
    except (OSError, ValueError, AttributeError) as exc:
        raise ScheduleError(f"{path} is not a branch record ({exc}); delete it to list the model's branches again"
                            ) from exc
    return record


def schedule_from_record(record: Mapping[str, Any]) -> Schedule:
    """The schedule of a recorded listing (offline)."""
    return schedule_from_branches(record["model"], record["branches"])


def record_schedule(model_id: str, path: str | Path, *, offline: bool) -> Schedule:
    """``model_id``'s schedule from its record at ``path``, listing the hub once (and recording it) when there
    is no record yet; ``offline`` with no record is an error saying what to run."""
    path = Path(path)
    if not path.exists():
        if offline:
            raise ScheduleError(f"{model_id}: no branch record at {path} and the hub is offline; list the branches "
                                f"once with network access: icl-dynamics branches --model {model_id} --out {path}")
        write_record(list_branches(model_id), path)
    record = read_record(path)
    if record["model"] != model_id:
        raise ScheduleError(f"{path} records the branches of {record['model']}, not {model_id}; delete it")
    return schedule_from_record(record)


def cached_branch(model_id: str, step: int, cache_dir: str | Path | None = None) -> str:
    """The branch of ``model_id``'s stage-1 ``step`` among the refs in the local hub cache (``step<N>`` when no
    cached ref names that step), so a checkpoint loads offline by its step whatever its family's naming."""
    from icl_dynamics.hub import repo_cache_dir

    refs = repo_cache_dir(model_id, cache_dir) / "refs"
    default = f"step{step}"
    if (refs / default).is_file() or not refs.is_dir():
        return default
    for ref in sorted(p.name for p in refs.iterdir() if p.is_file()):
        try:
            branch = parse_branch(ref)
        except ScheduleError:
            continue
        if branch is not None and branch.segment == "stage1" and branch.step == step:
            return ref
    return default
