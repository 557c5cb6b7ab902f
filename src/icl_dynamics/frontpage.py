"""The report's front page: what the run found, in words, with the headline figure first.

``snakemake --report`` opens on the workflow's description (the Snakefile's ``report:``); the
``front_page`` rule writes it from the analysis tables after every run, so the report opens on this
run's result rather than on the rule graph: the headline figure (the emergence panel, whose shading is
the summary's), then per model when each head class formed and each ICL level emerged (the step of
the midpoint with its interval, and the first checkpoint past the step-0 null), and the verdicts
(:data:`icl_dynamics.emergence.ORDERS`) of every head class against every ICL level. The text is
reStructuredText, as Snakemake renders it (it also runs it through Jinja2: nothing here uses braces).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from icl_dynamics.emergence import LEVEL_METRIC, LEVELS, head_class, tokens_per_step

CLASS_NAMES = {"induction": "Induction heads (prefix matching)", "previous_token": "Previous-token heads",
               "copying": "Copying heads"}
LEVEL_NAMES = {"loss_reduction": "loss reduction (ICL score)", "format_compliance": "format compliance",
               "pattern_discovery": "pattern discovery (constrained accuracy)"}


def _step(tokens: float, tps: int) -> str:
    return f"{tokens / tps:,.0f}"


def _when(mid: float, low: float, high: float, tps: int) -> str:
    """'step X (95% interval A-B)' from a midpoint and its interval in tokens ('' without a midpoint)."""
    if pd.isna(mid):
        return ""
    interval = f" (95% interval {_step(low, tps)}-{_step(high, tps)})" if not (pd.isna(low) or pd.isna(high)) else ""
    return f"step {_step(mid, tps)}{interval}"


def _class_name(subject: str) -> str:
    if subject.startswith("sih:"):
        return f"Semantic induction heads ({subject[4:]} relations)"
    return CLASS_NAMES.get(subject, subject)


def head_rows(summary: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """The head-class rows the page reports: each class's ``top<k>`` rows, or its ``all`` rows where it
    has no more than ``top_k`` heads (the summary then has only those)."""
    rows = summary[summary["subject_kind"] == "head_class"]
    topped = set(rows.loc[rows["head_set"] == f"top{top_k}", "subject"])
    rows = rows[(rows["head_set"] == f"top{top_k}") | ((rows["head_set"] == "all") & ~rows["subject"].isin(topped))]
    order = {name: i for i, name in enumerate(CLASS_NAMES)}  # the classic classes first, then the relation index's
    return rows.sort_values("subject", key=lambda s: s.map(lambda x: (order.get(x, len(order)), x)), kind="stable")


def _head_lines(rows: pd.DataFrame, formation: pd.DataFrame, top_k: int, tps: int) -> list[str]:
    lines = []
    for subject, g in rows.groupby("subject", sort=False):
        row = g.iloc[0]
        name = _class_name(str(subject))
        units = f"{int(row['n_formed'])} of {int(row['n_units'])} heads formed"
        if row["head_set"] != "all":
            units += f", the top {top_k} of each score"
        when = _when(row["subject_tokens"], row["subject_low_tokens"], row["subject_high_tokens"], tps)
        onsets = _onsets(heads_in(formation, row["head_set"], top_k), str(subject))
        first = f"; first past its step-0 null at step {_step(np.median(onsets), tps)} (median over heads)" \
            if len(onsets) else ""
        if when:
            lines.append(f"- **{name}**: half-way formed at {when}, the median over formed heads ({units}){first}.")
        elif len(onsets):
            lines.append(f"- **{name}**: left its step-0 null ({units}{first}), but no midpoint is located: "
                         "undetermined.")
        else:
            lines.append(f"- **{name}**: never left its step-0 null ({units}).")
    return lines


def _onsets(formation: pd.DataFrame, subject: str) -> np.ndarray:
    """The onsets (tokens) of the heads of class ``subject`` in ``formation`` (those that left their null)."""
    mine = formation[[head_class(s, f) == subject for s, f in zip(formation["score"], formation["family"])]]
    return mine["onset_tokens"].dropna().to_numpy(float)


def heads_in(formation: pd.DataFrame, head_set: str, top_k: int) -> pd.DataFrame:
    """The formation rows of a summary head set: every head for ``all``, the top ``top_k`` per score else."""
    return formation if head_set == "all" else formation[(formation["final_rank"] <= top_k).fillna(False)]


def _level_lines(emergence: pd.DataFrame, tps: int) -> list[str]:
    lines = []
    timed = emergence[emergence["metric"] == emergence["level"].map(LEVEL_METRIC)]
    order = {level: i for i, level in enumerate(LEVELS)}
    for row in sorted(timed.to_dict("records"), key=lambda r: (order.get(r["level"], 9), r["task"])):
        name = LEVEL_NAMES.get(row["level"], row["level"])
        task = f", task {row['task']}" if row["task"] not in ("mean", "") and row["level"] != "loss_reduction" else ""
        shots = f", {int(row['shots'])}-shot" if not pd.isna(row["shots"]) else ""
        first = f"; first past its step-0 null at step {_step(row['onset_tokens'], tps)}" \
            if not pd.isna(row["onset_tokens"]) else ""
        if row["fit_status"] == "ok":
            when = _when(row["transition_tokens"], row["transition_tokens_low"], row["transition_tokens_high"], tps)
            lines.append(f"- **{name}**{task}{shots}: emerged, half-way at {when}{first}.")
        elif not pd.isna(row["onset_tokens"]):
            lines.append(f"- **{name}**{task}{shots}: left its step-0 null{first}, but its midpoint is "
                         f"{row['fit_status'].replace('_', ' ')}: undetermined.")
        else:
            lines.append(f"- **{name}**{task}{shots}: did not emerge (never past its step-0 null).")
    return lines


def _verdicts(rows: pd.DataFrame) -> list[str]:
    if rows.empty:
        return []
    levels = [lv for lv in LEVELS if lv in set(rows["level"])]
    tasks = rows[["level", "task"]].drop_duplicates()
    columns = [(lv, t) for lv in levels for t in sorted(tasks.loc[tasks["level"] == lv, "task"])]
    header = ["head class"] + [LEVEL_NAMES.get(lv, lv) + ("" if t in ("mean", "") or lv == "loss_reduction"
                                                          else f", {t}") for lv, t in columns]
    out = ["", ".. list-table:: When each head class formed, against when each ICL level emerged "
           "(before / with / after: the lag's 95% interval below, around or above zero)",
           "   :header-rows: 1", ""]
    out.append("   * - " + "\n     - ".join(header))
    for subject, g in rows.groupby("subject", sort=False):
        cells = [_class_name(str(subject))]
        for lv, t in columns:
            hit = g[(g["level"] == lv) & (g["task"] == t)]
            cells.append(str(hit["order"].iloc[0]) if len(hit) else "")
        out.append("   * - " + "\n     - ".join(cells))
    return out


def front_page(summary: pd.DataFrame, emergence: pd.DataFrame, formation: pd.DataFrame, provenance: pd.DataFrame,
               figure: str | os.PathLike[str], *, top_k: int) -> str:
    """The report's front page (reStructuredText): the headline figure (``figure``, a PNG, embedded), then
    per model the formation of each head class and the emergence of each ICL level, and the verdicts."""
    image = base64.b64encode(Path(figure).read_bytes()).decode()
    tps = tokens_per_step(provenance)
    models = sorted(set(summary["model"]) | set(emergence["model"]))
    title = "Result: " + ", ".join(m.split("/")[-1] for m in models)
    # raw HTML, the base64 in short lines (browsers skip whitespace in base64 data): docutils refuses input lines
    # over 10,000 characters, and Snakemake renders the page with docutils' defaults
    lines = [image[i:i + 76] for i in range(0, len(image), 76)]
    out = [title, "=" * len(title), "", ".. raw:: html", "",
           '   <img alt="the emergence panel" style="max-width: 100%" src="data:image/png;base64,',
           *(f"   {line}" for line in lines), '   ">', "",
           "The ICL levels (top rows: shaded, each level's transition interval; dotted, its first checkpoint past "
           "its step-0 null) and the heads beneath, against training tokens (figure *emergence_panel.png*). A "
           "midpoint is where a logistic fitted to the series is half-way; its interval is a bootstrap's "
           "(README, \"Where we depart from the paper\").", ""]
    for model in models:
        steps = sorted(provenance.loc[provenance["model"] == model, "step"].astype(int))
        mine = head_rows(summary[summary["model"] == model], top_k)
        out += [model, "-" * len(model), "",
                f"{len(steps)} checkpoints, steps {steps[0]:,} to {steps[-1]:,}; each head class over the top "
                f"{top_k} heads of each score at the last checkpoint, or every head where it has no more.", "",
                "**Heads**", ""]
        out += _head_lines(mine, formation[formation["model"] == model], top_k, tps[model])
        out += ["", "**In-context learning**", ""]
        out += _level_lines(emergence[emergence["model"] == model], tps[model])
        out += _verdicts(mine)
        out.append("")
    out += ["The tables behind this page: *summary.csv* (every comparison), and analysis/summary.parquet, "
            "emergence.parquet and formation.parquet in the results folder (results/README.md).", ""]
    return "\n".join(out)


def write_front_page(paths: dict[str, Sequence[str]], figure: str, out: str | os.PathLike[str], *, top_k: int) -> Path:
    """Read the analysis tables (``paths``: summary, emergence, formation, provenance) and write the page."""
    from icl_dynamics.io import atomic_path

    frames = {name: pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
              for name, files in paths.items()}
    text = front_page(frames["summary"], frames["emergence"], frames["formation"], frames["provenance"], figure,
                      top_k=top_k)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text)
    return Path(out)
