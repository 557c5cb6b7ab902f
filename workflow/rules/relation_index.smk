# The paper's relation index of every head, per checkpoint, on the model's relation triplets.

RI = config["relation_index"]


rule relation_index:
    input:
        provenance_of("{step}"),
        relations=f"{RESULTS}/{{model}}/relations/sequences.parquet",
        triplets=f"{RESULTS}/{{model}}/relations/triplets.parquet",
    output:
        f"{RESULTS}/{{model}}/step{{step}}/relation_index.parquet",
    conda:
        "../envs/icl-dynamics.yaml"
    log:
        "logs/{model}/step{step}/relation_index.log",
    params:
        flags=lambda wc: checkpoint_flags(wc.model, wc.step),
        relations_dir=lambda wildcards, input: os.path.dirname(input.relations),
        options=" ".join(
            [
                f"--gates {' '.join(RI['gates'])} --variants {' '.join(RI['variants'])} --tau {RI['tau']}",
                f"--control-position {RI['control_position']} --alpha {RI['alpha']}",
                f"--min-clusters {RI['min_clusters']} --seed {RI['seed']} --batch-size {RI['batch_size']}",
                "" if RI["exclude_function_words"] else "--keep-function-words",
            ]
        ),
    resources:
        gpu=1,
    shell:
        cli(
            "relation-index {params.flags} --relations-dir {params.relations_dir} {params.options} --out {output}"
        ) + " 2> {log}"
