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
from dataclasses import dataclass
from typing import Any

PYTHIA_STEPS: tuple[int, ...] = (0, *(2**i for i in range(10)), *range(1000, 143_001, 1000))
PYTHIA_TOKENS_PER_STEP = 2_097_152  # 1,024 sequences x 2,048 tokens


class StepError(ValueError):
    """A requested step is not among a schedule's checkpoints."""


@dataclass(frozen=True)
class Schedule:
    """The checkpoints a family of models publishes and the tokens seen per optimiser step."""

    name: str
    steps: tuple[int, ...]
    tokens_per_step: int

    def tokens(self, step: int) -> int:
        """Tokens seen by the model at ``step``."""
        self.check(step)
        return step * self.tokens_per_step

    def nearest(self, step: int, k: int = 2) -> list[int]:
        """The ``k`` valid steps closest to ``step`` (ties broken towards the smaller step)."""
        return sorted(sorted(self.steps, key=lambda s: (abs(s - step), s))[:k])

    def check(self, step: int) -> int:
        """Return ``step`` if the schedule has it, else raise naming the nearest valid steps."""
        if step not in self.steps:
            raise StepError(
                f"step {step} is not a checkpoint of the {self.name} schedule; "
                f"nearest valid steps: {', '.join(map(str, self.nearest(step)))}"
            )
        return step


PYTHIA = Schedule("pythia", PYTHIA_STEPS, PYTHIA_TOKENS_PER_STEP)


def _log_preset() -> list[int]:
    """step0, powers of two through 512, then 1000, 2000, 4000, ... and the final step."""
    steps = [0, *(2**i for i in range(10))]
    s = 1000
    while s < PYTHIA_STEPS[-1]:
        steps.append(s)
        s *= 2
    steps.append(PYTHIA_STEPS[-1])
    return steps


def _dense_early_preset() -> list[int]:
    """Every checkpoint through step 20000, then every 10000, and the final step."""
    early = [s for s in PYTHIA_STEPS if s <= 20_000]
    late = list(range(30_000, PYTHIA_STEPS[-1], 10_000))
    return [*early, *late, PYTHIA_STEPS[-1]]


PRESETS: dict[str, Any] = {
    "all": lambda schedule: list(schedule.steps),
    "log": lambda schedule: _require_pythia(schedule, "log", _log_preset()),
    "dense-early": lambda schedule: _require_pythia(schedule, "dense-early", _dense_early_preset()),
}


def _require_pythia(schedule: Schedule, preset: str, steps: list[int]) -> list[int]:
    if schedule.name != PYTHIA.name:
        raise StepError(f"preset {preset!r} is defined on the Pythia grid; for {schedule.name} use 'all' or explicit steps")
    return steps


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
