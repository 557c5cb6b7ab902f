# Stage 3: one table per stage across checkpoints (provenance also flags duplicate weights).

MERGED = ["provenance", "heads", "icl", "loss_curve", "relation_index", "ablation"]
PER_STEP = {
    "provenance": ["provenance"],
    "heads": ["heads"],
    "icl": ["loss", "icl_tasks"],
    "loss_curve": ["loss_curve"],
    "relation_index": ["relation_index"],
    "ablation": ["ablation"],
}


rule merge:
    input:
        lambda wc: expand(
            f"{RESULTS}/{wc.model}/step{{step}}/{{name}}.parquet", step=steps_of(wc.model), name=PER_STEP[wc.stage]
        ),
    output:
        f"{RESULTS}/{{model}}/{{stage}}.parquet",
    log:
        "logs/{model}/merge_{stage}.log",
    wildcard_constraints:
        stage="|".join(MERGED),
    localrule: True  # seconds of light work: not worth a queue wait
    conda:
        "../envs/icl-dynamics.yaml"
    params:
        schedule=lambda wc: schedule_arg(wc.model),
        toy_seed=config["toy_zoo"]["seed"],
    shell:
        "icl-dynamics merge --stage {wildcards.stage} --schedule {params.schedule} --toy-seed {params.toy_seed} "
        "--out {output:q} {input:q} > {log:q} 2>&1"
