"""Run configuration: validate against the JSON schema, fill defaults, resolve checkpoints.

Errors name the offending key and the problem in one line (``config key 'loss.late': ...``) and
are raised before any job starts, so a typo never costs a night of GPU time.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema import Draft202012Validator, validators

from icl_dynamics.checkpoints import PYTHIA, Schedule, StepError, check_model_id, model_slug, select_steps


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


def _with_defaults(validator_class: type) -> type:
    """A validator that fills schema defaults in place (deep copies, so schemas stay untouched)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001 - jsonschema hook
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def _key(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        path = ".".join(filter(None, [path, *extra]))
        return f"config key {path!r}: unknown key (allowed: {', '.join(sorted(error.schema.get('properties', {})))})"
    if error.validator == "required":
        return f"config key {path or '(top level)'!r}: {error.message}"
    if error.validator == "uniqueItems":
        return f"config key {path!r}: {error.message}; give each value once"
    if error.validator == "pattern" and error.schema.get("description"):
        return f"config key {path!r}: {error.instance!r} does not match {error.schema['description']}"
    return f"config key {path or '(top level)'!r}: {error.message}"


def _check_finite(value: Any, path: str = "") -> None:
    """Refuse NaN and infinite numbers anywhere (YAML's ``.nan``, ``.inf``): every schema bound compares
    false with NaN, so it would pass, and fail later as an OverflowError or a silently empty filter."""
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _check_finite(sub, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            _check_finite(sub, f"{path}.{i}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {path!r}: {value} is not a finite number; give a number")


def load_schema(path: str | os.PathLike[str]) -> dict:
    """Read the YAML JSON-schema file."""
    return yaml.safe_load(Path(path).read_text())


def schedule_named(name: str, toy_seed: int) -> Schedule:
    """The checkpoint grid called ``name``: ``pythia``, a toy zoo's (``toy``, ``toy-relations``) trained with
    ``toy_seed``, or the path of a model's branch record (:mod:`icl_dynamics.schedules`)."""
    if name == "pythia":
        return PYTHIA
    if name.endswith(".json"):
        from icl_dynamics.schedules import read_record, schedule_from_record

        return schedule_from_record(read_record(name))
    from icl_dynamics.toyzoo import zoo_config

    return zoo_config(name, toy_seed).schedule()


def schedule_for(config: Mapping[str, Any]) -> Schedule:
    """The checkpoint grid named by ``config['schedule']``."""
    return schedule_named(config["schedule"], config["toy_zoo"]["seed"])


def _check_models(models: list[str]) -> None:
    """Hub ids (no control characters) are case-insensitive and each model needs its own results folder."""
    seen: dict[str, str] = {}
    slugs: dict[str, str] = {}
    for i, model in enumerate(models):
        try:
            check_model_id(model, f"config key 'models.{i}'")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if model.lower() in seen:
            first = seen[model.lower()]
            twice = "is listed twice" if first == model else f"and {first!r} name one hub repository (ids ignore case)"
            raise ConfigError(f"config key 'models': {model!r} {twice}")
        slug = model_slug(model)
        if slug in slugs:
            raise ConfigError(f"config key 'models': {slugs[slug]!r} and {model!r} would share the results folder {slug!r}")
        seen[model.lower()], slugs[slug] = model, model


def _check_results(results: str) -> None:
    """``results`` names a directory (relative to the working directory), not nothing or a file."""
    if not results.strip():
        raise ConfigError("config key 'results': empty; name the output directory (default: results)")
    if Path(results).exists() and not Path(results).is_dir():
        raise ConfigError(f"config key 'results': {results!r} is a file, not a directory")


def _check_agenda_dir(agenda_dir: str) -> None:
    """A named AGENDA copy must hold the files the relations stage reads (nothing in the workflow makes them)."""
    from icl_dynamics.agenda import TSV_NAME, VOCAB_NAME

    folder = Path(agenda_dir)
    missing = [name for name in (TSV_NAME, VOCAB_NAME) if not (folder / name).is_file()]
    if missing:
        where = f"{agenda_dir!r} lacks {', '.join(missing)}" if folder.is_dir() else f"{agenda_dir!r} does not exist"
        raise ConfigError(f"config key 'relations.agenda_dir': {where}; point it at a copy of the AGENDA files "
                          "(icl-dynamics fetch-agenda --dest DIR makes one), or set it to null to download them")


def _check_toy_zoo(toy_zoo: Mapping[str, Any], schedule: str) -> None:
    """A toy zoo already on disk must be the one the configuration names (kind and seed)."""
    from icl_dynamics.toyzoo import read_manifest

    if not (Path(toy_zoo["dir"]) / "zoo.json").is_file():
        return  # built by the workflow's first job, with this configuration's kind and seed
    try:
        manifest = read_manifest(toy_zoo["dir"])
        kind, seed = manifest.get("kind", "toy"), manifest["config"]["seed"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"config key 'toy_zoo.dir': {toy_zoo['dir']}/zoo.json is not a toy zoo manifest ({exc}); "
                          "delete the directory to rebuild it") from exc
    if kind != schedule:
        raise ConfigError(f"config key 'toy_zoo.dir': {toy_zoo['dir']} holds the {kind!r} zoo, but schedule is "
                          f"{schedule!r}; point toy_zoo.dir at another directory")
    if seed != toy_zoo["seed"]:
        raise ConfigError(f"config key 'toy_zoo.seed': {toy_zoo['dir']} was trained with seed {seed}, not "
                          f"{toy_zoo['seed']}; use seed {seed} or delete the directory to retrain")


def _check_cache(config: Mapping[str, Any]) -> None:
    """Evicting scored checkpoints from a toy zoo's own hub would destroy the zoo, and offline nothing
    evicted could be fetched again."""
    if config["keep_weights"]:
        return
    if config["hub_offline"]:
        raise ConfigError("config key 'keep_weights': false with hub_offline: true would delete checkpoints from "
                          "the cache that cannot be fetched again offline; set keep_weights: true")
    if config["schedule"] in ("pythia", "hub") or not config["hf_cache"]:
        return
    zoo, cache = Path(config["toy_zoo"]["dir"]).resolve(), Path(config["hf_cache"]).resolve()
    if cache == zoo or zoo in cache.parents:
        raise ConfigError(f"config key 'keep_weights': false would delete the toy zoo's checkpoints from "
                          f"{config['hf_cache']} as they are scored; set keep_weights: true (or copy the zoo's "
                          "hub elsewhere and point hf_cache at the copy)")


def _check_families(config: Mapping[str, Any]) -> None:
    """Every model is of a supported family (README, "Model families"), refused by name otherwise: from its id
    (``EleutherAI/pythia-*``, ``allenai/OLMo-*-hf``, ``allenai/OLMo-2-*``) or the ``families`` key. The Pythia
    and toy grids are GPT-NeoX's: another family needs ``schedule: hub``, and the hub schedule needs to know
    each model's family."""
    from icl_dynamics.architecture import FAMILIES, UnsupportedFamily, family_of

    declared = config["families"]
    for model in declared:
        if model not in config["models"]:
            raise ConfigError(f"config key 'families': {model!r} is not among the models")
    for model in config["models"]:
        try:
            family = family_of(model, declared.get(model))
        except UnsupportedFamily as exc:
            key = "families" if model in declared else "models"
            raise ConfigError(f"config key {key!r}: {exc}") from exc
        if family is not None and family.name != "gpt-neox" and config["schedule"] != "hub":
            raise ConfigError(f"config key 'schedule': {model} is an {family.label} model, whose checkpoints are "
                              f"branches named {family.branches}, not the {config['schedule']} grid; set schedule: hub")
        if family is None and config["schedule"] == "hub":
            raise ConfigError(f"config key 'families': the family of {model} cannot be told from its id; name it: "
                              f"families: {{{model}: {'|'.join(FAMILIES)}}}")


def _check_groups(config: Mapping[str, Any]) -> None:
    """Every run of a group is one of the models (README, "Seed groups"); ``varies`` gets its default."""
    for name, spec in config["groups"].items():
        missing = [run for run in spec["runs"] if run not in config["models"]]
        if missing:
            raise ConfigError(f"config key 'groups.{name}.runs': {', '.join(missing)} not among the models; add "
                              f"{'it' if len(missing) == 1 else 'them'} to models (every run of a group is measured)")
        spec.setdefault("varies", "seed")


def _model_schedule(config: Mapping[str, Any], model: str) -> tuple[Schedule, str]:
    """``model``'s checkpoint grid and the ``--schedule`` argument the jobs get: the configured grid, or with
    ``schedule: hub`` the model's branch record ``<results>/<model>/branches.json`` (listed from the hub the
    first time, then read offline)."""
    if config["schedule"] != "hub":
        return schedule_for(config), config["schedule"]
    from icl_dynamics.schedules import record_schedule

    path = Path(config["results"]) / model_slug(model) / "branches.json"
    offline = config["hub_offline"] or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return record_schedule(model, path, offline=offline), str(path)


def validate_config(config: Mapping[str, Any], schema: Mapping[str, Any] | str | os.PathLike[str]) -> dict:
    """Return a validated copy of ``config`` with defaults filled and ``steps`` resolved.

    Raises :class:`ConfigError` naming the first offending key.
    """
    if not isinstance(schema, Mapping):
        schema = load_schema(schema)
    config = copy.deepcopy(dict(config))
    _check_finite(config)
    validator = _with_defaults(Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise ConfigError(_key(jsonschema.exceptions.best_match(errors)))
    loss, text = config["loss"], config["text"]
    if not loss["early"] < loss["late"] < text["context"]:
        raise ConfigError(
            f"config key 'loss.late': need loss.early < loss.late < text.context, "
            f"got {loss['early']} < {loss['late']} < {text['context']}"
        )
    analysis, ri = config["analysis"], config["relation_index"]
    for key, scored in (("ri_gate", "gates"), ("ri_variant", "variants")):
        if analysis[key] not in ri[scored]:  # the analysis and the ablation's SIH group read that relation index
            raise ConfigError(f"config key 'analysis.{key}': {analysis[key]!r} is not among relation_index.{scored} "
                              f"{ri[scored]}")
    if config["ablation"]["n_docs"] > text["n_docs"]:
        raise ConfigError(f"config key 'ablation.n_docs': {config['ablation']['n_docs']} documents, but text.n_docs "
                          f"selects {text['n_docs']}")
    if text["kind"] == "hub" and not text["name"]:
        raise ConfigError("config key 'text.name': a hub text source needs a dataset name")
    if text["kind"] != "hub" and not text["path"]:
        raise ConfigError(f"config key 'text.path': a {text['kind']} text source needs a path")
    shots = config["icl_tasks"]["shots"]
    if analysis["shots"] is not None and analysis["shots"] not in shots:
        raise ConfigError(f"config key 'analysis.shots': {analysis['shots']} is not among icl_tasks.shots {shots}; "
                          "the analysis can only use a shot count the tasks measure")
    relations = config["relations"]
    if bool(relations["planted_map"]) != bool(relations["planted_texts"]):
        raise ConfigError("config key 'relations.planted_texts': planted_map and planted_texts go together "
                          "(the relations toy zoo's planted.json and relations.jsonl)")
    if relations["agenda_dir"] and not relations["planted_map"]:
        _check_agenda_dir(relations["agenda_dir"])
    _check_models(config["models"])
    _check_families(config)
    _check_groups(config)
    _check_results(config["results"])
    if config["schedule"] not in ("pythia", "hub"):
        _check_toy_zoo(config["toy_zoo"], config["schedule"])
    _check_cache(config)
    config["model_steps"], config["schedule_args"] = {}, {}
    for model in config["models"]:
        try:
            schedule, arg = _model_schedule(config, model)
            config["model_steps"][model] = select_steps(config["checkpoints"], schedule)
        except StepError as exc:
            which = f" of {model}" if config["schedule"] == "hub" else ""
            raise ConfigError(f"config key 'checkpoints'{which}: {exc}") from exc
        config["schedule_args"][model] = arg
    config["steps"] = sorted({step for steps in config["model_steps"].values() for step in steps})
    for step in config["figures"]["heatmap_steps"] or []:
        if step not in config["steps"]:
            raise ConfigError(f"config key 'figures.heatmap_steps': step {step} is not among the measured steps")
    return config
