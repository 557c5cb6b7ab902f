"""The per-checkpoint measurements and the job that runs any set of them on one model load.

Each :class:`Stage` (induction heads, loss reduction, ICL tasks, relation index, ablation) declares its
options, reads its inputs before the model is loaded (a bad input fails in a second, not after a minute
of loading) and turns a loaded :class:`~icl_dynamics.models.Checkpoint` into tables. A stage may also
read tables of earlier stages of the same checkpoint (``needs``: the ablation reads the heads and the
relation index to pick its head groups): from the same job when it runs them, else from their files.
The CLI exposes
each stage as its own subcommand (to rerun one stage of one checkpoint) and all of them as
``icl-dynamics score`` (the workflow's one job per checkpoint: one process, one load, every table);
:func:`score` runs one on a checkpoint loaded in Python and returns its tables as DataFrames.

torch and the stage modules are imported where a stage runs, so the CLI's light commands stay light.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from icl_dynamics.checkpoints import Schedule
    from icl_dynamics.models import Checkpoint

log = logging.getLogger(__name__)

# add(flag, **argparse keywords): declares one option of a stage
AddOption = Callable[..., None]
# a stage's tables: output name -> (rows, schema, metadata of the file)
Tables = dict[str, tuple[list[dict], "pa.Schema", dict[str, Any]]]
# the earlier stages' tables a stage reads (Stage.needs), by table name
Earlier = Mapping[str, "pd.DataFrame"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One per-checkpoint measurement: its options, inputs and output tables."""

    name: str  # subcommand, prefix of its options in `score`, and what the finite guard names
    help: str
    outputs: Mapping[str, str]  # table name (file stem under the step folder) -> flag of the stage's subcommand
    inputs: tuple[str, ...]  # flags naming input files (shared, unprefixed in `score`)
    options: Callable[[AddOption], None]
    prepare: Callable[[argparse.Namespace], Any]  # reads the inputs, before the model loads
    # (checkpoint, options, prepared inputs, the needed earlier tables by name) -> tables
    measure: Callable[[Checkpoint, argparse.Namespace, Any, Earlier], Tables]
    needs: Mapping[str, str] = dataclasses.field(default_factory=dict)  # earlier stage's table -> flag of its file

    def run(self, ckpt: Checkpoint, opts: argparse.Namespace, inputs: Any, earlier: Earlier | None = None) -> Tables:
        """``measure`` under the checkpoint's finite guard (a NaN or Inf stops it, naming this stage)."""
        with ckpt.guard(self.name):
            return self.measure(ckpt, opts, inputs, earlier or {})


def _no_inputs(opts: argparse.Namespace) -> None:
    return None


# --- heads -------------------------------------------------------------------------------------


def _heads_options(add: AddOption) -> None:
    add("--n-tokens", type=int, default=25, help="length of the random segment that is repeated")
    add("--repeats", type=int, default=4, help="times the segment repeats")
    add("--n-samples", type=int, default=10, help="random sequences averaged")
    add("--exclude-frac", type=float, default=0.05, help="fraction of the vocabulary left out (most frequent ids)")
    add("--seed", type=int, default=0)


def _heads(ckpt: Checkpoint, opts: argparse.Namespace, _: None, _earlier: Earlier) -> Tables:
    from icl_dynamics.induction import Probe, induction_rows
    from icl_dynamics.schemas import INDUCTION_SCHEMA

    probe = Probe(opts.n_tokens, opts.repeats, opts.n_samples, opts.exclude_frac, opts.seed)
    rows = induction_rows(ckpt.model, ckpt.tokenizer, probe)
    best = max(rows, key=lambda r: r["prefix_matching"])
    log.info("heads: best prefix matching %.3f (layer %d head %d)", best["prefix_matching"], best["layer"],
             best["head"])
    return {"heads": (rows, INDUCTION_SCHEMA, {"probe": vars(probe)})}


# --- loss reduction ------------------------------------------------------------------------------


