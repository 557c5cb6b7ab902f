"""``icl-dynamics``: the command line the Snakemake rules call, one subcommand per stage.

Every stage also runs by hand, e.g. to rerun one checkpoint::

    icl-dynamics heads --model EleutherAI/pythia-70m-deduped --step 1000 --out heads.parquet
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from icl_dynamics.stages import option_dest
from icl_dynamics.toyzoo import TOY_SEED, ZOO_KINDS

log = logging.getLogger("icl_dynamics")
T = TypeVar("T")


def _schedule(args: argparse.Namespace):
    from icl_dynamics.config import schedule_named

    return schedule_named(args.schedule, args.toy_seed)


def _checkpoint_args(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument("--model", required=True, help="hub model id, e.g. EleutherAI/pythia-70m-deduped")
    p.add_argument("--step", required=True, type=int, help="training step (revision step<N>)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face hub cache (default: HF_HUB_CACHE)")
    p.add_argument("--schedule", default="pythia", help=f"checkpoint grid: pythia, {', '.join(ZOO_KINDS)}, or a model's "
                   "branch record (<results>/<model>/branches.json: the grid its hub branches name)")
    p.add_argument("--toy-seed", type=int, default=TOY_SEED, help="seed of the toy zoo (schedules toy, toy-relations)")
    if device:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
        p.add_argument("--dtype", default="auto", help="auto (= float32) | float32 | float16 | bfloat16")
        p.add_argument("--provenance", default=None,
                       help="the fetch stage's provenance.parquet: check the cached weights against it first")


def _load(args: argparse.Namespace):
    from icl_dynamics.models import load_checkpoint

    _schedule(args).check(args.step)
    fetched = _fetched_row(args) if args.provenance else None
    ckpt = _refetching(args, lambda: load_checkpoint(args.model, args.step, cache_dir=args.cache_dir,
                                                     device=args.device, dtype=args.dtype, fetched=fetched,
                                                     revision=_schedule(args).revision(args.step)))
    log.info("loaded %s@step%d on %s (%s)", args.model, args.step, ckpt.device, next(ckpt.model.parameters()).dtype)
    return ckpt


def _refetching(args: argparse.Namespace, load: Callable[[], T]) -> T:
    """``load()``; when the checkpoint is no longer in the cache (keep_weights: false evicts each scored
    one) and the hub is reachable, fetch it again first. The load then checks the weights against the
    fetch stage's recorded hashes, so a rescore sees the very files the first score saw."""
    from huggingface_hub import constants

    try:
        return load()
    except FileNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise
    from icl_dynamics import hub

    log.warning("%s@step%d is no longer in the cache (evicted after scoring?): fetching it again", args.model, args.step)
    hub.fetch_checkpoint(args.model, args.step, cache_dir=args.cache_dir, revision=_schedule(args).revision(args.step))
    return load()


def _fetched_row(args: argparse.Namespace) -> dict:
    """The fetch stage's provenance row of ``--model`` at ``--step`` (from ``--provenance``)."""
    from icl_dynamics import hub, io

    try:
        rows = io.read_table(args.provenance, hub.PROVENANCE_SCHEMA).to_pylist()
    except io.SchemaError as exc:
        raise io.SchemaError(f"{exc}: {args.provenance} is not a provenance table of this icl-dynamics' fetch (an "
                             "older one recorded the weights only); run the fetch again (delete the file and rerun "
                             "snakemake, or icl-dynamics fetch)") from exc
    row = next((r for r in rows if r["model"] == args.model and r["step"] == args.step), None)
    if row is None:
        raise ValueError(f"{args.provenance} has no row for {args.model} step {args.step}")
    return row


