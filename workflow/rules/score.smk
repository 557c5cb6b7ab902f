# Stage 2: one job per (model, step) on the GPU. One process loads the checkpoint once and writes
# every per-checkpoint table: induction scores (heads), ICL level 1 (loss, loss_curve), levels 2 and 3
# (icl_tasks), the relation index and the ablations (which read this job's heads and relation index).
# Rerun one stage by hand with its own subcommand (README).


rule score:
    input:
        provenance_of("{step}"),
        text_tokens=f"{RESULTS}/{{model}}/text_tokens.parquet",
        relations=f"{RESULTS}/{{model}}/relations/sequences.parquet",
        triplets=f"{RESULTS}/{{model}}/relations/triplets.parquet",
    output:
        multiext(f"{RESULTS}/{{model}}/step{{step}}/", *[f"{table}.parquet" for table in SCORE_TABLES]),
    log:
        "logs/{model}/step{step}/score.log",
    conda:
        "../envs/icl-dynamics.yaml"
    threads: config["cluster"]["score_threads"]
    resources:
        gpu=1,
        mem_mb=score_resource("mem_mb"),
        runtime=score_resource("runtime"),
    params:
        flags=lambda wc: checkpoint_flags(wc.model, wc.step),
        relations_dir=lambda wildcards, input: os.path.dirname(input.relations),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        options=score_options(),
    shell:
        cli(
            "score {params.flags} --text-tokens {input.text_tokens:q} --relations-dir {params.relations_dir:q} "
            "{params.options} --threads {threads} --out-dir {params.out_dir:q}"
        )
        + " > {log:q} 2>&1"


# keep_weights false: the scored checkpoint's weights leave the HF cache (see fetch.smk)
rule evict:
    input:
        provenance=provenance_of("{step}"),
        scored=multiext(f"{RESULTS}/{{model}}/step{{step}}/", *[f"{table}.parquet" for table in SCORE_TABLES]),
    output:
        evicted("{model}", "{step}"),
    log:
        "logs/{model}/step{step}/evict.log",
    localrule: True
    conda:
        "../envs/icl-dynamics.yaml"
    params:
        flags=lambda wc: checkpoint_flags(wc.model, wc.step, device=False),
    shell:
        cli("evict {params.flags} --provenance {input.provenance:q} --out {output:q}") + " > {log:q} 2>&1"