def _loss_options(add: AddOption) -> None:
    add("--text-tokens", help="output of tokenize-text (the documents, tokenised once per model)")
    add("--early", type=int, default=50, help="early token position of the ICL score")
    add("--late", type=int, default=500, help="late token position of the ICL score")
    add("--batch-size", type=int, default=8)
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples of the documents")
    add("--seed", type=int, default=0)


def _input_table(value: Any, schema: pa.Schema, what: str) -> tuple[pa.Table, dict]:
    """A table input given as a path (its file, and the provenance stamped into it) or as a DataFrame
    (``load_results`` output: its ``attrs["provenance"]``, else none), checked against ``schema``."""
    import pandas as pd

    from icl_dynamics import io

    if isinstance(value, pd.DataFrame):
        missing = [name for name in schema.names if name not in value.columns]
        if missing:
            raise ValueError(f"{what}: the DataFrame lacks columns {missing}")
        provenances = list(value.attrs.get("provenance", {}).values())
        return io.to_table(value[schema.names].to_dict("list"), schema), provenances[0] if provenances else {}
    return io.read_table(value, schema), io.read_provenance(value)


def _loss_inputs(opts: argparse.Namespace) -> tuple[Any, str]:
    import torch

    from icl_dynamics.icl import TextSource
    from icl_dynamics.schemas import TEXT_TOKENS_SCHEMA

    table, provenance = _input_table(opts.text_tokens, TEXT_TOKENS_SCHEMA, "text_tokens")
    docs = torch.tensor(table.column("token_ids").to_pylist(), dtype=torch.long)
    label = TextSource(**provenance["source"]).label() if "source" in provenance else "text (a DataFrame)"
    return docs, label


def _label(value: Any) -> str:
    """How an input appears in a table's metadata: its path, or what kind of object it was."""
    return value if isinstance(value, str) else str(value) if isinstance(value, Path) else type(value).__name__


def _loss(ckpt: Checkpoint, opts: argparse.Namespace, inputs: tuple[Any, str], _earlier: Earlier) -> Tables:
    from icl_dynamics.icl import loss_reduction, per_token_losses
    from icl_dynamics.models import check_loss, check_token_ids
    from icl_dynamics.schemas import ICL_SCHEMA, LOSS_CURVE_SCHEMA

    docs, task = inputs
    check_token_ids(ckpt.model, docs, f"the text tokens {opts.text_tokens}")
    losses = per_token_losses(ckpt.model, docs, batch_size=opts.batch_size, progress=True)
    check_loss(ckpt.model_id, ckpt.step, ckpt.model, losses, f"the text ({task})")  # before any table is made of it
    curve, icl = loss_reduction(losses, early=opts.early, late=opts.late, n_boot=opts.bootstrap, seed=opts.seed)
    icl["task"] = task
    log.info("loss: ICL score %.3f [%.3f, %.3f] over %d documents", icl["value"], icl["ci_low"], icl["ci_high"],
             icl["n"])
    meta = {"early": opts.early, "late": opts.late, "bootstrap": opts.bootstrap, "text_tokens": _label(opts.text_tokens)}
    return {"loss": ([icl], ICL_SCHEMA, meta), "loss_curve": (curve, LOSS_CURVE_SCHEMA, meta)}


# --- ICL tasks -----------------------------------------------------------------------------------


def _icl_tasks_options(add: AddOption) -> None:
    add("--shots", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 10, 20], help="demonstrations per prompt")
    add("--n-prompts", type=int, default=50, help="prompts per task and shot count")
    add("--seed", type=int, default=0)
    add("--batch-size", type=int, default=16)


def _icl_tasks_inputs(opts: argparse.Namespace) -> None:
    twice = sorted({s for s in opts.shots if list(opts.shots).count(s) > 1})
    if twice:
        raise ValueError(f"icl-tasks: --shots lists {', '.join(map(str, twice))} more than once (config key "
                         "'icl_tasks.shots'); give each shot count once")


