"""Read the pipeline's tables back as DataFrames, for notebooks and scripts.

A results folder (the config's ``results``, e.g. ``results/toy``) holds one folder per model, named by
:func:`~icl_dynamics.checkpoints.model_slug`, with a ``step<N>/`` folder per checkpoint and the tables
merged over checkpoints beside them, and ``analysis/`` for all models together (``results/README.md``).
:func:`load_results` reads any of those tables by name into one DataFrame, whichever of them exist.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from icl_dynamics import io
from icl_dynamics.checkpoints import model_slug

ANALYSIS = "analysis"  # the analysis folder beside the model folders
STEP_FOLDER = re.compile(r"step(\d+)")

# the tables the merge command writes, each with the per-checkpoint tables it concatenates, step by step
# (the merge rule's PER_STEP in workflow/rules/merge.smk; tests/test_api.py checks that they agree)
MERGED: dict[str, tuple[str, ...]] = {
    "provenance": ("provenance",),
    "heads": ("heads",),
    "icl": ("loss", "icl_tasks"),
    "loss_curve": ("loss_curve",),
    "relation_index": ("relation_index",),
    "ablation": ("ablation",),
}
# tables written once per model rather than per checkpoint, with the command that writes each
PER_MODEL: dict[str, str] = {
    "text_tokens": "tokenize-text",
    **{f"relations/{name}": "relations" for name in ("sequences", "triplets", "summary")},
}


def _per_step() -> dict[str, str]:
    """The per-checkpoint tables (``step<N>/<name>.parquet``), with the command that writes each."""
    from icl_dynamics.stages import STAGES

    return {"provenance": "fetch",
            **{table: f"score --stages {stage.name}" for stage in STAGES.values() for table in stage.outputs}}


def _analysis() -> tuple[str, ...]:
    """The analysis tables (``analysis/<name>.parquet``, every model together; the seed groups' in
    ``analysis/groups/``)."""
    from icl_dynamics import causal, emergence, seed_groups

    return (*emergence.TABLES, *causal.TABLES, *seed_groups.TABLES)


def _analysis_file(root: Path, stage: str) -> Path:
    return root / ANALYSIS / ("groups" if stage.startswith("group_") else "") / f"{stage}.parquet"


def table_names() -> list[str]:
    """Every table :func:`load_results` reads: per checkpoint, merged, per model and the analysis's."""
    return sorted({*_per_step(), *MERGED, *PER_MODEL, *_analysis()})


def load_results(results_dir: str | os.PathLike[str], stage: str, models: str | Sequence[str] | None = None,
                 steps: Sequence[int] | None = None) -> pd.DataFrame:
    """One table of a results folder as one DataFrame, over every model (or ``models``, hub ids) and
    checkpoint (or ``steps``).

    ``stage`` names the table (:func:`table_names`). A per-checkpoint table (``heads``, ``loss``,
    ``loss_curve``, ``icl_tasks``, ``relation_index``, ``provenance``) or ``icl`` (``loss`` and
    ``icl_tasks`` together) is read from ``<model>/<name>.parquet`` once the merge has written it,
    else concatenated from the ``<model>/step<N>/`` files in step order as the merge would (except that
    per-checkpoint ``provenance`` rows are not flagged for duplicate weights: the merge does that). ``text_tokens`` and
    ``relations/<table>`` are one file per model (they have no ``model`` column: name one model when
    there are several); ``emergence``, ``formation``, ``relation`` and ``summary`` are read from
    ``analysis/``. ``attrs["files"]`` lists the files read and ``attrs["provenance"]`` maps each to
    the provenance stamped into it (:func:`icl_dynamics.io.read_provenance`).
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no results folder {root}: pass the config's `results` folder (e.g. results/toy) "
                                "after running the workflow")
    if any(STEP_FOLDER.fullmatch(p.name) for p in root.iterdir()):
        raise ValueError(f"{root} is one model's folder: pass the results folder holding it ({root.parent})")
    names = table_names()
    if stage not in names:
        raise ValueError(f"unknown table {stage!r}; choose one of {', '.join(names)}")
    wanted = [models] if isinstance(models, str) else None if models is None else list(models)
    step_indexed = stage in MERGED or stage in _per_step()
    if steps is not None and not step_indexed:
        raise ValueError(f"{stage} is not a per-checkpoint table: leave out steps")
    if stage in _analysis():
        files = [_analysis_file(root, stage)]
        if not files[0].exists():
            command = "causal" if stage.startswith("causal_") else "groups" if stage.startswith("group_") else "analyze"
            raise FileNotFoundError(f"{files[0]} is missing: `icl-dynamics {command}` writes it (the workflow's "
                                    f"{command} rule, once every model is merged)")
    else:
        folders = _model_folders(root, wanted)
        if stage in PER_MODEL and len(folders) > 1:
            raise ValueError(f"{stage} has no model column: name one model, e.g. models={folders[0].name!r} "
                             f"(folders: {', '.join(f.name for f in folders)})")
        files = [path for folder in folders for step, path in _model_files(folder, stage)
                 if steps is None or step is None or step in steps]
        if not files:
            raise ValueError(f"no {stage} table at steps {sorted(steps or [])} in {root}")
    frame = to_frame(io.concat_tables(files))
    if wanted is not None and stage in _analysis():
        column = "model" if "model" in frame else "run" if "run" in frame else "data_group"
        absent = sorted(set(wanted) - set(frame[column]))
        if absent:
            raise ValueError(f"{files[0]} has no rows of {absent} ({column}: {sorted(set(frame[column]))})")
        frame = frame[frame[column].isin(wanted)]
    if steps is not None:
        absent = sorted(set(steps) - set(frame["step"]))
        if absent:
            raise ValueError(f"no {stage} rows at steps {absent} in {root} (steps read: {sorted(set(frame['step']))})")
        frame = frame[frame["step"].isin(steps)]
    frame = frame.reset_index(drop=True)
    frame.attrs = {"files": [str(f) for f in files], "provenance": {str(f): io.read_provenance(f) for f in files}}
    return frame


def to_frame(table: pa.Table) -> pd.DataFrame:
    """``table`` as a DataFrame whose integer columns stay integers: a column the schema declares
    nullable becomes pandas' nullable integer of the same width (``shots`` of the ``icl`` table is
    ``Int32``, null for the loss rows, where plain pandas would make every value a float); the others
    keep numpy's integer types."""
    frame = table.to_pandas()
    for field in table.schema:
        if pa.types.is_integer(field.type) and field.nullable:
            frame[field.name] = frame[field.name].astype(str(field.type).replace("int", "Int").replace("uInt", "UInt"))
    return frame


