"""Checkpoint schedules: which training steps exist, how many tokens each has seen, and selection.

Pythia publishes 154 revisions per model (``step0``, ``step1``, ``step2``, ``step4`` ... ``step512``,
then ``step1000`` ... ``step143000`` every 1,000 steps) at 2,097,152 tokens per step. The toy zoo has
a schedule of its own. Selecting a step that a schedule lacks is an error that names the nearest
valid steps, so a typo never silently drops a checkpoint from a sweep.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PYTHIA_STEPS: tuple[int, ...] = (0, *(2**i for i in range(10)), *range(1000, 143_001, 1000))
PYTHIA_TOKENS_PER_STEP = 2_097_152  # 1,024 sequences x 2,048 tokens


class StepError(ValueError):
    """A requested step is not among a schedule's checkpoints."""


@dataclass(frozen=True)
class Schedule:
    """The checkpoints a family of models publishes and the tokens seen per optimiser step; ``branches`` (aligned
    with ``steps``) the hub branch of each step when it is not ``step<N>`` (a schedule read from a model's branch
    names, :mod:`icl_dynamics.schedules`), ``refused`` steps that exist but are not measured, with the reason
    (OLMo-2's stage 2), ``stage2`` those branches."""

    name: str
    steps: tuple[int, ...]
    tokens_per_step: int
    branches: tuple[str, ...] | None = None
    refused: Mapping[int, str] = field(default_factory=dict, compare=False)
    stage2: tuple[str, ...] = ()

    def revision(self, step: int) -> str:
        """The hub branch of ``step`` (``step<N>``, or the name the model's branches give it)."""
        self.check(step)
        return self.branches[self.steps.index(step)] if self.branches is not None else revision(step)

    def tokens(self, step: int) -> int:
        """Tokens seen by the model at ``step``."""
        self.check(step)
        return step * self.tokens_per_step

    def nearest(self, step: int, k: int = 2) -> list[int]:
        """The ``k`` valid steps closest to ``step`` (ties broken towards the smaller step)."""
        return sorted(sorted(self.steps, key=lambda s: (abs(s - step), s))[:k])

    def check(self, step: int) -> int:
        """Return ``step`` if the schedule has it, else raise naming the nearest valid steps."""
        if step not in self.steps and step in self.refused:
            raise StepError(self.refused[step])
        if step not in self.steps:
            raise StepError(
                f"step {step} is not a checkpoint of the {self.name} schedule; "
                f"nearest valid steps: {', '.join(map(str, self.nearest(step)))}"
            )
        return step


PYTHIA = Schedule("pythia", PYTHIA_STEPS, PYTHIA_TOKENS_PER_STEP)


def _nearest(schedule: Schedule, target: int) -> int:
    """The checkpoint of ``schedule`` nearest to ``target`` (ties: the earlier)."""
    return min(schedule.steps, key=lambda s: (abs(s - target), s))


def _log_preset(schedule: Schedule) -> list[int]:
    """The first checkpoint, every power-of-two step below 1000 the schedule has, then the checkpoint nearest to
    each of 1000, 2000, 4000, ... up to the last step, and the last: on Pythia step0, 1, 2, 4 ... 512, 1000,
    2000, 4000, ..., 128000 and 143000; on any other schedule the same grid, snapped to its checkpoints."""
    steps = [schedule.steps[0], *(s for s in schedule.steps if 0 < s < 1000 and s & (s - 1) == 0)]
    target = 1000
    while target <= schedule.steps[-1]:
        steps.append(_nearest(schedule, target))
        target *= 2
    return sorted({*steps, schedule.steps[-1]})


def _dense_early_preset(schedule: Schedule) -> list[int]:
    """Every checkpoint through step 20000, then the checkpoint nearest each further multiple of 10000, and the
    last (on Pythia: every step through 20000, 30000 ... 140000, 143000)."""
    early = [s for s in schedule.steps if s <= 20_000]
    late = [_nearest(schedule, t) for t in range(30_000, schedule.steps[-1], 10_000)]
    return sorted({*early, *late, schedule.steps[-1]})