def _icl_tasks(ckpt: Checkpoint, opts: argparse.Namespace, _: None, _earlier: Earlier) -> Tables:
    from icl_dynamics.icl_tasks import evaluate_tasks
    from icl_dynamics.schemas import ICL_SCHEMA

    rows = evaluate_tasks(ckpt.model, ckpt.tokenizer, shots=opts.shots, n_prompts=opts.n_prompts, seed=opts.seed,
                          batch_size=opts.batch_size)
    meta = {"n_prompts": opts.n_prompts, "seed": opts.seed, "shots": opts.shots}
    return {"icl_tasks": (rows, ICL_SCHEMA, meta)}


# --- relation index ------------------------------------------------------------------------------


def _relation_index_options(add: AddOption) -> None:
    add("--relations-dir", help="output of the relations stage")
    add("--gates", nargs="+", default=["argmax", "margin"], choices=("argmax", "margin"))
    add("--variants", nargs="+", default=["literal", "source", "contextual"],
        choices=("literal", "source", "contextual"))
    add("--tau", type=float, default=2.2, help="margin of the margin gate")
    add("--keep-function-words", action="store_true", help="keep stop words and punctuation in C_j")
    add("--control-position", type=int, default=10, help="position of the fixed-token control")
    add("--alpha", type=float, default=0.05, help="family-wise error rate of the SIH test (Holm)")
    add("--min-clusters", type=int, default=10,
        help="documents and token pairs a cell needs behind its test; fewer: 'insufficient'")
    add("--seed", type=int, default=0, help="seed of the random-token and matched controls")
    add("--no-bos", action="store_true", help="score without prepending <|endoftext|>")
    add("--batch-size", type=int, default=8)
    add("--max-len", type=int, default=None, help="drop triplets beyond this many tokens (default: the model's context)")


def _relation_index_inputs(opts: argparse.Namespace) -> tuple[Any, Any]:
    """The relations stage's sequences and triplets: from its folder, or (Python API) a mapping of the two
    DataFrames, ``{"sequences": ..., "triplets": ...}`` (``load_results(..., "relations/sequences")``)."""
    from icl_dynamics.relations import SEQUENCES_SCHEMA, TRIPLETS_SCHEMA

    given = opts.relations_dir
    if isinstance(given, Mapping):
        missing = sorted({"sequences", "triplets"} - set(given))
        if missing:
            raise ValueError(f"relations_dir: a mapping of DataFrames needs the keys sequences and triplets "
                             f"(missing {missing})")
        return (_input_table(given["sequences"], SEQUENCES_SCHEMA, "relations sequences")[0],
                _input_table(given["triplets"], TRIPLETS_SCHEMA, "relations triplets")[0])
    relations = Path(given)
    return (_input_table(relations / "sequences.parquet", SEQUENCES_SCHEMA, "relations sequences")[0],
            _input_table(relations / "triplets.parquet", TRIPLETS_SCHEMA, "relations triplets")[0])


def _relation_index(ckpt: Checkpoint, opts: argparse.Namespace, inputs: tuple[Any, Any],
                    _earlier: Earlier) -> Tables:
    from icl_dynamics.models import check_token_ids
    from icl_dynamics.relation_index import score_relation_index
    from icl_dynamics.schemas import RELATION_INDEX_SCHEMA

    sequences, triplets = inputs
    check_token_ids(ckpt.model, sequences.column("token_ids").combine_chunks().flatten().to_numpy(),
                    f"the relation sequences in {opts.relations_dir}")
    rows = score_relation_index(
        ckpt.model, sequences, triplets, gates=opts.gates, variants=opts.variants, tau=opts.tau,
        exclude_function_words=not opts.keep_function_words, control_position=opts.control_position,
        seed=opts.seed, alpha=opts.alpha, min_clusters=opts.min_clusters, batch_size=opts.batch_size,
        bos=not opts.no_bos, max_len=opts.max_len,
    )
    log.info("relation index: %d rows, %d flagged as semantic induction heads; 95th percentile of the attention "
             "dominance ratio over all heads: %.2f (tau = %.2f)", len(rows), sum(r["sih"] for r in rows),
             rows[0]["ratio_p95_model"] if rows else float("nan"), opts.tau)
    flagged = sum(r["negative_control_flagged"] for r in rows)
    if flagged:  # score_relation_index also warns; the job log must show it whatever the warning filters
        log.error("NEGATIVE CONTROL FLAGGED in %d cell(s) of %s@step%d: the SIH test is broken on this checkpoint "
                  "and its flags must not be trusted (see the relation_index table's negative_control_flagged)",
                  flagged, ckpt.model_id, ckpt.step)
    params = {**vars(opts), "relations_dir": _label(opts.relations_dir)}
    return {"relation_index": (rows, RELATION_INDEX_SCHEMA, {"params": params})}