def _stamp(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    from icl_dynamics.stages import stamp

    return stamp(rows, args.model, args.step, _schedule(args).tokens(args.step))


# --- subcommands ---------------------------------------------------------------------------------


def cmd_stage(args: argparse.Namespace) -> None:
    """One stage of one checkpoint (``icl-dynamics heads ...``): its options are the parser's own."""
    from icl_dynamics.stages import run_stages

    stage = args.stage
    opts = argparse.Namespace(**{dest: getattr(args, dest) for dest in _option_dests(stage)})
    seconds = run_stages([(stage, opts)], lambda: _load(args), lambda rows: _stamp(rows, args),
                         {name: getattr(args, option_dest(flag)) for name, flag in stage.outputs.items()})
    log.info("%s in %.1f s (load %.1f s)", stage.name, seconds[stage.name], seconds["load"])


def cmd_score(args: argparse.Namespace) -> None:
    """Every selected stage of one checkpoint on one model load, each table in ``--out-dir``."""
    from icl_dynamics.stages import STAGES, run_stages

    jobs = []
    for name in [name for name in STAGES if name in args.stages]:  # stages that read others' tables come later
        stage = STAGES[name]
        missing = [flag for flag in stage.inputs if getattr(args, option_dest(flag)) is None]
        if missing:
            raise ValueError(f"score: stage {name} needs {' and '.join(missing)}")
        prefix = option_dest(f"--{name}-")
        inputs = {option_dest(flag) for flag in (*stage.inputs, *stage.needs.values())}  # inputs keep their own name
        opts = {dest: getattr(args, dest if dest in inputs else prefix + dest) for dest in _option_dests(stage)}
        jobs.append((stage, argparse.Namespace(**opts)))
    if args.threads:  # the job's CPU share (Snakemake's threads, SLURM's cpus-per-task), not every core
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    paths = {table: out / f"{table}.parquet" for stage, _ in jobs for table in stage.outputs}
    seconds = run_stages(jobs, lambda: _load(args), lambda rows: _stamp(rows, args), paths)
    log.info("%s@step%d scored in %.1f s: %s", args.model, args.step, sum(seconds.values()),
             ", ".join(f"{phase} {value:.1f} s" for phase, value in seconds.items()))


def _option_dests(stage) -> list[str]:
    """The attribute names of ``stage``'s options and inputs (what its measure function reads)."""
    flags: list[str] = []
    stage.options(lambda flag, **kw: flags.append(flag))
    return [option_dest(flag) for flag in flags]


def cmd_toy_zoo(args: argparse.Namespace) -> None:
    from icl_dynamics.toyzoo import train, write_zoo, zoo_config

    cfg = zoo_config(args.kind, args.seed)
    zoo = train(cfg)
    write_zoo(zoo, args.out)
    log.info("toy zoo: %d checkpoints trained in %.0f s, written to %s", len(zoo.states), zoo.seconds, args.out)


def cmd_fetch(args: argparse.Namespace) -> None:
    from icl_dynamics import hub, io

    schedule = _schedule(args)
    schedule.check(args.step)
    result = hub.fetch_checkpoint(args.model, args.step, cache_dir=args.cache_dir, attempts=args.attempts,
                                  timeout=args.timeout, min_rate=args.min_rate, revision=schedule.revision(args.step))
    # the provenance table is where a run records when and where: the only table stamped with time and host
    # its metadata also records what this fetch added to the cache: the only things the eviction may delete
    io.write_rows([result.row(schedule.tokens(args.step))], hub.PROVENANCE_SCHEMA, args.out, reproducible=False,
                  meta={"fetch": result.record()})
    log.info("%s@%s: commit %s, %s weights (%d files, %.1f MB) and %d other files verified in %.1f s", args.model,
             result.revision, result.commit[:12], result.weights_format, len(result.weights),
             sum(w.size for w in result.weights) / 1e6, len(result.files) - len(result.weights), result.seconds)
    group = sorted({args.step, *result.same_weights_in_cache})
    positions = [schedule.steps.index(s) for s in group if s in schedule.steps]
    if len(group) > 1 and positions != list(range(positions[0], positions[0] + len(group))):
        log.warning("%s@%s serves the same weights as the cached branch(es) of non-consecutive step(s) %s: a branch "
                    "serves another step's weights (or a ref points at another step's commit); the merge marks it "
                    "suspect", args.model, result.revision, ", ".join(map(str, result.same_weights_in_cache)))


def cmd_evict(args: argparse.Namespace) -> None:
    import json

    from icl_dynamics import hub, io

    row = _fetched_row(args)
    record = hub.evict_checkpoint(args.model, args.step, row["commit"], cache_dir=args.cache_dir,
                                  fetched=io.read_provenance(args.provenance).get("fetch"), revision=row["revision"])
    io.write_bytes_atomic(args.out, (json.dumps(record, indent=2) + "\n").encode())
    log.info("%s@step%d: %d blobs (%.1f MB) left the cache%s", args.model, args.step, record["deleted_blobs"],
             record["freed_bytes"] / 1e6, f"; kept: {record['kept']}" if record["kept"] else "")


def cmd_branches(args: argparse.Namespace) -> None:
    """List a model's hub branches once and record them (the schedule every later run reads offline)."""
    from icl_dynamics.schedules import list_branches, schedule_from_record, write_record

    record = list_branches(args.model)
    schedule = schedule_from_record(record)  # refuse a branch list we cannot read before recording it
    write_record(record, args.out)
    log.info("%s: %d branches, %d stage-1 checkpoints (steps %d to %d, %s tokens per step), %d stage-2 branches "
             "(refused) recorded in %s", args.model, len(record["branches"]), len(schedule.steps), schedule.steps[0],
             schedule.steps[-1], f"{schedule.tokens_per_step:,}", len(schedule.stage2), args.out)


def cmd_tokenize_text(args: argparse.Namespace) -> None:
    from icl_dynamics import io, schemas
    from icl_dynamics.icl import TextSource, iter_texts, select_documents
    from icl_dynamics.models import load_tokenizer

    fetched = _fetched_row(args) if args.provenance else None
    tokenizer = _refetching(args, lambda: load_tokenizer(args.model, args.step, cache_dir=args.cache_dir,
                                                         fetched=fetched))
    source = TextSource(args.kind, args.name, args.path, args.split, args.column)
    rows = select_documents(iter_texts(source), tokenizer, context=args.context, n_docs=args.n_docs, seed=args.seed)
    meta = {"source": vars(source), "context": args.context, "n_docs": args.n_docs, "seed": args.seed,
            "tokenizer_of": f"{args.model}@step{args.step}"}
    io.write_rows(rows, schemas.TEXT_TOKENS_SCHEMA, args.out, meta=meta)
    log.info("kept %d documents of %d tokens from %s", len(rows), args.context, source.label())


def cmd_fetch_agenda(args: argparse.Namespace) -> None:
    from icl_dynamics.agenda import fetch_agenda

    log.info("AGENDA files verified in %s", fetch_agenda(args.dest))


def cmd_relations(args: argparse.Namespace) -> None:
    from icl_dynamics.agenda import verify_agenda
    from icl_dynamics.models import load_tokenizer
    from icl_dynamics.relations import build_planted_relations, build_relations, read_texts, write_relations

    if (args.agenda_dir is None) == (args.planted_map is None):
        raise ValueError("relations: give either --agenda-dir (KG and syntax) or --planted-map (planted relations)")
    fetched = _fetched_row(args) if args.provenance else None
    tokenizer = _refetching(args, lambda: load_tokenizer(args.model, args.step, cache_dir=args.cache_dir,
                                                         fetched=fetched))
    if args.planted_map:
        if not args.planted_texts:
            raise ValueError("relations: --planted-map needs --planted-texts (the zoo's relations.jsonl)")
        tables = build_planted_relations(args.planted_map, read_texts(args.planted_texts), tokenizer,
                                         source=Path(args.planted_texts).name)
    else:
        texts = read_texts(args.syntax_texts, column=args.syntax_column, split=args.syntax_split) if args.syntax_texts else None
        tables = build_relations(verify_agenda(args.agenda_dir), tokenizer, unit=args.unit, anchor=args.anchor,
                                 spacy_model=args.spacy_model, syntax_texts=texts, kg_letters=args.kg_letters,
                                 syntax_source=str(args.syntax_texts) if args.syntax_texts else None)
    write_relations(tables, args.out_dir)
    summary = tables.summary.to_pandas()
    for family, counts in summary.groupby("family")[["kept", "dropped", "recovered"]].sum().iterrows():
        log.info("%s: %d relations kept (%d recovered by spacing normalisation), %d dropped", family,
                 counts["kept"], counts["recovered"], counts["dropped"])


def _headless() -> None:
    """Draw on matplotlib's file-only Agg backend: the CLI never opens a window (the library leaves the
    backend to its caller, so a notebook keeps its own)."""
    import matplotlib

    matplotlib.use("Agg")


def _read_frames(paths: list[str] | None):
    """One DataFrame of the tables at ``paths`` (merged tables of several models), None for none."""
    import pandas as pd

    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True) if paths else None


