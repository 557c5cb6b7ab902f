# Stage 4: one model's figures (PNG and PDF side by side) in results/<model>/figures/.


rule figures:
    input:
        heads=f"{RESULTS}/{{model}}/heads.parquet",
        icl=f"{RESULTS}/{{model}}/icl.parquet",
        loss_curve=f"{RESULTS}/{{model}}/loss_curve.parquet",
        relation_index=f"{RESULTS}/{{model}}/relation_index.parquet",
        provenance=f"{RESULTS}/{{model}}/provenance.parquet",
        # the relations toy zoo's training curve: its planted-relation control figure
        training=(f"{config['toy_zoo']['dir']}/training.parquet" if config["schedule"] == "toy-relations" else []),
    output:
        report(
            directory(f"{RESULTS}/{{model}}/figures"),
            patterns=["{name}.png"],
            caption="../report/model_figures.rst",
            category="Per model",
            subcategory="{model}",
        ),
    log:
        "logs/{model}/figures.log",
    conda:
        "../envs/icl-dynamics.yaml"
    params:
        steps=(
            "--heatmap-steps " + " ".join(map(str, config["figures"]["heatmap_steps"]))
            if config["figures"]["heatmap_steps"]
            else ""
        ),
        top_k=config["figures"]["top_k"],
        training=lambda wildcards, input: f"--training-curve {shlex.quote(input.training)}" if input.training else "",
    shell:
        "icl-dynamics figures --heads {input.heads:q} --icl {input.icl:q} --loss-curve {input.loss_curve:q} "
        "--relation-index {input.relation_index:q} --provenance {input.provenance:q} "
        "{params.steps} --top-k {params.top_k} {params.training} --out-dir {output:q} > {log:q} 2>&1"