# --- ablation ------------------------------------------------------------------------------------


def _ablation_options(add: AddOption) -> None:
    add("--text-tokens", help="output of tokenize-text (the documents, tokenised once per model)")
    add("--relations-dir", help="output of the relations stage")
    add("--heads-table", help="this checkpoint's heads table (read when the heads stage is not in the same job)")
    add("--relation-index-table",
        help="this checkpoint's relation_index table (read when the relation-index stage is not in the same job)")
    add("--max-parameters", type=float, default=2e9,
        help="skip larger models (an empty table says why); 0 skips every model")
    add("--n-docs", type=int, default=32, help="documents of the ICL score (the first of --text-tokens)")
    add("--early", type=int, default=50, help="early token position of the ICL score")
    add("--late", type=int, default=500, help="late token position of the ICL score")
    add("--n-sequences", type=int, default=64, help="relation sequences with an event, per relation family")
    add("--shots", type=int, default=20, help="demonstrations per task prompt (the largest icl-tasks measures)")
    add("--n-prompts", type=int, default=20, help="prompts per synthetic task")
    add("--top-k", type=int, default=5, help="induction heads (highest prefix matching) ablated together")
    add("--gate", default="argmax", choices=("argmax", "margin"), help="relation-index gate of the SIH flag")
    add("--variant", default="source", choices=("literal", "source", "contextual"),
        help="relation-index variant of the SIH flag")
    add("--draws", type=int, default=5, help="layer-matched random controls per group")
    add("--exact-heads", type=_exact_heads, default=5,
        help="heads ablated exactly per evaluation set, the gradient screen's top ones ('all': every head)")
    add("--screen-steps", type=int, default=2,  # icl_dynamics.ablation.SCREEN_STEPS
        help="points on the path to every head at its mean where the screen takes its gradient (1: the clean model)")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples of the documents and prompts")
    add("--seed", type=int, default=0, help="seed of the prompts, the controls and the bootstrap")
    add("--batch-size", type=int, default=8)
    add("--ablate-first", action="store_true",
        help="also ablate position 0 (the attention sink), the mean taken over every position; default: position "
             "0 keeps the head's own output")


def _exact_heads(text: str) -> int | None:
    """``--exact-heads``: a count >= 0, or ``all`` (None: every head)."""
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count of heads (0, 1, ...) nor 'all'")
    return int(text)


def _ablation_inputs(opts: argparse.Namespace) -> tuple[Any, str, Any, Any]:
    return (*_loss_inputs(opts), *_relation_index_inputs(opts))


def _this_checkpoint(table: pd.DataFrame, name: str, ckpt: Checkpoint) -> pd.DataFrame:
    """The rows of another stage's table for ``ckpt`` (a table from this job has no model and step columns)."""
    if "model" not in table:
        return table
    rows = table[(table["model"] == ckpt.model_id) & (table["step"] == ckpt.step)]
    if rows.empty:
        found = sorted({f"{m}@step{s}" for m, s in zip(table["model"], table["step"])})
        raise ValueError(f"ablation: the {name} table has no rows of {ckpt.model_id}@step{ckpt.step} (it has "
                         f"{', '.join(found[:3])}); give this checkpoint's table")
    return rows


