# Shared helpers: paths, the CLI prefix with the config's common flags, and wildcard constraints.

import os
import shlex

from snakemake.logging import logger

# the rules that download run in the Snakemake process (where the network is) unless configured otherwise
NETWORK_LOCAL = config["cluster"]["network_rules_local"]


wildcard_constraints:
    model=r"[^/]+",
    step=r"\d+",


def model_id(slug):
    return unslug(slug, config["models"])


def steps_of(slug):
    """The steps measured of one model (with schedule hub each model has its own grid)."""
    return config["model_steps"][model_id(slug)]


def schedule_arg(slug):
    """The --schedule a model's jobs get: the grid's name, or the model's branch record (schedule hub)."""
    return config["schedule_args"][model_id(slug)]


def cli(command):
    """The icl-dynamics invocation for a stage (offline mode exported when configured)."""
    env = "HF_HUB_OFFLINE=1 " if config["hub_offline"] else ""
    return f"{env}icl-dynamics {command}"


def checkpoint_flags(slug, step, device=True):
    """--model/--step/--cache-dir/--schedule (and --device/--dtype) for one checkpoint."""
    flags = [
        "--model",
        model_id(slug),
        "--step",
        str(step),
        "--schedule",
        schedule_arg(slug),
        "--toy-seed",
        str(config["toy_zoo"]["seed"]),
    ]
    if config["hf_cache"]:
        flags += ["--cache-dir", config["hf_cache"]]
    if device:  # the stages that load weights check them against what fetch verified
        flags += [
            "--device",
            config["device"],
            "--dtype",
            config["dtype"],
            "--provenance",
            f"{RESULTS}/{slug}/step{step}/provenance.parquet",
        ]
    return " ".join(shlex.quote(f) for f in flags)


def provenance_of(step):
    return f"{RESULTS}/{{model}}/step{step}/provenance.parquet"


def first_provenance(wildcards):
    """The provenance of a model's first measured step (whose tokenizer the per-model rules read)."""
    return f"{RESULTS}/{wildcards.model}/step{steps_of(wildcards.model)[0]}/provenance.parquet"


def text_flags():
    """Flags of the tokenize-text stage from the config's text block."""
    text = config["text"]
    flags = [
        "--kind",
        text["kind"],
        "--split",
        text["split"],
        "--column",
        text["column"],
        "--n-docs",
        str(text["n_docs"]),
        "--context",
        str(text["context"]),
        "--seed",
        str(text["seed"]),
    ]
    if text["name"]:
        flags += ["--name", text["name"]]
    if text["path"]:
        flags += ["--path", text["path"]]
    return " ".join(shlex.quote(f) for f in flags)


# --- score jobs and the bounded cache (score.smk, fetch.smk) ---

SCORE_TABLES = [table for stage in STAGES.values() for table in stage.outputs]  # what one score job writes
KEEP_WEIGHTS = config["keep_weights"]
# the score jobs one model can run at once are bounded by its cache window: say so when --resources gpu=N asks for more
GPU_JOBS = getattr(workflow.global_resources.get("gpu"), "value", None)
WINDOW = config["max_cached_checkpoints"]
if not KEEP_WEIGHTS and GPU_JOBS and GPU_JOBS >= WINDOW:
    logger.warning(
        f"max_cached_checkpoints {WINDOW} keeps at most {WINDOW} checkpoints of a model in the cache, so at most "
        f"{WINDOW} of its score jobs run at once, none downloading ahead, but gpu={GPU_JOBS}: add "
        f"--config max_cached_checkpoints={GPU_JOBS + 1} to keep every GPU busy"
    )


def evicted(model, step):
    return f"{RESULTS}/{model}/step{step}/weights_evicted.json"


def previous_eviction(wildcards):
    """The eviction of the same model's checkpoint max_cached_checkpoints steps before this one (none
    for the first ones, for a step outside the configured selection, or with keep_weights true): the
    window is per model, so models never wait for each other. Not ancient: when that eviction reruns
    (after a forced refetch), the flag and so the fetch wait for it again."""
    step, steps = int(wildcards.step), steps_of(wildcards.model)
    if KEEP_WEIGHTS or step not in steps:
        return []
    i = steps.index(step) - config["max_cached_checkpoints"]
    return [evicted(wildcards.model, steps[i])] if i >= 0 else []


def fetch_turn(wildcards):
    """The fetch's turn: the fetch_slot flag, which waits for previous_eviction.

    The fetch reads the flag as ancient and the flag's rule carries the ordering, so changing the step
    list or keep_weights later reruns only these flags, never a fetch or the scoring behind it.
    """
    return ancient(f"{RESULTS}/{wildcards.model}/step{wildcards.step}/fetch_slot")


def score_options():
    """The score command's stage options (--<stage>-<option>) from the config's stage blocks."""
    induction, loss, tasks, ri = config["induction"], config["loss"], config["icl_tasks"], config["relation_index"]
    options = {
        "heads": {key: induction[key] for key in ("n_tokens", "repeats", "n_samples", "exclude_frac", "seed")},
        "loss": {key: loss[key] for key in ("early", "late", "batch_size", "bootstrap")},
        "icl-tasks": {key: tasks[key] for key in ("shots", "n_prompts", "seed", "batch_size")},
        "relation-index": {
            key: ri[key]
            for key in ("gates", "variants", "tau", "control_position", "alpha", "min_clusters", "seed", "batch_size")
        },
    }
    flags = []
    for stage, values in options.items():
        for key, value in values.items():
            flags += [f"--{stage}-{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    if not ri["exclude_function_words"]:
        flags.append("--relation-index-keep-function-words")
    ablation = config["ablation"]
    derived = {  # the ICL score, the shot count and the SIH flag the other stages and the analysis use
        "max_parameters": ablation["max_parameters"] if ablation["enabled"] else 0,
        "early": loss["early"],
        "late": loss["late"],
        "shots": max(tasks["shots"]),
        "gate": config["analysis"]["ri_gate"],
        "variant": config["analysis"]["ri_variant"],
    }
    keys = (
        "n_docs",
        "n_sequences",
        "n_prompts",
        "top_k",
        "draws",
        "exact_heads",
        "screen_steps",
        "bootstrap",
        "seed",
        "batch_size",
    )
    for key, value in {**derived, **{key: ablation[key] for key in keys}}.items():
        flags += [f"--ablation-{key.replace('_', '-')}", str(value)]
    if ablation["ablate_first"]:
        flags.append("--ablation-ablate-first")
    return " ".join(shlex.quote(f) for f in flags)


def score_resource(name):
    """A score job's ``name`` resource (mem_mb, runtime) scaled by the size its model id states."""
    spec = config["cluster"][f"score_{name}"]
    return lambda wc: int(spec["base"] + spec["per_billion"] * parameter_count(model_id(wc.model)) / 1e9)