def cmd_analyze(args: argparse.Namespace) -> None:
    from icl_dynamics import emergence, io
    from icl_dynamics.figures import emergence as fig
    from icl_dynamics.validation import check_analysis_options

    _headless()

    start = time.perf_counter()
    icl, heads, ri, provenance = (_read_frames(paths) for paths in (args.icl, args.heads, args.relation_index,
                                                                     args.provenance))
    check_analysis_options(icl, heads, ri, provenance, shots=args.shots, families=args.ri_families,
                           direction=args.ri_direction, gate=args.ri_gate, variant=args.ri_variant)
    if provenance is not None:
        _log_left_out(provenance, args.include_suspect)
    tables = emergence.analyze(
        icl, heads, ri, provenance, shots=args.shots,
        per_task=args.per_task, direction=args.ri_direction, gate=args.ri_gate, variant=args.ri_variant,
        tau=args.ri_tau, k=args.k, n_boot=args.n_boot, n_perm=args.n_perm, top_k=args.top_k, seed=args.seed,
        include_suspect=args.include_suspect,
    )
    out = Path(args.out_dir)
    meta = {key: value for key, value in vars(args).items() if key != "func"}
    for name, schema in emergence.TABLES.items():
        io.write_rows(tables[name].to_dict("list"), schema, out / f"{name}.parquet", meta=meta)
    with io.atomic_path(out / "summary.csv") as tmp:  # the report's table
        tables["summary"].to_csv(tmp, index=False)
    figures = out / "figures"
    fig.emergence_panel(tables["icl_traj"], tables["emergence"], tables["head_traj"], tables["formation"],
                        figures / "emergence_panel", top_k=args.top_k)
    fig.formation_emergence_scatter(tables["formation"], tables["emergence"], figures / "formation_vs_emergence")
    fig.correlation_map(tables["relation"], figures / "correlation_map")
    if ri is not None:
        fig.ri_heatmaps(ri, figures / "ri_heatmaps", direction=args.ri_direction, gate=args.ri_gate,
                        variant=args.ri_variant, families=args.ri_families)
    log.info("analysis of %d ICL series and %d head scores in %.0f s -> %s", len(tables["emergence"]),
             len(tables["formation"]), time.perf_counter() - start, out)