def _ablation(ckpt: Checkpoint, opts: argparse.Namespace, inputs: tuple[Any, str, Any, Any],
              earlier: Earlier) -> Tables:
    from icl_dynamics.ablation import (
        ablation_table,
        flagged_sih_heads,
        icl_score_set,
        icl_task_set,
        relation_recall_set,
        top_induction_heads,
    )
    from icl_dynamics.models import check_token_ids
    from icl_dynamics.schemas import ABLATION_SCHEMA

    docs, text, sequences, triplets = inputs
    check_token_ids(ckpt.model, docs, f"the text tokens {opts.text_tokens}")
    check_token_ids(ckpt.model, sequences.column("token_ids").combine_chunks().flatten().to_numpy(),
                    f"the relation sequences in {opts.relations_dir}")
    params = sum(p.numel() for p in ckpt.model.parameters())
    meta: dict[str, Any] = {"params": {k: _label(v) if k in ("text_tokens", "relations_dir") else v
                                       for k, v in vars(opts).items() if not k.endswith("_table")},
                            "mean_reference": "each evaluation set's own real positions, clean pass"
                            + ("" if opts.ablate_first else ", but position 0, which keeps its output")}
    if params > opts.max_parameters:
        reason = (f"skipped: {params / 1e6:.0f}M parameters > max_parameters {opts.max_parameters / 1e6:.0f}M "
                  "(ablation.max_parameters, or ablation.enabled false)")
        log.info("ablation %s", reason)
        return {"ablation": ([], ABLATION_SCHEMA, {**meta, "skipped": reason})}
    if not 0 < opts.n_docs <= len(docs):
        raise ValueError(f"ablation: n_docs {opts.n_docs} must be in 1..{len(docs)} (the documents of "
                         f"{opts.text_tokens})")
    evaluations = [relation_recall_set(ckpt.model.config, sequences, triplets, n_sequences=opts.n_sequences),
                   icl_score_set(docs[:opts.n_docs], early=opts.early, late=opts.late, task=text),
                   icl_task_set(ckpt.tokenizer, shots=opts.shots, n_prompts=opts.n_prompts, seed=opts.seed)]
    groups = {"sih": flagged_sih_heads(_this_checkpoint(earlier["relation_index"], "relation_index", ckpt),
                                       gate=opts.gate, variant=opts.variant),
              "induction": top_induction_heads(_this_checkpoint(earlier["heads"], "heads", ckpt), opts.top_k)}
    exact_heads = None if opts.exact_heads in (None, "all") else int(opts.exact_heads)  # the API may say "all"
    table = ablation_table(ckpt.model, evaluations, groups, exact_heads=exact_heads,
                           screen_steps=opts.screen_steps, draws=opts.draws, seed=opts.seed,
                           batch_size=opts.batch_size, n_boot=opts.bootstrap, keep_first=not opts.ablate_first)
    cost = table.attrs["cost"]
    exact = table[(table["ablation"] == "head") & (table["method"] == "exact")]
    log.info("ablation: every head screened, %d ablated exactly, groups %s; %.0f s, %.1f forward passes over %d "
             "tokens (%.1f as separate passes without the screen)", len(exact.drop_duplicates(["layer", "head"])),
             {name: len(heads) for name, heads in groups.items()}, cost.seconds, cost.passes, cost.tokens,
             cost.unshared_passes)
    meta["groups"] = {name: [f"L{a}H{b}" for a, b in heads] for name, heads in groups.items()}
    # the work, not the seconds: a rerun writes the same bytes
    meta["cost"] = {"passes": cost.passes, "unshared_passes": cost.unshared_passes, "tokens": cost.tokens}
    return {"ablation": (table.astype(object).where(table.notna(), None).to_dict("records"), ABLATION_SCHEMA, meta)}


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("heads", "prefix-matching, previous-token and copying scores of every head",
              {"heads": "--out"}, (), _heads_options, _no_inputs, _heads),
        Stage("loss", "per-token loss curve and ICL score (loss reduction)",
              {"loss": "--out", "loss_curve": "--out-curve"}, ("--text-tokens",), _loss_options, _loss_inputs,
              _loss),
        Stage("icl-tasks", "format compliance and pattern discovery on the four synthetic tasks",
              {"icl_tasks": "--out"}, (), _icl_tasks_options, _icl_tasks_inputs, _icl_tasks),
        Stage("relation-index", "the paper's relation index of every head (Ren et al. 2024)",
              {"relation_index": "--out"}, ("--relations-dir",), _relation_index_options, _relation_index_inputs,
              _relation_index),
        Stage("ablation", "mean-ablation of every head and of the flagged head groups: what relation recall and ICL "
              "lose (issue 15's causal check)", {"ablation": "--out"}, ("--text-tokens", "--relations-dir"),
              _ablation_options, _ablation_inputs, _ablation,
              needs={"heads": "--heads-table", "relation_index": "--relation-index-table"}),
    )
}