def _model_folders(root: Path, models: list[str] | None) -> list[Path]:
    """The model folders of ``root``: every one, or those of ``models`` (hub ids), in that order."""
    present = sorted(p for p in root.iterdir() if p.is_dir() and p.name != ANALYSIS and not p.name.startswith("."))
    if models is None:
        if not present:
            raise FileNotFoundError(f"{root} holds no model folder yet: run the workflow first (README)")
        return present
    folders = [root / model_slug(model) for model in models]
    absent = [model for model, folder in zip(models, folders) if not folder.is_dir()]
    if absent:
        raise FileNotFoundError(f"{root} has no results of {absent} (folder {model_slug(absent[0])!r}); its model "
                                f"folders: {', '.join(p.name for p in present) or 'none'}")
    return folders


def _model_files(folder: Path, stage: str) -> list[tuple[int | None, Path]]:
    """The files of table ``stage`` in a model folder with their step (None: not per checkpoint): the
    merged or per-model file when there is one, else the per-checkpoint files in step order."""
    whole = folder / f"{stage}.parquet"
    if whole.exists():
        return [(None, whole)]
    if stage in PER_MODEL:
        raise FileNotFoundError(f"{whole} is missing: `icl-dynamics {PER_MODEL[stage]}` writes it (the workflow "
                                f"runs it); {folder.name} holds {_contents(folder)}")
    per_step, parts = _per_step(), MERGED.get(stage, (stage,))
    steps = sorted((int(m[1]), p) for p in folder.iterdir() if p.is_dir() and (m := STEP_FOLDER.fullmatch(p.name)))
    files = [(step, path / f"{part}.parquet") for step, path in steps for part in parts
             if (path / f"{part}.parquet").exists()]
    if not files:
        made = ", ".join(f"step<N>/{part}.parquet (`icl-dynamics {per_step[part]}`)" for part in parts)
        merged = f" nor {whole.name} (`icl-dynamics merge`)" if stage in MERGED else ""
        raise FileNotFoundError(f"{folder} has no {stage} table: neither {made}{merged}; it holds "
                                f"{_contents(folder)}. Run the workflow (README) or those commands")
    return files


def _contents(folder: Path) -> str:
    """The tables a model folder holds, for error messages."""
    whole = [p.stem for p in sorted(folder.glob("*.parquet"))] + [
        f"relations/{p.stem}" for p in sorted(folder.glob("relations/*.parquet"))]
    steps = [p for p in folder.iterdir() if p.is_dir() and STEP_FOLDER.fullmatch(p.name)]
    per_step = sorted({p.stem for step in steps for p in step.glob("*.parquet")})
    return (f"{', '.join(whole) or 'no merged table'} and, per checkpoint ({len(steps)} steps), "
            f"{', '.join(per_step) or 'nothing'}")
