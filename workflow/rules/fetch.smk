# Stage 1: one job per (model, step) puts the checkpoint into the HF cache and verifies it.
# With schedule "toy" the toy zoo is trained first and serves as the (offline) hub cache.

TOY_ZOO = f"{config['toy_zoo']['dir']}/zoo.json"


rule toy_zoo:
    output:
        TOY_ZOO,
    conda:
        "../envs/icl-dynamics.yaml"
    log:
        "logs/toy_zoo.log",
    params:
        out=lambda wildcards, output: os.path.dirname(output[0]),
        seed=config["toy_zoo"]["seed"],
    shell:
        "icl-dynamics toy-zoo --out {params.out} --seed {params.seed} 2> {log}"


rule fetch:
    input:
        TOY_ZOO if config["schedule"] == "toy" else [],
    output:
        f"{RESULTS}/{{model}}/step{{step}}/provenance.parquet",
    conda:
        "../envs/icl-dynamics.yaml"
    log:
        "logs/{model}/step{step}/fetch.log",
    params:
        flags=lambda wc: checkpoint_flags(wc.model, wc.step, device=False),
        attempts=config["fetch"]["attempts"],
    resources:
        hub=1,
    retries: 1
    shell:
        cli("fetch {params.flags} --attempts {params.attempts} --out {output}") + " 2> {log}"
