# Shared helpers: paths, the CLI prefix with the config's common flags, and wildcard constraints.

import os
import shlex


wildcard_constraints:
    model=r"[^/]+",
    step=r"\d+",


def model_id(slug):
    return unslug(slug, config["models"])


def cli(command):
    """The icl-dynamics invocation for a stage (offline mode exported when configured)."""
    env = "HF_HUB_OFFLINE=1 " if config["hub_offline"] else ""
    return f"{env}icl-dynamics {command}"


def checkpoint_flags(slug, step, device=True):
    """--model/--step/--cache-dir/--schedule (and --device/--dtype) for one checkpoint."""
    flags = [
        "--model", model_id(slug),
        "--step", str(step),
        "--schedule", config["schedule"],
        "--toy-seed", str(config["toy_zoo"]["seed"]),
    ]
    if config["hf_cache"]:
        flags += ["--cache-dir", config["hf_cache"]]
    if device:  # the stages that load weights check them against what fetch verified
        flags += ["--device", config["device"], "--dtype", config["dtype"],
                  "--provenance", f"{RESULTS}/{slug}/step{step}/provenance.parquet"]
    return " ".join(shlex.quote(f) for f in flags)


def provenance_of(step):
    return f"{RESULTS}/{{model}}/step{step}/provenance.parquet"


def text_flags():
    """Flags of the tokenize-text stage from the config's text block."""
    text = config["text"]
    flags = [
        "--kind", text["kind"], "--split", text["split"], "--column", text["column"],
        "--n-docs", str(text["n_docs"]), "--context", str(text["context"]), "--seed", str(text["seed"]),
    ]
    if text["name"]:
        flags += ["--name", text["name"]]
    if text["path"]:
        flags += ["--path", text["path"]]
    return " ".join(shlex.quote(f) for f in flags)