def run_stages(jobs: Sequence[tuple[Stage, argparse.Namespace]], load: Callable[[], Checkpoint],
               stamp: Callable[[list[dict]], list[dict]], paths: Mapping[str, str | Path]) -> dict[str, float]:
    """Run ``jobs`` (stage, its options) on one model load and write every table to ``paths[name]``.

    Inputs are read first, the model is loaded once, each stage runs under the checkpoint's finite
    guard, and the tables are written together at the end (:func:`icl_dynamics.io.write_tables`):
    a failure or a kill leaves no output of this job, never some. Returns seconds per phase.
    """
    import pandas as pd

    from icl_dynamics import io

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    import icl_dynamics.models  # noqa: F401  (torch and transformers: timed on their own)

    seconds["import"] = time.perf_counter() - start
    start = time.perf_counter()
    prepared = [stage.prepare(opts) for stage, opts in jobs]
    produced: set[str] = set()
    from_files: dict[str, pd.DataFrame] = {}  # needed tables no earlier stage of this job writes
    for stage, opts in jobs:
        for name in stage.needs:
            if name not in produced and name not in from_files:
                from_files[name] = _needed_table(stage, opts, name)
        produced.update(stage.outputs)
    seconds["inputs"] = time.perf_counter() - start
    start = time.perf_counter()
    ckpt = load()
    seconds["load"] = time.perf_counter() - start
    tables: Tables = {}
    for (stage, opts), inputs in zip(jobs, prepared):
        start = time.perf_counter()
        earlier = {name: pd.DataFrame(tables[name][0]) if name in tables else from_files[name] for name in stage.needs}
        tables.update(stage.run(ckpt, opts, inputs, earlier))
        seconds[stage.name] = time.perf_counter() - start
    start = time.perf_counter()
    runtime, record = ckpt.runtime(), ckpt.record()  # how, and on what (verified files, probe outputs)
    io.write_tables({paths[name]: (io.to_table(stamp(rows), schema), {**meta, "runtime": runtime,
                                                                      "checkpoint": record})
                     for name, (rows, schema, meta) in tables.items()})
    seconds["write"] = time.perf_counter() - start
    return seconds


def option_dest(flag: str) -> str:
    """argparse's attribute name for ``flag`` (``--heads-table`` -> ``heads_table``)."""
    return flag.lstrip("-").replace("-", "_")


def _needed_table(stage: Stage, opts: argparse.Namespace, name: str) -> pd.DataFrame:
    """The earlier stage's table ``name`` that ``stage`` needs, read from the file its option names."""
    import pandas as pd

    from icl_dynamics import io
    from icl_dynamics.schemas import STAGE_TABLES

    flag = stage.needs[name]
    path = getattr(opts, option_dest(flag))
    if path is None:
        raise ValueError(f"stage {stage.name} needs the {name} table: run its stage in the same job or give {flag}")
    if isinstance(path, pd.DataFrame):  # the Python API: a DataFrame (load_results, or score's own output)
        return path
    return io.read_table(path, STAGE_TABLES[name]).to_pandas()


def stamp(rows: list[dict], model: str, step: int, tokens: int) -> list[dict]:
    """``rows`` led by the columns every step-indexed table starts with: model, step and tokens seen."""
    return [{"model": model, "step": step, "tokens": tokens, **row} for row in rows]


