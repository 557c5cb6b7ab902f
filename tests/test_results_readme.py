"""results/README.md documents every table the pipeline writes, column for column (issue 14).

How the README is read (its "How to read the column tables" paragraph says the same to readers):

* A table's section is a heading that names ``<name>.parquet``: a ``##`` heading for a per-checkpoint,
  merged or per-model table, a ``###`` heading under ``## relations/`` for ``relations/<name>`` and under
  ``## analysis/`` for the analysis table ``<name>``. Its columns are the rows of the one markdown table
  in that section whose header is ``| column | meaning |``.
* A row's first cell names columns as `code` spans; any other text in that cell is ignored. A span
  starting with ``_`` is a suffix: it adds ``<column><suffix>`` for every column named before it in the
  cell, so "`control_tenth`, `control_random` (+ `_events`)" is four columns. Every other span must be
  a plain column name (no ``<score>`` placeholders, no ``[_low/_high]``).
* ``model``, ``step`` and ``tokens`` (:data:`schemas.CHECKPOINT_FIELDS`) are described once, near the top
  of the README, and begin every step-indexed table (per checkpoint or merged); those tables' sections
  do not repeat them. Every other table's section lists all its columns (``layer``/``head`` included).
* The per-checkpoint parts of a merged table (``loss`` and ``icl_tasks`` of ``icl``) have the merged
  table's schema (the merge concatenates them with it) and are documented by its section.

The code is the truth: the schemas are imported from the modules that write the tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pyarrow as pa
import pytest

from icl_dynamics import causal, emergence, hub, relations, results, schemas, seed_groups

README = Path(__file__).resolve().parents[1] / "results" / "README.md"

COLUMN_HEADER = re.compile(r"\|\s*column\s*\|\s*meaning\s*\|")
SECTION = re.compile(r"(#{2,3})\s+(.*)")
TABLE_FILE = re.compile(r"([a-z0-9_]+)\.parquet")
CODE = re.compile(r"`([^`]+)`")
NAME = re.compile(r"[a-z][a-z0-9_]*")
SUFFIX = re.compile(r"_[a-z0-9_]+")
SUBFOLDERS = {"relations/": "relations/", "analysis/": ""}  # ## heading's folder -> prefix of its tables' names

SHARED = tuple(f.name for f in schemas.CHECKPOINT_FIELDS)

# per-checkpoint tables documented by the section of the merged table that concatenates them
DOCUMENTED_WITH = {"loss": "icl", "icl_tasks": "icl"}


def _schemas() -> dict[str, pa.Schema]:
    """Every table of :func:`results.table_names` with the schema its writer uses."""
    documented = {
        "provenance": hub.PROVENANCE_SCHEMA,
        "heads": schemas.INDUCTION_SCHEMA,
        "icl": schemas.ICL_SCHEMA,
        "loss_curve": schemas.LOSS_CURVE_SCHEMA,
        "relation_index": schemas.RELATION_INDEX_SCHEMA,
        "ablation": schemas.ABLATION_SCHEMA,
        "text_tokens": schemas.TEXT_TOKENS_SCHEMA,
        "relations/sequences": relations.SEQUENCES_SCHEMA,
        "relations/triplets": relations.TRIPLETS_SCHEMA,
        "relations/summary": relations.SUMMARY_SCHEMA,
        **emergence.TABLES,
        **causal.TABLES,
        **seed_groups.TABLES,
    }
    return {**documented, **{part: documented[whole] for part, whole in DOCUMENTED_WITH.items()}}


SCHEMAS = _schemas()
STEP_INDEXED = {*results.MERGED, *results._per_step()}  # merged and per-checkpoint tables


class NotationError(ValueError):
    """A first cell that breaks the README's column notation."""


def columns(cell: str) -> list[str]:
    """The columns a row's first cell names (the module docstring's rule)."""
    bases: list[str] = []
    suffixed: list[str] = []
    for span in CODE.findall(cell):
        if SUFFIX.fullmatch(span):
            if not bases:
                raise NotationError(f"suffix `{span}` with no column before it: {cell!r}")
            suffixed += [base + span for base in bases]
        elif not NAME.fullmatch(span):
            raise NotationError(f"`{span}` is not a column name (list every column, or use a `_suffix`): {cell!r}")
        elif suffixed:
            raise NotationError(f"a column after a suffix (put suffixes last): {cell!r}")
        else:
            bases.append(span)
    return bases + suffixed


@dataclass
class Section:
    """A table's section of the README: its columns in order (repeats kept), its text, notation errors."""

    columns: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    column_tables: int = 0