def _log_left_out(provenance, include_suspect: bool) -> None:
    """Say which checkpoints the analysis leaves out for duplicate weights, and why."""
    import pandas as pd

    for row in provenance.sort_values(["model", "step"]).itertuples():
        if pd.notna(row.duplicate_of_step):
            log.warning("%s step %d is left out: it serves the same weights as step %d (benign: consecutive "
                        "checkpoints)", row.model, row.step, int(row.duplicate_of_step))
        elif row.suspect and not include_suspect:
            log.warning("%s step %d is left out: SUSPECT, its weights equal step(s) %s (not consecutive); "
                        "analysis.include_suspect keeps it", row.model, row.step,
                        ", ".join(map(str, row.same_weights_as)))


def cmd_causal(args: argparse.Namespace) -> None:
    import pandas as pd

    from icl_dynamics import causal, io
    from icl_dynamics.emergence import duplicate_checkpoints
    from icl_dynamics.figures.causal import causal_figures

    _headless()

    start = time.perf_counter()
    ablation, heads = _read_frames(args.ablation), _read_frames(args.heads)
    provenance = _read_frames(args.provenance)
    exclude = (duplicate_checkpoints(provenance, include_suspect=args.include_suspect)
               if provenance is not None else set())
    tables = causal.causal_tables(ablation, heads, _read_frames(args.relation_index), pd.read_parquet(args.emergence),
                                  exclude=exclude, direction=args.ri_direction, gate=args.ri_gate,
                                  variant=args.ri_variant, k=args.k, n_boot=args.n_boot, seed=args.seed)
    out = Path(args.out_dir)
    meta = {key: value for key, value in vars(args).items() if key != "func"}
    io.write_tables({out / f"{name}.parquet": (io.to_table(tables[name].to_dict("list"), schema), meta)
                     for name, schema in causal.TABLES.items()})
    causal_figures(tables["causal_correlation"], tables["causal_series"], out / "figures",
                   sorted(set(heads["model"])))
    order = tables["causal_order"]
    for key, rows in order.groupby(["model", "group", "metric", "task"], sort=True):
        log.info("%s: ablating %s heads costs %s (%s): %s", *key,
                 ", ".join(f"{o} {level}" for o, level in zip(rows["order"], rows["icl_level"])))
    log.info("causal analysis of %d ablation rows in %.0f s -> %s", len(ablation), time.perf_counter() - start, out)