PRESETS: dict[str, Any] = {
    "all": lambda schedule: list(schedule.steps),
    "log": _log_preset,
    "dense-early": _dense_early_preset,
}


def select_steps(selection: Mapping[str, Any], schedule: Schedule = PYTHIA) -> list[int]:
    """Resolve a config ``checkpoints`` block into a sorted list of valid steps.

    The block may combine ``preset`` (``all``, ``log``, ``dense-early``), explicit ``steps``, and
    ``ranges`` (each ``{start, stop, every}``: the schedule's steps in [start, stop] that are a
    multiple of ``every``, or all of them when ``every`` is absent). The union is returned.
    """
    chosen: set[int] = set()
    preset = selection.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise StepError(f"unknown checkpoint preset {preset!r}; choose one of {sorted(PRESETS)}")
        chosen.update(PRESETS[preset](schedule))
    for step in selection.get("steps", []) or []:
        chosen.add(schedule.check(int(step)))
    for rng in selection.get("ranges", []) or []:
        chosen.update(_range_steps(rng, schedule))
    if not chosen:
        raise StepError("the checkpoint selection is empty: give a preset, steps or ranges")
    return sorted(chosen)


def _range_steps(rng: Mapping[str, int], schedule: Schedule) -> list[int]:
    start, stop, every = int(rng["start"]), int(rng["stop"]), rng.get("every")
    if stop < start:
        raise StepError(f"checkpoint range start {start} is after stop {stop}")
    lo, hi = bisect.bisect_left(schedule.steps, start), bisect.bisect_right(schedule.steps, stop)
    steps = [s for s in schedule.steps[lo:hi] if every is None or s % int(every) == 0]
    if not steps:
        raise StepError(f"checkpoint range {dict(rng)} holds no {schedule.name} checkpoint")
    return steps


def revision(step: int) -> str:
    """The hub branch name of a step (``step1000``)."""
    return f"step{step}"


def parse_revision(name: str) -> int:
    """Inverse of :func:`revision`."""
    if not name.startswith("step") or not name[4:].isdigit():
        raise StepError(f"{name!r} is not a step revision (expected 'step<N>')")
    return int(name[4:])


# a hub model id: org/name of letters, digits, '_', '.' and '-' (fullmatch: no trailing newline slips through)
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_model_id(model_id: str, what: str) -> str:
    """``model_id`` if it is a hub model id, else a ValueError naming ``what`` (a config key or a flag)."""
    if not MODEL_ID.fullmatch(model_id):
        control = [c for c in model_id if not c.isprintable() or c.isspace()]
        why = f"holds {', '.join(sorted({repr(c) for c in control}))}" if control else "is not org/name"
        raise ValueError(f"{what}: {model_id!r} is not a hub model id ({why}); write it as org/name of letters, "
                         "digits, '_', '.' and '-'")
    return model_id


def model_slug(model_id: str) -> str:
    """A filesystem-safe name for a hub model id (``EleutherAI/pythia-70m`` -> ``EleutherAI--pythia-70m``)."""
    return model_id.replace("/", "--")


def unslug(slug: str, model_ids: Iterable[str]) -> str:
    """The model id among ``model_ids`` whose slug is ``slug``."""
    for model_id in model_ids:
        if model_slug(model_id) == slug:
            return model_id
    raise KeyError(f"no configured model has slug {slug!r}")




def parameter_count(model_id: str, default: float = 1e8) -> float:
    """The parameter count a model id states (``pythia-1.4b`` -> 1.4e9, ``pythia-70m-deduped`` -> 7e7),
    for sizing cluster jobs; ``default`` when the id states none (a toy model, a renamed fork)."""
    match = re.search(r"(?<![\w.])(\d+(?:\.\d+)?)([mb])(?![a-z])", model_id.split("/")[-1].lower())
    if not match:
        return default
    return float(match.group(1)) * (1e6 if match.group(2) == "m" else 1e9)