@cache
def readme() -> tuple[str, dict[str, Section], tuple[str, ...]]:
    """results/README.md's text before the first section, its table sections by table name, and its
    structural errors (a table documented twice, a column table outside a table's section)."""
    top: list[str] = []
    sections: dict[str, Section] = {}
    errors: list[str] = []
    section: Section | None = None
    folder: str | None = None  # the current ## heading's folder (SUBFOLDERS)
    in_table = seen_heading = False
    for line in README.read_text().splitlines():
        heading = SECTION.fullmatch(line)
        if heading:
            seen_heading, in_table = True, False
            level, title = heading.groups()
            if level == "##":
                folder = next((f for f in SUBFOLDERS if title.startswith(f)), None)
            file = TABLE_FILE.match(title)
            section = None
            if file is not None:
                name = (SUBFOLDERS[folder] if level == "###" and folder is not None else "") + file.group(1)
                if name in sections:
                    errors.append(f"{name} is documented twice")
                section = sections[name] = Section()
            continue
        if not seen_heading:
            top.append(line)
            continue
        if section is not None:
            section.text.append(line)
        if COLUMN_HEADER.fullmatch(line.strip()):
            if section is None:
                errors.append(f"a column table outside a table's section, under {line!r}")
            else:
                section.column_tables += 1
            in_table = section is not None
        elif in_table and line.startswith("|"):
            first = line.strip().strip("|").split("|")[0].strip()
            if set(first) <= set("-: "):  # the separator row
                continue
            try:
                section.columns.extend(columns(first))
            except NotationError as exc:
                section.errors.append(str(exc))
        else:
            in_table = False
    return "\n".join(top), sections, tuple(errors)


def test_expansion_rule():
    assert columns("`a`, `b_c`") == ["a", "b_c"]
    assert columns("`control_matched` (+ `_events`)") == ["control_matched", "control_matched_events"]
    assert columns("`x`, `y` (+ `_low`, `_high`)") == ["x", "y", "x_low", "y_low", "x_high", "y_high"]
    for wrong in ("`<score>_se`", "`transition_step[_low/_high]`", "`_events`", "`a` (+ `_x`), `b`"):
        with pytest.raises(NotationError):
            columns(wrong)


def test_schema_mapping_is_the_code_s():
    """The test's table -> schema map covers every table the pipeline writes, with the writers' schemas."""
    from icl_dynamics.cli import _merge_schema

    assert sorted(SCHEMAS) == results.table_names()
    assert DOCUMENTED_WITH == {part: whole for whole, parts in results.MERGED.items() for part in parts
                               if part != whole}, "update DOCUMENTED_WITH to results.MERGED's per-checkpoint parts"
    wrong = [name for name in results.MERGED if SCHEMAS[name] != _merge_schema(name)]
    wrong += [name for name, schema in {**emergence.TABLES, **causal.TABLES}.items() if SCHEMAS[name] != schema]
    assert not wrong, f"tables mapped to another schema than the one the merge or analyze command writes: {wrong}"
    not_led = [name for name in STEP_INDEXED if tuple(SCHEMAS[name].names[:3]) != SHARED]
    assert not not_led, f"step-indexed tables whose schema does not begin with {SHARED}: {not_led}"


def test_readme_has_a_section_for_every_table():
    _, sections, errors = readme()
    assert not errors, "results/README.md: " + "; ".join(errors)
    expected = set(results.table_names()) - set(DOCUMENTED_WITH)
    missing, extra = sorted(expected - set(sections)), sorted(set(sections) - expected)
    assert not missing, f"tables without a section in results/README.md: {missing}"
    assert not extra, f"sections of results/README.md for tables the pipeline does not write: {extra}"
    unnamed = [f"{part}.parquet in {whole}" for part, whole in DOCUMENTED_WITH.items()
               if f"{part}.parquet" not in "\n".join(sections[whole].text)]
    assert not unnamed, f"results/README.md: name the per-checkpoint files a section documents: {unnamed}"


def test_shared_columns_are_described_once():
    top, sections, _ = readme()
    assert all(f"`{name}`" in top for name in SHARED), f"results/README.md's opening must describe {SHARED}"
    repeated = {name: sorted(set(section.columns) & set(SHARED)) for name, section in sections.items()
                if name in STEP_INDEXED and set(section.columns) & set(SHARED)}
    assert not repeated, f"step-indexed sections repeating the shared columns: {repeated}"


@pytest.mark.parametrize("table", sorted(set(results.table_names()) - set(DOCUMENTED_WITH)))
def test_readme_columns_equal_the_schema(table):
    _, sections, _ = readme()
    if table not in sections:
        pytest.fail(f"results/README.md has no section for {table}")
    section = sections[table]
    if section.column_tables != 1:
        pytest.fail(f"results/README.md, {table}: {section.column_tables} `| column | meaning |` tables, not one")
    if section.errors:
        pytest.fail(f"results/README.md, {table}: " + "; ".join(section.errors))
    twice = sorted({c for c in section.columns if section.columns.count(c) > 1})
    if twice:
        pytest.fail(f"results/README.md, {table}: columns listed twice: {twice}")
    documented = set(section.columns) | (set(SHARED) if table in STEP_INDEXED else set())
    schema = set(SCHEMAS[table].names)
    missing, extra = sorted(schema - documented), sorted(documented - schema)
    if missing or extra:
        pytest.fail(f"results/README.md, {table}: columns the code writes but the README lacks: {missing}; "
                    f"columns the README lists but the code does not write: {extra}")