def cmd_groups(args: argparse.Namespace) -> None:
    import pandas as pd

    from icl_dynamics import io, seed_groups
    from icl_dynamics.figures.seed_groups import group_figures

    _headless()
    groups = []
    for spec in args.group:
        if len(spec) < 3 or spec[1] not in seed_groups.VARIES:
            raise ValueError(f"--group {' '.join(spec)}: give NAME VARIES RUN [RUN ...] with VARIES one of "
                             f"{', '.join(seed_groups.VARIES)}")
        groups.append(seed_groups.Group(spec[0], tuple(spec[2:]), spec[1]))
    tables = seed_groups.group_tables(pd.read_parquet(args.summary), groups)
    out = Path(args.out_dir)
    meta = {key: value for key, value in vars(args).items() if key != "func"}
    io.write_tables({out / f"{name}.parquet": (io.to_table(tables[name].to_dict("list"), schema), meta)
                     for name, schema in seed_groups.TABLES.items()})
    group_figures(tables, out / "figures")
    pooled = tables["group_lags"][tables["group_lags"]["run"] == seed_groups.POOLED]
    for row in pooled[pooled["subject_kind"] == "head_class"].itertuples():
        log.info("%s: %s (%s) vs %s: %s (runs: %d before, %d with, %d after)", row.group, row.subject, row.head_set,
                 row.level, row.verdict, row.n_before, row.n_with, row.n_after)


def cmd_front_page(args: argparse.Namespace) -> None:
    from icl_dynamics.frontpage import write_front_page

    paths = {"summary": [args.summary], "emergence": [args.emergence], "formation": [args.formation],
             "provenance": args.provenance}
    log.info("report front page written to %s", write_front_page(paths, args.figure, args.out, top_k=args.top_k))


def _merge_schema(stage: str):
    """The schema of merged table ``stage``: the fetch's provenance, or its score tables' (results.MERGED)."""
    from icl_dynamics import hub, results
    from icl_dynamics.schemas import STAGE_TABLES

    schemas = {"provenance": hub.PROVENANCE_SCHEMA,
               **{name: STAGE_TABLES[parts[0]] for name, parts in results.MERGED.items() if name != "provenance"}}
    if stage not in schemas:
        raise SystemExit(f"unknown stage {stage!r}; choose one of {', '.join(sorted(schemas))}")
    return schemas[stage]


def cmd_merge(args: argparse.Namespace) -> None:
    from icl_dynamics import hub, io
    from icl_dynamics.validation import check_merge_inputs

    schema = _merge_schema(args.stage)
    merged = io.concat_tables(args.inputs, schema)
    check_merge_inputs(args.stage, args.inputs, schema, args.out)
    if args.stage == "provenance":
        merged = io.to_table(hub.flag_duplicates(merged.to_pylist(), _schedule(args)), schema)
        for row in merged.to_pylist():
            if row["duplicate_of_step"] is not None:
                log.warning("%s step %d serves the same weights as step %d (benign: consecutive checkpoints; weights "
                            "digest %s); it is left out of the analysis", row["model"], row["step"],
                            row["duplicate_of_step"], row["weights_digest"][:12])
            elif row["suspect"]:
                cached = sorted(set(row["same_weights_in_cache"]) - {r["step"] for r in merged.to_pylist()})
                log.warning("%s step %d serves the same weights as non-consecutive step(s) %s: SUSPECT branch "
                            "(weights digest %s), left out of the analysis unless analysis.include_suspect is true",
                            row["model"], row["step"],
                            ", ".join([*map(str, row["same_weights_as"]), *(f"{s} (cached, not measured)" for s in cached)]),
                            row["weights_digest"][:12])
    io.write_table(merged, args.out, meta={"stage": args.stage, **io.merged_provenance(args.inputs)})
    log.info("merged %d tables, %d rows -> %s", len(args.inputs), merged.num_rows, args.out)


def cmd_figures(args: argparse.Namespace) -> None:
    import pandas as pd

    from icl_dynamics.figures import heads as heads_fig
    from icl_dynamics.figures.icl import write_icl_figures
    from icl_dynamics.figures.relation_index import write_relation_index_figures

    _headless()
    heads = pd.read_parquet(args.heads)
    icl = pd.read_parquet(args.icl)
    provenance = pd.read_parquet(args.provenance) if args.provenance else None
    models = {path: sorted(set(pd.read_parquet(path, columns=["model"])["model"]))
              for path in (args.heads, args.icl, args.provenance, args.loss_curve, args.relation_index) if path}
    if len({tuple(m) for m in models.values()}) > 1 or any(len(m) != 1 for m in models.values()):
        raise ValueError("figures: the tables must hold one model, the same: "
                         + "; ".join(f"{path} holds {', '.join(m) or 'no row'}" for path, m in models.items()))
    out = Path(args.out_dir)
    written = heads_fig.prefix_matching_heatmaps(heads, out / "prefix_matching_heatmap", steps=args.heatmap_steps)
    written += heads_fig.top_heads_vs_icl(heads, icl, out / "top_heads_vs_icl", top_k=args.top_k,
                                          provenance=provenance)
    curves = pd.read_parquet(args.loss_curve) if args.loss_curve else None
    written += write_icl_figures(icl, curves, out, model=heads["model"].iloc[0])
    if args.relation_index:
        ri = pd.read_parquet(args.relation_index)
        written += write_relation_index_figures(ri, out, k=args.top_k)
        if args.training_curve:
            written += _planted_figure(ri, pd.read_parquet(args.training_curve), out)
    log.info("%d figure files written to %s", len(written), out)