def stage_options(stage: Stage, **values: Any) -> argparse.Namespace:
    """``stage``'s options as its subcommand would have them: its defaults, overridden by ``values``
    (option names with underscores, e.g. ``n_samples=20``). An unknown name, a value outside an
    option's choices or a missing input file is an error naming what the stage takes."""
    parser = argparse.ArgumentParser(prog=stage.name, add_help=False)
    actions: dict[str, argparse.Action] = {}

    def add(flag: str, **kw: Any) -> None:
        action = parser.add_argument(flag, **kw)
        actions[action.dest] = action

    stage.options(add)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise TypeError(f"stage {stage.name} has no option {', '.join(unknown)}; its options: {', '.join(actions)}")
    opts = {dest: action.default for dest, action in actions.items()}
    for dest, value in values.items():
        action = actions[dest]
        if action.nargs is not None:  # a list option: one value is a list of one
            value = [value] if isinstance(value, (str, int, float)) else list(value)
        bad = [v for v in (value if action.nargs is not None else [value])
               if action.choices is not None and v not in action.choices]
        if bad:
            raise ValueError(f"stage {stage.name}: {dest}={value!r}: {bad} not among {list(action.choices)}")
        opts[dest] = value
    missing = [a for a in actions.values()
               if a.option_strings[0] in (*stage.inputs, *stage.needs.values()) and opts[a.dest] is None]
    if missing:
        raise ValueError(f"stage {stage.name} needs " + " and ".join(f"{a.dest}= ({a.help})" for a in missing))
    return argparse.Namespace(**opts)


def score(ckpt: Checkpoint, stage: str, *, schedule: str | Schedule = "pythia",
          **options: Any) -> dict[str, pd.DataFrame]:
    """Run one stage on a loaded checkpoint (:func:`icl_dynamics.models.load_checkpoint`) and return its
    tables by name as DataFrames, the rows ``icl-dynamics score`` writes for the same options.

    ``stage`` is one of :data:`STAGES` (``heads``, ``loss``, ``icl-tasks``, ``relation-index``,
    ``ablation``; ``_`` for ``-`` is fine); ``options`` are its options by name with their defaults as in
    ``icl-dynamics <stage> --help`` (:func:`stage_options`): ``loss`` needs ``text_tokens``, the
    tokenize-text table, ``relation-index`` needs ``relations_dir``, the relations stage's folder, and
    ``ablation`` both and ``heads_table`` and ``relation_index_table``, the checkpoint's own tables.
    Every table input is a path or a DataFrame (what :func:`icl_dynamics.load_results` or ``score``
    returned); ``relations_dir`` is the folder or ``{"sequences": DataFrame, "triplets": DataFrame}``.
    ``schedule`` (``pythia``, ``toy``, ``toy-relations`` or a :class:`~icl_dynamics.checkpoints.Schedule`)
    gives the tokens the checkpoint has seen.
    """
    from icl_dynamics import io
    from icl_dynamics.checkpoints import StepError

    spec = STAGES.get(stage.replace("_", "-"))
    if spec is None:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if getattr(ckpt, "verified", None) is None:
        raise ValueError(f"{ckpt.model_id}@step{ckpt.step}: this checkpoint was not loaded by load_checkpoint, so "
                         "nothing verified its files; load it with icl_dynamics.load_checkpoint")
    opts = stage_options(spec, **options)
    if isinstance(schedule, str):
        from icl_dynamics.config import schedule_named
        from icl_dynamics.toyzoo import TOY_SEED

        schedule = schedule_named(schedule, TOY_SEED)
    try:
        tokens = schedule.tokens(ckpt.step)
    except StepError as exc:
        hint = "; a toy zoo's checkpoint needs schedule='toy' or 'toy-relations'" if schedule.name == "pythia" else ""
        raise StepError(f"{ckpt.model_id}: {exc}{hint}") from exc
    from icl_dynamics.results import to_frame

    tables = spec.run(ckpt, opts, spec.prepare(opts), {name: _needed_table(spec, opts, name) for name in spec.needs})
    return {name: to_frame(io.to_table(stamp(rows, ckpt.model_id, ckpt.step, tokens), schema))
            for name, (rows, schema, _) in tables.items()}
