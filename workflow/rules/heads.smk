# Stage 2a: per-head induction scores (prefix matching, previous token, copying) per checkpoint.

INDUCTION = config["induction"]


rule heads:
    input:
        provenance_of("{step}"),
    output:
        f"{RESULTS}/{{model}}/step{{step}}/heads.parquet",
    conda:
        "../envs/icl-dynamics.yaml"
    log:
        "logs/{model}/step{step}/heads.log",
    params:
        flags=lambda wc: checkpoint_flags(wc.model, wc.step),
        probe=(
            f"--n-tokens {INDUCTION['n_tokens']} --repeats {INDUCTION['repeats']} "
            f"--n-samples {INDUCTION['n_samples']} --exclude-frac {INDUCTION['exclude_frac']} "
            f"--seed {INDUCTION['seed']}"
        ),
    resources:
        gpu=1,
    shell:
        cli("heads {params.flags} {params.probe} --out {output}") + " 2> {log}"
