# Stage 2: one job per (model, step) on the GPU. One process loads the checkpoint once and writes
# every per-checkpoint table: induction scores (heads), ICL level 1 (loss, loss_curve), levels 2 and 3
# (icl_tasks) and the relation index. Rerun one stage by hand with its own subcommand (README).

SCORE_TABLES = ["heads", "loss", "loss_curve", "icl_tasks", "relation_index"]


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
    return " ".join(shlex.quote(f) for f in flags)


rule score:
    input:
        provenance_of("{step}"),
        text_tokens=f"{RESULTS}/{{model}}/text_tokens.parquet",
        relations=f"{RESULTS}/{{model}}/relations/sequences.parquet",
        triplets=f"{RESULTS}/{{model}}/relations/triplets.parquet",
    output:
        multiext(f"{RESULTS}/{{model}}/step{{step}}/", *[f"{table}.parquet" for table in SCORE_TABLES]),
    conda:
        "../envs/icl-dynamics.yaml"
    log:
        "logs/{model}/step{step}/score.log",
    params:
        flags=lambda wc: checkpoint_flags(wc.model, wc.step),
        relations_dir=lambda wildcards, input: os.path.dirname(input.relations),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        options=score_options(),
    resources:
        gpu=1,
    shell:
        cli(
            "score {params.flags} --text-tokens {input.text_tokens} --relations-dir {params.relations_dir} "
            "{params.options} --out-dir {params.out_dir}"
        ) + " 2> {log}"
