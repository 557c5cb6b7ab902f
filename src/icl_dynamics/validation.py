"""Content checks of the tables the merge concatenates, and of the analysis's options against the tables.

The merge's schema check (:func:`icl_dynamics.io.read_table`) proves that the columns exist with
their types. It cannot see a per-checkpoint table without rows, a measured column that is all NaN,
a step file whose rows name another model or step than its folder, a step rescored by hand with
other options than the others, or two steps that compute the same function from differently stored
weights. Each merges into a table that looks whole and changes what the analysis finds, so
:func:`check_merge_inputs` refuses each, naming the files. :func:`check_analysis_options` refuses
analysis options that select what was never measured (a shot count, a relation family) before the
analysis starts, instead of silently analysing fewer series.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from icl_dynamics import io
from icl_dynamics.checkpoints import model_slug

log = logging.getLogger(__name__)

STEP_FILE = re.compile(r"step(\d+)")
# provenance entries that describe a job, not its stage options: where it ran, what it loaded, what it found
PER_JOB = frozenset({"runtime", "checkpoint", "groups", "cost"})
# options that name input files (the same per-model table for every step in the workflow, but spelled
# differently when a step is rescored by hand from another folder) or only batch the work
NOT_COMPARED = frozenset({"batch_size", "text_tokens", "relations_dir", "heads_table", "relation_index_table"})
# Two checkpoints give "the same outputs" on the probe when no log-probability differs by more than this.
# One checkpoint in float32 and in float64 differs by less than 1e-5; the closest two of the 17 toy-zoo
# checkpoints differ by 0.26 (tests/test_plausibility.py).
PROBE_TOLERANCE = 1e-4


class ContentError(ValueError):
    """Tables whose content cannot be merged or analysed as they are; the message names the files."""


def stage_options(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The stage options a table's provenance records: everything but the environment
    (:data:`icl_dynamics.io.ENVIRONMENT`), the per-job entries and the options that change no number."""

    def strip(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in value.items() if k not in NOT_COMPARED}
        return value

    return strip({k: v for k, v in provenance.items() if k not in io.ENVIRONMENT and k not in PER_JOB})


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two option dictionaries differ, with both values."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}={a!r} vs {b!r}"]


def _step_folder(path: Path) -> tuple[str, int] | None:
    """(model folder, step) of a per-checkpoint file laid out as ``<model slug>/step<N>/<table>.parquet``."""
    m = STEP_FILE.fullmatch(path.parent.name)
    return (path.parent.parent.name, int(m[1])) if m else None


def _all_nan(column: pa.ChunkedArray) -> bool:
    if not pa.types.is_floating(column.type) or len(column) == 0:
        return False
    return bool(pc.all(pc.or_(pc.is_nan(column), pc.is_null(column))).as_py())


