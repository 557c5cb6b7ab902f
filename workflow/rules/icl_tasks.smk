# ICL levels 2 and 3: format compliance and pattern discovery on the synthetic tasks, per checkpoint.

TASKS = config["icl_tasks"]


rule icl_tasks:
    input:
        provenance_of("{step}"),
    output:
        f"{RESULTS}/{{model}}/step{{step}}/icl_tasks.parquet",
    conda:
        "../envs/icl-dynamics.yaml"
    log:
        "logs/{model}/step{step}/icl_tasks.log",
    params:
        flags=lambda wc: checkpoint_flags(wc.model, wc.step),
        options=(
            f"--shots {' '.join(map(str, TASKS['shots']))} --n-prompts {TASKS['n_prompts']} "
            f"--seed {TASKS['seed']} --batch-size {TASKS['batch_size']}"
        ),
    resources:
        gpu=1,
    shell:
        cli("icl-tasks {params.flags} {params.options} --out {output}") + " 2> {log}"