def _planted_figure(ri, training, out: Path) -> list[Path]:
    """The relations toy zoo's positive-control figure (RI rows of the default gate, variant, direction)."""
    from icl_dynamics.checkpoints import model_slug
    from icl_dynamics.figures import save_figure
    from icl_dynamics.figures.relation_index import planted_control, select_rows
    from icl_dynamics.planted import DECOY, PLANTED, phase_change_step

    rows = select_rows(ri, model=None, gate="argmax", variant="source", direction="forward")
    rows = rows[rows["family"].isin([PLANTED, DECOY])]
    if rows.empty or "relation_loss" not in training or training["relation_loss"].isna().all():
        raise ValueError("--training-curve: needs the relations toy zoo's training.parquet and planted relation rows")
    curve = training.dropna(subset=["relation_loss"])
    phase = phase_change_step(curve["step"], curve["relation_loss"])
    fig = planted_control(rows, training, phase)
    return save_figure(fig, out / f"{model_slug(rows['model'].iloc[0])}_planted_control.png")


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icl-dynamics", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("toy-zoo", help="train the toy GPT-NeoX zoo and write it as a hub-layout cache")
    p.add_argument("--out", required=True, help="zoo directory (hub cache in OUT/hub)")
    p.add_argument("--kind", choices=ZOO_KINDS, default=ZOO_KINDS[0],
                   help="toy: copies (induction heads); toy-relations: planted relations (semantic induction heads)")
    p.add_argument("--seed", type=int, default=TOY_SEED, help="training seed (the default is the shipped zoo's)")
    p.set_defaults(func=cmd_toy_zoo)

    p = sub.add_parser("fetch", help="fetch one checkpoint into the HF cache, verify it, write provenance")
    _checkpoint_args(p, device=False)
    p.add_argument("--attempts", type=int, default=6,
                   help="tries per hub request (429, 5xx, refused, reset, truncated and stalled requests are retried)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a hub request may send nothing; also the window the minimum rate is measured over")
    p.add_argument("--min-rate", type=float, default=100_000.0,
                   help="bytes per second a download must average over each --timeout seconds (slower: retried)")
    p.add_argument("--out", required=True, help="provenance Parquet")
    p.set_defaults(func=cmd_fetch)

    from icl_dynamics.stages import STAGES

    for stage in STAGES.values():
        p = sub.add_parser(stage.name, help=stage.help)
        _checkpoint_args(p)
        stage.options(lambda flag, _p=p, _stage=stage, **kw: _p.add_argument(
            flag, **kw, **({"required": True} if flag in (*_stage.inputs, *_stage.needs.values()) else {})))
        for name, flag in stage.outputs.items():
            p.add_argument(flag, required=True, help=f"the {name} table (Parquet)")
        p.set_defaults(func=cmd_stage, stage=stage)

    p = sub.add_parser("score", help="every per-checkpoint stage on one model load (the workflow's GPU job)",
                       allow_abbrev=False)  # a single stage's --out must not pass for --out-dir
    _checkpoint_args(p)
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="stages to run (default: all)")
    shared: set[str] = set()
    for stage in STAGES.values():
        group = p.add_argument_group(f"{stage.name} options")

        def add(flag: str, _stage=stage, _group=group, **kw) -> None:
            if flag in (*_stage.inputs, *_stage.needs.values()):  # input files keep their own name, one flag for
                if flag not in shared:  # every stage that reads them; required when a stage runs that needs them
                    _group.add_argument(flag, default=None, help=kw.get("help"))
                    shared.add(flag)
            else:
                _group.add_argument(f"--{_stage.name}-{flag.lstrip('-')}", **kw)

        stage.options(add)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads torch may use (default: torch's own, every core); the workflow passes its job's")
    p.add_argument("--out-dir", required=True,
                   help="the checkpoint's folder: writes <table>.parquet for every table of the stages run")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evict", help="remove one scored checkpoint's weights from the HF cache (keep_weights: false)")
    _checkpoint_args(p, device=False)
    p.add_argument("--provenance", required=True, help="the fetch stage's provenance.parquet (names the commit)")
    p.add_argument("--out", required=True, help="JSON record of what left the cache")
    p.set_defaults(func=cmd_evict)

    p = sub.add_parser("tokenize-text", help="select and tokenise the natural-text documents once per model")
    _checkpoint_args(p, device=False)
    p.add_argument("--provenance", default=None,
                   help="the fetch stage's provenance.parquet: check the tokenizer files against it first")
    p.add_argument("--kind", choices=("hub", "disk", "jsonl", "text"), default="hub")
    p.add_argument("--name", default=None, help="hub dataset id (kind hub)")
    p.add_argument("--path", default=None, help="local file or datasets directory")
    p.add_argument("--split", default="train")
    p.add_argument("--column", default="text")
    p.add_argument("--n-docs", type=int, default=200)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenize_text)

    p = sub.add_parser("fetch-agenda", help="download the AGENDA test split at its pinned commit and verify it")
    p.add_argument("--dest", required=True)
    p.set_defaults(func=cmd_fetch_agenda)

    p = sub.add_parser("relations", help="KG and syntactic (or planted) relation triplets for one model's tokenizer")
    _checkpoint_args(p, device=False)
    p.add_argument("--provenance", default=None,
                   help="the fetch stage's provenance.parquet: check the tokenizer files against it first")
    p.add_argument("--agenda-dir", default=None, help="verified AGENDA copy (see fetch-agenda)")
    p.add_argument("--planted-map", default=None,
                   help="planted.json of the relations toy zoo: its planted relations instead of AGENDA's")
    p.add_argument("--planted-texts", default=None, help="the relations toy zoo's relations.jsonl")
    p.add_argument("--unit", choices=("abstract", "sentence"), default="abstract")
    p.add_argument("--anchor", choices=("single", "first"), default="single",
                   help="syntax and KG entity words: single-token words only, or anchor on a sub-token (the "
                        "first; the last for a KG head)")
    p.add_argument("--no-kg-letters", dest="kg_letters", action="store_false",
                   help="leave out the kg-letters family (the paper's letter construction, a negative control)")
    p.add_argument("--spacy-model", default="en_core_web_sm")
    p.add_argument("--syntax-texts", default=None, help="text file, datasets directory or hub dataset (default: AGENDA)")
    p.add_argument("--syntax-column", default="text")
    p.add_argument("--syntax-split", default="train")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_relations)

    p = sub.add_parser("analyze", help="when heads form, when ICL emerges, how they relate (all models)")
    p.add_argument("--icl", nargs="+", required=True, help="merged ICL tables")
    p.add_argument("--heads", nargs="+", required=True, help="merged induction-score tables")
    p.add_argument("--relation-index", nargs="*", default=None, help="merged relation-index tables")
    p.add_argument("--provenance", nargs="*", default=None,
                   help="merged provenance (duplicate and suspect checkpoints are left out)")
    p.add_argument("--include-suspect", action="store_true",
                   help="keep checkpoints whose weights equal a non-consecutive step's (see provenance 'suspect')")
    p.add_argument("--shots", type=int, default=None, help="shot count of the ICL tasks (default: the largest)")
    p.add_argument("--per-task", action="store_true", help="one series per task instead of the mean over tasks")
    p.add_argument("--ri-direction", default="forward", choices=("forward", "reverse"))
    p.add_argument("--ri-gate", default="argmax", choices=("argmax", "margin"))
    p.add_argument("--ri-variant", default="source", choices=("literal", "source", "contextual"))
    p.add_argument("--ri-families", nargs="+", default=["kg", "syntax"],
                   help="relation families drawn in the RI heatmaps (planted decoy for the relations toy zoo)")
    p.add_argument("--ri-tau", type=float, default=None, help="tau of the margin gate, if several were scored")
    p.add_argument("--k", type=int, default=3, help="checkpoints a crossing must hold for after its first")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--n-perm", type=int, default=999)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("causal", help="the ablations over training: head correlations, group importance and "
                       "when each causal effect emerges against ICL (all models)")
    p.add_argument("--ablation", nargs="+", required=True, help="merged ablation tables")
    p.add_argument("--heads", nargs="+", required=True, help="merged induction-score tables")
    p.add_argument("--relation-index", nargs="*", default=None, help="merged relation-index tables")
    p.add_argument("--emergence", required=True, help="the analyze command's emergence table")
    p.add_argument("--provenance", nargs="*", default=None,
                   help="merged provenance (duplicate and suspect checkpoints are left out)")
    p.add_argument("--include-suspect", action="store_true",
                   help="keep checkpoints whose weights equal a non-consecutive step's (see provenance 'suspect')")
    p.add_argument("--ri-direction", default="forward", choices=("forward", "reverse"))
    p.add_argument("--ri-gate", default="argmax", choices=("argmax", "margin"))
    p.add_argument("--ri-variant", default="source", choices=("literal", "source", "contextual"))
    p.add_argument("--k", type=int, default=3, help="checkpoints a crossing must hold for after its first")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True, help="the analysis folder (tables; figures/ for the figures)")
    p.set_defaults(func=cmd_causal)

    p = sub.add_parser("groups", help="seed groups: each run's midpoints and lags side by side, pooled over runs, "
                       "with a group verdict (after analyze)")
    p.add_argument("--summary", required=True, help="the analyze command's summary.parquet (every run's rows)")
    p.add_argument("--group", nargs="+", action="append", required=True, metavar="NAME VARIES RUN",
                   help="a group: its name, what its runs' seeds change (seed, data or weights) and its runs' model "
                        "ids; repeat for each group")
    p.add_argument("--out-dir", required=True, help="the groups folder (tables; figures/ for the figures)")
    p.set_defaults(func=cmd_groups)

    p = sub.add_parser("front-page", help="the report's front page: what the run found, with the headline figure")
    p.add_argument("--summary", required=True, help="the analyze command's summary.parquet")
    p.add_argument("--emergence", required=True, help="the analyze command's emergence.parquet")
    p.add_argument("--formation", required=True, help="the analyze command's formation.parquet")
    p.add_argument("--provenance", nargs="+", required=True, help="merged provenance of every model")
    p.add_argument("--figure", required=True, help="the headline figure (PNG), embedded first")
    p.add_argument("--top-k", type=int, default=10, help="the analysis' top_k (which head set the page reports)")
    p.add_argument("--out", required=True, help="reStructuredText (the Snakefile's report: description)")
    p.set_defaults(func=cmd_front_page)
    p = sub.add_parser("branches", help="list a model's hub branches once into a record (its checkpoint schedule)")
    p.add_argument("--model", required=True, help="hub model id, e.g. allenai/OLMo-2-0425-1B")
    p.add_argument("--out", required=True, help="the record, e.g. results/allenai--OLMo-2-0425-1B/branches.json")
    p.set_defaults(func=cmd_branches)

    p = sub.add_parser("merge", help="concatenate one stage's per-checkpoint tables")
    p.add_argument("--stage", required=True)
    p.add_argument("--schedule", default="pythia",
                   help="checkpoint grid (which steps are consecutive, for duplicate weights): pythia, a toy zoo's, "
                        "or a model's branch record")
    p.add_argument("--toy-seed", type=int, default=TOY_SEED, help="seed of the toy zoo (schedules toy, toy-relations)")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("figures", help="one model's figures: induction heads, ICL levels, relation index")
    p.add_argument("--heads", required=True)
    p.add_argument("--icl", required=True)
    p.add_argument("--provenance", default=None, help="merged provenance (marks duplicate checkpoints)")
    p.add_argument("--loss-curve", default=None, help="merged loss-curve table")
    p.add_argument("--relation-index", default=None, help="merged relation-index table")
    p.add_argument("--training-curve", default=None,
                   help="the relations toy zoo's training.parquet: adds the planted-relation control figure")
    p.add_argument("--heatmap-steps", type=int, nargs="*", default=None)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_figures)
    return parser


def _check_values(args: argparse.Namespace) -> None:
    """Values argparse lets through but no stage can use: a model id that is no hub id (a trailing newline
    would name folders with it), and NaN or infinite numbers (every threshold compares false with NaN)."""
    from icl_dynamics.checkpoints import check_model_id

    if getattr(args, "model", None) is not None:
        check_model_id(args.model, "--model")
    for dest, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"--{dest.replace('_', '-')} {item}: not a finite number; give one")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # a job's log starts with the command that made it (rerun it by hand from there)
    log.info("command: %s", shlex.join(["icl-dynamics", *(sys.argv[1:] if argv is None else argv)]))
    try:
        _check_values(args)
        args.func(args)
    except Exception as exc:  # every failure ends in one line; the traceback only with -v
        expected = isinstance(exc, (ValueError, KeyError, RuntimeError, OSError))
        message = " ".join(str(exc).split()) or type(exc).__name__
        if len(message) > 600:
            message = message[:600] + " ..."
        if not expected:
            message = f"unexpected {type(exc).__name__}: {message} (rerun with -v for the traceback and report it)"
        log.error("%s", message, exc_info=args.verbose)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