def check_merge_inputs(stage: str, paths: Sequence[str | os.PathLike[str]], schema: pa.Schema,
                       out: str | os.PathLike[str] | None = None) -> None:
    """Refuse per-checkpoint tables that cannot be merged into table ``stage`` as they are (module docstring).

    Each input must hold rows of exactly one (model, step), the one its ``<model>/step<N>/`` folder
    names when it lies in one, and no non-nullable float column of all NaN; an input without rows is
    refused unless its provenance says the stage skipped the checkpoint (``skipped``, the ablation of a
    model too large). All inputs must name one model (the one ``out``'s folder names, when it is a
    model folder), each (part, step) once, and each part (``loss`` and ``icl_tasks`` of ``icl``) must
    have been measured with the same stage options (:func:`stage_options`). Checkpoints whose weights
    differ (their ``weights_digest``) must differ in their probe outputs (:func:`check_probe_outputs`).
    """
    required = [f.name for f in schema if not f.nullable and pa.types.is_floating(f.type)]
    seen: dict[tuple[str, int], Path] = {}
    models: dict[str, Path] = {}
    options: dict[str, tuple[Path, dict]] = {}
    probes: list[tuple[Path, int, Mapping]] = []
    for path in map(Path, paths):
        table = pq.read_table(path)
        provenance = io.read_provenance(path)
        ids = {(m, s) for m, s in zip(table.column("model").to_pylist(), table.column("step").to_pylist())}
        folder = _step_folder(path)
        if not ids:
            if "skipped" in provenance:
                continue
            raise ContentError(f"{path} has no rows: a {stage} table of a checkpoint is never empty; rerun the job "
                               "that wrote it (delete the file and rerun snakemake, or icl-dynamics score)")
        if len(ids) > 1:
            raise ContentError(f"{path} holds rows of {len(ids)} checkpoints ({_listed(ids)}): a per-checkpoint table "
                               "holds one; merge per-checkpoint files, not merged tables")
        (model, step), = ids
        if folder is not None and folder != (model_slug(model), step):
            raise ContentError(f"{path}: its rows are {model}@step{step}, but the file lies in the folder of "
                               f"{folder[0]}@step{folder[1]}; it was copied or written for another checkpoint: rerun "
                               "that checkpoint's job")
        for name in required:
            if _all_nan(table.column(name)):
                raise ContentError(f"{path}: column {name!r} is NaN in every row; a measurement that produced "
                                   "nothing is not a result: rerun the job that wrote it")
        models.setdefault(model, path)
        part = path.stem
        if (part, step) in seen:
            raise ContentError(f"{seen[(part, step)]} and {path} both hold {model}@step{step}; give each "
                               "checkpoint once")
        seen[(part, step)] = path
        if stage != "provenance":
            mine = stage_options(provenance)
            first = options.setdefault(part, (path, mine))
            if first[1] != mine:
                raise ContentError(f"{first[0]} and {path} were measured with different {part} options "
                                   f"({'; '.join(_differences(first[1], mine)[:3])}); rescore them with the same "
                                   "options (delete the odd files and rerun snakemake)")
            if "checkpoint" in provenance:
                probes.append((path, step, provenance["checkpoint"]))
    if len(models) > 1:
        raise ContentError(f"the {stage} inputs hold several models ({', '.join(f'{m} in {p}' for m, p in models.items())})"
                           "; the merge is per model: give one model's files")
    if out is not None and models:
        model, parent = next(iter(models)), Path(out).parent
        model_folder = parent.is_dir() and any(STEP_FILE.fullmatch(p.name) for p in parent.iterdir())
        if model_folder and parent.name != model_slug(model):
            raise ContentError(f"--out {out} lies in the folder of another model than its inputs' ({model}); write it "
                               f"into {model_slug(model)}/")
    check_probe_outputs(probes)


def check_probe_outputs(checkpoints: Iterable[tuple[Path, int, Mapping]]) -> None:
    """Refuse two checkpoints (file, step, provenance ``checkpoint`` entry) whose weights are stored
    differently (``weights_digest``) but give the same outputs on the fixed probe
    (:func:`icl_dynamics.models.probe_outputs`, within :data:`PROBE_TOLERANCE`): one branch serves the
    other's weights, re-saved, which no byte comparison catches. Byte-identical weights are the merged
    provenance's business (``duplicate_of_step``, ``suspect``).

    Every pair is compared, not only neighbours: a branch that serves a far step's weights is caught
    too. Comparing here, where every step's provenance is at hand, keeps each checkpoint's job free of
    any other checkpoint (a job that loaded the previous step would reach back up the data flow).
    """
    entries = list({s: (p, s, r) for p, s, r in checkpoints if r.get("probe") and r.get("weights_digest")}.values())
    for i, (path_a, step_a, a) in enumerate(entries):
        for path_b, step_b, b in entries[i + 1:]:
            if a["weights_digest"] == b["weights_digest"] or len(a["probe"]) != len(b["probe"]):
                continue
            gap = max(abs(x - y) for x, y in zip(a["probe"], b["probe"]))
            if math.isfinite(gap) and gap <= PROBE_TOLERANCE:
                raise ContentError(
                    f"step {step_a} ({path_a}) and step {step_b} ({path_b}) give the same outputs on the fixed probe "
                    f"(largest difference {gap:.1e}) from differently stored weights: one branch serves the other "
                    "step's weights; check the hub branches (or refs/ in the cache) of both steps"
                )


def _listed(ids: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{m}@step{s}" for m, s in sorted(ids)[:3])


def _models(frame: Any) -> set[str]:
    return set() if frame is None else {str(m) for m in frame["model"].unique()}


def check_analysis_options(icl: Any, heads: Any, ri: Any = None, provenance: Any = None, *,
                           shots: int | None = None, families: Sequence[str] | None = None,
                           direction: str | None = None, gate: str | None = None,
                           variant: str | None = None) -> None:
    """Refuse analysis options that select what the merged tables (DataFrames) never measured, before
    the analysis runs: every table names the same models; ``shots`` is a shot count every model's
    ICL tasks were measured at (and every task has rows at the shot count used); ``direction``, ``gate``
    and ``variant`` are in the relation index, and so is one of ``families`` at least (:func:`_check_families`)."""
    named = {"icl": icl, "heads": heads, "relation_index": ri, "provenance": provenance}
    found = {name: _models(frame) for name, frame in named.items() if frame is not None}
    if len({frozenset(m) for m in found.values()}) > 1:
        listed = "; ".join(f"{name}: {', '.join(sorted(models)) or 'none'}" for name, models in found.items())
        raise ContentError(f"the merged tables name different models ({listed}); give each model's tables, "
                           "from one results folder")
    tasks = icl[icl["shots"].notna()]
    for model, rows in tasks.groupby("model"):
        measured = sorted({int(s) for s in rows["shots"]})
        if shots is not None and shots not in measured:
            raise ContentError(f"analysis shots {shots} (analysis.shots / --shots) were not measured for {model}: the "
                               f"ICL tasks were measured at {', '.join(map(str, measured))} shots (icl_tasks.shots); "
                               "choose one of those")
        chosen = shots if shots is not None else measured[-1]
        lacking = sorted(set(rows["task"]) - set(rows.loc[rows["shots"] == chosen, "task"]))
        if lacking:
            raise ContentError(f"{model}: task(s) {', '.join(lacking)} have no rows at {chosen} shots, the shot count "
                               "the analysis uses; rescore them (their step files lack it)")
    if shots is not None and tasks.empty:
        raise ContentError(f"analysis shots {shots}: the icl tables hold no ICL-task rows; leave shots unset")
    if ri is None or ri.empty:
        return
    for column, wanted in (("direction", direction), ("gate", gate), ("variant", variant)):
        if wanted and wanted not in set(ri[column].astype(str)):
            raise ContentError(f"relation index {column} {wanted} (analysis.ri_{column}) was not measured: the "
                               f"relation index has {', '.join(sorted(set(ri[column].astype(str))))}")
    _check_families(families or [], set(ri["family"].astype(str)))


def _check_families(families: Sequence[str], measured: set[str]) -> None:
    """The heatmaps' families: each one the relations stage makes. A known family without rows is legitimate,
    even when none of them has any (a tokenizer that holds none of their words, as the toy zoo's holds no
    AGENDA word but the kg-letters anchors): its heatmap is drawn empty and the log says why, while the rest
    of the analysis (ICL levels, head classes) stands. A misspelt family is refused."""
    from icl_dynamics.relations import FAMILY_ORDER

    unknown = sorted(set(families) - set(FAMILY_ORDER))
    if unknown:
        raise ContentError(f"relation family {', '.join(unknown)} (--ri-families) is none the relations stage makes "
                           f"({', '.join(FAMILY_ORDER)})")
    for family in sorted(set(families) - measured):
        log.warning("the relation index has no %s rows (the relations stage kept no %s triplet for this tokenizer): "
                    "its heatmap is empty", family, family)
